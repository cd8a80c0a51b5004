"""Supabase through its official client (`supabase`, async): the PostgREST API over HTTPS.

The server must hold the project's service-role key: it bypasses row level security, which lets
users read only their own rows (supabase/migrations). postgrest-py's own retry is off, so tenacity
is the one retry policy, and every insert is an upsert that ignores duplicates, so a retry after a
lost answer stores nothing twice.

Files uploaded to sessions: their rows in `attachments` (PostgREST), their bytes in Supabase Storage,
private bucket `attachments` (20261212000000_attachments.sql creates it), object
`{session_id}/{attachment_id}`, through the same client's storage API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import httpx
import jwt
from postgrest import ReturnMethod
from postgrest.exceptions import APIError
from postgrest.utils import sanitize_param
from storage3.exceptions import StorageApiError
from storage3.types import FileOptions
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from server.core.models import EventDraft, Session, StoredEvent
from server.core.ports import (
    AttachmentInfo,
    EventPage,
    SessionCursor,
    SessionDeleted,
    StorageRefused,
    StorageUnavailable,
)
from server.storage.retry import cause, with_retries
from server.storage.rows import (
    ATTACHMENT_COLUMNS,
    CLEARED_WHEN_DELETED,
    EVENT_COLUMNS,
    SESSION_COLUMNS,
    attachment_key,
    attachment_keys,
    columns,
    event_page,
    in_asked_order,
    insert_or_existing,
    storable,
    stored_event,
    to_attachment,
    to_event,
    to_session,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_EVENT_COLUMNS = columns(EVENT_COLUMNS, ",")
_SESSION_COLUMNS = columns(SESSION_COLUMNS, ",")
_ATTACHMENT_COLUMNS = columns(ATTACHMENT_COLUMNS, ",")
BUCKET = "attachments"
# What Storage failing looks like once the retries are spent (or at once, when not transient).
_STORAGE_FAILURES = (StorageUnavailable, StorageApiError, httpx.HTTPError)
# Objects listed (then removed) per request when a session is deleted; Storage removes at most
# 1,000 objects a request.
OBJECT_PAGE_SIZE = 1000
OBJECTS_PER_REMOVE = 1000
# Ids in one `in.(...)` filter: PostgREST's filters are in the URL, and Supabase's gateway answers
# 414 past a request line of about 8 KB (postgrest-py #365); 100 UUIDs are about 3.7 KB.
IDS_PER_FILTER = 100
# Storage objects (and deleted sessions' folders) whose removal failed, kept to be tried again at
# the next sweep of unused uploads: at most this many of each, the rest left for good (logged).
MAX_LEFT = 10_000
# Supabase caps a response at 1,000 rows by default: history is read in pages.
PAGE_SIZE = 1000
_TRANSIENT_CODES = frozenset(
    {"PGRST000", "PGRST001", "PGRST002", "PGRST003", "40001", "40P01", "500", "502", "503", "504", "520"}
)


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[n : n + size]) for n in range(0, len(items), size)]


def transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, StorageApiError):  # Storage's own status, or the HTTP one
        return str(exc.status).isdigit() and int(str(exc.status)) >= 500
    if isinstance(exc, APIError):
        code = str(exc.code or "")
        return code in _TRANSIENT_CODES or code.startswith(("08", "53", "57P"))
    return False


def _without_attachments(exc: APIError | StorageApiError) -> bool:
    """The project lacks what the attachments migration makes: the table (PostgREST's PGRST205)
    or the bucket (Storage's "Bucket not found")."""
    if isinstance(exc, APIError):
        return str(exc.code) == "PGRST205"
    return "bucket not found" in f"{exc.code} {exc.message}".lower()


def event_row(draft: EventDraft) -> dict[str, Any]:
    row: dict[str, Any] = {
        "session_id": draft.session_id,
        "timestamp": draft.timestamp.isoformat(),
        "event_type": draft.event_type.value,
        "content": storable(draft.content),
        "turn_id": draft.turn_id,
        "event_key": draft.event_key,
        "finish_reason": draft.finish_reason,
        "error": draft.error.model_dump() if draft.error is not None else None,
    }
    # Named only when there are files: a project without 20261212100000_message_attachments.sql
    # still stores every other event (PostgREST refuses a column it does not know, PGRST204).
    if draft.attachments:
        row["attachments"] = [ref.model_dump() for ref in draft.attachments]
    return row


def key_role(key: str) -> str | None:
    """The role a Supabase API key grants: from its JWT claims, or its new-style prefix."""
    if key.startswith("sb_publishable_"):
        return "anon"
    if key.startswith("sb_secret_"):
        return "service_role"
    try:
        # Only read, never trusted: Supabase checks the signature; the role picks a warning here.
        claims = jwt.decode(key, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    role = claims.get("role")
    return role if isinstance(role, str) else None


_NO_SESSION = "00000000-0000-0000-0000-000000000000"
_PERMISSION_DENIED = frozenset({"42501", "401", "403"})
_UNDEFINED_COLUMN = "42703"
_MISSING_COLUMN = frozenset({_UNDEFINED_COLUMN, "PGRST204"})  # PostgreSQL's, or PostgREST's schema cache
_MISSING_TABLE = frozenset({"PGRST205", "42P01"})
# The newest columns the service needs, each with the migration that adds it, oldest first.
_NEWEST_COLUMNS = {
    "deleted_at": "20261208000000_conversations.sql",
    "context_upto": "20261210000000_context_summary.sql",
}
_ATTACHMENTS_MIGRATION = "20261212000000_attachments.sql"
_MESSAGE_ATTACHMENTS_MIGRATION = "20261212100000_message_attachments.sql"
_NEEDS_ATTACHMENTS = (
    "the attachments table or the Storage bucket `attachments` is missing: "
    f"apply supabase/migrations/{_ATTACHMENTS_MIGRATION}"
)
_NEEDS_SERVICE_ROLE = (
    "SUPABASE_KEY has the role {role}, and row level security refuses its writes: the server needs "
    "the service_role key (Supabase dashboard, Project Settings > API Keys: the service_role key, or a "
    "secret key sb_secret_...)"
)


class SupabaseRepository:
    def __init__(
        self, client: AsyncClient, http: httpx.AsyncClient, retry_seconds: float, role: str | None = None
    ) -> None:
        self._client = client
        self._http = http
        self._retry_seconds = retry_seconds
        self._role = role  # the key's, when it says (None: a key of unknown shape)
        # What a failed removal left in Storage: objects, and deleted sessions' folders (MAX_LEFT).
        self._left_objects: set[str] = set()
        self._left_sessions: set[str] = set()

    @classmethod
    async def open(
        cls, url: str, key: str, retry_seconds: float = 10.0, timeout_seconds: float = 10.0
    ) -> SupabaseRepository:
        role = key_role(key)
        if role is not None and role != "service_role":
            log.warning(
                "SUPABASE_KEY looks like the %s key: the server needs the service-role key, or row level "
                "security refuses its reads and writes (/readyz answers 503 until it has it)",
                role,
            )
        http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_seconds))
        client = await acreate_client(
            url, key, options=AsyncClientOptions(httpx_client=http, postgrest_client_retry=False)
        )
        return cls(client, http, retry_seconds, role)

    async def _retrying(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(operation, transient=transient, what=what, budget_seconds=self._retry_seconds)

    async def ensure_session(self, session_id: str, user_id: str | None, start_time: datetime) -> Session:
        async def insert() -> Session | None:
            response = await (
                self._client.table("sessions")
                .upsert(
                    {"session_id": session_id, "user_id": user_id, "start_time": start_time.isoformat()},
                    on_conflict="session_id",
                    ignore_duplicates=True,
                )
                .execute()
            )
            return to_session(response.data[0]) if response.data else None

        return await self._retrying(
            lambda: insert_or_existing(insert, lambda: self._fetch_session(session_id)), "ensure session"
        )

    async def get_session(self, session_id: str) -> Session | None:
        return await self._retrying(lambda: self._fetch_session(session_id), "read session")

    async def _fetch_session(self, session_id: str) -> Session | None:
        response = await self._client.table("sessions").select(_SESSION_COLUMNS).eq("session_id", session_id).execute()
        return to_session(response.data[0]) if response.data else None

    async def append_event(self, draft: EventDraft) -> StoredEvent:
        async def insert() -> StoredEvent | None:
            response = await (
                self._client.table("events")
                .upsert(
                    event_row(draft),
                    on_conflict="session_id,event_key",
                    ignore_duplicates=True,
                )
                .execute()
            )
            return to_event(response.data[0]) if response.data else None

        return await self._retrying(
            lambda: stored_event(
                insert,
                lambda: self._fetch_event(draft.session_id, draft.event_key),
                lambda: self._fetch_session(draft.session_id),
            ),
            "append event",
        )

    async def find_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        return await self._retrying(lambda: self._fetch_event(session_id, event_key), "find event")

    async def _fetch_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        response = await (
            self._client.table("events")
            .select(_EVENT_COLUMNS)
            .eq("session_id", session_id)
            .eq("event_key", event_key)
            .execute()
        )
        return to_event(response.data[0]) if response.data else None

    async def list_events(self, session_id: str, after_event_id: int | None = None) -> list[StoredEvent]:
        async def op() -> list[StoredEvent]:
            events: list[StoredEvent] = []
            after = after_event_id if after_event_id is not None else -1
            while True:
                response = await (
                    self._client.table("events")
                    .select(_EVENT_COLUMNS)
                    .eq("session_id", session_id)
                    .gt("event_id", after)
                    .order("event_id")
                    .limit(PAGE_SIZE)
                    .execute()
                )
                page = [to_event(row) for row in response.data]
                events.extend(page)
                if len(page) < PAGE_SIZE:
                    return events
                after = page[-1].event_id

        return await self._retrying(op, "list events")

    async def page_events(
        self, session_id: str, *, after: int | None = None, before: int | None = None, limit: int
    ) -> EventPage:
        # One request of `limit + 1` rows read towards the direction asked; a page longer than the
        # rows Supabase answers at most (PAGE_SIZE) takes as many more requests as that needs.
        ascending = after is not None

        async def op() -> EventPage:
            rows: list[StoredEvent] = []
            low, high = after, before
            while len(rows) < limit + 1:
                query = self._client.table("events").select(_EVENT_COLUMNS).eq("session_id", session_id)
                query = query.gt("event_id", low) if low is not None else query
                query = query.lt("event_id", high) if high is not None else query
                wanted = min(PAGE_SIZE, limit + 1 - len(rows))
                response = await query.order("event_id", desc=not ascending).limit(wanted).execute()
                page = [to_event(row) for row in response.data]
                rows.extend(page)
                if len(page) < wanted:
                    break
                low, high = (page[-1].event_id, high) if ascending else (low, page[-1].event_id)
            return event_page(rows, limit, ascending=ascending)

        return await self._retrying(op, "page events")

    async def list_sessions(self, user_id: str, limit: int, after: SessionCursor | None = None) -> list[Session]:
        async def op() -> list[Session]:
            query = (
                self._client.table("sessions").select(_SESSION_COLUMNS).eq("user_id", user_id).is_("deleted_at", "null")
            )
            if after is not None:
                # The keyset `(updated_at, session_id) < cursor` as PostgREST can say it; the plain
                # `updated_at <= moment` beside it lets the index scan start at the cursor.
                moment = sanitize_param(after.updated_at.isoformat())
                query = query.lte("updated_at", after.updated_at.isoformat()).or_(
                    f"updated_at.lt.{moment},and(updated_at.eq.{moment},session_id.lt.{sanitize_param(after.session_id)})"
                )
            response = await query.order("updated_at", desc=True).order("session_id", desc=True).limit(limit).execute()
            return [to_session(row) for row in response.data]

        return await self._retrying(op, "list sessions")

    async def rename_session(self, session_id: str, title: str) -> Session | None:
        # PostgREST sets values, not now(): the moment comes from here.
        changes = {"title": storable(title), "updated_at": datetime.now(UTC).isoformat()}
        return await self._update_session(session_id, changes, "rename session")

    async def set_generated_title(self, session_id: str, title: str) -> Session | None:
        return await self._update_session(session_id, {"title": storable(title)}, "set generated title", untitled=True)

    async def _update_session(
        self, session_id: str, changes: dict[str, Any], what: str, *, untitled: bool = False
    ) -> Session | None:
        async def op() -> Session | None:
            query = self._client.table("sessions").update(changes).eq("session_id", session_id)
            query = query.is_("deleted_at", "null")
            response = await (query.is_("title", "null") if untitled else query).execute()
            return to_session(response.data[0]) if response.data else None

        return await self._retrying(op, what)

    async def delete_session(self, session_id: str) -> bool:
        # One PATCH, one statement: triggers remove the events and the files' rows
        # (sessions_deleted_events_removed, sessions_deleted_attachments_removed).
        tombstone: dict[str, Any] = dict.fromkeys(CLEARED_WHEN_DELETED)
        tombstone["deleted_at"] = datetime.now(UTC).isoformat()

        async def op() -> bool:
            response = await (
                self._client.table("sessions")
                .update(tombstone)
                .eq("session_id", session_id)
                .is_("deleted_at", "null")
                .execute()
            )
            return bool(response.data)

        deleted = await self._retrying(op, "delete session")
        # Storage is not in the database's transaction: the objects go after the rows (the trigger
        # sessions_deleted_attachments_removed), also when the session was deleted already, so that
        # deleting it again (a retry after a lost answer) removes what a failure left. An upload
        # racing the delete has its row refused and removes its own object.
        await self._remove_session_objects(session_id)
        return deleted

    async def _remove_session_objects(self, session_id: str) -> bool:
        """Whether they are all removed; if not, the next sweep of unused uploads tries again."""

        async def op() -> None:
            while True:
                listed = await self._bucket().list(session_id, {"limit": OBJECT_PAGE_SIZE})
                paths = [f"{session_id}/{entry['name']}" for entry in listed]
                if paths:
                    await self._bucket().remove(paths)
                if len(paths) < OBJECT_PAGE_SIZE:
                    return

        try:
            await self._retrying(op, "remove a deleted session's files")
        except _STORAGE_FAILURES as exc:  # the session is deleted all the same: what is left is logged
            kept = len(self._left_sessions) < MAX_LEFT
            if kept:
                self._left_sessions.add(session_id)
            log.warning(
                "session %s is deleted but its files' Storage objects are not all removed (%s)%s",
                session_id,
                exc,
                "; tried again at the next sweep" if kept else "",
            )
            return False
        self._left_sessions.discard(session_id)
        return True

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        async def op() -> None:
            await (
                self._client.table("sessions")
                .update(
                    {
                        "summary": storable(summary),
                        "end_time": end_time.isoformat(),
                        "duration_seconds": duration_seconds,
                    },
                    returning=ReturnMethod.minimal,
                )
                .eq("session_id", session_id)
                .is_("deleted_at", "null")
                .execute()
            )
            # Done, unless the session emptied again after this summary's emptying.
            await (
                self._client.table("sessions")
                .update({"summary_due_at": None}, returning=ReturnMethod.minimal)
                .eq("session_id", session_id)
                .lte("summary_due_at", end_time.isoformat())
                .execute()
            )

        await self._retrying(op, "write summary")

    async def write_context_summary(self, session_id: str, summary: str, upto: int, previous_upto: int | None) -> bool:
        text = storable(summary)

        async def op() -> bool:
            query = (
                self._client.table("sessions")
                .update({"context_summary": text, "context_upto": upto})
                .eq("session_id", session_id)
                .is_("deleted_at", "null")
            )
            query = (
                query.is_("context_upto", "null") if previous_upto is None else query.eq("context_upto", previous_upto)
            )
            if (await query.execute()).data:
                return True
            # A retry after a lost answer finds its own write (the summary is too long for a filter).
            stored = await self._fetch_session(session_id)
            return (
                stored is not None
                and not stored.deleted
                and (stored.context_upto, stored.context_summary) == (upto, text)
            )

        return await self._retrying(op, "write context summary")

    async def mark_emptied(self, session_id: str, emptied_at: datetime) -> None:
        async def op() -> None:
            session = await self._fetch_session(session_id)  # PostgREST updates set values, not expressions
            if session is None or session.deleted:
                return
            duration = max(0, round((emptied_at - session.start_time).total_seconds()))
            await (
                self._client.table("sessions")
                .update(
                    {
                        "end_time": emptied_at.isoformat(),
                        "duration_seconds": duration,
                        "summary_due_at": emptied_at.isoformat(),
                    },
                    returning=ReturnMethod.minimal,
                )
                .eq("session_id", session_id)
                .is_("deleted_at", "null")
                .execute()
            )

        await self._retrying(op, "mark session emptied")

    async def due_summaries(self, limit: int) -> list[tuple[str, datetime]]:
        async def op() -> list[tuple[str, datetime]]:
            response = await (
                self._client.table("sessions")
                .select("session_id,summary_due_at")
                .not_.is_("summary_due_at", "null")
                .order("summary_due_at")
                .limit(limit)
                .execute()
            )
            rows: list[Any] = response.data
            return [(row["session_id"], datetime.fromisoformat(row["summary_due_at"])) for row in rows]

        return await self._retrying(op, "list due summaries")

    async def open_turns(self, after: str | None, limit: int) -> list[tuple[str, str]]:
        async def op() -> list[tuple[str, str]]:
            query = self._client.table("sessions").select("session_id,open_turn_id").not_.is_("open_turn_id", "null")
            if after is not None:
                query = query.gt("session_id", after)
            response = await query.order("session_id").limit(limit).execute()
            rows: list[Any] = response.data
            return [(row["session_id"], row["open_turn_id"]) for row in rows]

        try:
            return await self._retrying(op, "list open turns")
        except APIError as exc:
            if str(exc.code) == _UNDEFINED_COLUMN:
                raise StorageRefused(
                    "sessions.open_turn_id is missing: apply supabase/migrations/20261206000000_open_turns.sql"
                ) from None
            raise

    async def turn_events(self, session_id: str, turn_id: str) -> list[StoredEvent]:
        async def op() -> list[StoredEvent]:
            response = await (
                self._client.table("events")
                .select(_EVENT_COLUMNS)
                .eq("session_id", session_id)
                .eq("turn_id", turn_id)
                .order("event_id")
                .execute()
            )
            return [to_event(row) for row in response.data]

        return await self._retrying(op, "list turn events")

    def _bucket(self) -> Any:
        return self._client.storage.from_(BUCKET)

    async def add_attachment(self, info: AttachmentInfo, data: bytes) -> None:
        key = attachment_key(info.attachment_id)
        if key is None:
            raise ValueError("an attachment id is a UUID")
        path = f"{info.session_id}/{key}"
        row = {
            "attachment_id": key,
            "session_id": info.session_id,
            "name": storable(info.name),
            "mime_type": info.mime_type,
            "size": info.size,
            "sha256": info.sha256,
            "created_at": info.created_at.isoformat(),
            "used": info.used,
        }
        options: FileOptions = {"content-type": info.mime_type, "upsert": "true"}
        uploaded = False

        async def op() -> None:
            nonlocal uploaded
            if await self._fetch_attachment(key) is not None:
                return  # stored before: a retry
            # The object first, then the row that makes it a file: a row never names missing bytes.
            await self._bucket().upload(path, data, options)
            uploaded = True
            insert = self._client.table("attachments").upsert(row, on_conflict="attachment_id", ignore_duplicates=True)
            if (await insert.execute()).data or await self._fetch_attachment(key) is not None:
                return
            await self._bucket().remove([path])  # the row was refused: the session is not live
            raise SessionDeleted(info.session_id)

        try:
            await self._retrying(op, "add attachment")
        except SessionDeleted:
            raise
        except Exception as exc:
            if uploaded:  # no object without its row
                await self._remove_unclaimed(key, path)
            if isinstance(exc, APIError | StorageApiError) and _without_attachments(exc):
                raise StorageRefused(_NEEDS_ATTACHMENTS) from None
            raise

    async def _remove_unclaimed(self, key: str, path: str) -> None:
        """Best effort, one attempt: the object of an upload whose row was not stored. Unless the row
        is there after all (an insert whose answer was lost), and kept when that cannot be read."""
        try:
            if await self._fetch_attachment(key) is not None:
                return
        except (*_STORAGE_FAILURES, APIError) as exc:
            log.warning("a file's row may be stored or not: its Storage object is kept (%s)", cause(exc))
            return
        try:
            await self._bucket().remove([path])
        except _STORAGE_FAILURES as exc:
            self._leave_objects([path])
            log.warning(
                "a file's row is not stored and its Storage object is not removed (%s); tried again at the next sweep",
                cause(exc),
            )

    async def get_attachment(self, attachment_id: str) -> AttachmentInfo | None:
        if (key := attachment_key(attachment_id)) is None:
            return None
        return await self._retrying(lambda: self._fetch_attachment(key), "read attachment")

    async def _fetch_attachment(self, key: str) -> AttachmentInfo | None:
        response = await (
            self._client.table("attachments").select(_ATTACHMENT_COLUMNS).eq("attachment_id", key).execute()
        )
        return to_attachment(response.data[0]) if response.data else None

    async def attachment_data(self, attachment_id: str) -> bytes | None:
        if (key := attachment_key(attachment_id)) is None:
            return None

        async def op() -> bytes | None:
            info = await self._fetch_attachment(key)
            if info is None:
                return None
            try:
                data: bytes = await self._bucket().download(f"{info.session_id}/{key}")
            except StorageApiError as exc:
                if str(exc.status) == "404":  # deleted since the row was read
                    return None
                raise
            return data

        return await self._retrying(op, "read attachment data")

    async def session_attachments(self, session_id: str, attachment_ids: Sequence[str]) -> list[AttachmentInfo]:
        if not (keys := attachment_keys(attachment_ids)):
            return []

        async def op() -> list[AttachmentInfo]:
            found: list[AttachmentInfo] = []
            for chunk in chunks(keys, IDS_PER_FILTER):
                response = await (
                    self._client.table("attachments")
                    .select(_ATTACHMENT_COLUMNS)
                    .eq("session_id", session_id)
                    .in_("attachment_id", chunk)
                    .execute()
                )
                found.extend(to_attachment(row) for row in response.data)
            return in_asked_order(found, keys)

        return await self._retrying(op, "read session attachments")

    async def mark_attachments_used(self, session_id: str, attachment_ids: Sequence[str]) -> None:
        if not (keys := attachment_keys(attachment_ids)):
            return

        async def op() -> None:  # setting `used` again is a no-op: a retry may start over
            for chunk in chunks(keys, IDS_PER_FILTER):
                await (
                    self._client.table("attachments")
                    .update({"used": True}, returning=ReturnMethod.minimal)
                    .eq("session_id", session_id)
                    .in_("attachment_id", chunk)
                    .execute()
                )

        await self._retrying(op, "mark attachments used")

    async def delete_unused_attachments(self, created_before: datetime, limit: int) -> int:
        due = await self._retrying(partial(self._unused_ids, created_before, limit), "list unused attachments")
        deleted: list[str] = []  # the deleted rows' objects
        try:
            for chunk in chunks(due, IDS_PER_FILTER):
                rows = await self._retrying(partial(self._delete_unused, chunk), "delete unused attachments")
                deleted.extend(f"{row['session_id']}/{row['attachment_id']}" for row in rows)
        finally:  # also those of the rows deleted before a failure
            self._leave_objects(deleted)
        await self._remove_left()
        return len(deleted)

    async def _unused_ids(self, created_before: datetime, limit: int) -> list[str]:
        found = await (
            self._client.table("attachments")
            .select("attachment_id")
            .eq("used", False)
            .lt("created_at", created_before.isoformat())
            .order("created_at")
            .limit(limit)
            .execute()
        )
        rows: list[Any] = found.data
        return [str(row["attachment_id"]) for row in rows]

    async def _delete_unused(self, keys: list[str]) -> list[Any]:
        # `used` again in the delete: a file a message named meanwhile stays.
        deleted = (
            await self._client.table("attachments").delete().in_("attachment_id", keys).eq("used", False).execute()
        )
        return list(deleted.data)

    def _leave_objects(self, paths: Sequence[str]) -> None:
        """Keep objects to remove (at the end of a sweep, or the next one)."""
        room = max(0, MAX_LEFT - len(self._left_objects))
        if len(paths) > room:
            log.warning(
                "%d files' Storage objects are left for good (%d wait for removal)", len(paths) - room, MAX_LEFT
            )
        self._left_objects.update(paths[:room])

    async def _remove_left(self) -> None:
        """Remove the objects whose rows are gone, and what earlier failures left; what fails is
        logged and tried again at the next sweep (an object without its row is never served:
        a download reads the row first)."""
        try:
            for chunk in chunks(sorted(self._left_objects), OBJECTS_PER_REMOVE):
                await self._retrying(partial(self._bucket().remove, chunk), "remove unused files")
                self._left_objects.difference_update(chunk)
        except _STORAGE_FAILURES as exc:
            log.warning(
                "%d unused files' Storage objects are not removed (%s); tried again at the next sweep",
                len(self._left_objects),
                cause(exc),
            )
            return
        for session_id in sorted(self._left_sessions):
            if not await self._remove_session_objects(session_id):
                return  # Storage is failing: the rest wait for the next sweep

    async def ping(self) -> None:
        """Whether the key may write, and the project has what each migration makes: one request
        per probe, each changing nothing, all at once; the first that fails, in the migrations'
        order, is the answer (the message names the file to apply)."""
        if self._role is not None and self._role != "service_role":
            raise StorageRefused(_NEEDS_SERVICE_ROLE.format(role=self._role))
        probes = (self._probe_sessions(), self._probe_attachments(), self._probe_bucket(), self._probe_event_files())
        for outcome in await asyncio.gather(*probes, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _probe_sessions(self) -> None:
        """An update that matches no row is refused (permission denied) when the key's role lacks
        the rights, e.g. the anon key under this project's policies."""
        query = (
            self._client.table("sessions")
            .update({"summary_due_at": None}, returning=ReturnMethod.minimal)
            .eq("session_id", _NO_SESSION)
        )
        for column in _NEWEST_COLUMNS:  # and names the newest columns the service needs
            query = query.is_(column, "null")
        try:
            await query.execute()
        except APIError as exc:
            if str(exc.code) in _PERMISSION_DENIED:
                raise StorageRefused(
                    f"SUPABASE_KEY may not write the tables ({exc.code}: permission denied); "
                    + _NEEDS_SERVICE_ROLE.format(role=self._role or "unknown")
                ) from None
            if str(exc.code) == _UNDEFINED_COLUMN:
                said = str(exc.message or "")
                missing = next((c for c in _NEWEST_COLUMNS if c in said), next(iter(_NEWEST_COLUMNS)))
                raise StorageRefused(
                    f"sessions.{missing} is missing: apply supabase/migrations/{_NEWEST_COLUMNS[missing]}"
                ) from None
            raise

    async def _probe_attachments(self) -> None:
        query = self._client.table("attachments").select("attachment_id").eq("attachment_id", _NO_SESSION)
        missing = f"the attachments table is missing: apply supabase/migrations/{_ATTACHMENTS_MIGRATION}"
        await _probe(query, _MISSING_TABLE, missing)

    async def _probe_bucket(self) -> None:
        try:
            await self._client.storage.get_bucket(BUCKET)
        except StorageApiError as exc:
            if _without_attachments(exc):
                raise StorageRefused(
                    f"the Storage bucket `{BUCKET}` is missing: apply supabase/migrations/{_ATTACHMENTS_MIGRATION}"
                ) from None
            raise

    async def _probe_event_files(self) -> None:
        query = self._client.table("events").select("attachments").eq("session_id", _NO_SESSION).limit(1)
        missing = f"events.attachments is missing: apply supabase/migrations/{_MESSAGE_ATTACHMENTS_MIGRATION}"
        await _probe(query, _MISSING_COLUMN, missing)

    async def aclose(self) -> None:
        await self._http.aclose()


async def _probe(query: Any, missing_codes: Collection[str], missing: str) -> None:
    """A read that changes nothing: PostgREST's codes for what a migration makes, as the file to apply."""
    try:
        await query.execute()
    except APIError as exc:
        if str(exc.code) in missing_codes:
            raise StorageRefused(missing) from None
        raise
