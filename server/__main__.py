"""`python -m server`: serve on HOST:PORT (see server/serve.py)."""

import sys

from server.config import load_settings

if __name__ == "__main__":
    load_settings()  # an unusable setting stops it here, before the heavy imports below
    from server.serve import main

    try:
        main()
    except KeyboardInterrupt:
        # uvicorn shuts down cleanly on Ctrl-C, then raises it again: exit as interrupted, quietly.
        sys.exit(130)
