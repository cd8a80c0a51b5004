"""HTTP routes (PROTOCOL.md, HTTP and Metrics), with the models and status codes they answer."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.core.conversation import parse_session_id
from server.core.errors import ServiceError
from server.core.models import ErrorInfo, EventType, FinishReason, Session
from server.core.ports import StorageUnavailable
from server.metrics import PrometheusMetrics
from server.runtime import Runtime
from server.tools.mcp import McpServerState
from server.transport.tokens import InvalidToken, TokenVerifier, bearer_token

router = APIRouter()
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    queued_events: int
    reasons: list[str] | None = None  # when unavailable: what is wrong
    mcp_servers: dict[str, McpServerState] | None = None  # with MCP_SERVERS_FILE: each server's state


class HistoryItem(BaseModel):
    event_id: int
    event_type: EventType
    content: str
    timestamp: str
    finish_reason: FinishReason | None = None  # ai_message only
    error: ErrorInfo | None = None  # ai_message only


class Events(BaseModel):
    events: list[HistoryItem]


class Refusal(BaseModel):
    detail: ErrorInfo


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meanings = {
        400: "`invalid_session_id`, or `invalid_payload` for a malformed query parameter",
        401: "`unauthorized`: authentication is on and the Bearer token is missing, invalid or expired",
        403: "`forbidden`: the session belongs to another user",
        404: "`not_found`: no such session",
        503: "`unavailable`: storage is unreachable; retrying is safe",
    }
    return {status: {"model": Refusal, "description": meanings[status]} for status in statuses}


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _session_id(value: str) -> str:
    try:
        return parse_session_id(value)
    except ServiceError as exc:
        raise HTTPException(status_code=400, detail=exc.as_dict()) from None


async def _caller(request: Request) -> str | None:
    """The authenticated user (401 without a valid Bearer token), or None when authentication is off."""
    verifier: TokenVerifier | None = request.app.state.verifier
    if verifier is None:
        return None
    try:
        identity = await verifier.verify(bearer_token(request.headers.get("authorization")))
    except InvalidToken:
        raise HTTPException(
            status_code=401,
            detail={"code": "unauthorized", "message": "a valid Bearer token is needed"},
            headers={"WWW-Authenticate": "Bearer"},
        ) from None
    return identity.user_id


def _owned(session: Session | None, caller: str | None) -> Session:
    if session is None:
        raise HTTPException(status_code=404, detail={"code": "not_found", "message": "no such session"})
    if caller is not None and session.user_id != caller:
        raise HTTPException(
            status_code=403, detail={"code": "forbidden", "message": "this session belongs to another user"}
        )
    return session


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "storage, the provider or Redis cannot serve"}},
)
async def readyz(request: Request) -> JSONResponse:
    runtime = _runtime(request)
    problems = await runtime.readiness_problems()
    answer: dict[str, Any] = {
        "status": "unavailable" if problems else "ready",
        "queued_events": runtime.service.queued_events,
    }
    if problems:
        answer["reasons"] = problems
    if runtime.mcp is not None:
        answer["mcp_servers"] = {name: state.model_dump() for name, state in runtime.mcp.states().items()}
    return JSONResponse(answer, status_code=503 if problems else 200)


@router.get("/api/sessions/{session_id}", response_model=Session, responses=_refusals(400, 401, 403, 404, 503))
async def get_session(session_id: str, request: Request) -> Session:
    caller = await _caller(request)
    session_id = _session_id(session_id)
    try:
        session = await _runtime(request).repo.get_session(session_id)
    except StorageUnavailable:
        raise HTTPException(
            status_code=503, detail={"code": "unavailable", "message": "storage is unreachable"}
        ) from None
    return _owned(session, caller)


@router.get("/api/sessions/{session_id}/events", response_model=Events, responses=_refusals(400, 401, 403, 404, 503))
async def get_events(
    session_id: str,
    request: Request,
    after_event_id: int | None = Query(default=None, description="only the events after this one"),
) -> JSONResponse:
    caller = await _caller(request)
    session_id = _session_id(session_id)
    repo = _runtime(request).repo
    try:
        _owned(await repo.get_session(session_id), caller)
        events = await repo.list_events(session_id, after_event_id)
    except StorageUnavailable:
        raise HTTPException(
            status_code=503, detail={"code": "unavailable", "message": "storage is unreachable"}
        ) from None
    # Answered as built (the model above documents it): history can be long, and validating it again costs.
    return JSONResponse({"events": [event.public() for event in events]})


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "the Prometheus text format"},
        401: {"description": "`METRICS_TOKEN` is set and the Bearer token is not it"},
    },
)
async def metrics(request: Request) -> Response:
    expected: str | None = request.app.state.metrics_token
    if expected is not None:
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return JSONResponse(
                {"detail": {"code": "unauthorized", "message": "a valid Bearer token is needed"}},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    recorder: PrometheusMetrics = request.app.state.metrics
    return Response(await recorder.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/docs/protocol.md", include_in_schema=False)
async def protocol_doc() -> Response:
    """The protocol by example, linked from the API page (present in a checkout of the repository)."""
    if not PROTOCOL_DOC.is_file():
        raise HTTPException(status_code=404, detail={"code": "not_found", "message": "docs/protocol.md is not here"})
    return FileResponse(PROTOCOL_DOC, media_type="text/markdown; charset=utf-8")
