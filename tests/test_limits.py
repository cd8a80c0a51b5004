"""Limits that hold however requests interleave: sent at once, they count as if sent one by one."""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import ServerFactory
from tests.harness import REDIS_URL, Tab, serving
from tests.test_auth import SECRET, KeyServer, token


async def opened(tabs: list[Tab], url: str, bearer: str | None = None) -> Tab:
    tab = Tab(url)
    tabs.append(tab)
    return await tab.connect(auth={"token": bearer} if bearer else None)


def clustered(redis_channel: str, message_rate_limit: int) -> dict[str, Any]:
    """Settings of servers that share Redis, with authentication on."""
    return {
        "redis_url": REDIS_URL,
        "redis_channel": redis_channel,
        "auth_jwt_secret": SECRET,
        "message_rate_limit": message_rate_limit,
        "offline_chunk_delay_ms": 0,
    }


async def test_joins_sent_at_once_count_against_the_session_cap(start_server: ServerFactory, tabs: list[Tab]) -> None:
    server = await start_server(max_sessions_per_socket=3)
    tab = await opened(tabs, server.url)
    answers = await asyncio.gather(*(tab.call("join", {}) for _ in range(10)))
    accepted = [a for a in answers if a["ok"]]
    assert len(accepted) == 3, answers
    assert {a["error"]["code"] for a in answers if not a["ok"]} == {"rate_limited"}
    # The refused joins created nothing and left no trace: a leave frees exactly one place.
    assert (await tab.call("leave", {"session_id": accepted[0]["session"]["session_id"]}))["ok"]
    again = await asyncio.gather(*(tab.call("join", {}) for _ in range(4)))
    assert sum(a["ok"] for a in again) == 1, again


async def test_the_same_session_joined_at_once_takes_one_place(start_server: ServerFactory, tabs: list[Tab]) -> None:
    server = await start_server(max_sessions_per_socket=2)
    tab = await opened(tabs, server.url)
    sid = (await tab.join())["session"]["session_id"]
    await tab.call("leave", {"session_id": sid})
    answers = await asyncio.gather(*(tab.call("join", {"session_id": sid}) for _ in range(5)))
    assert all(a["ok"] for a in answers), answers
    assert (await tab.call("join", {}))["ok"]  # the second place is still free
    assert (await tab.call("join", {}))["error"]["code"] == "rate_limited"


async def test_messages_sent_at_once_are_counted_one_by_one(start_server: ServerFactory, tabs: list[Tab]) -> None:
    server = await start_server(message_rate_limit=2, offline_chunk_delay_ms=0)
    tab = await opened(tabs, server.url)
    sessions = [(await tab.join())["session"]["session_id"] for _ in range(3)]
    answers = await asyncio.gather(*(tab.call("message", {"session_id": s, "text": "hi"}) for s in sessions))
    assert sum(a["ok"] for a in answers) == 2, answers
    assert [a["error"]["code"] for a in answers if not a["ok"]] == ["rate_limited"]
    stored = [len((await tab.call("join", {"session_id": s}))["history"]) for s in sessions]
    assert sorted(stored)[0] == 0  # the refused one stored nothing


async def test_refused_messages_give_their_place_back(start_server: ServerFactory, tabs: list[Tab]) -> None:
    server = await start_server(message_rate_limit=2, offline_chunk_delay_ms=30)
    tab = await opened(tabs, server.url)
    sid = (await tab.join())["session"]["session_id"]
    first = await tab.call("message", {"session_id": sid, "text": "a long answer please"})
    assert first["ok"]
    # Sent while the turn runs: refused as busy, so they do not count.
    busy = await asyncio.gather(*(tab.call("message", {"session_id": sid, "text": "again"}) for _ in range(4)))
    assert {a["error"]["code"] for a in busy} == {"busy"}
    await tab.turn(first["turn_id"])
    second = await tab.call("message", {"session_id": sid, "text": "now"})
    assert second["ok"], second


async def test_connections_opened_at_once_while_keys_are_fetched_are_capped(
    start_server: ServerFactory, tabs: list[Tab]
) -> None:
    """The per-address cap, while every connect awaits a slow JWKS fetch."""
    keys = KeyServer()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys.add("slow-key", private)
    jwks = keys.app.routes[0].endpoint  # type: ignore[attr-defined]

    async def slow_jwks(request: Request) -> Response:
        await asyncio.sleep(0.5)
        answer: Response = await jwks(request)
        return answer

    app = Starlette(routes=[Route("/auth/v1/.well-known/jwks.json", slow_jwks)])
    async with serving(app) as url:
        server = await start_server(auth_jwks_url=f"{url}/auth/v1/.well-known/jwks.json", max_connections_per_address=2)
        bearer = token("gina", key=private, algorithm="RS256", kid="slow-key")
        errors: list[Any] = []

        async def connect() -> bool:
            tab = Tab(server.url)
            tabs.append(tab)
            tab.client.on("connect_error", errors.append)
            try:
                await tab.connect(auth={"token": bearer})
            except socketio.exceptions.ConnectionError:
                return False
            return True

        results = await asyncio.gather(*(connect() for _ in range(6)))
    assert sum(results) == 2, (results, errors)
    assert {e["message"] if isinstance(e, dict) else e for e in errors} == {"rate_limited"}


async def test_a_users_limit_counts_their_messages_on_every_process(
    start_server: ServerFactory, tabs: list[Tab], redis_channel: str
) -> None:
    shared = clustered(redis_channel, message_rate_limit=2)
    one, two = await start_server(**shared), await start_server(**shared)
    on_one = await opened(tabs, one.url, token("hana"))
    on_two = await opened(tabs, two.url, token("hana"))
    someone_else = await opened(tabs, two.url, token("ivan"))
    sid_one = (await on_one.join())["session"]["session_id"]
    sid_two = (await on_two.join())["session"]["session_id"]
    sid_other = (await someone_else.join())["session"]["session_id"]

    first = await on_one.call("message", {"session_id": sid_one, "text": "one"})
    await on_one.turn(first["turn_id"])
    second = await on_two.call("message", {"session_id": sid_two, "text": "two"})
    assert first["ok"] and second["ok"]
    await on_two.turn(second["turn_id"])
    # Hana used her 2 messages a minute, one on each process: both refuse the third.
    assert (await on_one.call("message", {"session_id": sid_one, "text": "3"}))["error"]["code"] == "rate_limited"
    assert (await on_two.call("message", {"session_id": sid_two, "text": "3"}))["error"]["code"] == "rate_limited"
    assert (await someone_else.call("message", {"session_id": sid_other, "text": "hi"}))["ok"]


async def test_a_users_messages_sent_at_once_to_two_processes_are_counted_one_by_one(
    start_server: ServerFactory, tabs: list[Tab], redis_channel: str
) -> None:
    shared = clustered(redis_channel, message_rate_limit=3)
    servers = [await start_server(**shared), await start_server(**shared)]
    sent: list[Any] = []
    for server in servers:
        tab = await opened(tabs, server.url, token("jo"))
        for _ in range(3):
            sid = (await tab.join())["session"]["session_id"]
            sent.append(tab.call("message", {"session_id": sid, "text": "at once"}))
    answers = await asyncio.gather(*sent)
    assert sum(a["ok"] for a in answers) == 3, answers
