"""`python -m server`: serve on HOST:PORT with the uvicorn settings that measured best."""

from __future__ import annotations

import importlib.util
import socket
from typing import Any

import uvicorn

from server.config import Settings
from server.main import create_app, prepare_shutdown


class Server(uvicorn.Server):
    """uvicorn closes connections before the lifespan shutdown; end turns first so clients get `done`."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await prepare_shutdown(self.config.app)
        await super().shutdown(sockets)


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
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
    Server(uvicorn_config(settings, create_app(settings))).run()


if __name__ == "__main__":
    main()
