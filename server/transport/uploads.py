"""A file uploaded as `multipart/form-data` (one part named `file`), read from the request as it
arrives and refused as soon as it passes the size limit: however large the body a client sends, the
service holds at most the limit in memory and writes nothing to disk (Starlette's own form parser
spools every file to a temporary file first)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

FIELD = "file"
MAX_NAME_CHARS = 255
# What a part's headers and the boundaries may add to a file's size in a request's Content-Length.
ENVELOPE_BYTES = 16 * 1024
DRAIN_BYTES = 1024 * 1024


class UploadRefused(Exception):
    """`status` and `code` as the /api routes answer them."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        # The body was read to its end: the connection may serve another request. When it was not
        # (a large body), the answer closes it, and the rest is never read.
        self.drained = True


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class _Parts:
    """What the parser has read so far: the `file` part's name and bytes; other parts are skipped."""

    max_bytes: int
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    disposition: bytes = b""
    in_file: bool = False
    name: str | None = None
    data: bytearray = field(default_factory=bytearray)
    found: bool = False

    def on_part_begin(self) -> None:
        self.disposition, self.in_file = b"", False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if options.get(b"name") == FIELD.encode() and not self.found:
            self.in_file, self.found = True, True
            filename = options.get(b"filename", b"").decode("utf-8", "replace").replace("\\", "/")
            self.name = filename.rsplit("/", 1)[-1].strip()[:MAX_NAME_CHARS] or "file"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            if len(self.data) + end - start > self.max_bytes:
                raise UploadRefused(413, "too_large", f"the file is larger than {self.max_bytes} bytes")
            self.data += data[start:end]


async def receive_upload(request: Request, max_bytes: int) -> Upload:
    """The request's `file` part, or UploadRefused (400 malformed, 413 too large)."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadRefused(400, "invalid_payload", "send the file as multipart/form-data, in a part named 'file'")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + ENVELOPE_BYTES:
        refused = UploadRefused(413, "too_large", f"the file is larger than {max_bytes} bytes")
        refused.drained = False
        raise refused
    parts = _Parts(max_bytes)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": parts.on_part_begin,
            "on_header_field": parts.on_header_field,
            "on_header_value": parts.on_header_value,
            "on_header_end": parts.on_header_end,
            "on_headers_finished": parts.on_headers_finished,
            "on_part_data": parts.on_part_data,
        },
    )
    stream = request.stream()
    most, read = max_bytes + ENVELOPE_BYTES, 0
    try:
        async for chunk in stream:
            read += len(chunk)
            if read > most:  # a body sent without a length: other parts must not go on for ever
                raise UploadRefused(413, "too_large", f"the file is larger than {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except UploadRefused as refused:
        refused.drained = await _drained(stream)
        raise
    except MultipartParseError:
        raise UploadRefused(400, "invalid_payload", "the multipart body cannot be read") from None
    except ClientDisconnect:
        raise UploadRefused(400, "invalid_payload", "the upload was not sent whole") from None
    if not parts.found or parts.name is None:
        raise UploadRefused(400, "invalid_payload", "no part named 'file'")
    return Upload(parts.name, bytes(parts.data))


async def _drained(stream: AsyncIterator[bytes]) -> bool:
    """Read and drop what is left of a refused body, up to DRAIN_BYTES: a client that is still
    sending a little more then reads its answer, rather than a reset connection. False when more
    than that was left (the answer closes the connection instead)."""
    left = DRAIN_BYTES
    try:
        async for chunk in stream:
            left -= len(chunk)
            if left < 0:
                return False
    except ClientDisconnect:
        pass
    return True
