"""A user's sessions as a frontend manages them: listed in pages, read, renamed, deleted, and their
events read a page at a time (docs/protocol.md, Conversations). Every answer costs one page."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from server.core.conversation import ConversationService, parse_session_id
from server.core.errors import ErrorCode, ServiceError, session_deleted, storage_unavailable
from server.core.models import Session, SessionDeletedEvent, SessionUpdatedEvent, iso
from server.core.ports import Emitter, EventPage, Repository, SessionCursor, StorageUnavailable

log = logging.getLogger(__name__)

MAX_SESSIONS_PAGE = 100
MAX_EVENTS_PAGE = 1000
MAX_TITLE_CHARS = 200
MAX_USER_ID_CHARS = 256  # as a `join`'s user_id
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class SessionPage:
    sessions: list[Session]
    next_cursor: str | None


def encode_cursor(session: Session) -> str:
    """Opaque to clients: where the next page starts (the last session's sort key)."""
    assert session.updated_at is not None
    raw = json.dumps([iso(session.updated_at), session.session_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> SessionCursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        updated_at, session_id = json.loads(raw)
        moment = datetime.fromisoformat(updated_at)
        if moment.tzinfo is None:
            raise ValueError("a cursor's time has a zone")
        return SessionCursor(updated_at=moment.astimezone(UTC), session_id=parse_session_id(session_id))
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error, ServiceError):
        raise _invalid("cursor is not one this service gave") from None


def checked_user_id(user_id: str) -> str:
    if not 1 <= len(user_id) <= MAX_USER_ID_CHARS or "\x00" in user_id or not _encodable(user_id):
        raise _invalid(f"user_id must be 1 to {MAX_USER_ID_CHARS} characters of text, without NUL")
    return user_id


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates cannot be stored
    except UnicodeEncodeError:
        return False
    return True


def checked_title(title: str) -> str:
    trimmed = title.strip()
    if not 1 <= len(trimmed) <= MAX_TITLE_CHARS:
        raise _invalid(f"title must be 1 to {MAX_TITLE_CHARS} characters once trimmed")
    if _CONTROL.search(trimmed) or not _encodable(trimmed):
        raise _invalid("title must be text without control characters")
    return trimmed


def _invalid(message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_PAYLOAD, message)


class SessionCatalog:
    """`caller`: the authenticated user (None when authentication is off: whoever knows a session's
    id may read, rename or delete it, as whoever knows it may join it)."""

    def __init__(self, repo: Repository, emitter: Emitter, service: ConversationService) -> None:
        self._repo = repo
        self._emitter = emitter
        self._service = service

    async def list(self, user_id: str, limit: int, cursor: str | None) -> SessionPage:
        if not 1 <= limit <= MAX_SESSIONS_PAGE:
            raise _invalid(f"limit must be 1 to {MAX_SESSIONS_PAGE}")
        user_id = checked_user_id(user_id)
        after = decode_cursor(cursor) if cursor is not None else None
        try:
            sessions = await self._repo.list_sessions(user_id, limit + 1, after)
        except StorageUnavailable:
            raise storage_unavailable() from None
        page, more = sessions[:limit], len(sessions) > limit
        return SessionPage(page, encode_cursor(page[-1]) if more else None)

    async def get(self, session_id: str, caller: str | None) -> Session:
        session_id = parse_session_id(session_id)
        try:
            session = await self._repo.get_session(session_id)
        except StorageUnavailable:
            raise storage_unavailable() from None
        return _owned(session, caller)

    async def events(
        self, session_id: str, caller: str | None, *, after: int | None, before: int | None, limit: int
    ) -> EventPage:
        if after is not None and before is not None:
            raise _invalid("give after_event_id or before_event_id, not both")
        if not 1 <= limit <= MAX_EVENTS_PAGE:
            raise _invalid(f"limit must be 1 to {MAX_EVENTS_PAGE}")
        session = await self.get(session_id, caller)
        try:
            return await self._repo.page_events(session.session_id, after=after, before=before, limit=limit)
        except StorageUnavailable:
            raise storage_unavailable() from None

    async def rename(self, session_id: str, caller: str | None, title: str) -> Session:
        title = checked_title(title)
        session = await self.get(session_id, caller)
        try:
            renamed = await self._repo.rename_session(session.session_id, title)
        except StorageUnavailable:
            raise storage_unavailable() from None
        if renamed is None:  # deleted meanwhile
            raise session_deleted()
        self._service.titles.session_titled(renamed.session_id)
        updated_at = iso(renamed.updated_at) if renamed.updated_at is not None else None
        event = SessionUpdatedEvent(session_id=renamed.session_id, title=renamed.title, updated_at=updated_at)
        await self._emitter.announce(renamed.session_id, renamed.user_id, event)
        return renamed

    async def delete(self, session_id: str, caller: str | None) -> None:
        """Storage first (from then on it takes nothing of the session, from any process), then the
        running turn ends (its `done` reaches the room first), then every client hears of it."""
        session = await self.get(session_id, caller)
        # Without the shared state a turn running on another process could not be cancelled.
        await self._service.require_shared_state()
        try:
            deleted = await self._repo.delete_session(session.session_id)
        except StorageUnavailable:
            raise storage_unavailable() from None
        if not deleted:  # another request deleted it meanwhile
            raise session_deleted()
        log.info("session %s deleted", session.session_id)
        await self._service.end_deleted(session.session_id)
        await self._emitter.announce(
            session.session_id, session.user_id, SessionDeletedEvent(session_id=session.session_id)
        )


def _owned(session: Session | None, caller: str | None) -> Session:
    if session is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "no such session")
    if caller is not None and session.user_id != caller:
        raise ServiceError(ErrorCode.FORBIDDEN, "this session belongs to another user")
    if session.deleted:
        raise session_deleted()
    return session
