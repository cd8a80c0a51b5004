"""The log an operator reads, from a real `python -m server`: today's text lines or, with
LOG_FORMAT=json, one JSON object a line naming the session and turn; in neither a message's text
or a secret, and a WARNING when a tool fails."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

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
