"""HTTP routes (docs/protocol.md, HTTP and Metrics), with the models and status codes they answer."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.core.errors import ErrorCode, ServiceError
from server.core.models import AttachmentRef, ErrorInfo, EventType, FinishReason, Session
from server.metrics import PrometheusMetrics
from server.runtime import Runtime
from server.tools.mcp import McpServerState
from server.transport import protocol_page
from server.transport.playground import CONTENT_SECURITY_POLICY, HEADERS
from server.transport.tokens import InvalidToken, TokenVerifier, bearer_token
from server.transport.uploads import UploadRefused, receive_upload

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
    attachments: list[AttachmentRef] | None = None  # user_message only ([] without any)


class Events(BaseModel):
    events: list[HistoryItem]
    more: bool  # events exist beyond the page, in the direction asked


class SessionList(BaseModel):
    sessions: list[Session]
    next_cursor: str | None  # asks for the next page; null on the last one


class Rename(BaseModel):
    title: str


class Refusal(BaseModel):
    detail: ErrorInfo


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meanings = {
        400: "`invalid_session_id`, or `invalid_payload` for a malformed query parameter",
        401: "`unauthorized`: authentication is on and the Bearer token is missing, invalid or expired",
        403: "`forbidden`: the session belongs to another user",
        404: "`not_found`: no such session (or file); `session_deleted`: it was deleted",
        413: "`too_large`: the file is larger than ATTACHMENT_MAX_BYTES",
        415: "`unsupported_media_type`: the file is no PNG, JPEG, GIF or WebP image, PDF or UTF-8 text",
        503: "`unavailable`: storage is unreachable; retrying is safe",
    }
    return {status: {"model": Refusal, "description": meanings[status]} for status in statuses}


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


STATUS = {
    ErrorCode.INVALID_PAYLOAD: 400,
    ErrorCode.INVALID_SESSION_ID: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.SESSION_DELETED: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
}


def count_refusal(request: Request, code: str) -> None:
    """An HTTP request answered with an error code, in `realtime_refusals_total`."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.refused(code)


def _http(error: ServiceError) -> HTTPException:
    return HTTPException(status_code=STATUS.get(error.code, 503), detail=error.as_dict())


@contextlib.contextmanager
def _answered() -> Iterator[None]:
    """A refusal of the core as the HTTP answer the contract gives it."""
    try:
        yield
    except ServiceError as exc:
        raise _http(exc) from None


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


# Resolved before the route's parameters are validated: `unauthorized` comes first of all errors.
Caller = Annotated[str | None, Depends(_caller)]
MIN_ID, MAX_ID = -(2**63), 2**63 - 1  # what storage's event ids can be


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


@router.get("/api/sessions", response_model=SessionList, responses=_refusals(400, 401, 503))
async def list_sessions(
    request: Request,
    caller: Caller,
    limit: int = Query(default=20, description="sessions per page, 1 to 100"),
    cursor: str | None = Query(default=None, description="`next_cursor` of the previous page"),
    user_id: str | None = Query(default=None, description="whose sessions, when authentication is off"),
) -> JSONResponse:
    if caller is None and not user_id:
        raise _http(ServiceError(ErrorCode.INVALID_PAYLOAD, "user_id: required while authentication is off"))
    with _answered():
        page = await _runtime(request).catalog.list(caller or user_id or "", limit, cursor)
    sessions = [session.model_dump(mode="json") for session in page.sessions]
    return JSONResponse({"sessions": sessions, "next_cursor": page.next_cursor})


@router.get("/api/sessions/{session_id}", response_model=Session, responses=_refusals(400, 401, 403, 404, 503))
async def get_session(session_id: str, request: Request, caller: Caller) -> Session:
    with _answered():
        return await _runtime(request).catalog.get(session_id, caller)


@router.patch("/api/sessions/{session_id}", response_model=Session, responses=_refusals(400, 401, 403, 404, 503))
async def rename_session(session_id: str, rename: Rename, request: Request, caller: Caller) -> Session:
    with _answered():
        return await _runtime(request).catalog.rename(session_id, caller, rename.title)


@router.delete(
    "/api/sessions/{session_id}", status_code=204, response_class=Response, responses=_refusals(400, 401, 403, 404, 503)
)
async def delete_session(session_id: str, request: Request, caller: Caller) -> Response:
    with _answered():
        await _runtime(request).catalog.delete(session_id, caller)
    return Response(status_code=204)


@router.get("/api/sessions/{session_id}/events", response_model=Events, responses=_refusals(400, 401, 403, 404, 503))
async def get_events(
    session_id: str,
    request: Request,
    caller: Caller,
    after_event_id: int | None = Query(
        default=None, ge=MIN_ID, le=MAX_ID, description="the first events after this one"
    ),
    before_event_id: int | None = Query(
        default=None, ge=MIN_ID, le=MAX_ID, description="the last events before this one"
    ),
    limit: int = Query(default=1000, description="events per page, 1 to 1,000"),
) -> JSONResponse:
    with _answered():
        page = await _runtime(request).catalog.events(
            session_id, caller, after=after_event_id, before=before_event_id, limit=limit
        )
    # Answered as built (the model above documents it): validating a page again costs.
    return JSONResponse({"events": [event.public() for event in page.events], "more": page.more})


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


def _protocol_absent() -> HTTPException:
    return HTTPException(status_code=404, detail={"code": "not_found", "message": "docs/protocol.md is not here"})


@router.get("/docs/protocol", include_in_schema=False)
async def protocol_page_html() -> HTMLResponse:
    """docs/protocol.md rendered for a person, linked from the API page (present in a checkout of
    the repository), under the playground's headers: its CSP allows the page's own stylesheet only."""
    try:
        page = protocol_page.render_page(PROTOCOL_DOC)
    except FileNotFoundError:
        raise _protocol_absent() from None
    return HTMLResponse(page, headers=HEADERS)


@router.get(protocol_page.STYLESHEET_PATH, include_in_schema=False)
async def protocol_page_stylesheet() -> FileResponse:
    return FileResponse(protocol_page.STYLESHEET, media_type="text/css; charset=utf-8", headers=HEADERS)


@router.get(protocol_page.RAW_PATH, include_in_schema=False)
async def protocol_doc() -> Response:
    """The same file as Markdown, for tools."""
    if not PROTOCOL_DOC.is_file():
        raise _protocol_absent()
    return FileResponse(PROTOCOL_DOC, media_type="text/markdown; charset=utf-8")


class AttachmentCreated(BaseModel):
    attachment_id: str
    name: str
    mime_type: str
    size: int


@router.post(
    "/api/sessions/{session_id}/attachments",
    status_code=201,
    response_model=AttachmentCreated,
    responses=_refusals(400, 401, 403, 404, 413, 415, 503),
)
async def upload_attachment(session_id: str, request: Request, caller: Caller) -> JSONResponse:
    """One file, as `multipart/form-data` in a part named `file`, for a later `message`."""
    runtime = _runtime(request)
    with _answered():
        session_id = await runtime.attachments.check_session(session_id, caller)  # before the body is read
    try:
        upload = await receive_upload(request, runtime.settings.attachment_max_bytes)
    except UploadRefused as refused:
        # A large rest of the body is never read: the answer closes the connection.
        detail = {"code": refused.code, "message": refused.message}
        count_refusal(request, refused.code)
        headers = {} if refused.drained else {"connection": "close"}
        return JSONResponse({"detail": detail}, status_code=refused.status, headers=headers)
    with _answered():
        info = await runtime.attachments.add(session_id, upload.name, upload.data)
    created = AttachmentCreated(
        attachment_id=info.attachment_id, name=info.name, mime_type=info.mime_type, size=info.size
    )
    return JSONResponse(created.model_dump(), status_code=201)


@router.get(
    "/api/attachments/{attachment_id}",
    response_class=Response,
    responses={200: {"description": "the file's bytes, as an attachment"}, **_refusals(401, 403, 404, 503)},
)
async def download_attachment(attachment_id: str, request: Request, caller: Caller) -> Response:
    with _answered():
        found = await _runtime(request).attachments.read(attachment_id, caller)
    headers = {
        "content-disposition": _as_attachment(found.info.name),
        "x-content-type-options": "nosniff",
        "content-security-policy": CONTENT_SECURITY_POLICY,
        "cache-control": "private, no-cache",
    }
    return Response(found.data, media_type=found.info.mime_type, headers=headers)


def _as_attachment(name: str) -> str:
    """RFC 6266: a plain ASCII `filename` for clients that read only that (curl -J), and the exact
    name as `filename*`."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
