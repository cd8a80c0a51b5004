"""The log an operator reads, from a real `python -m server`: today's text lines or, with
LOG_FORMAT=json, one JSON object a line naming the session and turn; in neither a message's text
or a secret, and a WARNING when a tool fails."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.harness import Tab, logged_server
from tests.test_auth import SECRET, token

SECRET_TEXT = "my plan 77Q-zebra: how's the weather in Atlantis?"


async def _workload(url: str) -> tuple[str, str, str]:
    """A turn whose tool fails (nothing listens where the weather upstream should be)."""
    user_token = token("logs-user")
    tab = await Tab(url).connect(auth={"token": user_token})
    try:
        session_id = (await tab.join())["session"]["session_id"]
        ack = await tab.call("message", {"session_id": session_id, "text": SECRET_TEXT})
        events = await tab.turn(ack["turn_id"])
        assert [n for n, _ in events][:3] == ["user_message", "tool_call", "tool_result"]
        assert events[2][1]["error"] is not None
    finally:
        await tab.close()
    # The plain WebSocket takes its token in the URL, which uvicorn logs.
    ws_url = url.replace("http://", "ws://") + f"/ws/session/{session_id}?token={user_token}"
    async with connect(ws_url) as ws:
        assert json.loads(await ws.recv())["event"] == "session"
    return session_id, ack["turn_id"], user_token


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_the_log_names_what_failed_and_never_what_was_said(tmp_path: Path, log_format: str) -> None:
    async with logged_server(
        tmp_path,
        LOG_FORMAT=log_format,
        AUTH_JWT_SECRET=SECRET,
        WEATHER_GEOCODING_URL="http://127.0.0.1:9",
        WEATHER_FORECAST_URL="http://127.0.0.1:9",
        OFFLINE_CHUNK_DELAY_MS="0",
    ) as (process, _url, log_path):
        session_id, turn_id, user_token = await _workload(_url)
        process.send_signal(signal.SIGTERM)
        await process.wait()
    log = log_path.read_text()
    for secret in (SECRET_TEXT, "77Q-zebra", "Atlantis", user_token, SECRET):
        assert secret not in log
    lines = [line for line in log.splitlines() if line.strip()]
    if log_format == "text":
        assert any(" WARNING server.core.turn: tool get_weather failed" in line for line in lines), log
        return
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is one object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    warning = [r for r in records if r["level"] == "WARNING" and r["message"].startswith("tool get_weather failed")]
    assert len(warning) == 1, records
    assert (warning[0]["logger"], warning[0]["session_id"], warning[0]["turn_id"]) == (
        "server.core.turn",
        session_id,
        turn_id,
    )
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "server"} <= loggers  # uvicorn's own lines are JSON too


# ------------------------------------------------------------------------------ debug and trace levels

DEBUG_TEXT = "Atlantis 77Q-zebra plan: meet at the third lighthouse"


async def _plain_turn(url: str, session_id: str, query: str = "", headers: dict[str, str] | None = None) -> None:
    """A message over the plain WebSocket, its turn read to `done`."""
    ws_url = url.replace("http://", "ws://") + f"/ws/session/{session_id}" + (f"?{query}" if query else "")
    async with connect(ws_url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["event"] == "session"
        await ws.send(DEBUG_TEXT)
        async with asyncio.timeout(10):
            while (frame := json.loads(await ws.recv()))["event"] != "done":
                if frame["event"] == "ack":
                    assert frame["data"]["ok"], frame


async def _refused_plain(url: str, query: str) -> None:
    """A token under a key the server does not read (`Token=`): refused with 4401, still a secret."""
    ws_url = url.replace("http://", "ws://") + f"/ws/session/{uuid.uuid4()}?{query}"
    async with connect(ws_url) as ws:
        assert json.loads(await ws.recv())["data"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4401


async def _every_door(url: str) -> list[str]:
    """Socket.IO (WebSocket and long-polling) with the token in `auth`, the plain WebSocket with it in
    `?token=`, `?%74oken=`, `?t%6Fk%65n=` and `Authorization`; a message with DEBUG_TEXT through each.
    The tokens, each of its own."""
    tokens = []
    for transport in ("websocket", "polling"):
        tokens.append(token(f"debug-{transport}"))
        tab = await Tab(url, transport).connect(auth={"token": tokens[-1]})
        try:
            session_id = (await tab.join())["session"]["session_id"]
            ack = await tab.call("message", {"session_id": session_id, "text": DEBUG_TEXT})
            await tab.turn(ack["turn_id"])
        finally:
            await tab.close()
    for key in ("token", "%74oken", "t%6Fk%65n"):
        tokens.append(token(f"debug-{key}"))
        await _plain_turn(url, str(uuid.uuid4()), f"after_event_id=0&{key}={tokens[-1]}")
    tokens.append(token("debug-header"))
    await _plain_turn(url, str(uuid.uuid4()), headers={"Authorization": f"Bearer {tokens[-1]}"})
    tokens.append(token("debug-misspelt"))
    await _refused_plain(url, f"Token={tokens[-1]}")
    # HTTP: the Bearer header, and a token in the query (which HTTP does not read, but uvicorn logs).
    tokens += [token("debug-http"), token("debug-http-query")]
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.get(
            f"/api/sessions/{uuid.uuid4()}?%54OKEN={tokens[-1]}", headers={"Authorization": f"Bearer {tokens[-2]}"}
        )
        assert answer.status_code == 404
    return tokens


@pytest.mark.parametrize(("level", "log_format"), [("debug", "text"), ("debug", "json"), ("trace", "text")])
async def test_no_level_and_no_spelling_of_the_url_logs_a_token_or_a_text(
    tmp_path: Path, level: str, log_format: str
) -> None:
    async with logged_server(
        tmp_path,
        LOG_LEVEL=level,
        LOG_FORMAT=log_format,
        AUTH_JWT_SECRET=SECRET,
        OFFLINE_CHUNK_DELAY_MS="0",
    ) as (process, url, log_path):
        tokens = await _every_door(url)
        process.send_signal(signal.SIGTERM)
        await process.wait()
    log = log_path.read_text()
    lines = log.splitlines()
    # The log did record at this level, the connections included (else the test would prove nothing).
    assert any("/ws/session/" in line for line in lines), log
    assert any(("DEBUG" if log_format == "text" else '"level": "DEBUG"') in line for line in lines), log
    secrets = [DEBUG_TEXT, "77Q-zebra", "Atlantis", "lighthouse", SECRET]
    for secret in tokens:
        secrets += [secret, secret.rsplit(".", 1)[1]]  # the whole token, and its signature alone
    leaks = [line for line in lines if any(secret in line for secret in secrets)]
    assert not leaks, f"{len(leaks)} of {len(lines)} lines hold a token or the text:\n" + "\n".join(leaks[:20])
    if log_format == "json":
        for line in lines:
            json.loads(line)  # every line one object, uvicorn's and the protocol's debug lines included
