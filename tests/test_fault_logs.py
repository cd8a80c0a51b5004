"""Handled failures in the whole log of a real `python -m server` ("Faults → A handled failure logs
one line"): a model that refuses or cannot be reached, an MCP server that cannot be reached or
prints garbage on stdout and stderr. Each is one WARNING line naming the code and the cause's class,
repeated ones rate-limited; never an ERROR or a traceback, and with LOG_FORMAT=json every line of the
log is one JSON object (a stdio server's stderr included)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fake_gemini import FakeGemini, error_reply
from tests.harness import ROOT, Tab, free_port, logged_server

Record = dict[str, Any]


def read_log(log_path: Path) -> tuple[str, list[Record]]:
    """The whole log, and its records: every line must be one JSON object."""
    text = log_path.read_text()
    return text, [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_no_bug_reported(text: str, records: list[Record]) -> None:
    bugs = [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert not bugs, bugs
    assert "Traceback" not in text


def gemini_env(base_url: str, repeat_seconds: str) -> dict[str, str]:
    return {
        "LOG_FORMAT": "json",
        "LOG_REPEAT_SECONDS": repeat_seconds,
        "LLM_PROVIDER": "gemini",
        "GEMINI_API_KEY": "test-gemini-key",
        "GEMINI_MODEL": "gemini-test-flash",
        "GEMINI_BASE_URL": base_url,
        "GEMINI_RETRY_ATTEMPTS": "2",
        "GEMINI_RETRY_INITIAL_SECONDS": "0.01",
    }


async def failed_turn(tab: Tab, session_id: str, code: str) -> str:
    ack = await tab.call("message", {"session_id": session_id, "text": "Hello?"})
    assert ack["ok"], ack
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert done["finish_reason"] == "error" and done["error"]["code"] == code, done
    turn_id: str = ack["turn_id"]
    return turn_id


FAILURES = {
    # failure: (code, the cause's class)
    "rejected": ("provider_rejected", "ClientError"),
    "unreachable": ("provider_unavailable", "ConnectError"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_failing_model_is_one_warning_per_turn_without_traceback(
    tmp_path: Path, fake_gemini: FakeGemini, failure: str
) -> None:
    code, cause = FAILURES[failure]
    if failure == "rejected":
        fake_gemini.stream(*[error_reply(400, "INVALID_ARGUMENT", "API key not valid") for _ in range(3)])
        base_url = fake_gemini.url
    else:
        base_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with logged_server(tmp_path, **gemini_env(base_url, repeat_seconds="0")) as (process, url, log_path):
        tab = await Tab(url).connect()
        try:
            session_id = (await tab.join())["session"]["session_id"]
            turns = [await failed_turn(tab, session_id, code) for _ in range(3)]
        finally:
            await tab.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()
    text, records = read_log(log_path)
    assert_no_bug_reported(text, records)
    for turn_id in turns:
        warnings = [r for r in records if r["level"] == "WARNING" and r.get("turn_id") == turn_id]
        assert len(warnings) == 1, warnings
        assert code in warnings[0]["message"] and cause in warnings[0]["message"], warnings[0]
    # Besides the turns' (retries included), only the summary the shutdown tried may have failed.
    others = [r for r in records if r["level"] == "WARNING" and "turn_id" not in r]
    assert all(r["logger"] == "server.core.summaries" for r in others), others


async def test_repeated_warnings_are_rate_limited_and_the_next_counts_those_held_back(
    tmp_path: Path, fake_gemini: FakeGemini
) -> None:
    fake_gemini.stream(*[error_reply(400, "INVALID_ARGUMENT") for _ in range(6)])
    async with logged_server(tmp_path, **gemini_env(fake_gemini.url, repeat_seconds="2")) as (process, url, log_path):
        tab = await Tab(url).connect()
        try:
            session_id = (await tab.join())["session"]["session_id"]
            for _ in range(5):
                await failed_turn(tab, session_id, "provider_rejected")
            await asyncio.sleep(2.2)  # the period is over: the next one is logged, with the count
            await failed_turn(tab, session_id, "provider_rejected")
        finally:
            await tab.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()
    text, records = read_log(log_path)
    assert_no_bug_reported(text, records)
    lines = [r["message"] for r in records if r["level"] == "WARNING" and "provider_rejected" in r["message"]]
    held_back = [int(m.group(1)) for line in lines if (m := re.search(r"\((\d+) similar suppressed\)", line))]
    assert 2 <= len(lines) < 6, lines
    assert len(lines) + sum(held_back) == 6, lines  # each turn either logged or counted
    assert lines[-1].endswith("similar suppressed)"), lines


async def test_an_mcp_server_printing_garbage_or_unreachable_is_a_few_warnings_in_json(tmp_path: Path) -> None:
    local = {"command": sys.executable, "args": ["-m", "tests.mcp_servers", "stdio"], "env": {"PYTHONPATH": str(ROOT)}}
    ghost = {"url": f"http://127.0.0.1:{free_port()}/mcp"}
    servers = tmp_path / "mcp.json"
    servers.write_text(json.dumps({"mcpServers": {"local": local, "ghost": ghost}}))
    async with logged_server(
        tmp_path, LOG_FORMAT="json", MCP_SERVERS_FILE=str(servers), OFFLINE_CHUNK_DELAY_MS="0"
    ) as (process, url, log_path):
        tab = await Tab(url).connect()
        try:
            session_id = (await tab.join())["session"]["session_id"]
            for _ in range(3):
                result = await use_tool(tab, session_id, "local__spew", {"lines": 200})
                assert result["result"] == "spewed 200 lines", result
            # The garbage was dropped, the session kept: the server still answers.
            assert (await use_tool(tab, session_id, "local__add", {"a": 2, "b": 3}))["result"] == {"sum": 5}
        finally:
            await tab.close()
        process.send_signal(signal.SIGTERM)
        await process.wait()
    text, records = read_log(log_path)  # 600 lines of stderr and 600 of garbage, yet every line is JSON
    assert_no_bug_reported(text, records)
    local_lines = [r for r in records if r["logger"] == "server.tools.mcp.local"]
    assert all(r["level"] == "WARNING" for r in local_lines), local_lines
    assert any(r["message"].startswith("stderr: complaint 0: something is off") for r in local_lines), local_lines
    garbage = [r for r in local_lines if "not JSON-RPC" in r["message"]]
    assert len(garbage) == 1 and "ValidationError" in garbage[0]["message"], garbage
    assert len(local_lines) <= 25, len(local_lines)
    ghost_lines = [r for r in records if r["message"].startswith("MCP server ghost")]
    assert ghost_lines and all(r["level"] == "WARNING" for r in ghost_lines), ghost_lines


async def use_tool(tab: Tab, session_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    ack = await tab.call("message", {"session_id": session_id, "text": f"use {tool} with {json.dumps(args)}"})
    assert ack["ok"], ack
    events = {name: data for name, data in await tab.turn(ack["turn_id"], timeout=20)}
    assert events["tool_call"]["name"] == tool, events
    result: dict[str, Any] = events["tool_result"]
    return result
