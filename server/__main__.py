"""`python -m server`: serve on HOST:PORT (see server/serve.py)."""

import asyncio
import sys

from server.config import Settings, UnusableSetting, load_settings


def refuse_an_unusable_database(settings: Settings) -> None:
    """A DATABASE_URL that PostgreSQL refuses (no such database, role or password) stops the process
    here in one line, like the settings check: the app's start finds it too, but only once uvicorn
    has said that it is starting. A server that does not answer is waited for by the app."""
    if settings.storage_backend == "postgres" and settings.database_url:
        from server.storage import postgres

        try:
            asyncio.run(postgres.probe(settings.database_url))
        except UnusableSetting as exc:
            raise SystemExit(exc.report()) from None


if __name__ == "__main__":
    # An unusable setting stops it here, before the heavy imports below.
    refuse_an_unusable_database(load_settings())
    from server.serve import main

    try:
        main()
    except KeyboardInterrupt:
        # uvicorn shuts down cleanly on Ctrl-C, then raises it again: exit as interrupted, quietly.
        sys.exit(130)
