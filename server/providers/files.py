"""A message's files as every provider sends them: images and PDFs as the vendor's own parts (each
provider builds those), text files as text, and a file without bytes by its name and the reason."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from server.core.file_types import TEXT_TYPES
from server.core.models import AttachmentRef
from server.core.ports import FileWithheld, UserText
from server.core.recent import Recent

log = logging.getLogger(__name__)

NOT_SENT = FileWithheld("not sent with this request")
REFUSED = FileWithheld("not sent: the model's endpoint refused it")
REFUSED_FILES_KEPT = 10_000


def file_label(file: AttachmentRef) -> str:
    return f'"{file.name}" ({file.mime_type}, {file.size} bytes)'


def user_parts(item: UserText, files: Mapping[str, bytes | FileWithheld]) -> list[str | tuple[AttachmentRef, bytes]]:
    """The message's files, then its text (models read a question best after what it is about):
    text as `str`, a file to send in the vendor's own part as (file, bytes)."""
    parts: list[str | tuple[AttachmentRef, bytes]] = []
    for file in item.files:
        data = files.get(file.attachment_id, NOT_SENT)
        if isinstance(data, FileWithheld):
            parts.append(f"[File {file_label(file)}: {data.reason}]")
        elif file.mime_type in TEXT_TYPES:
            parts.append(f"File {file_label(file)}:\n{data.decode('utf-8', errors='replace')}")
        else:
            parts.append((file, data))
    parts.append(item.text)
    return parts


class RefusedFiles:
    """Files a model's endpoint refused (HTTP 400 on a request carrying them: a text-only model, or
    a file it cannot read): later requests name them instead, so the session goes on."""

    def __init__(self) -> None:
        self._refused: Recent[str, bool] = Recent(REFUSED_FILES_KEPT)

    def withhold(self, files: Mapping[str, bytes | FileWithheld]) -> dict[str, bytes | FileWithheld]:
        return {
            attachment_id: REFUSED if attachment_id in self._refused else data for attachment_id, data in files.items()
        }

    def note(self, files: Mapping[str, bytes | FileWithheld]) -> None:
        sent = [attachment_id for attachment_id, data in files.items() if isinstance(data, bytes)]
        for attachment_id in sent:
            self._refused.remember(attachment_id, True)
        if sent:
            log.warning(
                "the model's endpoint refused a request carrying %d files: they go by name from now on", len(sent)
            )
