-- Conversations a frontend can manage: a session's title, when it last changed, and its deletion.
-- Safe to apply more than once.
--
-- * `title`: null until the session has one (a generated one, or a person's rename).
-- * `updated_at`: when the session last changed: its creation (the default), every stored event
--   (the trigger below, whoever inserts, plain SQL too), a rename. Sessions from
--   before this migration changed last with their last event, else when they started.
-- * `deleted_at`: a deleted session keeps its row (id, user_id, start_time, deleted_at), so that
--   its id is never used again; its events are removed and storage takes no more of them.
alter table public.sessions add column if not exists title text;
alter table public.sessions add column if not exists deleted_at timestamptz;

do $$
begin
    if not exists (
        select 1 from information_schema.columns
        where table_schema = 'public' and table_name = 'sessions' and column_name = 'updated_at'
    ) then
        alter table public.sessions add column updated_at timestamptz;
        update public.sessions s set updated_at = coalesce(
            (select e.timestamp from public.events e where e.session_id = s.session_id
             order by e.event_id desc limit 1),
            s.start_time
        );
        alter table public.sessions alter column updated_at set default now(),
            alter column updated_at set not null;
    end if;
end
$$;

-- A user's sessions, most recently updated first: the listing's keyset reads this index in order.
create index if not exists sessions_by_user_updated
    on public.sessions (user_id, updated_at desc, session_id desc) where deleted_at is null;

-- Before an event is stored: its session is updated now, or, when it is deleted, the event is
-- skipped (the insert succeeds having stored nothing). The UPDATE also locks the session's row,
-- which the deleting UPDATE locks too: a delete that comes first makes this UPDATE wait and then
-- find no row (READ COMMITTED checks `deleted_at is null` again on the tombstone), and one that
-- comes second waits for this insert to commit and then removes the event with the others. A mere
-- read of deleted_at (the foreign key's share lock included) would let an event outlive the delete.
create or replace function public.event_touches_session() returns trigger language plpgsql as $$
begin
    update public.sessions set updated_at = now()
    where session_id = new.session_id and deleted_at is null;
    if not found and exists (select 1 from public.sessions where session_id = new.session_id) then
        return null;  -- deleted; an unknown session is left to the foreign key to refuse
    end if;
    return new;
end
$$;

drop trigger if exists events_touch_session on public.events;
create trigger events_touch_session before insert on public.events
    for each row execute function public.event_touches_session();

-- Deleting a session is one UPDATE setting deleted_at: its events go in the same statement.
create or replace function public.session_deleted_events_removed() returns trigger language plpgsql as $$
begin
    delete from public.events where session_id = new.session_id;
    return null;
end
$$;

drop trigger if exists sessions_deleted_events_removed on public.sessions;
create trigger sessions_deleted_events_removed after update of deleted_at on public.sessions
    for each row when (old.deleted_at is null and new.deleted_at is not null)
    execute function public.session_deleted_events_removed();

-- Supabase: the server's service_role (which bypasses row level security) writes the tombstone and
-- removes the events; `authenticated` keeps only its read of its own rows
-- (20261127120000_row_level_security.sql): no user updates or deletes a session, theirs or not.
do $$
begin
    if to_regrole('service_role') is not null then
        grant select, insert, update, delete on table public.sessions, public.events to service_role;
    end if;
    if to_regrole('authenticated') is not null then
        revoke insert, update, delete, truncate on table public.sessions, public.events from authenticated;
    end if;
end
$$;
