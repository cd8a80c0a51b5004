"""Serving: uvicorn with the settings that measured best, one process or WORKERS of them."""

from __future__ import annotations

import importlib.util
import socket
from typing import Any

import uvicorn
from uvicorn.importer import import_from_string
from uvicorn.supervisors import multiprocess

from server.config import Settings
from server.main import create_app, prepare_shutdown


class Server(uvicorn.Server):
    """uvicorn closes connections before the lifespan shutdown; end turns first so clients get `done`."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        await prepare_shutdown(import_from_string(app) if isinstance(app, str) else app)
        await super().shutdown(sockets)


class WorkerProcess(multiprocess.Process):
    """A uvicorn worker that runs our Server (uvicorn's supervisor would make a plain one)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server


def serve_workers(settings: Settings) -> None:
    """WORKERS processes on one port, sharing Redis: each imports `server.main:app` itself."""
    if not settings.redis_url:
        raise SystemExit("WORKERS > 1 needs REDIS_URL: without it each process would keep sessions of its own")
    config = uvicorn_config(settings, "server.main:app")
    config.workers = settings.workers
    # uvicorn's supervisor makes its workers from this module attribute.
    multiprocess.Process = WorkerProcess  # type: ignore[misc]
    multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    """`app`: the ASGI app, or its import string (for workers, which import it themselves)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",  # uvloop: not on Windows
        http="httptools",
        ws="websockets-sansio",
        # Deflate measured as the largest cost per chunk and per idle socket (baseline-bench.md).
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


def main() -> None:
    settings = Settings()
    if settings.workers > 1:
        serve_workers(settings)
        return
    Server(uvicorn_config(settings, create_app(settings))).run()
