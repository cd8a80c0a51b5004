"""Turns cut off by the death of the process running them (killed, out of memory, the machine lost).

Such a turn still ends as every turn does: a `tool_result` `interrupted` for each of its
`tool_call`s left without one (so the conversation sent to a model is never malformed), its
`ai_message` (`error`, `interrupted`) holding the text streamed so far where it is known, then its
`tool_result`s and one `done` to the room. Who finds such turns is the caller's business: the
service at start for one process (the turns storage still has open), the coordination for a
process that stopped beating (Redis).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from server.core.errors import ToolErrorCode, TurnErrorCode
from server.core.models import (
    DoneEvent,
    ErrorInfo,
    EventDraft,
    EventType,
    StoredEvent,
    ToolResultEvent,
    utc_now,
)
from server.core.ports import Emitter, Metrics, Repository, ToolResultItem
from server.core.redelivery import answer_key, tool_result_key
from server.core.replay import tool_result_content
from server.core.writer import OrderedWriter

log = logging.getLogger(__name__)

INTERRUPTED = ErrorInfo(code=TurnErrorCode.INTERRUPTED, message="the server process running this turn stopped")
TOOL_INTERRUPTED = ErrorInfo(code=ToolErrorCode.INTERRUPTED, message="the server process running this turn stopped")


@dataclass(frozen=True)
class TurnEnder:
    """What ending a cut-off turn needs: its stored events, the session's ordered writes, the room."""

    repo: Repository
    writer: OrderedWriter
    emitter: Emitter
    metrics: Metrics

    async def end_interrupted(self, session_id: str, turn_id: str, text: str) -> bool:
        """Store and announce the end of the turn; False when there was nothing to end (its user
        message was never stored). Raises StorageUnavailable: try again later."""
        events = await self.repo.turn_events(session_id, turn_id)
        if not any(event.event_type is EventType.USER_MESSAGE for event in events):
            return False  # never started: its message was not acknowledged
        answer = next((event for event in events if event.event_type is EventType.AI_MESSAGE), None)
        if answer is not None:
            # Its process stored the answer, then died before sending `done`: sent from the row.
            await self.emitter.publish(session_id, done_from(answer))
            return True
        results = unanswered_calls(events)
        for result in results:
            await self.writer.append(self._draft(session_id, turn_id, EventType.TOOL_RESULT, result))
        draft = EventDraft(
            session_id=session_id,
            event_type=EventType.AI_MESSAGE,
            content=text,
            event_key=answer_key(turn_id),
            turn_id=turn_id,
            timestamp=utc_now(),
            finish_reason="error",
            error=INTERRUPTED,
        )
        stored = await self.writer.append(draft)
        for result in results:
            await self.emitter.publish(
                session_id,
                ToolResultEvent(
                    session_id=session_id,
                    turn_id=turn_id,
                    call_id=result.call_id,
                    name=result.name,
                    error=TOOL_INTERRUPTED,
                ),
            )
        await self.emitter.publish(
            session_id,
            DoneEvent(
                session_id=session_id,
                turn_id=turn_id,
                text=text,
                finish_reason="error",
                usage=None,
                event_id=stored.event_id if stored is not None else None,
                error=INTERRUPTED,
            ),
        )
        self.metrics.turn_interrupted()
        log.warning(
            "turn %s of session %s was cut off by the death of its process: ended as interrupted"
            " (%d chars of text kept, %d tool calls unanswered)",
            turn_id,
            session_id,
            len(text),
            len(results),
        )
        return True

    @staticmethod
    def _draft(session_id: str, turn_id: str, event_type: EventType, result: ToolResultItem) -> EventDraft:
        return EventDraft(
            session_id=session_id,
            event_type=event_type,
            content=tool_result_content(result),
            event_key=tool_result_key(turn_id, result.call_id),
            turn_id=turn_id,
            timestamp=utc_now(),
        )


def done_from(answer: StoredEvent) -> DoneEvent:
    """The `done` of a turn whose answer is stored."""
    return DoneEvent(
        session_id=answer.session_id,
        turn_id=answer.turn_id or "",
        text=answer.content,
        finish_reason=answer.finish_reason or "stop",
        usage=None,
        event_id=answer.event_id,
        error=answer.error,
    )


def unanswered_calls(events: list[StoredEvent]) -> list[ToolResultItem]:
    """An `interrupted` result for each of the turn's tool calls that has no result, in call order."""
    calls: dict[str, str] = {}
    for event in events:
        if event.event_type not in (EventType.TOOL_CALL, EventType.TOOL_RESULT):
            continue
        try:
            body = json.loads(event.content)
            call_id, name = str(body["call_id"]), str(body.get("name", ""))
        except (ValueError, TypeError, KeyError):
            continue  # not written by this service: nothing to answer
        if event.event_type is EventType.TOOL_CALL:
            calls[call_id] = name
        else:
            calls.pop(call_id, None)
    return [ToolResultItem(call_id=call_id, name=name, error=TOOL_INTERRUPTED) for call_id, name in calls.items()]
