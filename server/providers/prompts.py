"""What the model providers tell a model besides the conversation: the instructions of a turn, a
summary, a title and a compaction, and the conversation as plain text for the last three."""

from __future__ import annotations

import json
from collections.abc import Sequence

from server.core.ports import ConversationItem, ModelText, ToolCallItem, UserText
from server.providers.files import file_label

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant in a realtime chat. Answer clearly and concisely. "
    "When a question needs current weather, call the get_weather tool instead of guessing."
)
SUMMARY_PROMPT = (
    "Summarise the conversation below in two or three sentences for someone who did not read it: "
    "what the user wanted, what was answered, and any tools used. Reply with the summary only."
)
COMPACTION_PROMPT = (
    "You keep a running summary of a long conversation so that it can continue without its full "
    "text. Below are the summary so far (if any) and the turns that follow it. Write the updated "
    "summary: the user's goals, facts and decisions, names and numbers that matter, tool results "
    "still relevant, and open questions, in at most 400 words. Reply with the summary only."
)
TITLE_PROMPT = (
    "Give the conversation below a short title (at most eight words) that names its subject, in the "
    "language of the conversation. Reply with the title only: no quotes, no trailing punctuation."
)
# A tool result longer than this is cut in a transcript: a summary needs its gist, not all of it.
RESULT_CHARS = 2000


def compaction_input(summary: str | None, conversation: Sequence[ConversationItem]) -> list[ConversationItem]:
    """What a compaction request reads: the summary so far, then the turns it does not cover."""
    return [UserText(f"Summary so far: {summary}"), *conversation] if summary else list(conversation)


def transcript(conversation: Sequence[ConversationItem]) -> str:
    """The conversation as plain text, for a summary, a title or a compaction."""
    lines: list[str] = []
    for item in conversation:
        if isinstance(item, UserText):
            files = "".join(f" [file {file_label(file)}]" for file in item.files)
            lines.append(f"User: {item.text}{files}")
        elif isinstance(item, ModelText):
            lines.append(f"Assistant: {item.text}")
        elif isinstance(item, ToolCallItem):
            lines.append(f"Tool call {item.name}({json.dumps(item.args, ensure_ascii=False)})")
        else:
            outcome = item.error.model_dump() if item.error is not None else item.result
            lines.append(f"Tool result {item.name}: {json.dumps(outcome, ensure_ascii=False)[:RESULT_CHARS]}")
    return "\n".join(lines)
