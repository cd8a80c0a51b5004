"""A session's title, generated once after its first answer that ends with `stop`."""

from __future__ import annotations

import asyncio
import logging
import re

from server.core.errors import TurnErrorCode
from server.core.models import FinishReason, SessionUpdatedEvent, iso
from server.core.ports import Emitter, JobClaims, Metrics, ModelProvider, ProviderError, Repository, failure_reason
from server.core.recent import Recent
from server.core.replay import conversation_from_events
from server.core.tasks import TaskTracker

log = logging.getLogger(__name__)

TITLE_MAX_CHARS = 80
TITLE_EVENTS = 20  # the first events of the session are what a title is made of
CLAIM_SECONDS = 120.0  # should the process making a title die, another may try after this
KNOWN_TITLED = 10_000  # sessions known to have a title, not asked of storage again
_UNWANTED = re.compile(r"[\x00-\x1f\x7f]")


def clean_title(text: str) -> str:
    """One line of at most TITLE_MAX_CHARS, without the quotes or Markdown a model may wrap it in."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = " ".join(_UNWANTED.sub(" ", line).split()).strip("#*_`\"' ").removeprefix("Title:").strip()
    if len(line) > TITLE_MAX_CHARS:
        line = line[: TITLE_MAX_CHARS - 1].rstrip() + "…"
    return line


class TitleWriter:
    """Asks the provider for a title in the background; no turn waits for it. A title a person set
    is never replaced (storage writes a generated one only where there is none), and one process
    at a time makes a session's title (a claim in the shared state)."""

    def __init__(
        self,
        repo: Repository,
        provider: ModelProvider,
        claims: JobClaims,
        emitter: Emitter,
        tasks: TaskTracker,
        metrics: Metrics,
        *,
        enabled: bool,
    ) -> None:
        self._repo = repo
        self._provider = provider
        self._claims = claims
        self._emitter = emitter
        self._tasks = tasks
        self._metrics = metrics
        self._enabled = enabled
        self._titled: Recent[str, None] = Recent(KNOWN_TITLED)
        self._pending: dict[str, asyncio.Task[None]] = {}

    def turn_finished(self, session_id: str, finish_reason: FinishReason) -> None:
        if not self._enabled or finish_reason != "stop" or session_id in self._titled or session_id in self._pending:
            return
        task = self._tasks.spawn(self._make(session_id), name=f"title {session_id}")
        self._pending[session_id] = task
        task.add_done_callback(lambda done: self._forget(session_id, done))

    def _forget(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(session_id) is task:
            del self._pending[session_id]

    def session_titled(self, session_id: str) -> None:
        """The session has a title (a person's, or one made elsewhere): none is made here."""
        self._titled.remember(session_id, None)

    def session_deleted(self, session_id: str) -> None:
        task = self._pending.pop(session_id, None)
        if task is not None:
            task.cancel()
        self.session_titled(session_id)  # never titled again

    async def _make(self, session_id: str) -> None:
        try:
            session = await self._repo.get_session(session_id)
            if session is None or session.deleted or session.title is not None:
                self.session_titled(session_id)
                return
            if not await self._claims.claim_job("title", session_id, CLAIM_SECONDS):
                return  # another process is making it
        except Exception as exc:
            log.warning("cannot make session %s's title now (%s); tried after its next answer", session_id, exc)
            return
        try:
            await self._generate(session_id, session.user_id)
        finally:
            await asyncio.shield(self._release(session_id))

    async def _generate(self, session_id: str, user_id: str | None) -> None:
        try:
            title = await self._ask(session_id)
            stored = await self._repo.set_generated_title(session_id, title)
        except Exception as exc:
            self._metrics.title_made(ok=False)
            reason = failure_reason(exc)
            log.warning("title of session %s failed (%s); tried again after its next answer", session_id, reason)
            return
        self.session_titled(session_id)
        if stored is None:
            return  # a person named it meanwhile, or it was deleted
        self._metrics.title_made(ok=True)
        updated_at = iso(stored.updated_at) if stored.updated_at is not None else None
        await self._emitter.announce(
            session_id, user_id, SessionUpdatedEvent(session_id=session_id, title=stored.title, updated_at=updated_at)
        )

    async def _ask(self, session_id: str) -> str:
        page = await self._repo.page_events(session_id, after=0, limit=TITLE_EVENTS)
        try:
            title = clean_title(await self._provider.title(conversation_from_events(page.events)))
            if not title:
                raise ProviderError(TurnErrorCode.PROVIDER_ERROR, "the model gave an empty title")
        except Exception:
            self._metrics.provider_request("error")
            raise
        self._metrics.provider_request("ok")
        return title

    async def _release(self, session_id: str) -> None:
        try:
            await self._claims.release_job("title", session_id)
        except Exception as exc:  # it expires by itself
            log.debug("cannot release the title claim of %s: %r", session_id, exc)
