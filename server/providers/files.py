"""A message's files as every provider sends them: images and PDFs as the vendor's own parts (each
provider builds those), text files as text, and a file without bytes by its name and the reason."""

from __future__ import annotations

from collections.abc import Mapping

from server.core.file_types import TEXT_TYPES
from server.core.models import AttachmentRef
from server.core.ports import FileWithheld, UserText

NOT_SENT = FileWithheld("not sent with this request")


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
