"""DATABASE_URL as the service checks and shows it: a PostgreSQL URL, never printed with its password.

Standard library only: the settings check (server/config.py) runs before the heavy imports.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

SCHEMES = ("postgresql", "postgres")
SHAPE = "postgresql://user:password@host:port/database"
HIDDEN = "***"
# libpq's URL may carry the password as a query parameter too (asyncpg reads it there).
PASSWORD_PARAMETER = re.compile(r"((?:^|&)(?:ssl)?password=)[^&]*", re.IGNORECASE)


def shape_problem(dsn: str) -> str | None:
    """What makes `dsn` something no PostgreSQL driver can use, or None (connecting finds the rest)."""
    if "://" not in dsn:
        return f"must be a URL, {SHAPE}"
    try:
        url = urlsplit(dsn)
        url.port  # noqa: B018 -- parsing the port raises on one that is not a number in range
    except ValueError as exc:
        return scrubbed(f"is not a URL that can be parsed ({exc})", dsn)
    if url.scheme.lower() not in SCHEMES:
        given = f"not {url.scheme}://" if url.scheme else "not a URL without a scheme"
        return f"must be a PostgreSQL URL ({SHAPE}), {given}"
    return None


def shown(dsn: str) -> str | None:
    """`dsn` with its password replaced by ***, or None when it is not a URL (it is then not shown at
    all: whatever it holds could be a password)."""
    if "://" not in dsn:
        return None
    scheme, netloc, path, query, fragment = _split(dsn)
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{HIDDEN}@{host}"
    query = PASSWORD_PARAMETER.sub(rf"\g<1>{HIDDEN}", query)
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def scrubbed(text: str, dsn: str) -> str:
    """`text` (a driver's error message) with any password of `dsn` in it hidden."""
    for secret in _passwords(dsn):
        text = text.replace(secret, HIDDEN)
    return text


def _split(dsn: str) -> tuple[str, str, str, str, str]:
    # Done by hand: urlsplit refuses some values (a bad port, a bracket) that must still be shown.
    scheme, _, rest = dsn.partition("://")
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return scheme, netloc, slash + path, query, fragment


def _passwords(dsn: str) -> list[str]:
    if "://" not in dsn:
        return [dsn] if dsn else []
    _, netloc, _, query, _ = _split(dsn)
    userinfo, at, _ = netloc.rpartition("@")
    found = [userinfo.split(":", 1)[1]] if at and ":" in userinfo else []
    found += [m.group(0).split("=", 1)[1] for m in PASSWORD_PARAMETER.finditer(query)]
    return [form for secret in found if secret for form in {secret, unquote(secret)}]
