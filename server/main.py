"""The ASGI app: Socket.IO and FastAPI on one port. `uvicorn server.main:app` serves it (built on
first access, so importing this module builds nothing); `uvicorn --factory server.main:create_app`
builds it too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import socketio
from fastapi import FastAPI, Request, WebSocket
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings, UnusableSetting, load_settings
from server.logs import configure_logging
from server.metrics import PrometheusMetrics
from server.runtime import Runtime
from server.transport.clients import ConnectionGate
from server.transport.http import count_refusal, router
from server.transport.origins import origin_matcher, origin_regex
from server.transport.plain_ws import GOING_AWAY, PlainClients, serve_plain_client
from server.transport.playground import add_playground
from server.transport.socketio_app import create_sio, register_handlers
from server.transport.tokens import TokenVerifier
from server.upstream import engineio


def create_app(settings: Settings | None = None) -> socketio.ASGIApp:
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format, settings.log_repeat_seconds)
    sio = create_sio(settings)
    metrics = PrometheusMetrics(provider=settings.llm_provider or "offline")
    plain_clients = PlainClients()

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings, metrics)
        api.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.stop()
            gate.shut()  # after the turns' last events: an expired token still gets none of them
            await sio.shutdown()

    api = _http_routes(settings, lifespan, metrics)
    verifier = _token_verifier(settings)
    api.state.verifier = verifier
    gate = ConnectionGate(verifier, settings.max_connections_per_address, metrics)
    api.state.gate = gate
    register_handlers(sio, lambda: api.state.runtime.service, lambda: api.state.runtime.hub, gate)
    origins = origin_matcher(settings.cors_origin_list)

    @api.websocket("/ws/session/{session_id}")
    async def plain_session(websocket: WebSocket, session_id: str) -> None:
        await serve_plain_client(
            websocket,
            session_id,
            service=api.state.runtime.service,
            gate=gate,
            hub=api.state.runtime.hub,
            open_clients=plain_clients,
            origin_allowed=origins,
            packet_limit=settings.packet_limit,
            send_limit=settings.send_queue_limit_bytes,
        )

    app = socketio.ASGIApp(sio, other_asgi_app=api)
    app.api = api  # the runner reaches the runtime through it to drain turns before connections close
    app.plain_clients = plain_clients
    return app


def _http_routes(settings: Settings, lifespan: Any, metrics: PrometheusMetrics) -> FastAPI:
    """The HTTP API (and the page) with its middleware: startup failures as one line, CORS."""
    api = _http_api(lifespan)
    api.add_middleware(StartupReport)
    api.state.metrics = metrics
    api.state.metrics_token = settings.metrics_token
    regex = origin_regex(settings.cors_origin_list)
    api.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if regex is None else [],
        allow_origin_regex=regex,
        allow_methods=["GET", "POST", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
    )
    api.include_router(router)
    if settings.playground:
        add_playground(api)
    return api


class StartupReport:
    """A setting found unusable while starting (PostgreSQL refuses DATABASE_URL) reaches the server
    as its one line: Starlette would hand it the whole traceback, which the server logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        failed: list[Message] = []

        async def holding(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                failed.append(message)  # sent once the exception that follows says what failed
            else:
                await send(message)

        try:
            await self.app(scope, receive, holding)
        except UnusableSetting as exc:
            failed[:] = [{**message, "message": exc.report()} for message in failed]
            raise
        finally:
            for message in failed:
                await send(message)


DESCRIPTION = """The HTTP routes of the realtime conversation service. Conversations themselves run over
Socket.IO (path `/socket.io`) and the plain WebSocket `/ws/session/{session_id}`: their events,
payloads and error codes, and the settings, metrics and traces, are in
[the protocol](/docs/protocol) (`docs/protocol.md`; its Markdown source: `/docs/protocol.md`)."""


def _http_api(lifespan: Any) -> FastAPI:
    """FastAPI with its docs pages served from the package (nothing fetched from other hosts) and a
    schema that documents what the routes really answer."""
    # ReDoc is off: its page fetches its logo from cdn.redoc.ly whatever it is told.
    api = FastAPIOffline(
        title="Realtime AI conversation backend", description=DESCRIPTION, lifespan=lifespan, redoc_url=None
    )

    async def invalid_parameter(request: Request, exc: Exception) -> JSONResponse:
        # A query parameter of the wrong type (`after_event_id=abc`): the contract's 400, not FastAPI's 422.
        problems = exc.errors() if isinstance(exc, RequestValidationError) else []
        where = ", ".join(str(p["loc"][-1]) for p in problems) or "a parameter"
        count_refusal(request, "invalid_payload")
        return JSONResponse(
            {"detail": {"code": "invalid_payload", "message": f"{where}: not of the expected type"}}, status_code=400
        )

    async def refused(request: Request, exc: Exception) -> Response:
        # Counted by its code, as the sockets' refusals are (realtime_refusals_total).
        assert isinstance(exc, StarletteHTTPException)
        detail: object = exc.detail  # typed str; the routes give the contract's {code, message}
        if isinstance(detail, dict) and isinstance(detail.get("code"), str):
            count_refusal(request, detail["code"])
        return await http_exception_handler(request, exc)

    api.add_exception_handler(RequestValidationError, invalid_parameter)
    api.add_exception_handler(StarletteHTTPException, refused)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)  # answered as 400 (above)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _token_verifier(settings: Settings) -> TokenVerifier | None:
    if not settings.auth_enabled:
        return None
    return TokenVerifier(
        secret=settings.auth_jwt_secret,
        jwks_url=settings.auth_jwks_url,
        audience=settings.auth_jwt_audience,
        jwks_refresh_seconds=settings.auth_jwks_refresh_seconds,
        leeway_seconds=settings.auth_leeway_seconds,
    )


async def prepare_shutdown(app: Any) -> None:
    """Run before the server closes connections: turns end with `done` while clients still hear it."""
    runtime: Runtime | None = getattr(app.api.state, "runtime", None)
    if runtime is not None:
        await runtime.drain_turns()
    # Plain WebSocket clients get what is queued for them (the turns' `done`), then 1001.
    plain = [client.closed for client in app.plain_clients.close_all(GOING_AWAY)]
    if plain:
        await asyncio.wait(plain, timeout=1)
    # An Engine.IO-level close wakes pending long-polls at once (instead of after the ping
    # interval) and is a "transport close" to clients, so they reconnect to another process.
    await engineio.close_every_socket(app.engineio_server.eio, wait_seconds=1)


def __getattr__(name: str) -> Any:
    """`server.main:app`, built once, on first access (uvicorn's import string names it)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals().get("_app")
    if built is None:
        built = globals()["_app"] = create_app()
    return built
