"""What a turn sends its model: the newest whole turns that fit `CONTEXT_MAX_TOKENS`, after the
stored summary of everything before them (docs/protocol.md, Long conversations).

Tokens are estimated at 4 characters each (a tool call's or result's JSON included, and a text
file's bytes), an image at 1,000 and a PDF at 1,000 a page (its pages estimated from its size), all
scaled by how the provider's own count of this session's last request compared with the estimate. A turn
is the unit: a tool call never goes without its result, and the newest message always goes whole.
The work is O(what is sent), never O(the session): history is walked from its newest end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from server.core.event_store import HistoryEvent
from server.core.file_types import TEXT_TYPES
from server.core.models import AttachmentRef, EventDraft, EventType
from server.core.ports import ConversationItem, FileWithheld, ModelText, ToolCallItem, ToolResultItem, UserText
from server.core.recent import Recent
from server.core.replay import conversation_from_events

CHARS_PER_TOKEN = 4
SUMMARY_INTRO = "Summary of the earlier part of this conversation (for context; the newest turns follow verbatim):\n"
CALIBRATED_SESSIONS = 10_000
# How far the provider's count may move the estimate: a request's count includes the tool
# declarations and the system instruction, which the budget does not.
MIN_RATIO, MAX_RATIO = 0.5, 4.0
# A file the model sees as a picture or as pages: what Gemini and OpenAI charge is below this for
# common sizes, and the provider's count corrects the rest through the ratio.
TOKENS_PER_IMAGE_OR_PAGE = 1_000
PDF_BYTES_PER_PAGE = 50_000


def file_tokens(file: AttachmentRef) -> int:
    if file.mime_type in TEXT_TYPES:
        return file.size // CHARS_PER_TOKEN + 1
    if file.mime_type == "application/pdf":
        return TOKENS_PER_IMAGE_OR_PAGE * max(1, -(-file.size // PDF_BYTES_PER_PAGE))  # pages begun
    return TOKENS_PER_IMAGE_OR_PAGE


def item_tokens(item: ConversationItem) -> int:
    if isinstance(item, UserText):
        return len(item.text) // CHARS_PER_TOKEN + 1 + sum(file_tokens(file) for file in item.files)
    if isinstance(item, ModelText):
        size = len(item.text)
    elif isinstance(item, ToolCallItem):
        size = len(item.name) + len(json.dumps(item.args, ensure_ascii=False))
    elif isinstance(item, ToolResultItem):
        outcome = item.error.model_dump() if item.error is not None else item.result
        size = len(item.name) + len(json.dumps(outcome, ensure_ascii=False))
    return size // CHARS_PER_TOKEN + 1


def tokens_of(items: Iterable[ConversationItem]) -> int:
    return sum(item_tokens(item) for item in items)


def newest_turns(
    events: Sequence[HistoryEvent], after: int, *, until: int | None = None
) -> Iterable[list[HistoryEvent]]:
    """The whole turns of `events[:until]` stored after event `after`, newest first, each in order.
    A turn begins at a user message; walked from the end, so a caller that stops early pays only
    for what it took."""
    turn: list[HistoryEvent] = []
    for position in range(len(events) if until is None else until, 0, -1):
        event = events[position - 1]
        event_id = getattr(event, "event_id", None)  # a draft waiting in the outbox has none: it is newer
        if event_id is not None and event_id <= after:
            break
        turn.append(event)
        if event.event_type is EventType.USER_MESSAGE:
            turn.reverse()
            yield turn
            turn = []
    if turn:  # events before the first user message after `after` (rows written by others)
        turn.reverse()
        yield turn


def newest_that_fit(
    events: Sequence[HistoryEvent], after: int, room: int, *, until: int | None = None, ratio: float = 1.0
) -> tuple[list[list[ConversationItem]], list[int], bool]:
    """The newest whole turns after event `after` whose tokens fit `room`, oldest first, with their
    (scaled) tokens; and whether an older turn did not fit (it was left out)."""
    kept: list[list[ConversationItem]] = []
    kept_tokens: list[int] = []
    left_out = False
    for turn in newest_turns(events, after, until=until):
        items = conversation_from_events(turn)
        tokens = int(tokens_of(items) * ratio)
        if tokens > room:
            left_out = True
            break
        kept.append(items)
        kept_tokens.append(tokens)
        room -= tokens
    kept.reverse()
    kept_tokens.reverse()
    return kept, kept_tokens, left_out


@dataclass
class ContextWindow:
    """One turn's conversation for its model: summary, kept turns (oldest first), this turn's items."""

    budget: int
    ratio: float
    summary: list[ConversationItem]
    kept: list[list[ConversationItem]]
    current: list[ConversationItem]
    dropped: int = 0  # at least this many earlier turns neither summarised nor sent (compaction behind)
    _kept_tokens: list[int] = field(default_factory=list)

    def conversation(self) -> list[ConversationItem]:
        """The request's conversation, within the budget: the oldest kept turns go first when this
        turn's own items (its tool rounds) grow."""
        own = self._scaled(tokens_of(self.summary) + tokens_of(self.current))
        while self.kept and own + sum(self._kept_tokens) > self.budget:
            self.kept.pop(0)
            self._kept_tokens.pop(0)
            self.dropped += 1
        if self.summary and own > self.budget:  # this turn's own items need the room: they come first
            self.summary = []
        return [*self.summary, *(item for turn in self.kept for item in turn), *self.current]

    def estimate(self) -> int:
        """The estimated tokens of what `conversation()` gives now, unscaled (for calibration)."""
        return tokens_of(self.summary) + sum(tokens_of(turn) for turn in self.kept) + tokens_of(self.current)

    def _scaled(self, tokens: int) -> int:
        return int(tokens * self.ratio)


class ContextBudget:
    """The budget, and each session's calibration: the provider's count of its last request over
    this module's estimate of it."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._ratios: Recent[str, float] = Recent(CALIBRATED_SESSIONS)

    def window(
        self,
        session_id: str,
        events: Sequence[HistoryEvent],
        question: EventDraft,
        *,
        summary: str | None,
        upto: int,
    ) -> ContextWindow:
        ratio = self._ratios.get(session_id, 1.0)
        until = len(events)
        if until and events[-1].event_key == question.event_key:
            until -= 1  # read while the question was written: it may or may not be in there
        # A summary takes at most a quarter of the budget (its newest part, should it be longer).
        room_for_summary = int(self.max_tokens / 4 / ratio) * CHARS_PER_TOKEN
        summary_items: list[ConversationItem] = (
            [UserText(SUMMARY_INTRO + summary[-room_for_summary:])] if summary else []
        )
        current: list[ConversationItem] = [UserText(question.content, files=question.attachments or ())]
        room = self.max_tokens - int((tokens_of(summary_items) + tokens_of(current)) * ratio)
        kept, kept_tokens, left_out = newest_that_fit(events, upto, room, until=until, ratio=ratio)
        return ContextWindow(self.max_tokens, ratio, summary_items, kept, current, int(left_out), kept_tokens)

    def observe(self, session_id: str, estimated: int, reported: int) -> None:
        """The provider counted `reported` input tokens for a request estimated at `estimated`."""
        if estimated <= 0 or reported <= 0:
            return
        self._ratios.remember(session_id, min(MAX_RATIO, max(MIN_RATIO, reported / estimated)))

    def too_long(self, text: str, files: Sequence[AttachmentRef] = ()) -> bool:
        """A message (its text and files) that alone passes the budget can never be sent."""
        return item_tokens(UserText(text, files=tuple(files))) > self.max_tokens


def files_to_send(
    conversation: Sequence[ConversationItem], max_bytes: int | None
) -> tuple[list[AttachmentRef], dict[str, FileWithheld]]:
    """The files of the conversation's user messages to read and send, newest first while their
    bytes fit `max_bytes` (a request's limit); the older ones past it, to be named instead."""
    send: list[AttachmentRef] = []
    withheld: dict[str, FileWithheld] = {}
    room = max_bytes
    seen: set[str] = set()
    for item in reversed(conversation):
        if not isinstance(item, UserText):
            continue
        for file in item.files:
            if file.attachment_id in seen:
                continue
            seen.add(file.attachment_id)
            if room is not None and file.size > room:
                withheld[file.attachment_id] = FileWithheld("not sent again: past the size one request may carry")
                continue
            send.append(file)
            room = None if room is None else room - file.size
    return send, withheld
