"""What an uploaded file is, decided from its bytes, never from what the client says it is.

A short table of signatures rather than a library (libmagic needs a system library; the pure-Python
ones know hundreds of types): the service takes exactly five binary types, each with a fixed
signature at its start, and UTF-8 text, which no signature names.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# (offset, bytes) that must all match, and the type they make.
_SIGNATURES: tuple[tuple[tuple[tuple[int, bytes], ...], str], ...] = (
    (((0, b"\x89PNG\r\n\x1a\n"),), "image/png"),
    (((0, b"\xff\xd8\xff"),), "image/jpeg"),
    (((0, b"GIF87a"),), "image/gif"),
    (((0, b"GIF89a"),), "image/gif"),
    (((0, b"RIFF"), (8, b"WEBP")), "image/webp"),
    (((0, b"%PDF-"),), "application/pdf"),
)
# UTF-8 text is named by the file's extension among these; any other text is text/plain.
_TEXT_BY_EXTENSION = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
TEXT_TYPES = frozenset({"text/plain", *_TEXT_BY_EXTENSION.values()})


def file_type(name: str, data: bytes) -> str | None:
    """The file's MIME type, or None when it is none the service takes."""
    for checks, mime_type in _SIGNATURES:
        if all(data[offset : offset + len(magic)] == magic for offset, magic in checks):
            return mime_type
    if not _is_text(data):
        return None
    return _TEXT_BY_EXTENSION.get(PurePosixPath(name).suffix.lower(), "text/plain")


def _is_text(data: bytes) -> bool:
    """Valid UTF-8 without NUL or other control characters but tab, line feed, carriage return and
    form feed: what a person would call a text file (a binary can decode as UTF-8 by chance)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _CONTROL.search(text) is None
