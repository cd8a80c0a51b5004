"""Which tool calls wait for a person's approval, and what each decision makes of the call."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.core.errors import ToolErrorCode
from server.core.models import (
    ErrorInfo,
    JSONValue,
    PendingApproval,
    ToolApprovalRequestEvent,
    ToolApprovalResultEvent,
    iso,
    utc_now,
)
from server.core.ports import Approval, ApprovalOutcome, Emitter, Metrics, ToolApprovals, ToolCallItem, ToolResultItem

log = logging.getLogger(__name__)

TIMED_OUT = Approval(approved=False, reason="timed out", source="timeout")
CANCELLED = Approval(approved=False, reason="cancelled", source="cancel")
# The call's approval could not be asked (the shared state was away): it does not run.
UNASKED = Approval(approved=False, reason="approval could not be asked", source="unasked")
# A decision whose message to this process was lost is read from the shared state this often.
RECHECK_SECONDS = 5.0
# The longest the end of a turn waits to record its waiting calls as cancelled (shared state slow).
ABANDON_SECONDS = 2.0


@dataclass(frozen=True)
class ApprovalPolicy:
    """`patterns`: tool names or shell-style patterns (`files__*`, `*`) matched against the names
    the model is offered; a call to a matching tool waits up to `timeout_seconds` for a decision."""

    patterns: tuple[str, ...] = ()
    timeout_seconds: float = 300.0

    @classmethod
    def parse(cls, setting: str, timeout_seconds: float) -> ApprovalPolicy:
        """From `TOOL_APPROVAL`: comma-separated, blanks ignored."""
        return cls(tuple(p.strip() for p in setting.split(",") if p.strip()), timeout_seconds)

    def needs_approval(self, call: ToolCallItem) -> bool:
        # A call whose arguments cannot be read is answered at once: there is nothing to approve.
        if call.invalid_arguments is not None:
            return False
        return any(fnmatch.fnmatchcase(call.name, pattern) for pattern in self.patterns)


def refused_result(call: ToolCallItem, approval: Approval) -> ToolResultItem:
    """The result of a call that will not run: denied by a person, timed out, or cancelled."""
    if approval.source == "timeout":
        error = ErrorInfo(code=ToolErrorCode.APPROVAL_TIMEOUT, message="nobody approved this call in time")
    elif approval.source == "unasked":
        message = "this call needs a person's approval, which cannot be asked now; try again later"
        # It never waited: its result says why, and records no decision.
        return ToolResultItem(
            call_id=call.call_id, name=call.name, error=ErrorInfo(code=ToolErrorCode.TOOL_ERROR, message=message)
        )
    elif approval.source == "cancel":
        error = ErrorInfo(code=ToolErrorCode.CANCELLED, message="the turn was stopped")
    else:
        said = f": {approval.reason}" if approval.reason else ""
        error = ErrorInfo(code=ToolErrorCode.TOOL_DENIED, message=f"a person denied this call{said}")
    return ToolResultItem(call_id=call.call_id, name=call.name, error=error, approval=approval)


def approval_json(approval: Approval) -> dict[str, JSONValue]:
    """As stored with a call's result (and as clients see it)."""
    return {"approved": approval.approved, "reason": approval.reason}


def approval_wire(approval: Approval) -> dict[str, JSONValue]:
    """As the processes pass it to each other: who decided, too."""
    return {**approval_json(approval), "source": approval.source}


def approval_of(body: object) -> Approval | None:
    """An approval as `approval_json` or `approval_wire` wrote it; None for anything else."""
    if not isinstance(body, dict) or not isinstance(body.get("approved"), bool):
        return None
    reason, source = body.get("reason"), body.get("source", "person")
    if source not in ("person", "timeout", "cancel", "unasked"):
        return None
    return Approval(approved=body["approved"], reason=reason if isinstance(reason, str) else None, source=source)


@dataclass
class _Wait:
    pending: PendingApproval
    expires_at: datetime
    decided: asyncio.Future[Approval]
    asked: bool = False  # the room was told (a joining tab is shown the call from then on)


class TurnApprovals:
    """The tool calls of one turn that wait for a decision: asked of the room, decided once for the
    whole cluster (ToolApprovals), told to the room, or given up when the turn stops first."""

    def __init__(
        self,
        session_id: str,
        turn_id: str,
        policy: ApprovalPolicy,
        approvals: ToolApprovals,
        emitter: Emitter,
        metrics: Metrics,
    ) -> None:
        self._session_id = session_id
        self._turn_id = turn_id
        self._policy = policy
        self._approvals = approvals
        self._emitter = emitter
        self._metrics = metrics
        self._waiting: dict[str, _Wait] = {}
        self._decided: dict[str, Approval] = {}
        self._unasked: set[str] = set()  # calls whose approval could not be asked (shared state away)

    def pending(self) -> list[PendingApproval]:
        """The calls a joining tab is shown waiting: asked, and not decided yet."""
        return [wait.pending for wait in self._waiting.values() if wait.asked and not wait.decided.done()]

    async def open(self, call: ToolCallItem) -> datetime | None:
        """When the call's wait ends, once its decision is open on every process. None when it needs
        no approval, or when it cannot be asked (the shared state is away: it will not run)."""
        if not self._policy.needs_approval(call):
            return None
        try:
            await self._approvals.open_approval(
                self._session_id, self._turn_id, call.call_id, self._policy.timeout_seconds
            )
        except Exception as exc:
            log.warning("cannot ask for approval of %s: shared state unreachable (%s)", call.name, type(exc).__name__)
            self._unasked.add(call.call_id)
            return None
        expires_at = utc_now() + timedelta(seconds=self._policy.timeout_seconds)
        pending = PendingApproval(call_id=call.call_id, name=call.name, args=call.args, expires_at=iso(expires_at))
        self._waiting[call.call_id] = _Wait(pending, expires_at, asyncio.get_running_loop().create_future())
        return expires_at

    async def ask(self, call: ToolCallItem) -> None:
        """Tell the room the call waits (after its `tool_call`)."""
        wait = self._waiting.get(call.call_id)
        if wait is not None:
            wait.asked = True
            request = ToolApprovalRequestEvent(
                session_id=self._session_id, turn_id=self._turn_id, **wait.pending.model_dump()
            )
            await self._emitter.publish(self._session_id, request)

    def decided(self, turn_id: str, call_id: str, approval: Approval) -> None:
        """A call's decision, claimed on this process or another (ToolApprovals.on_decision)."""
        wait = self._waiting.get(call_id) if turn_id == self._turn_id else None
        if wait is not None and not wait.decided.done():
            wait.decided.set_result(approval)

    async def decision(self, call: ToolCallItem) -> Approval | None:
        """Wait for the call's decision until its deadline, and tell the room; None when the call
        needs none."""
        if call.call_id in self._unasked:
            return UNASKED
        wait = self._waiting.get(call.call_id)
        if wait is None:
            return None
        approval = await self._wait_for(call.call_id, wait)
        del self._waiting[call.call_id]
        self._decided[call.call_id] = approval
        self._metrics.tool_approval(_outcome(approval))
        await self._emitter.publish(self._session_id, self.told(call.call_id, approval))
        return approval

    def told(self, call_id: str, approval: Approval) -> ToolApprovalResultEvent:
        """What the room is told of the call's decision."""
        return ToolApprovalResultEvent(
            session_id=self._session_id,
            turn_id=self._turn_id,
            call_id=call_id,
            approved=approval.approved,
            reason=approval.reason,
        )

    async def _wait_for(self, call_id: str, wait: _Wait) -> Approval:
        while (remaining := (wait.expires_at - utc_now()).total_seconds()) > 0:
            try:
                # Shielded: a decision arriving as a slice of the wait ends still lands in the future.
                return await asyncio.wait_for(asyncio.shield(wait.decided), min(remaining, RECHECK_SECONDS))
            except TimeoutError:
                stored = await self._stored_decision(call_id)  # its message may have been lost
                if stored is not None:
                    return stored
        return await self._time_out(call_id)

    async def _stored_decision(self, call_id: str) -> Approval | None:
        try:
            return await self._approvals.decision(self._session_id, self._turn_id, call_id)
        except Exception:
            return None  # unreachable: read again at the next slice

    async def _time_out(self, call_id: str) -> Approval:
        """Claim the timeout, unless a person's decision won at the last moment (then it counts)."""
        try:
            if await self._approvals.decide(self._session_id, call_id, TIMED_OUT):
                return TIMED_OUT
        except Exception as exc:
            log.warning("approval of call %s timed out; shared state unreachable (%s)", call_id, type(exc).__name__)
            return TIMED_OUT
        return await self._stored_decision(call_id) or TIMED_OUT

    async def abandon(self, call_ids: list[str]) -> dict[str, Approval | None]:
        """The turn stopped: each call still waiting is decided `cancelled` (no one may decide it any
        more); a call decided already keeps its decision; a call that needed none, None."""
        waiting = [call_id for call_id in call_ids if self._waiting.pop(call_id, None) is not None]
        if waiting:
            # Unreachable or slow: the records expire with their deadline, and their turn has ended.
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(ABANDON_SECONDS):
                    await asyncio.gather(
                        *(self._approvals.decide(self._session_id, call_id, CANCELLED) for call_id in waiting),
                        return_exceptions=True,
                    )
        return {call_id: CANCELLED if call_id in waiting else self._decided.get(call_id) for call_id in call_ids}


def _outcome(approval: Approval) -> ApprovalOutcome:
    if approval.approved:
        return "approved"
    return "timeout" if approval.source == "timeout" else "denied"
