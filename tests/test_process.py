"""The service as operators run it: `python -m server` and `uvicorn server.main:app`, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sqlite3
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.fake_gemini import FakeGemini, Reply, text_chunk, usage
from tests.harness import Tab, free_port, listening_socket, logged_server, run_python, service_env


async def test_sigterm_mid_turn_ends_it_with_done_and_stores_everything(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    process, url = await spawn(sys.executable, "-m", "server", OFFLINE_CHUNK_DELAY_MS="60")
    tab = await Tab(url, "websocket").connect()
    watcher = await Tab(url, "polling").connect()
    try:
        sid = (await tab.join())["session"]["session_id"]
        await watcher.join(sid)
        ack = await tab.call("message", {"session_id": sid, "text": "a turn the server will not finish"})
        await tab.wait_for(lambda _: len(tab.named("chunk")) >= 3)
        process.send_signal(signal.SIGTERM)
        done = (await tab.turn(ack["turn_id"], timeout=10))[-1][1]
        assert done["finish_reason"] == "error"
        assert done["error"] == {"code": "shutdown", "message": "the server is shutting down"}
        assert done["text"] and isinstance(done["event_id"], int)
        assert (await watcher.turn(ack["turn_id"], timeout=10))[-1][1] == done
        assert await asyncio.wait_for(process.wait(), 20) in (
            0,
            -signal.SIGTERM,
        )  # uvicorn re-raises the signal once clean
    finally:
        await tab.close()
        await watcher.close()

    db = sqlite3.connect(tmp_path / "data" / "realtime.db")
    rows = db.execute("SELECT event_id, event_type, content FROM events WHERE session_id = ? ORDER BY event_id", (sid,))
    assert [r[1:] for r in rows] == [
        ("user_message", "a turn the server will not finish"),
        ("ai_message", done["text"]),
    ]
    # The session emptied at shutdown, so its summary was written then rather than lost.
    summary, end_time = db.execute("SELECT summary, end_time FROM sessions WHERE session_id = ?", (sid,)).fetchone()
    assert summary and "1 user messages" in summary and end_time
    db.close()


async def test_uvicorn_serves_the_same_app(spawn) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    process, url = await spawn(
        sys.executable, "-m", "uvicorn", "server.main:app", "--host", "127.0.0.1", "--port", str(port), port=port
    )
    tab = await Tab(url, "websocket").connect()
    try:
        sid = (await tab.join())["session"]["session_id"]
        ack = await tab.call("message", {"session_id": sid, "text": "hello uvicorn"})
        done = (await tab.turn(ack["turn_id"]))[-1][1]
        assert done["finish_reason"] == "stop"
        # The simplest way in: a plain WebSocket, plain text.
        async with ws_connect(url.replace("http://", "ws://") + f"/ws/session/{uuid.uuid4()}") as ws:
            assert json.loads(await ws.recv())["event"] == "session"
            await ws.send("How's the weather in Delhi ?")
            frames = []
            while not frames or frames[-1]["event"] != "done":
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        assert [f["event"] for f in frames][:2] == ["presence", "ack"] and frames[-1]["data"]["finish_reason"] == "stop"
    finally:
        await tab.close()
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once clean


async def run_to_the_end(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Run Python with `argv` until it exits: its status and its whole output."""
    status, out, _ = await run_python(argv, cwd, env, timeout=30, merged=True)
    return status, out


UNUSABLE_SETTINGS = [
    ("PORT", "abc", "PORT='abc' cannot be used: it should be a valid integer"),
    ("PORT", "99999", "PORT='99999' cannot be used: it should be less than or equal to 65535"),
    ("STORAGE_BACKEND", "mysql", "STORAGE_BACKEND='mysql' cannot be used: it should be 'sqlite', 'postgres' or"),
    ("MAX_MESSAGE_CHARS", "-5", "MAX_MESSAGE_CHARS='-5' cannot be used: it should be greater than 0"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL='loud' cannot be used: it should be 'critical', 'error', 'warning'"),
    ("STORAGE_BACKEND", "postgres", "STORAGE_BACKEND=postgres needs DATABASE_URL"),
    ("STORAGE_BACKEND", "supabase", "STORAGE_BACKEND=supabase needs SUPABASE_URL and SUPABASE_KEY"),
    ("WORKERS", "2", "WORKERS > 1 needs REDIS_URL"),
    ("LLM_PROVIDER", "openai", "LLM_PROVIDER=openai needs OPENAI_MODEL"),
    ("OPENAI_BASE_URL", "localhost:11434", "OPENAI_BASE_URL='localhost:11434' cannot be used: it must be an http(s)"),
    ("MCP_SERVERS_FILE", "/no/mcp.json", "MCP_SERVERS_FILE='/no/mcp.json' cannot be used: it cannot be read (No such"),
    ("MCP_SERVERS_FILE", "/dev/null", "MCP_SERVERS_FILE='/dev/null' cannot be used: it is not JSON"),
]


# Every setting through `python -m server`; uvicorn's import of the app checks them the same way.
CASES = [("python -m server", *case) for case in UNUSABLE_SETTINGS] + [
    ("uvicorn server.main:app", *case) for case in (UNUSABLE_SETTINGS[0], UNUSABLE_SETTINGS[5])
]


async def test_ctrl_c_stops_it_cleanly_without_a_traceback(tmp_path: Path) -> None:
    async with logged_server(tmp_path) as (process, _, log_path):
        process.send_signal(signal.SIGINT)  # what Ctrl-C on `make run` sends
        returncode = await asyncio.wait_for(process.wait(), 20)
    out = log_path.read_text()
    assert "stopped cleanly" in out and "Traceback" not in out, out
    assert returncode == 130  # the shell's code for "ended by SIGINT"


@pytest.mark.parametrize(
    ("command", "setting", "value", "says"), CASES, ids=[f"{c.split()[0]}-{s}={v}" for c, s, v, _ in CASES]
)
async def test_an_unusable_setting_stops_it_with_one_message_and_no_traceback(
    tmp_path: Path, command: str, setting: str, value: str, says: str
) -> None:
    env = service_env(tmp_path, free_port(), **{setting: value}, SUPABASE_KEY="s3cret")
    argv = ["-m", "server"] if command == "python -m server" else ["-m", "uvicorn", "server.main:app"]
    returncode, out = await run_to_the_end(argv, tmp_path, env)
    assert returncode != 0
    assert says in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) <= 3, out
    assert "s3cret" not in out
    assert not (tmp_path / "data").exists()  # nothing was opened or created


async def test_a_second_server_on_a_busy_port_stops_before_it_opens_anything(tmp_path: Path) -> None:
    busy = listening_socket()
    busy.listen()
    try:
        returncode, out = await run_to_the_end(["-m", "server"], tmp_path, service_env(tmp_path, busy.getsockname()[1]))
    finally:
        busy.close()
    assert returncode != 0
    assert "address already in use" in out.lower() and "startup complete" not in out, out
    assert not (tmp_path / "data").exists()  # the database was never opened


async def test_a_gemini_api_key_alone_switches_the_model_to_gemini(spawn, fake_gemini: FakeGemini) -> None:  # type: ignore[no-untyped-def]
    fake_gemini.stream(
        Reply(events=[text_chunk("From ", meta=usage(4, 1)), text_chunk("Gemini.", "STOP", usage(4, 2))])
    )
    _, url = await spawn(
        sys.executable, "-m", "server", LLM_PROVIDER="", GEMINI_API_KEY="from-env", GEMINI_BASE_URL=fake_gemini.url
    )
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/readyz")).status_code == 200
    tab = await Tab(url, "websocket").connect()
    try:
        sid = (await tab.join())["session"]["session_id"]
        ack = await tab.call("message", {"session_id": sid, "text": "Which model?"})
        done = (await tab.turn(ack["turn_id"]))[-1][1]
    finally:
        await tab.close()
    assert (done["text"], done["usage"]) == ("From Gemini.", {"input_tokens": 4, "output_tokens": 2})
    (request,) = fake_gemini.requests
    assert request.headers["x-goog-api-key"] == "from-env"
    assert request.contents == [{"role": "user", "parts": [{"text": "Which model?"}]}]


async def test_settings_come_from_a_dot_env_file(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / ".env").write_text("MAX_MESSAGE_CHARS=5\nOFFLINE_CHUNK_DELAY_MS=0\n")
    _, url = await spawn(sys.executable, "-m", "server")
    tab = await Tab(url, "websocket").connect()
    try:
        sid = (await tab.join())["session"]["session_id"]
        refused = await tab.call("message", {"session_id": sid, "text": "123456"})
        assert refused["error"]["code"] == "message_too_long" and "5 characters" in refused["error"]["message"]
        assert (await tab.call("message", {"session_id": sid, "text": "12345"}))["ok"]
    finally:
        await tab.close()


async def test_a_low_open_file_limit_is_raised_to_the_hard_one_and_logged(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise to")
    # As a shell with `ulimit -n 512` would start it.
    lower = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # noqa: E731
    async with logged_server(tmp_path, preexec=lower) as (process, _, log_path):
        limits = await asyncio.to_thread(Path(f"/proc/{process.pid}/limits").read_text)
    (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
    expected = str(1_048_576 if hard == resource.RLIM_INFINITY else hard)  # the kernel's usual nr_open
    assert line.split()[3] == expected, line
    assert "raised the open-file limit from 512 to" in log_path.read_text()
