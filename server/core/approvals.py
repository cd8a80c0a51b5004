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

TIMED_OUT = Approval(approved=False, reason="timed out")
CANCELLED = Approval(approved=False, reason="cancelled")
# The call's approval could not be asked (the shared state was away): it does not run.
UNASKED = Approval(approved=False, reason="approval could not be asked")


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
    if approval == TIMED_OUT:
        error = ErrorInfo(code=ToolErrorCode.APPROVAL_TIMEOUT, message="nobody approved this call in time")
    elif approval == UNASKED:
        message = "this call needs a person's approval, which cannot be asked now; try again later"
        return ToolResultItem(
            call_id=call.call_id, name=call.name, error=ErrorInfo(code=ToolErrorCode.TOOL_ERROR, message=message)
        )
    elif approval == CANCELLED:
        error = ErrorInfo(code=ToolErrorCode.CANCELLED, message="the turn was stopped")
    else:
        said = f": {approval.reason}" if approval.reason else ""
        error = ErrorInfo(code=ToolErrorCode.TOOL_DENIED, message=f"a person denied this call{said}")
    # A call that could not be asked never waited: its result says why, and records no decision.
    stored = None if approval == UNASKED else approval
    return ToolResultItem(call_id=call.call_id, name=call.name, error=error, approval=stored)


def approval_json(approval: Approval) -> dict[str, JSONValue]:
    return {"approved": approval.approved, "reason": approval.reason}


def approval_of(body: object) -> Approval | None:
    """An approval as `approval_json` wrote it; None for anything else."""
    if not isinstance(body, dict) or not isinstance(body.get("approved"), bool):
        return None
    reason = body.get("reason")
    return Approval(approved=body["approved"], reason=reason if isinstance(reason, str) else None)


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
        self._waiting: dict[str, tuple[PendingApproval, datetime, asyncio.Future[Approval]]] = {}
        self._decided: dict[str, Approval] = {}
        self._unasked: set[str] = set()  # calls whose approval could not be asked (shared state away)

    def pending(self) -> list[PendingApproval]:
        return [pending for pending, _, _ in self._waiting.values()]

    async def open(self, call: ToolCallItem) -> datetime | None:
        """When the call's wait ends, once its decision is open on every process. None when it needs
        no approval, or when it cannot be asked (the shared state is away: it will not run)."""
        if not self._policy.needs_approval(call):
            return None
        try:
            await self._approvals.open_approval(self._session_id, call.call_id, self._policy.timeout_seconds)
        except Exception as exc:
            log.warning("cannot ask for approval of %s: shared state unreachable (%s)", call.name, type(exc).__name__)
            self._unasked.add(call.call_id)
            return None
        expires_at = utc_now() + timedelta(seconds=self._policy.timeout_seconds)
        pending = PendingApproval(call_id=call.call_id, name=call.name, args=call.args, expires_at=iso(expires_at))
        self._waiting[call.call_id] = (pending, expires_at, asyncio.get_running_loop().create_future())
        return expires_at

    async def ask(self, call: ToolCallItem) -> None:
        """Tell the room the call waits (after its `tool_call`)."""
        waiting = self._waiting.get(call.call_id)
        if waiting is not None:
            request = ToolApprovalRequestEvent(
                session_id=self._session_id, turn_id=self._turn_id, **waiting[0].model_dump()
            )
            await self._emitter.publish(self._session_id, request)

    def decided(self, call_id: str, approval: Approval) -> None:
        """The call's decision, claimed on this process or another (ToolApprovals.on_decision)."""
        waiting = self._waiting.get(call_id)
        if waiting is not None and not waiting[2].done():
            waiting[2].set_result(approval)

    async def decision(self, call: ToolCallItem) -> Approval | None:
        """Wait for the call's decision until its deadline, and tell the room; None when the call
        needs none."""
        if call.call_id in self._unasked:
            return UNASKED
        waiting = self._waiting.get(call.call_id)
        if waiting is None:
            return None
        _, expires_at, future = waiting
        try:
            # Shielded: a decision arriving as the wait ends still lands in the future.
            approval = await asyncio.wait_for(asyncio.shield(future), (expires_at - utc_now()).total_seconds())
        except TimeoutError:
            approval = await self._time_out(call.call_id)
        del self._waiting[call.call_id]
        self._decided[call.call_id] = approval
        self._metrics.tool_approval(
            "approved" if approval.approved else "timeout" if approval == TIMED_OUT else "denied"
        )
        await self._emitter.publish(
            self._session_id,
            ToolApprovalResultEvent(
                session_id=self._session_id,
                turn_id=self._turn_id,
                call_id=call.call_id,
                approved=approval.approved,
                reason=approval.reason,
            ),
        )
        return approval

    async def _time_out(self, call_id: str) -> Approval:
        """Claim the timeout, unless a person's decision won at the last moment (then it counts)."""
        try:
            if await self._approvals.decide(self._session_id, call_id, TIMED_OUT):
                return TIMED_OUT
            return await self._approvals.decision(self._session_id, call_id) or TIMED_OUT
        except Exception as exc:
            log.warning("approval of call %s timed out; shared state unreachable (%s)", call_id, type(exc).__name__)
            return TIMED_OUT

    async def abandon(self, call_id: str) -> Approval | None:
        """The turn stopped: a call still waiting is decided `cancelled` (no one may decide it any
        more); the decision of one decided already; None for a call that needed none."""
        if call_id in self._decided:
            return self._decided[call_id]
        if self._waiting.pop(call_id, None) is None:
            return None
        with contextlib.suppress(Exception):  # unreachable: the record expires with its deadline
            await self._approvals.decide(self._session_id, call_id, CANCELLED)
        return CANCELLED


def _outcome(approval: Approval) -> ApprovalOutcome:
    if approval.approved:
        return "approved"
    return "timeout" if approval == TIMED_OUT else "denied"
