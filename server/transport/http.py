"""HTTP routes (PROTOCOL.md, HTTP)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from server.core.conversation import parse_session_id
from server.core.errors import ServiceError
from server.core.models import Session
from server.core.ports import StorageUnavailable
from server.runtime import Runtime
from server.transport.tokens import InvalidToken, TokenVerifier, bearer_token

router = APIRouter()


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


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    runtime = _runtime(request)
    problems = await runtime.readiness_problems()
    queued = runtime.service.queued_events
    if problems:
        return JSONResponse({"status": "unavailable", "reasons": problems, "queued_events": queued}, status_code=503)
    return JSONResponse({"status": "ready", "queued_events": queued})


@router.get("/api/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    caller = await _caller(request)
    session_id = _session_id(session_id)
    try:
        session = await _runtime(request).repo.get_session(session_id)
    except StorageUnavailable:
        raise HTTPException(
            status_code=503, detail={"code": "unavailable", "message": "storage is unreachable"}
        ) from None
    return _owned(session, caller).model_dump(mode="json")


@router.get("/api/sessions/{session_id}/events")
async def get_events(
    session_id: str, request: Request, after_event_id: int | None = Query(default=None)
) -> dict[str, Any]:
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
    return {"events": [event.public() for event in events]}
