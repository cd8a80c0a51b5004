"""Files uploaded to a session and served back: the running server over HTTP, real files made by
the tests, ownership with authentication on, and the session's deletion taking its files along."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from typing import Any

import httpx
import pytest

from tests.conftest import ServerFactory, TabFactory
from tests.fake_gemini import FakeGemini, Reply, call_part, chunk, error_reply, text_chunk
from tests.fake_openai import FakeOpenAI
from tests.harness import RunningServer, Tab
from tests.test_auth import SECRET, token
from tests.test_metrics import Scrape, scrape

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.7\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n"


async def new_session(server: RunningServer, connect: TabFactory, **join: Any) -> str:
    tab = await connect(server)
    session_id: str = (await tab.join(**join))["session"]["session_id"]
    return session_id


async def upload(http: httpx.AsyncClient, session_id: str, name: str, data: bytes, **headers: str) -> httpx.Response:
    files = {"file": (name, io.BytesIO(data), "application/octet-stream")}
    return await http.post(f"/api/sessions/{session_id}/attachments", files=files, headers=headers)


@pytest.mark.parametrize(
    ("name", "data", "mime_type"),
    [
        ("shot.png", PNG, "image/png"),
        ("photo.jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(100), "image/jpeg"),
        ("paper.pdf", PDF, "application/pdf"),
        ("notes.txt", "Été, ☀ and a tab\t.\n".encode(), "text/plain"),
        ("table.csv", b"city,temp\nDelhi,24.5\n", "text/csv"),
    ],
)
async def test_an_upload_is_typed_by_its_content_and_served_back_as_an_attachment(
    server: RunningServer, connect: TabFactory, name: str, data: bytes, mime_type: str
) -> None:
    sid = await new_session(server, connect)
    async with httpx.AsyncClient(base_url=server.url) as http:
        created = await upload(http, sid, name, data)
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["name"], body["mime_type"], body["size"]) == (name, mime_type, len(data))
        served = await http.get(f"/api/attachments/{body['attachment_id']}")
    assert served.status_code == 200 and served.content == data
    assert served.headers["content-type"].split(";")[0] == mime_type
    assert served.headers["content-disposition"] == f"attachment; filename=\"{name}\"; filename*=UTF-8''{name}"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in served.headers["content-security-policy"]
    stored = await server.runtime.repo.get_attachment(body["attachment_id"])
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.session_id == sid


async def test_a_name_beyond_ascii_is_served_exactly_with_a_plain_fallback(
    server: RunningServer, connect: TabFactory
) -> None:
    sid = await new_session(server, connect)
    async with httpx.AsyncClient(base_url=server.url) as http:
        created = (await upload(http, sid, "Été ☀.txt", b"sunny\n")).json()
        served = await http.get(f"/api/attachments/{created['attachment_id']}")
    assert served.headers["content-disposition"] == (
        "attachment; filename=\"_t_ _.txt\"; filename*=UTF-8''%C3%89t%C3%A9%20%E2%98%80.txt"
    )


async def test_refusals_a_binary_named_png_too_large_and_unknown_sessions(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(attachment_max_bytes=4096)
    sid = await new_session(server, connect)
    async with httpx.AsyncClient(base_url=server.url) as http:
        fake_png = await upload(http, sid, "image.png", bytes(range(256)) * 4)
        assert (fake_png.status_code, fake_png.json()["detail"]["code"]) == (415, "unsupported_media_type")
        big = await upload(http, sid, "big.png", PNG * 8)
        assert (big.status_code, big.json()["detail"]["code"]) == (413, "too_large")
        unknown = await upload(http, "6a2f41a0-0000-4000-8000-000000000000", "shot.png", PNG)
        assert (unknown.status_code, unknown.json()["detail"]["code"]) == (404, "not_found")
        bad_id = await upload(http, "nope", "shot.png", PNG)
        assert (bad_id.status_code, bad_id.json()["detail"]["code"]) == (400, "invalid_session_id")
        not_multipart = await http.post(f"/api/sessions/{sid}/attachments", content=PNG)
        assert (not_multipart.status_code, not_multipart.json()["detail"]["code"]) == (400, "invalid_payload")
        for missing in ("6a2f41a0-0000-4000-8000-000000000000", "not-a-uuid"):
            assert (await http.get(f"/api/attachments/{missing}")).status_code == 404


async def test_only_the_owner_uploads_and_reads_and_deletion_takes_the_files(start_server: ServerFactory) -> None:
    server = await start_server(auth_jwt_secret=SECRET)
    alice = {"Authorization": f"Bearer {token('alice')}"}
    bob = {"Authorization": f"Bearer {token('bob')}"}
    tab = await Tab(server.url).connect(auth={"token": token("alice")})
    try:
        sid = (await tab.join())["session"]["session_id"]
    finally:
        await tab.close()
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await upload(http, sid, "shot.png", PNG)).status_code == 401
        assert (await upload(http, sid, "shot.png", PNG, **bob)).status_code == 403
        created = await upload(http, sid, "shot.png", PNG, **alice)
        assert created.status_code == 201
        url = f"/api/attachments/{created.json()['attachment_id']}"
        assert (await http.get(url)).status_code == 401
        assert (await http.get(url, headers=bob)).status_code == 403
        assert (await http.get(url, headers=alice)).content == PNG
        assert (await http.delete(f"/api/sessions/{sid}", headers=alice)).status_code == 204
        assert (await http.get(url, headers=alice)).status_code == 404
        again = await upload(http, sid, "shot.png", PNG, **alice)
        assert (again.status_code, again.json()["detail"]["code"]) == (404, "session_deleted")


async def test_an_upload_no_message_names_is_deleted_once_it_is_old_enough(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(attachment_unused_seconds=2, attachment_expiry_interval_seconds=0.1)
    sid = await new_session(server, connect)
    async with httpx.AsyncClient(base_url=server.url) as http:
        created = (await upload(http, sid, "shot.png", PNG)).json()
        url = f"/api/attachments/{created['attachment_id']}"
        assert (await http.get(url)).status_code == 200  # young enough
        async with asyncio.timeout(10):
            while (await http.get(url)).status_code != 404:
                await asyncio.sleep(0.1)
    assert await server.runtime.repo.get_attachment(created["attachment_id"]) is None


async def test_a_message_carries_its_files_live_in_history_and_to_the_model(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(
        offline_chunk_delay_ms=0, attachments_per_message=2, attachment_unused_seconds=5,
        attachment_expiry_interval_seconds=0.1,
    )  # fmt: skip
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    other = await new_session(server, connect)
    async with httpx.AsyncClient(base_url=server.url) as http:
        shot = (await upload(http, sid, "shot.png", PNG)).json()
        paper = (await upload(http, sid, "paper.pdf", PDF)).json()
        elsewhere = (await upload(http, other, "other.png", PNG)).json()
    ids = [shot["attachment_id"], paper["attachment_id"]]
    refused = [
        await tab.call("message", {"session_id": sid, "text": "hi", "attachments": [*ids, ids[0]]}),
        await tab.call("message", {"session_id": sid, "text": "hi", "attachments": [elsewhere["attachment_id"]]}),
        await tab.call("message", {"session_id": sid, "text": "hi", "attachments": ["not-an-upload"]}),
        await tab.call("message", {"session_id": sid, "text": "hi", "attachments": "shot.png"}),
    ]
    assert [r["error"]["code"] for r in refused] == ["invalid_payload"] * 4, refused
    assert [e for e in await server.runtime.repo.list_events(sid)] == []  # nothing stored

    ack = await tab.call("message", {"session_id": sid, "text": "What are these?", "attachments": ids})
    assert ack["ok"], ack
    events = await tab.turn(ack["turn_id"])
    expected = [{k: f[k] for k in ("attachment_id", "name", "mime_type", "size")} for f in (shot, paper)]
    assert events[0][1]["attachments"] == expected
    answer = events[-1][1]["text"]
    assert f'"shot.png" (image/png, {len(PNG)} bytes)' in answer and '"paper.pdf" (application/pdf' in answer
    history = (await tab.join(sid))["history"]
    assert history[0]["event_type"] == "user_message" and history[0]["attachments"] == expected
    assert all("attachments" not in item for item in history if item["event_type"] != "user_message")
    assert reads_of_files(await scrape(server.url)) == 0  # the offline script names files: never read
    async with asyncio.timeout(10):  # past the unused uploads' age: the unnamed one goes
        while await server.runtime.repo.get_attachment(elsewhere["attachment_id"]) is not None:
            await asyncio.sleep(0.1)
    assert await server.runtime.repo.get_attachment(ids[0]) is not None  # older, and named: kept
    assert await server.runtime.repo.get_attachment(ids[1]) is not None


# ---------------------------------------------------------------- what the model gets


def decoded(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gemini parts with each `inlineData`'s base64 decoded (the SDK sends the URL-safe alphabet,
    which Gemini's JSON reads as well as the standard one)."""
    return [
        {"inlineData": {**part["inlineData"], "data": base64.urlsafe_b64decode(part["inlineData"]["data"])}}
        if "inlineData" in part
        else part
        for part in parts
    ]


def gemini_at(fake: FakeGemini) -> dict[str, Any]:
    """The settings of a server whose model is the Gemini stand-in."""
    return {
        "llm_provider": "gemini",
        "gemini_api_key": "test-key",
        "gemini_model": "gemini-test",
        "gemini_base_url": fake.url,
    }


def reads_of_files(metrics: Scrape) -> float:
    return metrics.value("realtime_storage_seconds_count", operation="attachment_data")


async def test_gemini_gets_images_and_pdfs_inline_text_as_text_read_once_a_turn_and_again_in_history(
    start_server: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory
) -> None:
    server = await start_server(**gemini_at(fake_gemini))
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    csv = b"city,temp\nDelhi,24.5\n"
    async with httpx.AsyncClient(base_url=server.url) as http:
        files = [
            (await upload(http, sid, name, data)).json()
            for name, data in [("a.png", PNG), ("b.pdf", PDF), ("c.csv", csv)]
        ]
    # A tool round: the turn makes two requests, and reads each file once.
    fake_gemini.stream(
        Reply(events=[chunk([call_part("get_weather", {"location": "Delhi"})], "STOP")]),
        Reply(events=[text_chunk("A chart, a paper and a table.", "STOP")]),
    )
    ack = await tab.call(
        "message", {"session_id": sid, "text": "What are these?", "attachments": [f["attachment_id"] for f in files]}
    )
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    expected_parts = [
        # The SDK keeps the blob's field names as Python spells them; Gemini's JSON reads both.
        {"inlineData": {"mime_type": "image/png", "data": PNG}},
        {"inlineData": {"mime_type": "application/pdf", "data": PDF}},
        {"text": f'File "c.csv" (text/csv, {len(csv)} bytes):\n{csv.decode()}'},
        {"text": "What are these?"},
    ]
    first, second = fake_gemini.calls()
    assert [c["role"] for c in first.contents] == ["user"] and decoded(first.contents[0]["parts"]) == expected_parts
    assert decoded(second.contents[0]["parts"]) == expected_parts
    assert reads_of_files(await scrape(server.url)) == 3

    ack = await tab.call("message", {"session_id": sid, "text": "And the second one?"})
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    replayed = fake_gemini.calls()[-1].contents
    assert replayed[0]["role"] == "user" and decoded(replayed[0]["parts"]) == expected_parts
    assert replayed[-1] == {"role": "user", "parts": [{"text": "And the second one?"}]}
    assert reads_of_files(await scrape(server.url)) == 6


async def test_a_file_gemini_refuses_goes_by_name_from_then_on(
    start_server: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory
) -> None:
    server = await start_server(**gemini_at(fake_gemini))
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    async with httpx.AsyncClient(base_url=server.url) as http:
        shot = (await upload(http, sid, "odd.png", PNG)).json()
    fake_gemini.stream(error_reply(400, "INVALID_ARGUMENT", "Unable to process input image."))
    ack = await tab.call("message", {"session_id": sid, "text": "Look", "attachments": [shot["attachment_id"]]})
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"]["code"] == "provider_rejected"
    ack = await tab.call("message", {"session_id": sid, "text": "Go on"})
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    refused = f'[File "odd.png" (image/png, {len(PNG)} bytes): not sent: the model\'s endpoint refused it]'
    # The failed turn left no answer: both user messages make one content.
    assert fake_gemini.calls()[-1].contents[0]["parts"] == [{"text": refused}, {"text": "Look"}, {"text": "Go on"}]


async def test_openai_gets_image_urls_and_file_parts_and_a_refusing_endpoint_gets_their_names_from_then_on(
    start_server: ServerFactory, fake_openai: FakeOpenAI, connect: TabFactory
) -> None:
    server = await start_server(
        llm_provider="openai",
        openai_base_url=f"{fake_openai.url}/v1",
        openai_model="m",
        openai_retry_initial_seconds=0.01,
    )
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    async with httpx.AsyncClient(base_url=server.url) as http:
        shot, paper = [(await upload(http, sid, name, data)).json() for name, data in [("a.png", PNG), ("b.pdf", PDF)]]
    ids = [shot["attachment_id"], paper["attachment_id"]]
    ack = await tab.call("message", {"session_id": sid, "text": "Read them", "attachments": ids})
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    assert fake_openai.requests[-1].messages[-1] == {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
            {
                "type": "file",
                "file": {
                    "filename": "b.pdf",
                    "file_data": "data:application/pdf;base64," + base64.b64encode(PDF).decode(),
                },
            },
            {"type": "text", "text": "Read them"},
        ],
    }

    fake_openai.text_only = True  # as a text-only model's server: 400 on any file part
    ack = await tab.call("message", {"session_id": sid, "text": "Once more", "attachments": ids[:1]})
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert done["error"]["code"] == "provider_rejected", done
    ack = await tab.call("message", {"session_id": sid, "text": "Go on"})
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert done["error"] is None and done["text"] == "Hi.", done
    sent = fake_openai.requests[-1].messages
    refused = "not sent: the model's endpoint refused it"  # both files were in the refused request
    assert sent[1]["content"] == [
        {"type": "text", "text": f'[File "a.png" (image/png, {len(PNG)} bytes): {refused}]'},
        {"type": "text", "text": f'[File "b.pdf" (application/pdf, {len(PDF)} bytes): {refused}]'},
        {"type": "text", "text": "Read them"},
    ]
    assert sent[-1] == {"role": "user", "content": "Go on"}


async def test_files_count_in_the_context_budget_and_past_a_requests_bound_they_are_refused_or_named(
    start_server: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory
) -> None:
    server = await start_server(
        **gemini_at(fake_gemini),
        context_max_tokens=2500, attachment_max_bytes=8_000_000,
    )  # fmt: skip
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    big = b"\x89PNG\r\n\x1a\n" + bytes(7_500_000)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        pictures = [(await upload(http, sid, f"{n}.png", PNG)).json()["attachment_id"] for n in range(3)]
        large = [(await upload(http, sid, f"large{n}.png", big)).json()["attachment_id"] for n in range(2)]
    # Three images at 1,000 tokens each pass a 2,500-token budget; two fit.
    refused = await tab.call("message", {"session_id": sid, "text": "hi", "attachments": pictures})
    assert refused["error"]["code"] == "message_too_long", refused
    # Two 7.5 MB files pass what one Gemini request may carry inline.
    refused = await tab.call("message", {"session_id": sid, "text": "hi", "attachments": large})
    assert refused["error"]["code"] == "message_too_long" and "request" in refused["error"]["message"], refused
    assert await server.runtime.repo.list_events(sid) == []

    for attachment_id in large:  # each alone fits; the second turn sends the older one by name
        ack = await tab.call("message", {"session_id": sid, "text": "look", "attachments": [attachment_id]})
        assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    first_turn = fake_gemini.calls()[-1].contents[0]["parts"]
    withheld = "not sent again: past the size one request may carry"
    assert first_turn[0] == {"text": f'[File "large0.png" (image/png, {len(big)} bytes): {withheld}]'}
    assert decoded(fake_gemini.calls()[-1].contents[-1]["parts"])[0]["inlineData"]["data"] == big
