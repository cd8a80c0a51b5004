"""A stand-in for Supabase Storage's object API, in memory, for the real supabase-py (storage3).

It serves the requests storage3 sends for this service, under `/storage/v1`:
`POST /object/{bucket}/{path}` (a multipart upload; `x-upsert: true` replaces an object),
`GET /object/{bucket}/{path}` (a download, with an `Authorization` bearer token),
`POST /object/list/{bucket}` (`prefix`, `limit`, `offset`: the objects in that folder, by name) and
`DELETE /object/{bucket}` (`{"prefixes": [paths]}`: those objects removed, missing ones ignored) and
`GET /bucket/{bucket}` (the bucket's details).
Errors are answered as Storage answers them: `{"statusCode": "404", "error": "not_found", ...}`.

`served_beside(app)` serves it and another app (the PostgREST stand-in) at one address, as one
Supabase project's URL serves both.

Faults for the tests: `fail_next(n)` answers the next n requests 503, until `heal()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route


class FakeSupabaseStorage:
    def __init__(self, buckets: tuple[str, ...] = ("attachments",)) -> None:
        self.buckets = set(buckets)
        self.objects: dict[tuple[str, str], bytes] = {}  # (bucket, path) -> bytes
        self.content_types: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._fail = 0
        self.app = Starlette(
            routes=[
                Route("/object/list/{bucket}", self._list, methods=["POST"]),
                Route("/object/{bucket}/{path:path}", self._upload, methods=["POST"]),
                Route("/object/{bucket}/{path:path}", self._download, methods=["GET"]),
                Route("/object/{bucket}", self._remove, methods=["DELETE"]),
                Route("/bucket/{bucket}", self._bucket, methods=["GET"]),
            ]
        )

    def fail_next(self, n: int) -> None:
        self._fail += n

    def heal(self) -> None:
        self._fail = 0

    def paths(self, bucket: str = "attachments") -> set[str]:
        return {path for (held_in, path) in self.objects if held_in == bucket}

    def served_beside(self, app: Starlette) -> Starlette:
        """One app: this one under /storage/v1, `app` (and its lifespan) for everything else."""

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with app.router.lifespan_context(app):
                yield

        return Starlette(routes=[Mount("/storage/v1", app=self.app), Mount("/", app=app)], lifespan=lifespan)

    def _refusal(self, request: Request, bucket: str) -> Response | None:
        self.requests.append((request.method, request.url.path))
        if self._fail:
            self._fail -= 1
            return _error(503, "503", "internal", "Service Unavailable")
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return _error(400, "403", "Unauthorized", "headers must have required property 'authorization'")
        if bucket not in self.buckets:
            return _error(400, "404", "Bucket not found", "Bucket not found")
        return None

    async def _upload(self, request: Request) -> Response:
        bucket, path = request.path_params["bucket"], request.path_params["path"]
        if (refused := self._refusal(request, bucket)) is not None:
            return refused
        if (bucket, path) in self.objects and request.headers.get("x-upsert") != "true":
            return _error(400, "409", "Duplicate", "The resource already exists")
        async with request.form() as form:
            upload = form["file"]
            assert not isinstance(upload, str), "the bytes come as a multipart file"
            self.objects[bucket, path] = await upload.read()
            self.content_types[bucket, path] = upload.content_type or ""
        return JSONResponse({"Id": path, "Key": f"{bucket}/{path}"})

    async def _download(self, request: Request) -> Response:
        bucket, path = request.path_params["bucket"], request.path_params["path"]
        if (refused := self._refusal(request, bucket)) is not None:
            return refused
        if (bucket, path) not in self.objects:
            return _error(400, "404", "not_found", "Object not found")
        return Response(self.objects[bucket, path], media_type=self.content_types[bucket, path])

    async def _list(self, request: Request) -> Response:
        bucket = request.path_params["bucket"]
        if (refused := self._refusal(request, bucket)) is not None:
            return refused
        body = await request.json()
        folder = body.get("prefix", "").strip("/")
        start = f"{folder}/" if folder else ""
        # The names in the folder (a deeper path shows as its first part, as Storage shows folders).
        names = sorted({path[len(start) :].split("/")[0] for path in self.paths(bucket) if path.startswith(start)})
        offset, limit = int(body.get("offset", 0)), int(body.get("limit", 100))
        return JSONResponse([{"name": name, "id": f"{start}{name}"} for name in names[offset : offset + limit]])

    async def _bucket(self, request: Request) -> Response:
        bucket = request.path_params["bucket"]
        if (refused := self._refusal(request, bucket)) is not None:
            return refused
        moment = "2026-12-12T00:00:00.000Z"
        return JSONResponse(
            {
                "id": bucket,
                "name": bucket,
                "owner": "",
                "public": False,
                "created_at": moment,
                "updated_at": moment,
                "file_size_limit": None,
                "allowed_mime_types": None,
            }
        )

    async def _remove(self, request: Request) -> Response:
        bucket = request.path_params["bucket"]
        if (refused := self._refusal(request, bucket)) is not None:
            return refused
        removed = []
        for path in (await request.json()).get("prefixes", []):
            if self.objects.pop((bucket, path), None) is not None:
                self.content_types.pop((bucket, path), None)
                removed.append({"name": path, "bucket_id": bucket})
        return JSONResponse(removed)


def _error(status: int, code: str, error: str, message: str) -> JSONResponse:
    return JSONResponse({"statusCode": code, "error": error, "message": message}, status_code=status)
