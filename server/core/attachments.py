"""Files uploaded to a session: taken (their type from their bytes), stored, and read back by a
caller who may join the session (docs/protocol.md, Attachments)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from server.core.catalog import SessionCatalog
from server.core.errors import ErrorCode, ServiceError, session_deleted, storage_refused, storage_unavailable
from server.core.file_types import file_type
from server.core.models import utc_now
from server.core.ports import AttachmentInfo, AttachmentStore, SessionDeleted, StorageRefused, StorageUnavailable
from server.core.tasks import TaskTracker, cancel_and_wait

log = logging.getLogger(__name__)

TYPES_TAKEN = "PNG, JPEG, GIF or WebP images, PDF, or UTF-8 text"


@dataclass(frozen=True)
class AttachmentFile:
    info: AttachmentInfo
    data: bytes


class Attachments:
    def __init__(self, catalog: SessionCatalog, store: AttachmentStore) -> None:
        self._catalog = catalog
        self._store = store

    async def check_session(self, session_id: str, caller: str | None) -> str:
        """The session's id, when the caller may upload to it (raised before a body is read)."""
        return (await self._catalog.get(session_id, caller)).session_id

    async def add(self, session_id: str, name: str, data: bytes) -> AttachmentInfo:
        """Store an upload of a session `check_session` let the caller use."""
        mime_type = file_type(name, data)
        if mime_type is None:
            raise ServiceError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"the file is none of {TYPES_TAKEN}")
        info = AttachmentInfo(
            attachment_id=str(uuid.uuid4()),
            session_id=session_id,
            name=name,
            mime_type=mime_type,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            created_at=utc_now(),
        )
        try:
            await self._store.add_attachment(info, data)
        except SessionDeleted:
            raise session_deleted() from None
        except StorageUnavailable:
            raise storage_unavailable() from None
        except StorageRefused as exc:
            raise storage_refused(exc, "take files") from None
        return info

    async def read(self, attachment_id: str, caller: str | None) -> AttachmentFile:
        """The file, to a caller who may join its session (else `not_found` or `forbidden`)."""
        try:
            info = await self._store.get_attachment(attachment_id)
            if info is None:
                raise ServiceError(ErrorCode.NOT_FOUND, "no such file")
            await self._catalog.get(info.session_id, caller)
            data = await self._store.attachment_data(attachment_id)
        except StorageUnavailable:
            raise storage_unavailable() from None
        if data is None:  # deleted meanwhile
            raise ServiceError(ErrorCode.NOT_FOUND, "no such file")
        return AttachmentFile(info, data)


class UploadExpiry:
    """Deletes the uploads no message names once they are `keep_seconds` old, looking every
    `every_seconds` (docs/protocol.md, Attachments: Keeping and expiry)."""

    BATCH = 500

    def __init__(self, store: AttachmentStore, tasks: TaskTracker, keep_seconds: float, every_seconds: float) -> None:
        self._store = store
        self._tasks = tasks
        self._keep = timedelta(seconds=keep_seconds)
        self._every = every_seconds
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = self._tasks.spawn_loop(self._expire_forever(), "expire unused uploads")

    async def stop(self) -> None:
        if self._loop is not None:
            await cancel_and_wait({self._loop})

    async def _expire_forever(self) -> None:
        while True:
            try:
                deleted = await self._store.delete_unused_attachments(utc_now() - self._keep, self.BATCH)
            except Exception as exc:  # storage away: the next pass deletes them
                log.warning("cannot expire unused uploads now (%s)", type(exc).__name__)
            else:
                if deleted:
                    log.info("deleted %d uploads no message named", deleted)
                if deleted == self.BATCH:
                    continue  # more are due
            await asyncio.sleep(self._every)
