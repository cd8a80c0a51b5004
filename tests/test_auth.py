"""Authentication, session ownership and abuse limits, over real sockets with tokens made here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import socketio
import websockets.asyncio.client
import websockets.exceptions
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import ServerFactory
from tests.fake_gemini import FakeGemini, error_reply
from tests.harness import RunningServer, Tab, serving

SECRET = "a-test-jwt-secret-of-more-than-32-bytes!"
AUDIENCE = "authenticated"


class KeyServer:
    """A JWKS endpoint serving whichever public keys the test says, as Supabase's does."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.fetches = 0
        self.url = ""
        self.app = Starlette(routes=[Route("/auth/v1/.well-known/jwks.json", self._jwks)])

    def add(self, kid: str, private_key: Any) -> None:
        self.keys[kid] = private_key

    async def _jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        keys = []
        for kid, private in self.keys.items():
            algorithm = (
                jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
            )
            jwk = json.loads(algorithm.to_jwk(private.public_key()))
            jwk.update(kid=kid, use="sig", alg="RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256")
            keys.append(jwk)
        return JSONResponse({"keys": keys})


def token(
    sub: str | None = "alice",
    *,
    key: Any = SECRET,
    algorithm: str = "HS256",
    kid: str | None = None,
    audience: str = AUDIENCE,
    expires_in: float | None = 300,
) -> str:
    claims: dict[str, Any] = {"aud": audience, "role": "authenticated"}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


@pytest.fixture
async def keys() -> AsyncIterator[KeyServer]:
    server = KeyServer()
    async with serving(server.app) as server.url:
        yield server


@pytest.fixture
async def secured(start_server: ServerFactory, keys: KeyServer) -> RunningServer:
    return await start_server(
        auth_jwt_secret=SECRET,
        auth_jwks_url=f"{keys.url}/auth/v1/.well-known/jwks.json",
        auth_jwks_refresh_seconds=0.5,
        offline_chunk_delay_ms=0,
    )


async def signed_in(tabs: list[Tab], server: RunningServer, bearer: str | None, transport: str = "websocket") -> Tab:
    tab = Tab(server.url, transport)
    tabs.append(tab)
    return await tab.connect(auth={"token": bearer} if bearer is not None else None)


async def refused(server: RunningServer, auth: Any, transport: str = "websocket") -> Any:
    """The `connect_error` a refused client gets (its message)."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(server.url, transports=[transport], auth=auth, wait_timeout=10)
    await close_refused(client)
    assert len(errors) == 1
    return errors[0]["message"] if isinstance(errors[0], dict) else errors[0]


async def refused_over_polling(server: RunningServer, auth: Any) -> Any:
    """Socket.IO v5 over Engine.IO v4 long-polling by hand: the answer to a namespace CONNECT."""
    path = "/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        opened = (await http.get(path)).text
        assert opened.startswith("0")
        sid = json.loads(opened[1:])["sid"]
        connect = "40" + (json.dumps(auth) if auth is not None else "")
        assert (await http.post(f"{path}&sid={sid}", content=connect)).status_code == 200
        packets = (await http.get(f"{path}&sid={sid}")).text.split("\x1e")
        await http.post(f"{path}&sid={sid}", content="1")  # Engine.IO CLOSE: done with this session
    errors = [json.loads(packet[2:]) for packet in packets if packet.startswith("44")]
    assert len(errors) == 1, packets
    return errors[0]


async def close_refused(client: socketio.AsyncClient) -> None:
    # python-engineio's polling client waits out its pending long-poll on disconnect; a browser aborts it.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.disconnect(), 0.3)
    http = client.eio.http
    if http is not None and not http.closed:
        await http.close()


# ---------------------------------------------------------------------------------------------- connect


@pytest.mark.parametrize(
    "auth",
    [
        None,
        {},
        {"token": ""},
        {"token": "not.a.jwt"},
        {"token": token(key="another-secret-of-more-than-32-bytes!!")},
        {"token": token(audience="anon")},
        {"token": token(expires_in=-60)},
        {"token": token(sub=None)},
        {"token": token(expires_in=None)},
    ],
    ids=[
        "no-auth",
        "no-token",
        "empty",
        "garbage",
        "bad-signature",
        "wrong-audience",
        "expired",
        "no-subject",
        "no-expiry",
    ],
)
async def test_bad_tokens_are_refused_at_connect(secured: RunningServer, auth: Any) -> None:
    assert await refused(secured, auth, "websocket") == "unauthorized"
    # Long-polling, on the wire (python-socketio's polling client takes 30 s to report a refusal;
    # socket.io-client reports it at once): the namespace CONNECT is answered with CONNECT_ERROR.
    assert await refused_over_polling(secured, auth) == {"message": "unauthorized"}


def forged(**claims: Any) -> str:
    """A token signed with the right key, its other claims valid, `claims` of a wrong type or out of range."""
    return jwt.encode({"aud": AUDIENCE, "sub": "mallory", "exp": int(time.time()) + 300, **claims}, SECRET, "HS256")


@pytest.mark.parametrize(
    "claims",
    [{"exp": "4102444800"}, {"exp": 1e20}, {"exp": 10**30}, {"sub": ""}],
    ids=["exp-as-a-string", "exp-1e20", "exp-beyond-any-date", "empty-subject"],
)
async def test_claims_of_a_wrong_type_are_unauthorized_at_every_door(
    secured: RunningServer, claims: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    bad = forged(**claims)
    assert await refused(secured, {"token": bad}) == "unauthorized"
    assert await refused_over_polling(secured, {"token": bad}) == {"message": "unauthorized"}
    async with httpx.AsyncClient(base_url=secured.url, timeout=10) as http:
        answer = await http.get(f"/api/sessions/{uuid.uuid4()}", headers={"Authorization": f"Bearer {bad}"})
    assert answer.status_code == 401, answer.text
    assert answer.json() == {"detail": {"code": "unauthorized", "message": "a valid Bearer token is needed"}}
    plain_url = secured.url.replace("http://", "ws://") + f"/ws/session/{uuid.uuid4()}?token={bad}"
    async with websockets.asyncio.client.connect(plain_url) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert first == {"event": "error", "data": {"code": "unauthorized", "message": "a valid token is needed"}}
    assert (ws.close_code, ws.close_reason) == (4401, "unauthorized")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # no traceback


async def test_a_valid_token_makes_its_subject_the_user(secured: RunningServer, tabs: list[Tab]) -> None:
    tab = await signed_in(tabs, secured, token("alice"))
    joined = await tab.join(user_id="someone-else")  # ignored: the token says who this is
    assert joined["session"]["user_id"] == "alice"
    ack = await tab.call("message", {"session_id": joined["session"]["session_id"], "text": "hello"})
    assert ack["ok"] and (await tab.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"


async def test_asymmetric_tokens_from_the_jwks_and_a_rotated_key(
    secured: RunningServer, keys: KeyServer, tabs: list[Tab]
) -> None:
    first = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys.add("rsa-1", first)
    tab = await signed_in(tabs, secured, token("carol", key=first, algorithm="RS256", kid="rsa-1"))
    assert (await tab.join())["session"]["user_id"] == "carol"

    rotated = ec.generate_private_key(ec.SECP256R1())
    unknown = token("carol", key=rotated, algorithm="ES256", kid="ec-2")
    assert await refused(secured, {"token": unknown}) == "unauthorized"  # not published yet
    keys.add("ec-2", rotated)  # the issuer rotates: the new key appears in the JWKS
    await asyncio.sleep(0.6)  # past the refresh cooldown (AUTH_JWKS_REFRESH_SECONDS)
    tab = await signed_in(tabs, secured, unknown)
    assert (await tab.join())["session"]["user_id"] == "carol"
    # A key the JWKS does not hold is never trusted, even with the right kid's name.
    forged = token(
        "carol", key=rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256", kid="rsa-1"
    )
    assert await refused(secured, {"token": forged}) == "unauthorized"


async def test_a_token_within_the_default_leeway_is_accepted_until_the_leeway_ends(
    secured: RunningServer, tabs: list[Tab]
) -> None:
    # Already past `exp` but within the 10 s leeway for clock skew: accepted, for about 2 s more;
    # then the server closes the connection (tests/test_token_expiry.py times it with a short leeway).
    tab = await signed_in(tabs, secured, token("dave", expires_in=-8))
    sid = (await tab.join())["session"]["session_id"]
    assert (await tab.call("message", {"session_id": sid, "text": "still me?"}))["ok"]
    async with asyncio.timeout(5):
        while tab.client.connected:
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------- ownership


async def test_another_users_session_is_forbidden_over_socketio_and_http(
    secured: RunningServer, tabs: list[Tab]
) -> None:
    alice = await signed_in(tabs, secured, token("alice"))
    sid = (await alice.join())["session"]["session_id"]
    bob = await signed_in(tabs, secured, token("bob"))
    answer = await bob.call("join", {"session_id": sid})
    assert answer["error"]["code"] == "forbidden"
    assert (await bob.call("message", {"session_id": sid, "text": "let me in"}))["error"]["code"] == "not_joined"

    async with httpx.AsyncClient(base_url=secured.url) as http:
        for path in (f"/api/sessions/{sid}", f"/api/sessions/{sid}/events"):
            assert (await http.get(path)).status_code == 401
            assert (await http.get(path, headers={"Authorization": "Bearer nonsense"})).status_code == 401
            as_bob = await http.get(path, headers={"Authorization": f"Bearer {token('bob')}"})
            assert as_bob.status_code == 403 and as_bob.json()["detail"]["code"] == "forbidden"
            as_alice = await http.get(path, headers={"Authorization": f"Bearer {token('alice')}"})
            assert as_alice.status_code == 200
        # `unauthorized` before `invalid_session_id`.
        assert (await http.get("/api/sessions/not-a-uuid")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200  # health needs no token


# ---------------------------------------------------------------------------------------------- limits


async def test_messages_are_limited_per_socket_and_per_user(start_server: ServerFactory, tabs: list[Tab]) -> None:
    server = await start_server(auth_jwt_secret=SECRET, message_rate_limit=2, offline_chunk_delay_ms=0)

    async def say(tab: Tab, sid: str) -> dict[str, Any]:
        ack: dict[str, Any] = await tab.call("message", {"session_id": sid, "text": "hi"})
        if ack["ok"]:
            await tab.turn(ack["turn_id"])
        return ack

    first = await signed_in(tabs, server, token("erin"))
    second = await signed_in(tabs, server, token("erin"))
    other_user = await signed_in(tabs, server, token("frank"))
    sid_1 = (await first.join())["session"]["session_id"]
    sid_2 = (await second.join())["session"]["session_id"]
    sid_3 = (await other_user.join())["session"]["session_id"]
    assert (await say(first, sid_1))["ok"]
    assert (await say(second, sid_2))["ok"]
    # Erin used her 2 messages a minute, over both her sockets: a fresh socket of hers is refused too.
    assert (await say(second, sid_2))["error"]["code"] == "rate_limited"
    assert (await say(first, sid_1))["error"]["code"] == "rate_limited"
    assert (await say(other_user, sid_3))["ok"]  # another user is not disturbed


async def test_sessions_per_socket_and_connections_per_address_are_capped(
    start_server: ServerFactory, tabs: list[Tab]
) -> None:
    server = await start_server(max_sessions_per_socket=2, max_connections_per_address=3)
    tab = await signed_in(tabs, server, None)
    joined = [(await tab.join())["session"]["session_id"] for _ in range(2)]
    over = await tab.call("join", {})
    assert over["error"]["code"] == "rate_limited"
    assert (await tab.call("leave", {"session_id": joined[0]}))["ok"]
    assert (await tab.call("join", {}))["ok"]

    for _ in range(2):
        await signed_in(tabs, server, None)
    assert await refused(server, None) == "rate_limited"  # a 4th connection from 127.0.0.1
    await tabs[-1].close()
    await asyncio.sleep(0.2)
    await signed_in(tabs, server, None)  # a slot is free again


async def test_an_oversized_packet_drops_only_its_own_connection(start_server: ServerFactory, tabs: list[Tab]) -> None:
    server = await start_server(max_message_chars=1000, max_packet_bytes=8192)
    bystander = await signed_in(tabs, server, None)
    sid = (await bystander.join())["session"]["session_id"]
    sender = await signed_in(tabs, server, None)
    await sender.join(sid)

    too_long = await sender.call("message", {"session_id": sid, "text": "x" * 2000})
    assert too_long["error"]["code"] == "message_too_long"  # under the packet limit: a coded error
    with pytest.raises(socketio.exceptions.TimeoutError):
        await sender.call("message", {"session_id": sid, "text": "x" * 20_000}, timeout=3)
    async with asyncio.timeout(5):  # Engine.IO closed the connection that sent it
        while sender.client.connected:
            await asyncio.sleep(0.02)
    ack = await bystander.call("message", {"session_id": sid, "text": "still here"})
    assert ack["ok"] and (await bystander.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- CORS


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [("http://localhost:5173", True), ("http://127.0.0.1:3000", True), ("https://evil.example", False)],
)
async def test_the_handshake_honours_cors_origins(
    start_server: ServerFactory, transport: str, origin: str, allowed: bool, tabs: list[Tab]
) -> None:
    server = await start_server()
    tab = Tab(server.url, transport)
    if allowed:
        tabs.append(await tab.connect(headers={"Origin": origin}))
        assert tab.client.connected
    else:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await tab.connect(headers={"Origin": origin})
        await close_refused(tab.client)


async def test_production_origins_replace_the_development_ones(start_server: ServerFactory) -> None:
    server = await start_server(cors_origins="https://chat.example.com,https://*.example.com")
    async with httpx.AsyncClient(base_url=server.url) as http:
        handshake = "/socket.io/?EIO=4&transport=polling"
        for origin, status in (
            ("https://chat.example.com", 200),
            ("https://eu.example.com", 200),
            ("http://localhost:5173", 400),
            ("https://example.com.evil.test", 400),
        ):
            assert (await http.get(handshake, headers={"Origin": origin})).status_code == status, origin


# ---------------------------------------------------------------------------------------------- logs


async def test_logs_carry_no_secret_and_no_message_text(
    start_server: ServerFactory, fake_gemini: FakeGemini, tabs: list[Tab], caplog: pytest.LogCaptureFixture
) -> None:
    gemini_key = f"gemini-key-{uuid.uuid4().hex}"
    marker = f"private words {uuid.uuid4().hex}"
    caplog.set_level(logging.INFO)
    server = await start_server(
        auth_jwt_secret=SECRET,
        llm_provider="gemini",
        gemini_api_key=gemini_key,
        gemini_base_url=fake_gemini.url,
        log_level="info",
    )
    bearer = token("grace")
    await refused(server, {"token": token("grace", expires_in=-60)})
    tab = await signed_in(tabs, server, bearer)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": marker})
    await tab.turn(ack["turn_id"])
    fake_gemini.stream(error_reply(400, "INVALID_ARGUMENT", "upstream detail"))
    ack = await tab.call("message", {"session_id": sid, "text": marker})
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert "upstream detail" not in json.dumps(done)  # no internals in what clients get
    await tab.close()
    await server.stop()

    logged = caplog.text
    assert "invalid token" in logged and "serving with provider=gemini" in logged  # the log did record
    for secret in (gemini_key, SECRET, bearer, marker):
        assert secret not in logged
