"""Long conversations against the real google-genai SDK and a Gemini stand-in that counts the tokens
of what it receives: every request stays within CONTEXT_MAX_TOKENS, its oldest part summarised."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import pytest

from server.core.context import SUMMARY_INTRO
from tests.conftest import ServerFactory, TabFactory
from tests.fake_gemini import FakeGemini, Recorded, Reply, call_part, chunk, error_reply, prompt_tokens, text_chunk
from tests.harness import RunningServer, Tab
from tests.test_gemini import ask
from tests.test_metrics import scrape

BUDGET = 400
ANSWER = "A long answer about the sea, the ships on it and the weather they meet on the way. " * 2


@pytest.fixture
def start_counted(fake_gemini: FakeGemini, start_server: ServerFactory) -> ServerFactory:
    fake_gemini.count_tokens = True

    async def start(**overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {
            "llm_provider": "gemini",
            "gemini_api_key": "long-key",
            "gemini_model": "long-model",
            "gemini_base_url": fake_gemini.url,
            "gemini_retry_initial_seconds": 0.01,
            "context_max_tokens": BUDGET,
            "title_generation": False,
            "message_rate_limit": 1000,
        }
        return await start_server(**{**settings, **overrides})

    return start


def texts(request: Recorded) -> list[str]:
    return [part["text"] for content in request.contents for part in content["parts"] if "text" in part]


def calls_have_results(request: Recorded) -> bool:
    """Every call is followed by its own result (by id), in order: no pair split by what was cut."""
    parts = [part for content in request.contents for part in content["parts"]]
    calls = [p["functionCall"]["id"] for p in parts if "functionCall" in p]
    results = [p["functionResponse"]["id"] for p in parts if "functionResponse" in p]
    return calls == results


async def chat(fake: FakeGemini, tab: Tab, sid: str, turns: int, start: int = 0) -> None:
    for n in range(start, start + turns):
        if n % 7 == 3:  # now and then a turn with a tool call and its result
            fake.stream(
                Reply(events=[chunk([call_part("get_weather", {"location": "Delhi"}, call_id=f"c{n}")], "STOP")]),
                Reply(events=[text_chunk(f"Weather answer {n}. {ANSWER}", "STOP")]),
            )
        else:
            fake.stream(Reply(events=[text_chunk(f"Answer {n}. {ANSWER}", "STOP")]))
        done, _ = await ask(tab, sid, f"Question number {n}: tell me more about the sea please")
        assert done["finish_reason"] == "stop", done
        await settled(fake, quiet=0.15)  # a compaction the turn started is stored before the next turn


async def settled(fake: FakeGemini, quiet: float = 0.3) -> None:
    """Until no compaction request came for `quiet` seconds (one made after the last turn included)."""
    seen = -1
    while seen != len(fake.compaction_requests):
        seen = len(fake.compaction_requests)
        await asyncio.sleep(quiet)


async def test_thirty_turns_under_a_small_budget_stay_within_it_with_a_growing_summary(
    start_counted: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory
) -> None:
    server = await start_counted()
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await chat(fake_gemini, tab, sid, 32)
    await settled(fake_gemini)

    turns = fake_gemini.calls()
    assert len(turns) == 32 + 5  # a request per turn, two for each of the five tool turns
    sizes = [prompt_tokens(request.contents) for request in turns]
    assert max(sizes) <= BUDGET, sizes
    assert all(calls_have_results(request) for request in turns)
    assert sum(1 for request in turns if any("functionCall" in p for c in request.contents for p in c["parts"])) > 5
    # The newest turns go verbatim, summary or not: each request carries the question before its own.
    for request in turns[1:]:
        number = int(texts(request)[-1].split()[2].rstrip(":"))
        assert f"Question number {number - 1}: tell me more about the sea please" in texts(request), number
    with_summary = [request for request in turns if texts(request)[0].startswith(SUMMARY_INTRO)]
    assert with_summary and turns[-1] in with_summary
    first = turns.index(with_summary[0])
    assert all(request in with_summary for request in turns[first:])  # once there, always there

    # Storage keeps every event: compaction changes only what the model is sent.
    history = (await tab.join(sid, history_limit=1000))["history"]
    assert len([e for e in history if e["event_type"] == "user_message"]) == 32
    # Incremental: each compaction extends the summary before it, and there is at most one per
    # half budget of new history.
    compactions = fake_gemini.compaction_requests
    history_tokens = sum(len(event["content"]) // 4 + 1 for event in history)
    assert 2 <= len(compactions) <= history_tokens // (BUDGET // 2) + 1, len(compactions)
    assert all("Summary so far: FAKE SUMMARY" in texts(request)[0] for request in compactions[1:])
    # The newest message goes whole, last.
    assert texts(turns[-1])[-1] == "Question number 31: tell me more about the sea please"
    metrics = await scrape(server.url)
    outcomes = metrics.by_label("realtime_compactions_total", "outcome")
    assert outcomes == {"ok": len(compactions), "error": 0}


async def test_the_stored_summary_is_used_after_a_restart_without_a_new_request(
    start_counted: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory, tmp_path: Any
) -> None:
    database = tmp_path / "long.db"
    server = await start_counted(sqlite_path=database)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await chat(fake_gemini, tab, sid, 16)
    await settled(fake_gemini)
    assert fake_gemini.compaction_requests
    await tab.close()
    await server.stop()

    compactions = len(fake_gemini.compaction_requests)
    again = await start_counted(sqlite_path=database)
    tab = await connect(again)
    await tab.join(sid)
    fake_gemini.stream(Reply(events=[text_chunk("After the restart.", "STOP")]))
    await ask(tab, sid, "Do you remember?")
    first = texts(fake_gemini.calls()[-1])[0]
    assert first.startswith(SUMMARY_INTRO + "FAKE SUMMARY")
    assert len(fake_gemini.compaction_requests) == compactions  # read from storage, not made again


async def test_a_failing_compaction_degrades_to_the_newest_turns_and_recovers(
    start_counted: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory
) -> None:
    server = await start_counted()
    fake_gemini.compaction_replies.extend([error_reply(400, "INVALID_ARGUMENT")] * 100)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await chat(fake_gemini, tab, sid, 10)
    await settled(fake_gemini)
    turns = fake_gemini.calls()
    assert max(prompt_tokens(request.contents) for request in turns) <= BUDGET
    assert not any(texts(request)[0].startswith(SUMMARY_INTRO) for request in turns)  # none stored yet
    assert texts(turns[-1])[0] != "Question number 0: tell me more about the sea please"  # oldest dropped
    errors = (await scrape(server.url)).by_label("realtime_compactions_total", "outcome")["error"]
    assert errors >= 1

    fake_gemini.compaction_replies.clear()  # the stand-in answers again: compaction catches up
    await chat(fake_gemini, tab, sid, 6, start=10)
    await settled(fake_gemini)
    assert texts(fake_gemini.calls()[-1])[0].startswith(SUMMARY_INTRO + "FAKE SUMMARY")
    assert (await scrape(server.url)).by_label("realtime_compactions_total", "outcome")["ok"] >= 1


async def test_a_message_larger_than_the_whole_budget_is_refused_and_stores_nothing(
    start_counted: ServerFactory, connect: TabFactory
) -> None:
    server = await start_counted(context_max_tokens=256)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "word " * 300})
    assert ack["error"]["code"] == "message_too_long", ack
    assert (await tab.join(sid))["history"] == []


async def test_an_older_file_is_sent_while_it_fits_then_named_in_the_summary(
    start_counted: ServerFactory, fake_gemini: FakeGemini, connect: TabFactory
) -> None:
    server = await start_counted(context_max_tokens=1600)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    async with httpx.AsyncClient(base_url=server.url) as http:
        files = {"file": ("chart.png", io.BytesIO(png), "image/png")}
        chart = (await http.post(f"/api/sessions/{sid}/attachments", files=files)).json()
    ack = await tab.call("message", {"session_id": sid, "text": "See this", "attachments": [chart["attachment_id"]]})
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    await chat(fake_gemini, tab, sid, 12)
    await settled(fake_gemini)

    def carries_the_file(request: Recorded) -> bool:
        return any("inlineData" in part for content in request.contents for part in content["parts"])

    turns = fake_gemini.calls()
    assert carries_the_file(turns[0]) and carries_the_file(turns[1])  # an image costs 1,000: it fits a while
    assert not carries_the_file(turns[-1])
    label = f'[file "chart.png" (image/png, {len(png)} bytes)]'
    assert any(label in text for request in fake_gemini.compaction_requests for text in texts(request))
