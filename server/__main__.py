"""`python -m server`: serve on HOST:PORT (see server/serve.py)."""

from server.serve import main

if __name__ == "__main__":
    main()
