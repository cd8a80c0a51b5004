"""Patches of upstream libraries, one module per library, each pinned to the version it was written for.

Imported first whatever starts the service, so the pins are checked here, before any patch module
runs: a library installed at another version, or changed, stops the start in one line (guard.py).
"""

from server.upstream.guard import refuse_stale_upstream

refuse_stale_upstream()
