"""A deterministic script standing in for a model when no API key is set. Not an LLM, and it says so."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Sequence

from server.core.models import AttachmentRef, JSONValue, Usage
from server.core.ports import (
    ConversationItem,
    Finished,
    ModelEvent,
    ModelInfo,
    ModelRequest,
    ModelText,
    TextDelta,
    ToolCallItem,
    ToolCallRequest,
    ToolResultItem,
    UsageReport,
    UserText,
)
from server.providers.files import file_label

LABEL = "[offline scripted model, not an LLM]"
_WEATHER = re.compile(r"\bweather\b.*?\b(?:in|at|for)\s+(?P<place>[^?!.,;:\n]+)", re.IGNORECASE | re.DOTALL)
_TRAILING_FILLER = re.compile(r"\s+(?:today|tonight|tomorrow|right now|now|please)\s*$", re.IGNORECASE)
_WORD = re.compile(r"\S+\s*")
# "use demo__add with {"a": 2, "b": 3}": a call of any tool the service offers (an MCP server's).
_USE_TOOL = re.compile(r"\buse\s+(?P<name>[A-Za-z_][A-Za-z0-9_-]*)\s+with\s+(?P<args>\{.*\})", re.DOTALL)


def words(text: str) -> list[str]:
    """The pieces the script streams an answer in: a word with the spaces after it."""
    return _WORD.findall(text)


def weather_place(text: str) -> str | None:
    """The place a message asks the weather for ("How's the weather in Delhi?" -> "Delhi")."""
    match = _WEATHER.search(text)
    if not match:
        return None
    place = _TRAILING_FILLER.sub("", match.group("place").strip()).strip()
    return place or None


TITLE_WORDS = 6  # a title is the first message's first words
DIGEST_CHARS = 60  # of each message, in a compaction's digest
DIGEST_LIMIT = 4000  # the digest's newest characters are kept


def _excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _weather_answer(place: str, result: ToolResultItem) -> str:
    if result.error is not None:
        return (
            f"{LABEL} The get_weather tool could not answer for {place}: {result.error.message}. "
            "This deterministic script has nothing more to say about the weather, but the conversation can go on."
        )
    r = result.result if isinstance(result.result, dict) else {}
    where = ", ".join(str(p) for p in (r.get("location"), r.get("country")) if p)
    return (
        f"{LABEL} The get_weather tool reports {r.get('conditions', 'unknown conditions')} in {where or place}: "
        f"{r.get('temperature_c')} °C, humidity {r.get('humidity_percent')}%, wind {r.get('wind_speed_kmh')} km/h "
        f"(observed {r.get('observed_at')}). "
        "This answer was put together by a deterministic script from the tool's result."
    )


def named_tool_call(text: str, offered: set[str]) -> tuple[str, dict[str, JSONValue]] | None:
    """The tool and arguments a message names (`use <tool> with {json}`), when that tool is offered."""
    match = _USE_TOOL.search(text)
    if not match or match.group("name") not in offered:
        return None
    try:
        args = json.loads(match.group("args"))
    except json.JSONDecodeError:
        return None
    return (match.group("name"), args) if isinstance(args, dict) else None


def _tool_answer(result: ToolResultItem) -> str:
    if result.error is not None:
        return (
            f"{LABEL} The {result.name} tool failed: {result.error.message} ({result.error.code}). "
            "This deterministic script only reports what the tool said."
        )
    shown = result.result if isinstance(result.result, str) else json.dumps(result.result, ensure_ascii=False)
    return (
        f"{LABEL} The {result.name} tool answered: {_excerpt(shown, 400)} "
        "This deterministic script only reports what the tool returned."
    )


def echo_answer(question: str) -> str:
    """The script's answer to a message that asks for no tool."""
    count = len(question.split())
    return (
        f'{LABEL} You wrote {count} word{"" if count == 1 else "s"}: "{_excerpt(question)}". '
        "This reply comes from a deterministic script for trying the service without a model; "
        "set GEMINI_API_KEY to talk to Gemini."
    )


def files_named(files: Sequence[AttachmentRef]) -> str:
    """What the script says of the files it got with the message: each one's name, type and size."""
    if not files:
        return ""
    named = "; ".join(file_label(file) for file in files)
    return f" It got {len(files)} file{'' if len(files) == 1 else 's'} with it: {named}."


class OfflineProvider:
    name = "offline"
    max_request_file_bytes: int | None = None
    takes_files = False  # its answer names the files: their bytes are never read

    info = ModelInfo(provider="offline", operation="chat", model="offline")

    def __init__(self, chunk_delay_ms: float = 40) -> None:
        self._delay = chunk_delay_ms / 1000
        self._prompt_words = PromptWords()

    def not_ready_reason(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        conversation = request.conversation
        # The question is the last user message; tool results after it belong to this turn.
        question = ""
        files: tuple[AttachmentRef, ...] = ()
        results: list[ToolResultItem] = []
        for item in reversed(conversation):
            if isinstance(item, UserText):
                question, files = item.text, item.files
                break
            if isinstance(item, ToolResultItem):
                results.insert(0, item)
        offered = {tool.name for tool in request.tools}
        named = named_tool_call(question, offered)
        place = weather_place(question) if named is None and "get_weather" in offered else None
        prompt_words = self._prompt_words.count(conversation)

        call = named or (("get_weather", {"location": place}) if place else None)
        if call is not None and not results:
            # Unique per call, as a model's call ids are: stored tool events are keyed by them.
            call_id = f"offline-{uuid.uuid4().hex[:12]}"
            yield ToolCallRequest(call_id=call_id, name=call[0], args=call[1])
            yield UsageReport(Usage(input_tokens=prompt_words, output_tokens=1))
            yield Finished("stop")
            return

        if named and results:
            answer = _tool_answer(results[-1])
        elif place and results:
            answer = _weather_answer(place, results[-1])
        else:
            answer = echo_answer(question) + files_named(files)
        pieces = words(answer)
        loop = asyncio.get_running_loop()
        due = loop.time()
        for word in pieces:
            if self._delay:
                # Timed from when the last word was due, not from when it went out: a model's
                # stream does not slow down when the server is busy, so a late word shortens the next pause.
                due += self._delay
                await asyncio.sleep(max(0.0, due - loop.time()))
            else:
                await asyncio.sleep(0)  # still a stream: let other sessions run between words
            yield TextDelta(word)
        # Word counts, labelled as tokens: the offline script has no tokenizer.
        yield UsageReport(Usage(input_tokens=prompt_words, output_tokens=len(pieces)))
        yield Finished("stop")

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str:
        questions = [item.text for item in conversation if isinstance(item, UserText)]
        answers = [item for item in conversation if isinstance(item, ModelText)]
        tools = Counter(item.name for item in conversation if isinstance(item, ToolCallItem))
        parts = [f"Offline summary (scripted, not an LLM): {len(questions)} user messages and {len(answers)} answers."]
        if tools:
            parts.append("Tools used: " + ", ".join(f"{name} ×{n}" for name, n in sorted(tools.items())) + ".")
        if questions:
            parts.append(f'First message: "{_excerpt(questions[0])}".')
        if len(questions) > 1:
            parts.append(f'Last message: "{_excerpt(questions[-1])}".')
        return " ".join(parts)

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        questions = [item.text for item in conversation if isinstance(item, UserText)]
        words = " ".join(questions[:1]).split()[:TITLE_WORDS]
        return " ".join(words) or "Untitled conversation"

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        """A deterministic digest: the summary so far, then each message's first words."""
        lines = [summary] if summary else ["Offline digest of the earlier conversation (scripted, not an LLM):"]
        for item in conversation:
            if isinstance(item, UserText | ModelText):
                who = "User" if isinstance(item, UserText) else "Assistant"
                lines.append(f"{who}: {_excerpt(item.text, DIGEST_CHARS)}")
        return "\n".join(lines)[-DIGEST_LIMIT:]


def _text_of(item: ConversationItem) -> str:
    return item.text if isinstance(item, UserText | ModelText) else ""


class PromptWords:
    """The words of a conversation, counted in O(new items) per turn.

    A turn's conversation is the session's earlier items, the same objects as the last turn's
    (server/core/history.py builds them once), and a few new ones. So each counted item keeps the
    total up to it, and a count walks back only to the first item it knows at the same position
    (an answer inserted before counted items moves them, and their totals no longer hold). Keyed by
    identity (equal texts in two sessions are different items) and bounded, oldest first."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._upto: OrderedDict[int, tuple[ConversationItem, int, int]] = OrderedDict()

    def count(self, conversation: Sequence[ConversationItem]) -> int:
        start, total = 0, 0
        for position in range(len(conversation) - 1, -1, -1):
            item = conversation[position]
            known = self._upto.get(id(item))
            if known is not None and known[0] is item and known[1] == position:
                start, total = position + 1, known[2]
                self._upto.move_to_end(id(item))
                break
        for position, item in enumerate(conversation[start:], start):
            total += len(_text_of(item).split())
            self._upto[id(item)] = (item, position, total)
        while len(self._upto) > self._limit:
            self._upto.popitem(last=False)
        return total
