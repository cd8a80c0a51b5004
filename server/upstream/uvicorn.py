"""uvicorn, patched. What is patched, and why:

`run_workers` runs uvicorn's multiprocess supervisor with workers that serve our own server (its
shutdown ends turns with `done` before connections close). The supervisor makes each worker from
its module's `Process` class, and each worker's server in `Process.server`, with no way to pass
another: the module attribute is replaced by a subclass of `WorkerProcess` for the run.

Why uvicorn's public API cannot do it: `uvicorn.run(workers=...)` and `Multiprocess(config,
sockets)` take no server class nor factory, and `Process.server` makes a plain `Server(config)`;
only the class the module names decides what each worker runs.

`PATCHED` holds the sha256 of the upstream module this relies on, as in the version pinned in
constraints.txt: the service does not start when the installed version or the module differs
(server/upstream/guard.py), and tests/test_upstream.py fails, so an upgrade is read first.
"""

from __future__ import annotations

import uvicorn
from uvicorn.supervisors import multiprocess

DISTRIBUTION = "uvicorn"
PINNED = "0.54.0"
PATCHED: dict[object, str] = {
    multiprocess: "53541976227fec0b9ace2c7a5ce8f592ed0d8ff37f3c93c2a18baae9236365c2",
}


class WorkerProcess(multiprocess.Process):
    """A uvicorn worker whose server is `make_server(config)`. Subclass it at module level: the
    supervisor pickles each worker into its process, which imports the class by name."""

    def make_server(self, config: uvicorn.Config) -> uvicorn.Server:
        raise NotImplementedError

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = self.make_server(self.config)
        return self._server


def run_workers(config: uvicorn.Config, worker: type[WorkerProcess]) -> None:
    """`config.workers` processes of `worker` on one socket, under uvicorn's supervisor."""
    multiprocess.Process = worker  # type: ignore[misc]
    multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
