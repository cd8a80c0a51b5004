"""An upload read as it arrives: a real HTTP server on a socket, a real client sending multipart
bodies (made by httpx, or by hand where they must be broken), files made by the test."""

from __future__ import annotations

import io
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.core.file_types import file_type
from server.transport.uploads import UploadRefused, receive_upload
from tests.harness import serving

LIMIT = 1024 * 1024


async def upload(request: Request) -> JSONResponse:
    try:
        received = await receive_upload(request, LIMIT)
    except UploadRefused as refused:
        return JSONResponse(
            {"code": refused.code, "message": refused.message},
            status_code=refused.status,
            headers={} if refused.drained else {"connection": "close"},
        )
    return JSONResponse({"name": received.name, "size": len(received.data), "crc": zlib.crc32(received.data)})


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with serving(Starlette(routes=[Route("/upload", upload, methods=["POST"])])) as base:
        yield f"{base}/upload"


def png(size: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes(n % 251 for n in range(size - 8))


async def test_a_file_part_is_received_whole_whatever_else_the_form_holds(url: str) -> None:
    data = png(300_000)
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            url,
            data={"note": "x" * 10_000},
            files={"file": ("../../etc/shot.png", io.BytesIO(data), "application/x-anything")},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": "shot.png", "size": len(data), "crc": zlib.crc32(data)}


@pytest.mark.parametrize(
    ("headers", "body", "code"),
    [
        ({"content-type": "application/json"}, b"{}", "invalid_payload"),
        (
            {"content-type": "multipart/form-data; boundary=x"},
            b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n",
            "invalid_payload",
        ),
        ({"content-type": "multipart/form-data; boundary=x"}, b"garbage without a boundary", "invalid_payload"),
    ],
    ids=["not-multipart", "no-file-part", "unreadable"],
)
async def test_a_body_that_is_no_file_upload_is_invalid_payload(
    url: str, headers: dict[str, str], body: bytes, code: str
) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, headers=headers, content=body)
    assert (answer.status_code, answer.json()["code"]) == (400, code)


async def test_a_declared_length_over_the_limit_is_refused_before_reading(url: str) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, files={"file": ("big.png", io.BytesIO(png(LIMIT + 1)), "image/png")})
    assert (answer.status_code, answer.json()["code"]) == (413, "too_large")


async def test_a_chunked_upload_past_the_limit_is_cut_off_with_memory_bounded(url: str) -> None:
    """200 times the limit, sent in chunks without a length: the server stops reading at the limit."""
    sent = 0
    chunk = b"\x89PNG\r\n\x1a\n" + b"\x00" * (64 * 1024 - 8)

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n\r\n'
        for _ in range(200 * LIMIT // len(chunk)):
            sent += len(chunk)
            yield chunk
        yield b"\r\n--b--\r\n"

    tracemalloc.start()
    try:
        async with httpx.AsyncClient() as http:
            try:
                answer: Any = await http.post(
                    url, content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
                )
            except httpx.TransportError as exc:  # the server may close before the client has sent it all
                answer = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if isinstance(answer, httpx.Response):
        assert (answer.status_code, answer.json()["code"]) == (413, "too_large")
    assert peak < 4 * LIMIT, peak  # the limit, the parser's chunk, and the client's: never the body


async def test_a_chunked_body_whose_other_parts_never_end_is_cut_off_at_the_limit(url: str) -> None:
    """No `file` part past the limit, but a form field that goes on: the body as a whole is bounded."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
        for _ in range(50 * LIMIT // 65536):
            sent += 65536
            yield b"x" * 65536
        yield b"\r\n--b--\r\n"

    async with httpx.AsyncClient() as http:
        try:
            answer: Any = await http.post(
                url, content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
            )
        except httpx.TransportError as exc:  # the server may close before the client has sent it all
            answer = exc
    assert sent < 50 * LIMIT  # it stopped reading: the client could not send it all
    if isinstance(answer, httpx.Response):
        assert (answer.status_code, answer.json()["code"]) == (413, "too_large")


def test_the_type_comes_from_the_content_not_the_name() -> None:
    assert file_type("photo.txt", png(100)) == "image/png"
    assert file_type("x.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 10) == "image/jpeg"
    assert file_type("x", b"GIF89a...") == "image/gif"
    assert file_type("x", b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert file_type("paper.png", b"%PDF-1.7\n...") == "application/pdf"
    assert file_type("notes.MD", "# Titre\n\nÉté ☀".encode()) == "text/markdown"
    assert file_type("t.csv", b"a,b\r\n1,2\r\n") == "text/csv"
    assert file_type("d.json", b'{"a": 1}') == "application/json"
    assert file_type("readme", b"plain\ttext\x0c") == "text/plain"
    assert file_type("binary.png", bytes(range(256))) is None  # named .png, but not one
    assert file_type("latin1.txt", "café".encode("latin-1")) is None  # not UTF-8
    assert file_type("nul.txt", b"text\x00with a NUL") is None
