"""Serving: uvicorn with the settings that measured best, one process or WORKERS of them."""

from __future__ import annotations

import gc
import importlib.util
import logging
import resource
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.importer import import_from_string

from server import metrics
from server.config import Settings, load_settings
from server.logs import configure_logging, uvicorn_log_config
from server.main import create_app, prepare_shutdown
from server.upstream import uvicorn as uvicorn_patch

log = logging.getLogger("server")


def tune_interpreter() -> None:
    """Process-wide settings for a server whose loop is busy and whose blocking work is in threads:
    what exists after start-up is frozen out of the cyclic collector's reach (its walks stalled the
    loop), and a thread hands the GIL back to the loop sooner. Measured in docs/performance.md."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    sys.setswitchinterval(0.0002)


class Server(uvicorn.Server):
    """uvicorn closes connections before the lifespan shutdown; end turns first so clients get `done`.

    `owns_process`: this server is the process's only job (`python -m server`, a worker), so it may
    tune the interpreter (see tune_interpreter) once the app has started; TUNE_INTERPRETER=false
    leaves it as it is.
    """

    def __init__(self, config: uvicorn.Config, *, owns_process: bool = False) -> None:
        super().__init__(config)
        self._owns_process = owns_process

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._owns_process:
            tune_interpreter()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        await prepare_shutdown(import_from_string(app) if isinstance(app, str) else app)
        await super().shutdown(sockets)


class ServiceWorker(uvicorn_patch.WorkerProcess):
    """A uvicorn worker that runs our Server (uvicorn's supervisor would make a plain one)."""

    def make_server(self, config: uvicorn.Config) -> uvicorn.Server:
        return Server(config, owns_process=load_settings().tune_interpreter)

    def join(self) -> None:
        # The supervisor joins every worker that ends (stopped, crashed, replaced).
        super().join()
        metrics.process_exited(self.pid)


def serve_workers(settings: Settings) -> None:
    """WORKERS processes on one port, sharing Redis (Settings requires it): each imports `server.main:app` itself."""
    config = uvicorn_config(settings, "server.main:app")
    config.workers = settings.workers
    # Before the workers start: each inherits the directory its metrics go to.
    with metrics.multiprocess_directory():
        uvicorn_patch.run_workers(config, ServiceWorker)


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    """`app`: the ASGI app, or its import string (for workers, which import it themselves)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(settings.log_format),
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",  # uvloop: not on Windows
        http="httptools",
        ws="websockets-sansio",
        # Deflate measured as the largest cost per chunk and per idle socket (baseline-bench.md).
        ws_per_message_deflate=False,
        # MAX_PACKET_BYTES: a bigger frame is refused (1009) as its header arrives, not once buffered.
        ws_max_size=settings.packet_limit,
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


def raise_open_file_limit() -> None:
    """Each connection is a file descriptor: take the soft limit up to the hard one (a soft 1,024,
    common on Linux, would refuse the 1,025th client), and say so."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1_048_576
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("raised the open-file limit from %d to %d (connections each take one)", soft, hard)
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit: %s", exc)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, settings.log_repeat_seconds)
    raise_open_file_limit()
    if settings.workers > 1:
        serve_workers(settings)
        return
    config = uvicorn_config(settings, create_app(settings))
    # Bound before the app starts: on a busy port the process stops before it opens its storage.
    sock = config.bind_socket()
    Server(config, owns_process=settings.tune_interpreter).run(sockets=[sock])
