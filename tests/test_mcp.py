"""Tools from MCP servers, against real MCP servers written with the official SDK (tests/mcp_servers.py):
one over stdio (started by the service), one over Streamable HTTP (started here, on a free port)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.tools.mcp_schema import exposed_name, model_schema, unique_names
from tests.conftest import ServerFactory, Spawner, TabFactory
from tests.fake_gemini import FakeGemini, Reply, call_part, chunk, text_chunk
from tests.harness import REDIS_URL, ROOT, RunningServer, Tab, free_port, logged_server
from tests.test_metrics import scrape

TOKEN = "mcp-test-token"


@pytest.fixture(scope="module")
def mcp_http() -> Iterator[str]:
    """The Streamable HTTP server, for every test of this module (it keeps nothing a test reads but `seen`)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mcp_servers", "http", str(port), TOKEN], cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


LOCAL = {
    "command": sys.executable,
    "args": ["-m", "tests.mcp_servers", "stdio"],
    "env": {"GREETING": "hello", "PYTHONPATH": str(ROOT)},
}


def servers_file(tmp_path: Path, http_url: str | None = None, **extra: dict[str, Any]) -> Path:
    servers: dict[str, Any] = {"local": LOCAL}
    if http_url:
        servers["remote"] = {"url": http_url, "headers": {"Authorization": f"Bearer {TOKEN}"}}
    servers.update(extra)
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


async def run_turn(tab: Tab, session_id: str, text: str, timeout: float = 15) -> dict[str, Any]:
    """The turn's events by name (the last of each), after its `done`."""
    ack = await tab.call("message", {"session_id": session_id, "text": text})
    assert ack["ok"], ack
    return {name: data for name, data in await tab.turn(ack["turn_id"], timeout=timeout)}


async def use(tab: Tab, session_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    events = await run_turn(tab, session_id, f"use {tool} with {json.dumps(args)}")
    assert events["tool_call"]["name"] == tool and events["tool_call"]["args"] == args, events
    tool_result: dict[str, Any] = events["tool_result"]
    return tool_result


async def readiness(server: RunningServer) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer: dict[str, Any] = (await http.get("/readyz")).json()
        return answer


async def wait_until(predicate: Any, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def test_calls_their_results_and_their_failures(
    tmp_path: Path, mcp_http: str, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(mcp_servers_file=servers_file(tmp_path, mcp_http), mcp_result_max_chars=1000)
    states = (await readiness(server))["mcp_servers"]
    assert states["local"]["state"] == states["remote"]["state"] == "connected", states
    assert {"local__add", "local__echo", "local__slow"} <= set(states["local"]["tools"])
    assert {"remote__add", "remote__echo"} <= set(states["remote"]["tools"])
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]

    structured = await use(tab, sid, "remote__add", {"a": 2, "b": 3})
    assert structured["result"] == {"sum": 5} and structured["error"] is None
    text = await use(tab, sid, "local__echo", {"text": "hello there"})
    assert text["result"] == "hello there"
    refused = await use(tab, sid, "local__refuse", {"reason": "not today"})
    assert refused["error"]["code"] == "tool_error" and "not today" in refused["error"]["message"]
    exploded = await use(tab, sid, "remote__explode", {})
    assert refused["result"] is None and exploded["error"] == {"code": "tool_error", "message": "exploded on purpose"}
    crashed = await use(tab, sid, "local__crash", {})
    assert crashed["error"] == {"code": "tool_error", "message": "Error executing tool crash"}  # no bug details
    invalid = await use(tab, sid, "local__add", {"a": "two", "b": 3})
    assert invalid["error"]["code"] == "invalid_arguments" and "invalid arguments" in invalid["error"]["message"]
    capped = await use(tab, sid, "local__big", {"n": 50_000})
    assert capped["result"].startswith("x" * 1000) and "the first 1,000 are kept" in capped["result"]
    assert len(capped["result"]) < 1100

    # The server saw the calls it was sent, and not the one refused for its arguments.
    seen = await use(tab, sid, "local__seen_so_far", {})
    assert seen["result"]["calls"] == ["echo"], seen
    # The model hears the same as the tabs: the offline script answers from the result.
    answer = await run_turn(tab, sid, 'use remote__echo with {"text": "round trip"}')
    assert "The remote__echo tool answered: round trip" in answer["done"]["text"]
    async with httpx.AsyncClient(base_url=server.url) as http:
        events = (await http.get(f"/api/sessions/{sid}/events")).json()["events"]
    stored = [json.loads(e["content"]) for e in events if e["event_type"] == "tool_result"]
    assert (stored[0]["name"], stored[0]["result"]) == ("remote__add", {"sum": 5})
    assert max(len(e["content"]) for e in events) < 1500  # the 50,000 characters never reached the log
    metrics = await scrape(server.url)
    assert metrics.value("realtime_tool_calls_total", tool="remote__add", outcome="ok") == 1
    assert metrics.value("realtime_tool_calls_total", tool="local__refuse", outcome="error") == 1
    assert metrics.value("realtime_tool_calls_total", tool="remote__grow", outcome="ok") == 0  # offered, at 0


async def test_a_slow_call_times_out_and_a_cancelled_one_is_cancelled_on_the_server(
    tmp_path: Path, mcp_http: str, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(mcp_servers_file=servers_file(tmp_path, mcp_http), mcp_tool_timeout_seconds=1)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    late = await use(tab, sid, "local__slow", {"seconds": 5, "label": "timed-out"})
    assert late["error"]["code"] == "tool_timeout", late
    await wait_until(lambda: _seen_cancelled(tab, sid, "local", "timed-out"))

    ack = await tab.call(
        "message", {"session_id": sid, "text": 'use remote__slow with {"seconds": 0.9, "label": "stopped"}'}
    )
    await tab.wait_for(lambda ev: any(n == "tool_call" and d["turn_id"] == ack["turn_id"] for n, d in ev))
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    events = {n: d for n, d in await tab.turn(ack["turn_id"])}
    assert events["done"]["finish_reason"] == "cancelled"
    assert events["tool_result"]["error"]["code"] == "cancelled"
    await wait_until(lambda: _seen_cancelled(tab, sid, "remote", "stopped"))


async def _seen_cancelled(tab: Tab, sid: str, server: str, label: str) -> bool:
    seen = await use(tab, sid, f"{server}__seen_so_far", {})
    return label in seen["result"]["cancelled"]


async def test_a_stdio_server_killed_mid_session_is_restarted(
    tmp_path: Path, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(mcp_servers_file=servers_file(tmp_path))
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    before = (await use(tab, sid, "local__whoami", {}))["result"]
    # Exactly the file's environment, plus PATH (and what Python sets for itself: LC_CTYPE).
    assert set(before["env"]) - {"LC_CTYPE"} == {"GREETING", "PYTHONPATH", "PATH"} and before["greeting"] == "hello"

    ack = await tab.call("message", {"session_id": sid, "text": 'use local__slow with {"seconds": 20}'})
    await tab.wait_for(lambda ev: any(n == "tool_call" and d["turn_id"] == ack["turn_id"] for n, d in ev))
    os.kill(before["pid"], signal.SIGKILL)
    events = {n: d for n, d in await tab.turn(ack["turn_id"])}
    assert events["tool_result"]["error"]["code"] == "tool_error", events["tool_result"]
    assert events["done"]["finish_reason"] == "stop"

    async def reconnected() -> bool:
        return (await readiness(server))["mcp_servers"]["local"]["state"] == "connected"

    await wait_until(reconnected)
    after = (await use(tab, sid, "local__whoami", {}))["result"]
    assert after["pid"] != before["pid"]
    await server.stop()  # the service stops its stdio server with it
    with pytest.raises(ProcessLookupError):
        os.kill(after["pid"], 0)


async def test_an_unreachable_server_at_start_is_skipped_and_an_optional_one_keeps_readiness(
    tmp_path: Path, start_server: ServerFactory, connect: TabFactory
) -> None:
    ghost = {"url": f"http://127.0.0.1:{free_port()}/mcp"}
    missing = {"command": str(tmp_path / "no-such-server")}
    path = servers_file(tmp_path, ghost=ghost, missing=missing)
    server = await start_server(mcp_servers_file=path)
    ready = await readiness(server)
    assert ready["status"] == "ready", ready
    assert ready["mcp_servers"]["ghost"] == {
        "transport": "http", "state": "reconnecting", "tools": [], "last_error": "cannot connect", "required": False
    }  # fmt: skip
    assert ready["mcp_servers"]["missing"]["last_error"] == "cannot start the command (not found, or not executable)"
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    assert (await use(tab, sid, "local__add", {"a": 1, "b": 1}))["result"] == {"sum": 2}

    required = servers_file(tmp_path, ghost={**ghost, "required": True})
    strict = await start_server(mcp_servers_file=required)
    ready = await readiness(strict)
    assert ready["status"] == "unavailable" and any(
        r.startswith("mcp: ghost is reconnecting") for r in ready["reasons"]
    )


async def test_a_changed_tool_list_is_offered(tmp_path: Path, start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(mcp_servers_file=servers_file(tmp_path))
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    assert "local__extra" not in (await readiness(server))["mcp_servers"]["local"]["tools"]
    await use(tab, sid, "local__grow", {})

    async def offered() -> bool:
        return "local__extra" in (await readiness(server))["mcp_servers"]["local"]["tools"]

    await wait_until(offered)
    assert (await use(tab, sid, "local__extra", {}))["result"] == "I am new"


async def test_declarations_reach_gemini_and_a_history_with_mcp_calls_replays_after_a_restart(
    tmp_path: Path, mcp_http: str, fake_gemini: FakeGemini, start_server: ServerFactory, connect: TabFactory
) -> None:
    settings: dict[str, Any] = {
        "llm_provider": "gemini",
        "gemini_api_key": "test-key",
        "gemini_base_url": fake_gemini.url,
        "mcp_servers_file": servers_file(tmp_path, mcp_http, **{"my tools!": LOCAL, "long" * 16: LOCAL}),
        "sqlite_path": tmp_path / "kept.db",
    }
    server = await start_server(**settings)
    call = call_part("remote__add", {"a": 20, "b": 22}, call_id="c-1", signature="c2lnbmVk")
    fake_gemini.stream(Reply(events=[chunk([call], "STOP")]), Reply(events=[text_chunk("It is 42.", "STOP")]))
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    events = await run_turn(tab, sid, "What is 20 + 22?")
    assert events["tool_result"]["result"] == {"sum": 42} and events["done"]["text"] == "It is 42."

    declarations = {d["name"]: d for d in fake_gemini.calls()[0].body["tools"][0]["functionDeclarations"]}
    assert {"get_weather", "local__add", "remote__add", "local__search", "remote__search"} <= set(declarations)
    assert declarations["remote__add"]["description"] == "Adds two integers."
    # Names a provider would refuse are made valid and unique, the same way every time.
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", name) for name in declarations), list(declarations)
    digest = hashlib.sha256(b"my tools!__add").hexdigest()[:8]
    assert f"my_tools___add_{digest}" in declarations
    long_add = "_" + hashlib.sha256(("long" * 16 + "__add").encode()).hexdigest()[:8]
    assert ("long" * 16)[:55] + long_add in declarations
    schema = (
        declarations["local__search"].get("parametersJsonSchema")
        or declarations["local__search"]["parameters_json_schema"]
    )
    assert schema["type"] == "object" and schema["required"] == ["query"]
    query, limit = schema["properties"]["query"], schema["properties"]["limit"]
    assert query == {"description": "lower-case words", "title": "Query", "type": "string"}  # no pattern, lengths
    assert limit == {"maximum": 10, "minimum": 1, "title": "Limit", "type": "integer"}  # no default
    assert schema["properties"]["mode"]["enum"] == ["fast"]
    # ... while the call is still checked against the whole schema.
    fake_gemini.stream(
        Reply(events=[chunk([call_part("local__search", {"query": "UPPER"}, call_id="c-2")], "STOP")]),
        Reply(events=[text_chunk("No.", "STOP")]),
    )
    refused = await run_turn(tab, sid, "Search for UPPER")
    assert (
        refused["tool_result"]["error"]["code"] == "invalid_arguments"
        and "does not match" in refused["tool_result"]["error"]["message"]
    )

    await server.stop()
    restarted = await start_server(**settings)
    fake_gemini.stream(Reply(events=[text_chunk("Still 42.", "STOP")]))
    again = await connect(restarted)
    await again.join(sid)
    await run_turn(again, sid, "And now?")
    contents = fake_gemini.calls()[-1].contents
    parts = [part for content in contents for part in content["parts"]]
    replayed_call = next(p for p in parts if "functionCall" in p and p["functionCall"]["name"] == "remote__add")
    assert (
        replayed_call["functionCall"]["args"] == {"a": 20, "b": 22} and replayed_call["thoughtSignature"] == "c2lnbmVk"
    )
    response = next(p for p in parts if "functionResponse" in p and p["functionResponse"]["name"] == "remote__add")
    assert response["functionResponse"]["response"] == {"output": {"sum": 42}}
    first_turn = fake_gemini.calls()[1].contents  # what the model read right after the call, before the restart
    assert next(p for c in first_turn for p in c["parts"] if "functionResponse" in p) == response


async def test_two_processes_on_redis_each_have_their_own_sessions(
    tmp_path: Path, mcp_http: str, spawn: Spawner, redis_channel: str
) -> None:
    common = {
        "REDIS_URL": REDIS_URL,
        "REDIS_CHANNEL": redis_channel,
        "MCP_SERVERS_FILE": str(servers_file(tmp_path, mcp_http)),
    }
    _, first_url = await spawn(sys.executable, "-m", "server", **common)
    _, second_url = await spawn(sys.executable, "-m", "server", **common)
    first, second = await Tab(first_url).connect(), await Tab(second_url).connect()
    try:
        sid = (await first.join())["session"]["session_id"]
        await second.join(sid)
        on_first = (await use(first, sid, "remote__session", {}))["result"]
        # The other process's tab saw that turn, tool events included.
        await second.wait_for(lambda ev: any(n == "done" for n, _ in ev))  # the turn is over everywhere
        assert any(n == "tool_result" and d["name"] == "remote__session" for n, d in second.events)
        on_second = (await use(second, sid, "remote__session", {}))["result"]
        assert on_first["session"] and on_second["session"] and on_first["session"] != on_second["session"]
        local_first = (await use(first, sid, "local__whoami", {}))["result"]["pid"]
        local_second = (await use(second, sid, "local__whoami", {}))["result"]["pid"]
        assert local_first != local_second
    finally:
        await first.close()
        await second.close()


async def _healthz_latencies(url: str, out: list[float]) -> None:
    """GET /healthz every 20 ms until cancelled: how long the service's event loop leaves one waiting."""
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            started = time.monotonic()
            await http.get("/healthz")
            out.append(time.monotonic() - started)
            await asyncio.sleep(0.02)


async def test_a_stdio_server_printing_a_line_over_the_bound_is_restarted_and_others_go_on(tmp_path: Path) -> None:
    async with logged_server(
        tmp_path,
        LOG_FORMAT="json",
        MCP_SERVERS_FILE=str(servers_file(tmp_path)),
        OFFLINE_CHUNK_DELAY_MS="0",
        MESSAGE_RATE_LIMIT="1000",  # the other session sends as fast as its turns end
    ) as (process, url, log_path):
        flooding, other = await Tab(url).connect(), await Tab(url).connect()
        latencies: list[float] = []
        probe = asyncio.create_task(_healthz_latencies(url, latencies))
        try:
            sid, other_sid = (
                (await flooding.join())["session"]["session_id"],
                (await other.join())["session"]["session_id"],
            )
            before = (await use(flooding, sid, "local__whoami", {}))["result"]
            # 17 MiB in one line, over the 16 MiB bound, while another session's turns go on.
            ack = await flooding.call("message", {"session_id": sid, "text": 'use local__flood with {"mib": 17}'})
            flood_done = asyncio.ensure_future(flooding.turn(ack["turn_id"], timeout=40))
            other_turns: list[float] = []
            while not flood_done.done():
                started = time.monotonic()
                answer = await run_turn(other, other_sid, "Hello there", timeout=40)
                other_turns.append(time.monotonic() - started)
                assert answer["done"]["finish_reason"] == "stop", answer
            flooded = {name: data for name, data in await flood_done}

            async def restarted() -> bool:
                async with httpx.AsyncClient(base_url=url) as http:
                    state = (await http.get("/readyz")).json()["mcp_servers"]["local"]["state"]
                if state == "connected":
                    after.update((await use(flooding, sid, "local__whoami", {}))["result"] or {})
                    if after.get("pid", before["pid"]) != before["pid"]:
                        return True
                await asyncio.sleep(0.5)  # under the per-session message rate
                return False

            after: dict[str, Any] = {}
            await wait_until(restarted, timeout=30)
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await flooding.close()
            await other.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()
    print(
        f"\nother session: {len(other_turns)} turns meanwhile, longest {max(other_turns):.3f} s; "
        f"GET /healthz: {len(latencies)} probes, longest {max(latencies):.3f} s"
    )
    assert after["pid"] != before["pid"]  # restarted, and its tools work again (else wait_until timed out)
    assert flooded["tool_result"]["error"]["code"] == "tool_error", flooded["tool_result"]
    assert flooded["done"]["finish_reason"] == "stop"
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")] and "Traceback" not in text
    warnings = [r for r in records if r["level"] == "WARNING"]
    restart = [r for r in warnings if r["logger"].startswith("server.tools.mcp")]
    assert len(restart) == 1 and "LineTooLong" in restart[0]["message"], warnings
    # Besides, the call it dropped is the turn's tool failure, in its one line.
    assert [r["message"] for r in warnings if r not in restart] == ["tool local__flood failed: tool_error (MCPError)"]
    assert max(other_turns) < 10  # a sanity bound only; the figures above are the measurement


async def test_the_shipped_example_server_as_mcp_example_json_starts_it(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file names the checkout's venv by a relative path, as `make run` (cwd: the checkout) sees it.
    if not (ROOT / ".venv/bin/python").exists():
        pytest.skip("mcp.example.json starts .venv/bin/python, which this checkout does not have")
    monkeypatch.chdir(ROOT)
    server = await start_server(mcp_servers_file=ROOT / "mcp.example.json")
    assert (await readiness(server))["mcp_servers"]["example"]["tools"] == [
        "example__add", "example__count_words", "example__utc_now"
    ]  # fmt: skip
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "client_examples/python_client.py"),
        "--url",
        server.url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(client.communicate(b'use example__add with {"a": 2, "b": 3.5}\n/quit\n'), 60)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    text = out.decode()
    assert "tool call example__add({'a': 2, 'b': 3.5})" in text and "tool result {'sum': 5.5}" in text, text
    assert 'The example__add tool answered: {"sum": 5.5}' in text, text


def test_every_provider_gets_valid_unique_names_and_the_schema_keywords_gemini_takes() -> None:
    assert unique_names([("a", "b"), ("x", "y")], taken={"a__b"}) == {("x", "y"): "x__y"}  # never a taken name
    assert (
        exposed_name("weird server", "tool")
        == exposed_name("weird server", "tool")
        != exposed_name("weird_server", "tool")
    )
    # One rule for Gemini and OpenAI alike: `.` and `:` (which Gemini would take) are replaced too.
    listed = [("files", "read.text"), ("files", "read:text"), ("files", "read_text"), ("9lives", "x"), ("s", "t" * 80)]
    names = unique_names(listed)
    assert names[("files", "read_text")] == "files__read_text"
    assert len(set(names.values())) == len(listed)
    for name in names.values():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", name), name
    assert names[("files", "read.text")].startswith("files__read_text_")  # the hash keeps twins apart
    schema = model_schema(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "properties": {
                "x": {"oneOf": [{"const": "a"}, {"type": "integer", "multipleOf": 2, "exclusiveMinimum": 0}]},
                "y": {"allOf": [{"type": "string"}], "default": "b", "enum": ["b", True, None, 3]},
                "z": {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^q", "format": "email"},
                    "uniqueItems": True,
                },
            },
            "additionalProperties": False,
            "if": {"required": ["x"]},
        }
    )
    assert schema == {
        "type": "object",
        "properties": {
            "x": {"anyOf": [{"enum": ["a"]}, {"type": "integer"}]},
            "y": {"enum": ["b", 3]},
            "z": {"type": "array", "items": {"type": "string", "format": "email"}},
        },
        "additionalProperties": False,
    }
