"""The playground page (docs/protocol.md, The playground page): `GET /` and its assets under
`/playground/`, plain files from `static/` with no build step. The page is a Socket.IO client like
any other; the server only serves it, with a Content-Security-Policy that allows nothing but its
own origin (and blob: images, its files fetched with a token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
ASSETS_PATH = "/playground"

# No inline script or style, nothing from another origin; 'self' in connect-src covers ws:// and
# wss:// to the page's own host (CSP level 3), which is all Socket.IO needs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # blob: for the service's files fetched with the token (an <img> cannot send it).
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated every time (ETag), so a new release's page never runs an old script.
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def add_playground(api: FastAPI) -> None:
    """Serve the page at `/` and its files under /playground/ (PLAYGROUND=false: not called, so 404)."""

    @api.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    api.mount(ASSETS_PATH, _Assets(directory=STATIC), name="playground")
