"""Coordination for one process: plain dictionaries, no network (Redis: coordination/redis.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from datetime import datetime

from server.core.models import ActiveTurn
from server.core.ports import Approval, CancelHandler, DecisionHandler, LostHandler, OrphanHandler, RunningTextHandler
from server.core.recent import Recent

# Calls whose decision (None: still waiting) this process remembers.
APPROVALS_KEPT = 10_000

# The longest a turn asked for waits for an ending turn's release (it takes one await, or one Redis
# round trip): past it, `busy`.
ENDING_WAIT_SECONDS = 2.0


class LocalCoordination:
    def __init__(self) -> None:
        self._turns: dict[str, str] = {}
        self._ending: dict[str, asyncio.Event] = {}  # turns publishing their `done`, set when released
        self._members: defaultdict[str, set[str]] = defaultdict(set)
        self._cancel_handlers: list[CancelHandler] = []
        self._jobs: set[tuple[str, str]] = set()  # (job, session) running (one process: no expiry needed)
        # (session, call) -> (its turn, its decision or None while it waits)
        self._approvals: Recent[tuple[str, str], tuple[str, Approval | None]] = Recent(APPROVALS_KEPT)
        self._decision_handlers: list[DecisionHandler] = []

    async def acquire_turn(self, session_id: str, turn_id: str) -> bool:
        ending = self._ending.get(session_id)
        if session_id in self._turns and ending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ending.wait(), ENDING_WAIT_SECONDS)
        if session_id in self._turns:
            return False
        self._turns[session_id] = turn_id
        return True

    async def turn_ending(self, session_id: str, turn_id: str) -> bool:
        if self._turns.get(session_id) == turn_id:
            self._ending[session_id] = asyncio.Event()
        return True

    async def release_turn(self, session_id: str, turn_id: str) -> None:
        if self._turns.get(session_id) == turn_id:
            del self._turns[session_id]
            ending = self._ending.pop(session_id, None)
            if ending is not None:
                ending.set()

    async def running_turn(self, session_id: str) -> str | None:
        return self._turns.get(session_id)

    async def alone(self) -> bool:
        return True

    single_process = True

    async def turn_snapshot(self, session_id: str) -> ActiveTurn | None:
        return None

    async def request_cancel(self, session_id: str, turn_id: str) -> None:
        for handler in self._cancel_handlers:
            await handler(session_id, turn_id)

    def on_cancel(self, handler: CancelHandler) -> None:
        self._cancel_handlers.append(handler)

    def on_running_text(self, handler: RunningTextHandler) -> None:
        return None  # one process: the core reads its own running turns directly

    def on_turn_lost(self, handler: LostHandler) -> None:
        return None  # a lock in this process's memory does not expire

    def on_turn_orphaned(self, handler: OrphanHandler) -> None:
        # One process: its turns cut off by a crash are found in storage at its next start.
        return None

    async def add_member(self, session_id: str, member: str) -> int | None:
        members = self._members[session_id]
        if member in members:
            return None
        members.add(member)
        return len(members)

    async def remove_member(self, session_id: str, member: str) -> int | None:
        members = self._members.get(session_id)
        if members is None or member not in members:
            return None
        members.discard(member)
        if not members:
            del self._members[session_id]
            return 0
        return len(members)

    async def member_count(self, session_id: str) -> int:
        return len(self._members.get(session_id, ()))

    async def claim_summary(self, session_id: str, emptied_at: datetime) -> bool:
        # One process: the summary scheduler already runs one job per emptying.
        return True

    async def claim_job(self, job: str, session_id: str, seconds: float) -> bool:
        if (job, session_id) in self._jobs:
            return False
        self._jobs.add((job, session_id))
        return True

    async def release_job(self, job: str, session_id: str) -> None:
        self._jobs.discard((job, session_id))

    async def open_approval(self, session_id: str, turn_id: str, call_id: str, seconds: float) -> None:
        self._approvals.remember((session_id, call_id), (turn_id, None))

    async def decide(self, session_id: str, call_id: str, approval: Approval) -> bool:
        record = self._approvals.get((session_id, call_id))
        if record is None or record[1] is not None or self._turns.get(session_id) != record[0]:
            return False
        turn_id = record[0]
        self._approvals[(session_id, call_id)] = (turn_id, approval)  # claimed before any await: one wins
        for handler in self._decision_handlers:
            await handler(session_id, turn_id, call_id, approval)
        return True

    async def decision(self, session_id: str, turn_id: str, call_id: str) -> Approval | None:
        record = self._approvals.get((session_id, call_id))
        return record[1] if record is not None and record[0] == turn_id else None

    def on_decision(self, handler: DecisionHandler) -> None:
        self._decision_handlers.append(handler)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._cancel_handlers.clear()
        self._decision_handlers.clear()
