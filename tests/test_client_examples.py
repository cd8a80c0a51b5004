"""The example clients, run as a user would, against a live server."""

from __future__ import annotations

import asyncio
import codecs
import os
import shutil
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import ServerFactory, TabFactory
from tests.fake_openai import FakeOpenAI, Reply, call_delta, finish_chunk, text_chunk, text_reply, tool_calls_chunk
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
    assert out.startswith(f"session {sid}\n")
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


# ---------------------------------------------------------------- long sessions, titles, deletion

LONG = 3000  # events written with plain SQL, then one answer too big for a default frame
BIG = "long " * 1_000_000  # 5 MB: over aiohttp's 4 MiB and websockets' 1 MiB message limits
PAGE = 50  # the examples' history page


def insert_long_session(path: Path, session_id: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("insert into sessions (session_id, user_id) values (?, 'reader')", (session_id,))
        db.executemany(
            "insert into events (session_id, event_type, content) values (?, ?, ?)",
            ((session_id, "user_message" if n % 2 == 0 else "ai_message", f"event {n}") for n in range(LONG)),
        )
        db.execute(
            "insert into events (session_id, event_type, content) values (?, 'ai_message', ?)", (session_id, BIG)
        )


@pytest.fixture
async def long_session(server: RunningServer) -> tuple[str, str]:
    """A session of LONG + 1 events, and the line the examples print about its earlier ones."""
    sid = str(uuid.uuid4())
    await asyncio.to_thread(insert_long_session, server.settings.sqlite_path, sid)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        page = (await http.get(f"/api/sessions/{sid}/events", params={"limit": PAGE})).json()
        first = page["events"][0]["event_id"]
        earlier = f"{server.url}/api/sessions/{sid}/events?before_event_id={first}"
        before = (await http.get(f"{earlier}&limit=10")).json()  # where the line points
    assert [e["content"] for e in before["events"]] == [f"event {n}" for n in range(LONG - PAGE - 9, LONG - PAGE + 1)]
    assert before["more"] is True
    return sid, f"[earlier messages not shown: GET {earlier}]"


def shows_the_last_page(out: str, earlier_line: str) -> None:
    assert out.count(earlier_line) == 1, out[:2000]
    assert f"event {LONG - PAGE + 1}\n" in out and f"event {LONG - PAGE}\n" not in out, out[:2000]
    assert BIG.strip() in out  # the answer too big for a default frame, whole
    assert out.index(earlier_line) < out.index(f"event {LONG - 1}\n") < out.index(BIG)


async def test_python_client_shows_the_last_page_of_a_long_session_and_chats(
    server: RunningServer, long_session: tuple[str, str]
) -> None:
    sid, earlier_line = long_session
    argv = [sys.executable, str(EXAMPLES / "python_client.py"), "--url", server.url, "--session", sid]
    out = await run(*argv, stdin=b"hello\n")
    shows_the_last_page(out, earlier_line)
    assert out.count("[done: stop") == 1 and 'You wrote 1 word: "hello"' in out
    again = await run(*argv, "--history", "3", stdin=b"/quit\n")
    assert BIG in again and "you: hello\n" in again and f"event {LONG - 1}\n" not in again  # the last 3
    assert "[earlier messages not shown: GET " in again


async def test_plain_websocket_client_shows_the_last_page_of_a_long_session_and_chats(
    server: RunningServer, long_session: tuple[str, str]
) -> None:
    sid, earlier_line = long_session
    out = await run(
        sys.executable, str(EXAMPLES / "plain_ws_client.py"), "--url", server.url, "--session", sid, stdin=b"hello\n"
    )
    assert out.startswith(f"session {sid}\n")
    shows_the_last_page(out, earlier_line)
    assert out.count("[done: stop]") == 1 and 'You wrote 1 word: "hello"' in out


async def test_node_client_shows_the_last_page_of_a_long_session_and_chats(
    server: RunningServer, long_session: tuple[str, str], node_client: Path
) -> None:
    sid, earlier_line = long_session
    out = await run("node", "chat.mjs", "hello", "--session", sid, cwd=node_client, env={"SERVER_URL": server.url})
    assert f"session {sid}\n" in out
    shows_the_last_page(out, earlier_line)
    assert out.count("[done: stop") == 1 and 'You wrote 1 word: "hello"' in out


class Running:
    """An example client left running with its input open; what it has printed so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    async def until(self, seen: Callable[[str], bool], timeout: float = 20) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while not seen(self.out):
                data = await self.process.stdout.read(65536)
                assert data, f"it ended first:\n{self.out}"
                self.out += self._decoder.decode(data)
        return self.out

    async def ends(self, timeout: float = 10) -> int:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            self.out += self._decoder.decode(await self.process.stdout.read(), final=True)
            return await self.process.wait()


Starter = Callable[..., Awaitable[Running]]


@pytest.fixture
async def started() -> AsyncIterator[Starter]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(*argv: str) -> Running:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        processes.append(process)
        return Running(process)

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_clients_show_titles_and_end_when_their_session_is_deleted(
    start_server: ServerFactory, started: Starter
) -> None:
    server = await start_server(offline_chunk_delay_ms=40)  # an answer streams for about a second
    python = await started(sys.executable, str(EXAMPLES / "python_client.py"), "--url", server.url)
    assert python.process.stdin is not None
    python.process.stdin.write(b"hello\n")
    out = await python.until(lambda out: "[done: stop" in out)
    sid = out.split("session ", 1)[1].split()[0]
    await python.until(lambda out: "\n[title: hello]\n" in out)  # made from the first message, once answered
    plain = await started(sys.executable, str(EXAMPLES / "plain_ws_client.py"), "--url", server.url, "--session", sid)
    shown = await plain.until(lambda out: 'You wrote 1 word: "hello"' in out)  # the history's answer
    assert shown.startswith(f"session {sid}\n[title: hello]\nyou: hello\n"), shown

    python.process.stdin.write(b"tell me more\n")
    await python.until(lambda out: out.count("[offline ") == 2)
    await plain.until(lambda out: out.count("[offline ") == 2)  # both are printing the answer
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.patch(f"/api/sessions/{sid}", json={"title": "Named by a person"})).status_code == 200
        for client in (python, plain):  # not in the middle of the answer: on its own line after it
            out = await client.until(lambda out: "[title: Named by a person]\n" in out)
            before = out.split("[title: Named by a person]")[0].splitlines()
            assert before[-1].startswith("[done: stop") and 'You wrote 3 words: "tell me more"' in before[-2], out
        assert (await http.delete(f"/api/sessions/{sid}")).status_code == 204
    # Their input is still open: the deletion alone ends them, with its line and status 1.
    for client in (python, plain):
        assert await client.ends() == 1, client.out
        assert client.out.rstrip().endswith(f"[session {sid} was deleted; this chat is over]"), client.out


async def test_both_example_clients_chat_through_an_openai_compatible_endpoint(
    fake_openai: FakeOpenAI, start_server: ServerFactory, node_client: Path
) -> None:
    # What Ollama streams (each call whole, no index), then its answer; once for each client.
    for _ in range(2):
        fake_openai.stream(
            Reply(
                events=[
                    text_chunk("Let me look. "),
                    tool_calls_chunk(call_delta(None, "call_7", "get_weather", '{"location": "Delhi"}')),
                    finish_chunk("stop"),
                ]
            ),
            text_reply("Delhi is mainly clear, 24.5 °C."),
        )
    server = await start_server(
        llm_provider="openai", openai_base_url=f"{fake_openai.url}/v1", openai_model="llama3.1:8b"
    )
    out = await run(
        sys.executable,
        str(EXAMPLES / "python_client.py"),
        "--url",
        server.url,
        stdin=b"How's the weather in Delhi?\n/quit\n",
    )
    assert "-> tool call get_weather({'location': 'Delhi'})" in out and "<- tool result {'location': 'Delhi'" in out
    assert "assistant: Let me look." in out and "assistant: Delhi is mainly clear, 24.5 °C." in out, out
    assert "[done: stop, tokens in/out 10/3]" in out, out

    out = await run("node", "chat.mjs", "How's the weather in Delhi?", cwd=node_client, env={"SERVER_URL": server.url})
    assert '-> tool call get_weather({"location":"Delhi"})' in out and '<- tool result {"location":"Delhi"' in out
    assert "\nDelhi is mainly clear, 24.5 °C.\n[done: stop, tokens in/out 10/3" in out, out
    assert [r.body["model"] for r in fake_openai.requests] == ["llama3.1:8b"] * 4
