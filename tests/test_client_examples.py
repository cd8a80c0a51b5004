"""The example clients, run as a user would, against a live server."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest

from tests.conftest import ServerFactory, TabFactory
from tests.harness import RunningServer, free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "client_examples"


async def run(
    *argv: str, stdin: bytes = b"", cwd: Path | None = None, env: dict[str, str] | None = None, exit_code: int = 0
) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(stdin), 60)
    finally:
        if process.returncode is None:  # a client that hangs: leave nothing behind
            process.kill()
            await process.wait()
    text = out.decode()
    assert process.returncode == exit_code, text
    return text


async def test_python_client_chats_and_shows_tools(server: RunningServer) -> None:
    out = await run(
        sys.executable,
        str(EXAMPLES / "python_client.py"),
        "--url",
        server.url,
        stdin=b"How's the weather in Delhi?\nhello\n/quit\n",
    )
    assert "session " in out and "[1 tab(s) in this session]" in out
    assert "-> tool call get_weather({'location': 'Delhi'})" in out and "<- tool result {'location': 'Delhi'" in out
    assert "mainly clear in Delhi, India: 24.5 °C" in out
    assert out.count("[done: stop") == 2 and 'You wrote 1 word: "hello"' in out
    assert "[other tab]" not in out  # it knows its own messages


async def test_python_client_signs_in_with_a_token(start_server: ServerFactory) -> None:
    secret = "an-example-secret-of-more-than-32-bytes"
    server = await start_server(auth_jwt_secret=secret)
    valid = jwt.encode({"sub": "ada", "aud": "authenticated", "exp": int(time.time()) + 60}, secret, "HS256")
    out = await run(
        sys.executable, str(EXAMPLES / "python_client.py"), "--url", server.url, "--token", valid, stdin=b"hi\n/quit\n"
    )
    assert out.count("[done: stop") == 1
    refused = await run(
        sys.executable,
        str(EXAMPLES / "python_client.py"),
        "--url",
        server.url,
        env={"CHAT_TOKEN": "forged"},
        exit_code=1,
    )
    assert refused.strip() == f"connection refused by {server.url}: unauthorized"


async def test_python_client_says_a_refusal_in_one_line(server: RunningServer) -> None:
    out = await run(
        sys.executable, str(EXAMPLES / "python_client.py"), "--url", server.url, "--session", "abc", exit_code=1
    )
    assert out.strip() == "join refused: invalid_session_id: session_id must be a UUID", out


async def test_python_client_names_the_server_it_cannot_reach() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    out = await run(sys.executable, str(EXAMPLES / "python_client.py"), env={"SERVER_URL": dead}, exit_code=1)
    assert len(out.strip().splitlines()) == 1 and dead in out and "--url or SERVER_URL" in out, out
    usage = await run(sys.executable, str(EXAMPLES / "python_client.py"), "--help")
    assert "--url" in usage and "SERVER_URL" in usage


async def test_python_client_replays_history_as_it_shows_live_events(server: RunningServer) -> None:
    first = await run(
        sys.executable, str(EXAMPLES / "python_client.py"), "--url", server.url, stdin=b"How's the weather in Delhi?\n"
    )
    sid = first.split("session ", 1)[1].split()[0]
    again = await run(sys.executable, str(EXAMPLES / "python_client.py"), "--url", server.url, "--session", sid)
    live = [line for line in first.splitlines() if "-> tool call" in line or "<- tool result" in line]
    assert len(live) == 2
    for line in live:
        assert line in again.splitlines(), again
    assert "you: How's the weather in Delhi?" in again and '"call_id"' not in again


@pytest.fixture(scope="session")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have Node.js for the JavaScript client example")
        pytest.skip("Node.js is not installed here")
    target = tmp_path_factory.mktemp("node") / "client"
    shutil.copytree(EXAMPLES / "node", target, ignore=shutil.ignore_patterns("node_modules"))
    return target


@pytest.fixture(scope="session")
def installed_node_example(node_example: Path) -> Path:
    import subprocess

    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=node_example, check=True, timeout=180)
    return node_example


@pytest.fixture
async def node_client(installed_node_example: Path) -> AsyncIterator[Path]:
    yield installed_node_example


async def test_node_client_says_a_refusal_in_one_line(server: RunningServer, node_client: Path) -> None:
    out = await run(
        "node", "chat.mjs", "hi", "--session", "abc", cwd=node_client, env={"SERVER_URL": server.url}, exit_code=1
    )
    assert out.strip() == "join refused: invalid_session_id: session_id must be a UUID", out
    dead = f"http://127.0.0.1:{free_port()}"
    out = await run("node", "chat.mjs", "hi", "--url", dead, cwd=node_client, exit_code=1)
    assert len(out.strip().splitlines()) == 1 and dead in out and "--url or SERVER_URL" in out, out
    usage = await run("node", "chat.mjs", "--help", cwd=node_client)
    assert "--url" in usage and "SERVER_URL" in usage


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_node_client_streams_a_turn_seen_by_another_tab(
    start_server: ServerFactory, connect: TabFactory, node_client: Path, transport: str
) -> None:
    server = await start_server()
    python_tab = await connect(server)
    sid = (await python_tab.join())["session"]["session_id"]
    out = await run(
        "node",
        "chat.mjs",
        "How's the weather in Delhi?",
        "--session",
        sid,
        "--transport",
        transport,
        cwd=node_client,
        env={"SERVER_URL": server.url},
    )
    assert f"session {sid}" in out and "[2 tab(s) in this session]" in out
    assert '-> tool call get_weather({"location":"Delhi"})' in out
    assert "[done: stop" in out
    done = python_tab.named("done")
    assert len(done) == 1 and done[0]["text"] in out  # the JS tab printed exactly the streamed answer
    assert python_tab.named("user_message")[0]["text"] == "How's the weather in Delhi?"


async def test_plain_websocket_client_chats_beside_a_socketio_tab(server: RunningServer, connect: TabFactory) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    out = await run(
        sys.executable,
        str(EXAMPLES / "plain_ws_client.py"),
        "--url",
        server.url,
        "--session",
        sid,
        stdin=b"How's the weather in Delhi?\nhello\n",
    )
    assert out.startswith(f"session {sid} (0 events before)")
    assert "-> tool call get_weather({'location': 'Delhi'})" in out and "<- tool result {'location': 'Delhi'" in out
    assert out.count("[done: stop]") == 2
    done = await tab.wait_for(lambda ev: [d for n, d in ev if n == "done"][1:])
    assert done[0]["text"] in out  # the plain client printed exactly what the tab received


async def test_plain_websocket_client_says_a_refusal_in_one_line(server: RunningServer) -> None:
    out = await run(
        sys.executable, str(EXAMPLES / "plain_ws_client.py"), "--url", server.url, "--session", "abc", exit_code=1
    )
    assert out.strip() == "refused: invalid_session_id: session_id must be a UUID", out
    dead = f"http://127.0.0.1:{free_port()}"
    out = await run(sys.executable, str(EXAMPLES / "plain_ws_client.py"), env={"SERVER_URL": dead}, exit_code=1)
    assert len(out.strip().splitlines()) == 1 and "--url or SERVER_URL" in out and str(dead.split(":")[-1]) in out
