"""The real PostgreSQL of this machine (or CI): scratch databases, and Supabase's roles stood in."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

MIGRATIONS = sorted((Path(__file__).resolve().parent.parent / "supabase" / "migrations").glob("*.sql"))
ADMIN_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

# What a Supabase project has before any migration: its three API roles, auth.uid() reading the
# caller's JWT claims (set per request by PostgREST), and default grants to the roles.
SUPABASE_STANDINS = """
do $$
begin
    -- Roles belong to the whole server: tests running side by side may create them at once.
    begin create role anon nologin noinherit;
    exception when duplicate_object or unique_violation then null; end;
    begin create role authenticated nologin noinherit;
    exception when duplicate_object or unique_violation then null; end;
    begin create role service_role nologin noinherit bypassrls;
    exception when duplicate_object or unique_violation then null; end;
end
$$;
create schema if not exists auth;
create or replace function auth.uid() returns uuid language sql stable as $$
    select nullif(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub', '')::uuid
$$;
grant usage on schema auth to anon, authenticated, service_role;
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
"""


async def admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_DSN}: {exc}")


@contextlib.asynccontextmanager
async def scratch_database(*, supabase_roles: bool = False) -> AsyncIterator[str]:
    """A fresh database (its DSN), dropped afterwards."""
    admin = await admin_connection()
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    try:
        if supabase_roles:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(SUPABASE_STANDINS)
            finally:
                await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def apply_migrations(conn: asyncpg.Connection) -> None:
    for path in MIGRATIONS:
        await conn.execute(path.read_text())
