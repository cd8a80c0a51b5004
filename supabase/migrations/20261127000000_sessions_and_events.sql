-- Sessions and their events: the base tables and columns, plus what idempotent
-- writes and history reads need. Safe to apply more than once.

create table if not exists public.sessions (
    session_id       uuid primary key,
    user_id          text,
    start_time       timestamptz not null default now(),
    end_time         timestamptz,
    summary          text,
    duration_seconds integer
);

create table if not exists public.events (
    event_id   bigint generated always as identity primary key,
    session_id uuid not null references public.sessions (session_id) on delete cascade,
    timestamp  timestamptz not null default now(),
    event_type text not null
        check (event_type in ('user_message', 'ai_message', 'tool_call', 'tool_result')),
    content    text not null,
    -- Added: the turn an event belongs to, and the key that makes a retried write a no-op
    -- (`insert ... on conflict (session_id, event_key) do nothing`).
    turn_id    text,
    event_key  text not null,
    constraint events_session_event_key unique (session_id, event_key)
);

-- History by session in stored order.
create index if not exists events_session_order on public.events (session_id, event_id);

-- Row level security: see 20261127120000_row_level_security.sql.
alter table public.sessions enable row level security;
alter table public.events enable row level security;
