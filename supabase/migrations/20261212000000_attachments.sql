-- Files uploaded to a session, which a later message names. Safe to apply more than once.
--
-- * A row per file: its name as the client gave it, the type read from its content, size and
--   sha256, and `used` once a stored message names it (an upload no message names is deleted a
--   day after it came; a used one stays as long as its session).
-- * `data`: the bytes, for STORAGE_BACKEND=postgres. With Supabase it stays null: the bytes are in
--   Supabase Storage, bucket `attachments`, object `{session_id}/{attachment_id}` (created below,
--   private: only the service-role key reads it; the server serves a file to its owner).
-- * A deleted session takes no files, and deleting one removes its files' rows in the same
--   statement (with Supabase the server then removes their Storage objects).
create table if not exists public.attachments (
    attachment_id uuid primary key,
    session_id    uuid not null references public.sessions (session_id) on delete cascade,
    name          text not null,
    mime_type     text not null,
    size          bigint not null,
    sha256        text not null,
    created_at    timestamptz not null default now(),
    used          boolean not null default false,
    data          bytea
);

create index if not exists attachments_by_session on public.attachments (session_id);
-- The expiry scan: uploads no message names, oldest first.
create index if not exists attachments_unused_by_age on public.attachments (used, created_at);

-- Before a file is stored: its session must be live, or the row is skipped (the insert succeeds
-- having stored nothing, as an event of a deleted session is). `for share` waits for a deleting
-- UPDATE of the session's row and then reads the tombstone, so no file outlives the delete; a
-- delete that comes second waits for this insert to commit and then removes the file with the rest.
create or replace function public.attachment_needs_live_session() returns trigger language plpgsql as $$
begin
    perform 1 from public.sessions
    where session_id = new.session_id and deleted_at is null
    for share;
    if not found then
        return null;  -- deleted or unknown
    end if;
    return new;
end
$$;

drop trigger if exists attachments_need_live_session on public.attachments;
create trigger attachments_need_live_session before insert on public.attachments
    for each row execute function public.attachment_needs_live_session();

-- Deleting a session is one UPDATE setting deleted_at: its files' rows go in the same statement.
create or replace function public.session_deleted_attachments_removed() returns trigger language plpgsql as $$
begin
    delete from public.attachments where session_id = new.session_id;
    return null;
end
$$;

drop trigger if exists sessions_deleted_attachments_removed on public.sessions;
create trigger sessions_deleted_attachments_removed after update of deleted_at on public.sessions
    for each row when (old.deleted_at is null and new.deleted_at is not null)
    execute function public.session_deleted_attachments_removed();

-- Row level security, as for sessions and events (20261127120000_row_level_security.sql): the
-- server's service_role bypasses it; `anon` gets nothing; `authenticated` users may read, and only
-- read, the files of their own sessions.
alter table public.attachments enable row level security;

do $$
begin
    if to_regrole('anon') is not null then
        revoke all on table public.attachments from anon;
    end if;
    if to_regrole('service_role') is not null then
        grant select, insert, update, delete on table public.attachments to service_role;
    end if;

    -- A plain PostgreSQL has no Supabase roles and no auth.uid(): nobody to grant to.
    if to_regrole('authenticated') is null or to_regprocedure('auth.uid()') is null then
        raise notice 'no Supabase roles in this database: no policies for authenticated users';
        return;
    end if;

    revoke all on table public.attachments from authenticated;
    grant select on table public.attachments to authenticated;

    drop policy if exists "owners read their sessions' attachments" on public.attachments;
    create policy "owners read their sessions' attachments" on public.attachments
        for select to authenticated
        using (exists (
            select 1 from public.sessions s
            where s.session_id = attachments.session_id and s.user_id = (select auth.uid())::text
        ));
end
$$;

-- Supabase Storage: the private bucket that holds the bytes (a plain PostgreSQL has no `storage`
-- schema: nothing to create).
do $$
begin
    if to_regclass('storage.buckets') is not null then
        insert into storage.buckets (id, name, public) values ('attachments', 'attachments', false)
        on conflict (id) do nothing;
    end if;
end
$$;
