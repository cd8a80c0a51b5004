"""What every transport's client shares: who it is, the limits it counts against, and how a request
becomes an acknowledgement in the contract's error order.

A transport (Socket.IO, the plain WebSocket) decodes frames into a request name and a payload,
calls `ClientConnection.request`, and encodes the answer; it never decides a refusal itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from server.core.conversation import ConversationService
from server.core.errors import ErrorCode, ServiceError
from server.core.log_context import log_scope
from server.core.ports import Metrics, TraceParent, Transport
from server.transport.payloads import ApprovePayload, JoinPayload, MessagePayload, SessionPayload, invalid_payload
from server.transport.tokens import Identity, InvalidToken, TokenVerifier

log = logging.getLogger(__name__)
P = TypeVar("P", bound=BaseModel)
Ack = dict[str, Any]
TOKEN_EXPIRED = "the token has expired; reconnect with a fresh one"
MAX_TRACE_HEADER = 1024


def trace_of(traceparent: object, tracestate: object) -> TraceParent | None:
    """A handshake's W3C trace context (Socket.IO `auth`, the plain WebSocket's headers): what is
    no string of a sane length is left out, as an invalid header is."""
    if not isinstance(traceparent, str) or len(traceparent) > MAX_TRACE_HEADER:
        return None
    state = tracestate if isinstance(tracestate, str) and len(tracestate) <= MAX_TRACE_HEADER else None
    return TraceParent(traceparent, state)


@dataclass(eq=False)
class ClientConnection:
    """One connected client, on either transport. `connection_id`: its name in the core and the rooms
    (unique in the process: a Socket.IO sid, or `ws:<hex>` for a plain WebSocket)."""

    connection_id: str
    transport: Transport
    address: str
    identity: Identity | None
    authenticating: bool  # authentication is on: every request needs a valid identity
    metrics: Metrics
    # Closes the connection when its token expires (ConnectionGate.close_at_expiry).
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    # The trace its turns continue, as its handshake gave it (a `message` may name another).
    trace: TraceParent | None = None

    def user(self) -> str | None:
        """The authenticated user; `unauthorized` once the token expired (it comes first of all errors)."""
        if not self.authenticating:
            return None
        if self.identity is None or self.identity.expired():
            raise ServiceError(ErrorCode.UNAUTHORIZED, TOKEN_EXPIRED)
        return self.identity.user_id

    def undecodable(self, message: str) -> Ack:
        """The ack for a frame or event that is no request at all: `unauthorized` still comes first."""
        try:
            self.user()
        except ServiceError as exc:
            return self.refusal(exc.code.value, exc.message)
        return self.refusal(ErrorCode.INVALID_PAYLOAD.value, message)

    def refusal(self, code: str, message: str) -> Ack:
        """The ack of a refused request (counted by its code)."""
        self.metrics.refused(code)
        return {"ok": False, "error": {"code": code, "message": message}}

    async def request(
        self,
        service: ConversationService,
        action: Callable[[ConversationService, ClientConnection, Any, str | None], Awaitable[Ack]],
        model: type[P],
        payload: object,
    ) -> Ack:
        """Run one request: the ack `{ok: true, ...}` or `{ok: false, error: {code, message}}`."""
        try:
            user = self.user()
            try:
                parsed = model.model_validate(payload)
            except ValidationError as exc:
                raise invalid_payload(exc) from None
            with log_scope(getattr(parsed, "session_id", None)):
                return {"ok": True, **await action(service, self, parsed, user)}
        except ServiceError as exc:
            return self.refusal(exc.code.value, exc.message)
        except Exception:
            log.exception("unexpected failure handling a request from %s", self.connection_id)
            return self.refusal(ErrorCode.UNAVAILABLE.value, "the server could not do this now")


class ConnectionGate:
    """Admits clients of both transports: connections per address (counted across both, and before
    the token is verified, so connections opened at once count as if opened one by one) and the
    token when authentication is on."""

    def __init__(self, verifier: TokenVerifier | None, max_per_address: int, metrics: Metrics) -> None:
        self._verifier = verifier
        self._max = max_per_address
        self.metrics = metrics
        self._per_address: Counter[str] = Counter()
        self._held_by_transport: set[str] = set()  # connections that `hold` counts
        self._expiring: set[ClientConnection] = set()  # those with an expiry timer

    @property
    def authenticating(self) -> bool:
        return self._verifier is not None

    def hold(self, address: str) -> bool:
        """Count a connection that a transport opened from `address` until `let_go`, before it asks to
        be admitted (an Engine.IO connection from its handshake: one that never connects to Socket.IO
        counts too). False when the address was at its limit; it is counted all the same."""
        within = self._per_address[address] < self._max
        self._per_address[address] += 1
        return within

    def let_go(self, address: str) -> None:
        self._forget(address)

    async def admit(
        self, connection_id: str, transport: Transport, address: str, token: object, held: bool | None = None
    ) -> ClientConnection:
        """The connection, or ServiceError `rate_limited` / `unauthorized`. `held`: what `hold`
        answered for this connection (it stays counted until `let_go`), or None to count it here
        (and not at all when refused)."""
        if (held is None and self._per_address[address] >= self._max) or held is False:
            self.metrics.refused(ErrorCode.RATE_LIMITED.value)
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many connections from this address")
        if held is None:
            self._per_address[address] += 1
        try:
            identity = await self._verifier.verify(token) if self._verifier is not None else None
        except InvalidToken as exc:
            log.info("refused a %s connection from %s: invalid token (%s)", transport, address, exc)
            if held is None:
                self._forget(address)
            self.metrics.refused(ErrorCode.UNAUTHORIZED.value)
            raise ServiceError(ErrorCode.UNAUTHORIZED, "a valid token is needed") from None
        except BaseException:
            if held is None:
                self._forget(address)
            raise
        if held is not None:
            self._held_by_transport.add(connection_id)
        self.metrics.connection_opened(transport)
        return ClientConnection(connection_id, transport, address, identity, self.authenticating, self.metrics)

    def close_at_expiry(self, connection: ClientConnection, close: Callable[[], None]) -> None:
        """Call `close` (which must not block) once the connection's token has expired: its `exp`
        plus the leeway. One timer handle per connection on the event loop, cancelled when the
        connection is released or the gate shuts."""
        if connection.identity is None:
            return
        delay = max(0.0, connection.identity.valid_until - time.time())
        connection.expiry = asyncio.get_running_loop().call_later(delay, self._expire, connection, close)
        self._expiring.add(connection)

    def _expire(self, connection: ClientConnection, close: Callable[[], None]) -> None:
        connection.expiry = None
        self._expiring.discard(connection)
        log.info("closing %s connection %s: its token expired", connection.transport, connection.connection_id)
        close()

    def expiry_timers(self) -> list[asyncio.TimerHandle]:
        return [c.expiry for c in self._expiring if c.expiry is not None]

    def release(self, connection: ClientConnection) -> None:
        self._cancel_expiry(connection)
        self.metrics.connection_closed(connection.transport)
        if connection.connection_id in self._held_by_transport:
            self._held_by_transport.discard(connection.connection_id)  # `let_go` uncounts it
        else:
            self._forget(connection.address)

    def shut(self) -> None:
        """Cancel every expiry timer (shutdown: the connections are closing anyway)."""
        for connection in list(self._expiring):
            self._cancel_expiry(connection)

    def _cancel_expiry(self, connection: ClientConnection) -> None:
        if connection.expiry is not None:
            connection.expiry.cancel()
            connection.expiry = None
        self._expiring.discard(connection)

    def _forget(self, address: str) -> None:
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]


# ---------------------------------------------------------------- the requests, as both transports name them


async def join(svc: ConversationService, client: ClientConnection, p: JoinPayload, user: str | None) -> Ack:
    result = await svc.join(
        client.connection_id, p.session_id, p.user_id, p.after_event_id, p.history_limit, owner=user
    )
    return {
        "session": result.session.model_dump(mode="json"),
        "history": [event.public() for event in result.history],
        "history_more": result.history_more,
        "active_turn": result.active_turn.model_dump(mode="json") if result.active_turn else None,
    }


async def message(svc: ConversationService, client: ClientConnection, p: MessagePayload, user: str | None) -> Ack:
    trace = TraceParent(p.traceparent, p.tracestate) if p.traceparent is not None else client.trace
    accepted = await svc.send_message(
        client.connection_id,
        p.session_id,
        p.text,
        p.client_message_id,
        user=user,
        attachments=p.attachments,
        trace=trace,
    )
    return {"turn_id": accepted.turn_id, "event_id": accepted.event_id}


async def cancel(svc: ConversationService, client: ClientConnection, p: SessionPayload, user: str | None) -> Ack:
    return {"turn_id": await svc.cancel(client.connection_id, p.session_id)}


async def approve_tool(svc: ConversationService, client: ClientConnection, p: ApprovePayload, user: str | None) -> Ack:
    await svc.approve_tool(client.connection_id, p.session_id, p.call_id, p.approved, p.reason)
    return {"call_id": p.call_id, "approved": p.approved}


async def leave(svc: ConversationService, client: ClientConnection, p: SessionPayload, user: str | None) -> Ack:
    await svc.leave(client.connection_id, p.session_id)
    return {}


REQUESTS: dict[str, tuple[type[BaseModel], Callable[..., Awaitable[Ack]]]] = {
    "join": (JoinPayload, join),
    "message": (MessagePayload, message),
    "cancel": (SessionPayload, cancel),
    "approve_tool": (ApprovePayload, approve_tool),
    "leave": (SessionPayload, leave),
}
