"""Real servers on free ports, and a Socket.IO client that records what it receives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import engineio.payload
import httpx
import socketio
import uvicorn

from server.config import Settings
from server.main import create_app
from server.serve import Server, uvicorn_config

# python-engineio's polling client refuses a response that bundles more than 16 packets, and a
# streamed answer easily queues more between two polls (browsers have no such limit).
engineio.payload.Payload.max_decode_packets = 10_000


def free_port() -> int:
    """A port for a subprocess to bind (in-process servers get a bound socket instead: no race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening_socket() -> socket.socket:
    """Bound here and handed to uvicorn, so no other socket can take the port in between."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a `python -m server` subprocess: offline, SQLite, in `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "SUPABASE_", "REDIS_", "AUTH_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        HOST="127.0.0.1",
        PORT=str(port),
        SQLITE_PATH=str(tmp_path / "data" / "realtime.db"),
        LLM_PROVIDER="offline",
        STORAGE_BACKEND="sqlite",
        SUMMARY_DELAY_SECONDS="30",
    )
    env.update(extra)
    return env


async def wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if process.returncode is not None:
                raise RuntimeError(f"the service exited with {process.returncode}")
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("the service did not become healthy")


def test_settings(tmp_path: Path, port: int = 0, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "llm_provider": "offline",
        "storage_backend": "sqlite",
        "sqlite_path": tmp_path / f"realtime-{uuid.uuid4().hex[:8]}.db",
        "offline_chunk_delay_ms": 2,
        "summary_delay_seconds": 0.2,
        "log_level": "warning",
        "weather_geocoding_url": "http://127.0.0.1:9",
        "weather_forecast_url": "http://127.0.0.1:9",
        "gemini_api_key": None,
        "supabase_url": None,
        "redis_url": None,
        "shutdown_grace_seconds": 1,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class RunningServer:
    """Our app under the real uvicorn server, in this event loop."""

    def __init__(self, settings: Settings) -> None:
        self.socket = listening_socket()
        settings = settings.model_copy(update={"port": self.socket.getsockname()[1]})
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.app = create_app(settings)
        self.server = Server(uvicorn_config(settings, self.app))
        self.server.config.loop = "asyncio"  # the test's loop is already running
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RunningServer:
        self.server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        for _ in range(500):
            if self.server.started:
                return self
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        raise TimeoutError("server did not start")

    @property
    def runtime(self) -> Any:
        return self.app.api.state.runtime

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await asyncio.wait_for(self._task, timeout=30)
        self._task = None
        self.socket.close()


@contextlib.asynccontextmanager
async def serving(app: Any, lifespan: str = "off") -> AsyncIterator[str]:
    """Serve any ASGI app (the fakes) on a free port while the block runs; yields its URL."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    task.add_done_callback(lambda _: sock.close())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        # A request still open here (a slow tool call the turn cancelled) ends with the test, not
        # after its own delay: uvicorn would wait for it.
        for request in list(server.server_state.tasks):
            request.cancel()
        await task


async def run_python(
    argv: list[str], cwd: Path, env: dict[str, str], *, timeout: float = 60, merged: bool = False
) -> tuple[int | None, str, str]:
    """Run Python with `argv` until it exits: its status, stdout and stderr (`merged`: both in the
    first, in the order written). One that does not stop in `timeout` is killed: nothing is left."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merged else asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), (err or b"").decode()


@contextlib.asynccontextmanager
async def logged_server(
    tmp_path: Path, preexec: Callable[[], Any] | None = None, **extra: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    """`python -m server` with its whole output (stdout and stderr) in a file, while the block
    runs: yields the process, its URL and the log's path. Stopped (killed if it will not) after.
    `preexec` runs in the child before it starts (a lower resource limit, as a shell's ulimit)."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            cwd=tmp_path,
            env=service_env(tmp_path, port, **extra),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=preexec,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_healthy(url, process)
            yield process, url, log_path
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


@contextlib.contextmanager
def serving_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app (a stateless fake shared by many tests) on a free port from a thread with
    its own event loop while the block runs; yields its URL. No test's teardown waits for it."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="fake server")
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("the fake server did not start")
            threading.Event().wait(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True  # a request still open (a slow tool call a turn cancelled) is dropped
        thread.join(timeout=10)
        sock.close()


@dataclass
class Tab:
    """One browser tab: a socketio.AsyncClient that records every server event."""

    url: str
    transport: str = "websocket"
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    client: socketio.AsyncClient = field(default_factory=lambda: socketio.AsyncClient(reconnection=False))
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self, auth: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Tab:
        for name in (
            "user_message",
            "chunk",
            "tool_call",
            "tool_approval_request",
            "tool_approval_result",
            "tool_result",
            "done",
            "presence",
            "session_updated",
            "session_deleted",
        ):
            self.client.on(name, self._recorder(name))
        await self.client.connect(
            self.url, transports=[self.transport], wait_timeout=10, auth=auth, headers=headers or {}
        )
        return self

    def _recorder(self, name: str) -> Callable[[dict[str, Any]], Any]:
        async def record(data: dict[str, Any]) -> None:
            self.events.append((name, data))
            self._changed.set()

        return record

    async def call(self, event: str, *data: Any, timeout: float = 10) -> Any:
        payload: Any = data[0] if len(data) == 1 else (data if data else None)
        return await self.client.call(event, payload, timeout=timeout)

    async def join(self, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
        payload: dict[str, Any] = dict(extra)
        if session_id is not None:
            payload["session_id"] = session_id
        ack: dict[str, Any] = await self.call("join", payload)
        assert ack["ok"], ack
        return ack

    async def wait_for(self, predicate: Callable[[list[tuple[str, dict[str, Any]]]], Any], timeout: float = 10) -> Any:
        async def poll() -> Any:
            while True:
                found = predicate(self.events)
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(poll(), timeout)

    async def turn(self, turn_id: str, timeout: float = 10) -> list[tuple[str, dict[str, Any]]]:
        """Every event of the turn, once its `done` arrived."""
        await self.wait_for(lambda ev: any(n == "done" and d["turn_id"] == turn_id for n, d in ev), timeout)
        return [(n, d) for n, d in self.events if d.get("turn_id") == turn_id]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.events if n == name]

    async def close(self) -> None:
        if not self.client.connected:
            return
        if self.transport != "polling":
            await self.client.disconnect()
            return
        # python-engineio's client waits for its pending long-poll (up to the ping interval)
        # on disconnect; a browser aborts it, and so do we.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.client.disconnect(), 0.3)
        http = self.client.eio.http
        if http is not None and not http.closed:
            await http.close()


async def wait_for_summary(server: RunningServer, session_id: str, timeout: float = 10) -> Any:
    """The session once its summary is written (read straight from the server's repository)."""
    async with asyncio.timeout(timeout):
        while True:
            session = await server.runtime.repo.get_session(session_id)
            if session is not None and session.summary is not None:
                return session
            await asyncio.sleep(0.05)


@dataclass
class HangingUp:
    """A TCP listener that closes every connection at once, answering nothing: what a model
    endpoint that cannot be reached looks like to its client. `accepted`: connections so far."""

    url: str
    accepted: int = 0


@contextlib.asynccontextmanager
async def hanging_up() -> AsyncIterator[HangingUp]:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint.accepted += 1
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    endpoint = HangingUp(f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}")
    try:
        yield endpoint
    finally:
        listener.close()
        await listener.wait_closed()
