"""A stand-in for Supabase's REST API (PostgREST) over the real PostgreSQL, for the real supabase-py.

It serves the requests supabase-py sends for this service:
`POST /rest/v1/{table}` with `on_conflict` and `Prefer: return=…, resolution=ignore-duplicates`,
`GET` with `select`, filters (`eq.`, `gt.`, `lt.`, …, `in.(…)`, `is.null`, and `or=(…)` with nested `and(…)`
and quoted values), `order` on one or more columns and `limit`, and `PATCH` and `DELETE` with
filters. Each request runs in one transaction as the role of its JWT (the `Authorization` bearer
token, as PostgREST reads it: a user's token, or else the API key) with its claims in
`request.jwt.claims` (`SET LOCAL ROLE`), as PostgREST does, so row level security applies for real.

Like a Supabase project, it answers 414 to a request line longer than `MAX_REQUEST_LINE` (the gateway
in front of PostgREST refuses such URLs before PostgREST sees them). Its schema cache is read at start
and again on `reload_schema()` (PostgREST's `NOTIFY pgrst, 'reload schema'`): a table missing from it
is PGRST205, a written column missing from it PGRST204, as PostgREST answers.

Faults for the tests: `fail_next(n)` answers 503 (PGRST001, no database connection) without
touching the database; `lose_next_response()` commits the next write and answers only after the client gave up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TABLES = ("sessions", "events", "attachments")
OPERATORS = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# Roughly where Supabase's gateway answers 414 "URI too long" (nginx's 8 KB request line buffer):
# postgrest-py #365 and supabase-js #766 meet it with long `in.(...)` filters.
MAX_REQUEST_LINE = 8000


def make_key(role: str, **claims: str) -> str:
    """An API key as Supabase issues them: a JWT whose claims name the role (unsigned here); with
    `sub`, a signed-in user's access token."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    body = {"role": role, "iss": "supabase", **claims}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(body)}.c2lnbmF0dXJl"


class FakePostgrest:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.url = ""  # set once it serves
        self.pool: asyncpg.Pool | None = None
        self.columns: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        # Supabase's PostgREST answers at most this many rows (db-max-rows), whatever `limit` says.
        self.max_rows = 1000
        self.answered_503 = 0
        self._fail = 0
        self._lose = 0
        self._hold = 0.0
        self.lost = asyncio.Event()
        self.app = Starlette(
            routes=[Route("/rest/v1/{table}", self._handle, methods=["GET", "POST", "PATCH", "DELETE"])],
            lifespan=self._lifespan,
        )

    def fail_next(self, n: int) -> None:
        self._fail += n

    def heal(self) -> None:
        self._fail = 0

    def lose_next_response(self, hold_seconds: float = 2.0) -> None:
        """Commit the next write, then hold its answer past the client's timeout (a lost response)."""
        self._lose += 1
        self._hold = hold_seconds

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self._start()
        try:
            yield
        finally:
            await self._stop()

    async def _start(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=5)
        await self.reload_schema()

    async def reload_schema(self) -> None:
        """Read the tables' columns again, as PostgREST does on `NOTIFY pgrst, 'reload schema'`."""
        assert self.pool is not None
        rows = await self.pool.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = ANY($1::text[])",
            list(TABLES),
        )
        self.columns = {}
        for row in rows:
            self.columns.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]

    async def _stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _handle(self, request: Request) -> Response:
        table = request.path_params["table"]
        self.requests.append((request.method, f"{request.url.path}?{request.url.query}"))
        if len(request.scope["raw_path"]) + 1 + len(request.scope["query_string"]) > MAX_REQUEST_LINE:
            return _too_long()
        if table not in self.columns:
            return _error(404, "PGRST205", f"Could not find the table 'public.{table}' in the schema cache")
        if self._fail:
            self._fail -= 1
            self.answered_503 += 1
            return _error(503, "PGRST001", "Database client error. Retrying the connection.")
        claims = _claims_of(request)
        role = claims["role"]
        prefer = {
            p.strip().split("=")[0]: p.strip().split("=")[-1] for p in request.headers.get("prefer", "").split(",")
        }
        assert self.pool is not None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                await conn.execute("SELECT set_config('request.jwt.claims', $1, true)", json.dumps(claims))
                if request.method == "GET":
                    rows = await self._select(conn, table, request)
                elif request.method == "POST":
                    rows = await self._insert(conn, table, request, prefer)
                elif request.method == "PATCH":
                    rows = await self._update(conn, table, request)
                else:
                    rows = await self._delete(conn, table, request)
        except asyncpg.PostgresError as exc:
            # Permission denied: 401 without a user's token, 403 with one (as PostgREST answers).
            denied = 401 if role == "anon" else 403
            status = {"23505": 409, "23503": 409, "42501": denied}.get(exc.sqlstate or "", 400)
            return _error(status, exc.sqlstate or "", str(exc))
        except _BadRequest as exc:
            return _error(400, exc.code, str(exc))
        if request.method != "GET" and self._lose:
            # Committed, but the answer never arrives: the client's read times out.
            self._lose -= 1
            self.lost.set()
            await asyncio.sleep(self._hold)
        if request.method != "GET" and prefer.get("return") != "representation":
            return Response(status_code=201 if request.method == "POST" else 204)
        return JSONResponse(rows, status_code=201 if request.method == "POST" else 200)

    def _cast(self, table: str, column: str) -> str:
        if column not in self.columns[table]:
            raise asyncpg.UndefinedColumnError(f"column {column} does not exist")
        return self.columns[table][column]

    def _written(self, table: str, column: str) -> str:
        """A column of a request's body, as `_cast`: unknown to the schema cache it is PGRST204."""
        if column not in self.columns[table]:
            raise _BadRequest("PGRST204", f"Could not find the '{column}' column of '{table}' in the schema cache")
        return self.columns[table][column]

    def _where(self, table: str, request: Request, args: list[Any]) -> str:
        clauses = []
        for column, condition in request.query_params.multi_items():
            if column in ("select", "order", "limit", "on_conflict", "columns"):
                continue
            if column in ("or", "and"):  # or=(a.lt.1,and(b.eq.2,c.gt.3))
                clauses.append(self._logic(table, column, condition, args))
            else:
                clauses.append(self._condition(table, column, condition, args))
        return " WHERE " + " AND ".join(clauses) if clauses else ""

    def _condition(self, table: str, column: str, condition: str, args: list[Any]) -> str:
        op, _, value = condition.partition(".")
        if op in ("is", "not") and value.endswith("null"):  # is.null, not.is.null
            return f'"{column}" IS {"NOT " if op == "not" else ""}NULL'
        if op == "in":  # in.(a,"b,c")
            args.append([_unquoted(item) for item in _split_items(value.removeprefix("(").removesuffix(")"))])
            return f'"{column}" = ANY(${len(args)}::text[]::{self._cast(table, column)}[])'
        args.append(value)
        return f'"{column}" {OPERATORS[op]} ${len(args)}::text::{self._cast(table, column)}'

    def _logic(self, table: str, operator: str, tree: str, args: list[Any]) -> str:
        """A logical tree as PostgREST reads one: `(item,item,...)`, each item `column.op.value`
        (a value in double quotes may hold `,.:()`) or a nested `and(...)` / `or(...)`."""
        if not (tree.startswith("(") and tree.endswith(")")):
            raise _BadRequest("PGRST100", f"failed to parse logic tree ({tree})")
        parts = []
        for item in _split_items(tree[1:-1]):
            nested, _, rest = item.partition("(")
            if nested in ("and", "or") and item.endswith(")"):
                parts.append(self._logic(table, nested, f"({rest}", args))
                continue
            column, _, condition = item.partition(".")
            op, _, value = condition.partition(".")
            parts.append(self._condition(table, column, f"{op}.{_unquoted(value)}", args))
        return "(" + f" {operator.upper()} ".join(parts) + ")"

    @staticmethod
    def _order(request: Request) -> str:
        terms = []
        for term in request.query_params["order"].split(","):
            column, *modifiers = term.split(".")
            nulls = {"nullsfirst": " NULLS FIRST", "nullslast": " NULLS LAST"}
            terms.append(
                f'"{column}" {"DESC" if "desc" in modifiers else "ASC"}'
                + "".join(nulls[m] for m in modifiers if m in nulls)
            )
        return " ORDER BY " + ", ".join(terms)

    async def _select(self, conn: asyncpg.Connection, table: str, request: Request) -> Any:
        args: list[Any] = []
        select = request.query_params.get("select", "*")
        columns = "*" if select == "*" else ", ".join(f'"{c}"' for c in select.split(","))
        sql = f"SELECT {columns} FROM {table}{self._where(table, request, args)}"
        if "order" in request.query_params:
            sql += self._order(request)
        sql += f" LIMIT {min(int(request.query_params.get('limit', self.max_rows)), self.max_rows)}"
        return json.loads(await conn.fetchval(f"SELECT coalesce(json_agg(t), '[]') FROM ({sql}) t", *args))

    async def _insert(self, conn: asyncpg.Connection, table: str, request: Request, prefer: dict[str, str]) -> Any:
        body = await request.json()
        rows = body if isinstance(body, list) else [body]
        columns = list(rows[0])
        args: list[Any] = []
        values = []
        for row in rows:
            placeholders = []
            for column in columns:
                args.append(_as_text(row.get(column)))
                placeholders.append(f"${len(args)}::text::{self._written(table, column)}")
            values.append(f"({', '.join(placeholders)})")
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join(values)}"
        if "on_conflict" in request.query_params:
            target = request.query_params["on_conflict"]
            if prefer.get("resolution") == "ignore-duplicates":
                sql += f" ON CONFLICT ({target}) DO NOTHING"
            else:
                updates = ", ".join(f"{c} = excluded.{c}" for c in columns)
                sql += f" ON CONFLICT ({target}) DO UPDATE SET {updates}"
        return json.loads(
            await conn.fetchval(f"WITH w AS ({sql} RETURNING *) SELECT coalesce(json_agg(w), '[]') FROM w", *args)
        )

    async def _update(self, conn: asyncpg.Connection, table: str, request: Request) -> Any:
        body = await request.json()
        args: list[Any] = []
        sets = []
        for column, value in body.items():
            args.append(_as_text(value))
            sets.append(f'"{column}" = ${len(args)}::text::{self._written(table, column)}')
        sql = f"UPDATE {table} SET {', '.join(sets)}{self._where(table, request, args)}"
        return json.loads(
            await conn.fetchval(f"WITH w AS ({sql} RETURNING *) SELECT coalesce(json_agg(w), '[]') FROM w", *args)
        )

    async def _delete(self, conn: asyncpg.Connection, table: str, request: Request) -> Any:
        args: list[Any] = []
        sql = f"DELETE FROM {table}{self._where(table, request, args)}"
        return json.loads(
            await conn.fetchval(f"WITH w AS ({sql} RETURNING *) SELECT coalesce(json_agg(w), '[]') FROM w", *args)
        )


class _BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _split_items(items: str) -> list[str]:
    """Split at the commas outside parentheses and double quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for n, char in enumerate(items):
        if char == '"' and (n == 0 or items[n - 1] != "\\"):
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif not quoted and depth == 0 and char == ",":
            parts.append(items[start:n])
            start = n + 1
    parts.append(items[start:])
    return parts


def _unquoted(value: str) -> str:
    """A value as PostgREST reads one: in double quotes it may hold `,.:()`."""
    if len(value) > 1 and value.startswith('"') and value.endswith('"'):
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def _as_text(value: Any) -> str | None:
    """A JSON value as PostgreSQL reads it from text (objects and arrays, for jsonb, as JSON)."""
    if value is None:
        return None
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _claims_of(request: Request) -> dict[str, Any]:
    """The JWT's claims, as PostgREST takes them: from `Authorization: Bearer` (supabase-py sends
    the API key there, or a signed-in user's token), else the anonymous role. Not verified here."""
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    try:
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    except (IndexError, ValueError):
        claims = {}
    if not isinstance(claims, dict) or claims.get("role") not in ("anon", "authenticated", "service_role"):
        claims = {"role": "anon"}
    return claims


def _too_long() -> Response:
    """The gateway's answer, an HTML page rather than PostgREST's JSON."""
    page = "<html><head><title>414 Request-URI Too Large</title></head><body>414 Request-URI Too Large</body></html>"
    return Response(page, status_code=414, media_type="text/html")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "details": None, "hint": None}, status_code=status)
