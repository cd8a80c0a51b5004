"""HTTP routes (PROTOCOL.md, HTTP)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from server.core.conversation import parse_session_id
from server.core.errors import ServiceError
from server.core.ports import StorageUnavailable
from server.runtime import Runtime

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _session_id(value: str) -> str:
    try:
        return parse_session_id(value)
    except ServiceError as exc:
        raise HTTPException(status_code=400, detail=exc.as_dict()) from None


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
    sid = _session_id(session_id)
    try:
        session = await _runtime(request).repo.get_session(sid)
    except StorageUnavailable:
        raise HTTPException(
            status_code=503, detail={"code": "unavailable", "message": "storage is unreachable"}
        ) from None
    if session is None:
        raise HTTPException(status_code=404, detail={"code": "not_found", "message": "no such session"})
    return session.model_dump(mode="json")


@router.get("/api/sessions/{session_id}/events")
async def get_events(
    session_id: str, request: Request, after_event_id: int | None = Query(default=None)
) -> dict[str, Any]:
    sid = _session_id(session_id)
    repo = _runtime(request).repo
    try:
        if await repo.get_session(sid) is None:
            raise HTTPException(status_code=404, detail={"code": "not_found", "message": "no such session"})
        events = await repo.list_events(sid, after_event_id)
    except StorageUnavailable:
        raise HTTPException(
            status_code=503, detail={"code": "unavailable", "message": "storage is unreachable"}
        ) from None
    return {"events": [event.public() for event in events]}
