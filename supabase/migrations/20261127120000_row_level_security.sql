-- Who may read the conversations. Safe to apply more than once.
--
-- * The server writes with the service-role key: PostgREST then runs as `service_role`, which
--   bypasses row level security. (STORAGE_BACKEND=postgres connects as the tables' owner.)
-- * `anon` (the key that ships in every browser bundle) gets no access at all. "Allow public"
--   policies are deliberately absent: with them anyone holding the anon key could read every
--   conversation.
-- * `authenticated` users may read, and only read, their own sessions and those sessions' events:
--   the rows whose `sessions.user_id` is their `auth.uid()`.

alter table public.sessions enable row level security;
alter table public.events enable row level security;

do $$
begin
    if to_regrole('anon') is not null then
        revoke all on table public.sessions, public.events from anon;
    end if;

    -- A plain PostgreSQL has no Supabase roles and no auth.uid(): nobody to grant to.
    if to_regrole('authenticated') is null or to_regprocedure('auth.uid()') is null then
        raise notice 'no Supabase roles in this database: no policies for authenticated users';
        return;
    end if;

    revoke all on table public.sessions, public.events from authenticated;
    grant select on table public.sessions, public.events to authenticated;

    drop policy if exists "owners read their sessions" on public.sessions;
    create policy "owners read their sessions" on public.sessions
        for select to authenticated
        using (user_id = (select auth.uid())::text);

    drop policy if exists "owners read their sessions' events" on public.events;
    create policy "owners read their sessions' events" on public.events
        for select to authenticated
        using (exists (
            select 1 from public.sessions s
            where s.session_id = events.session_id and s.user_id = (select auth.uid())::text
        ));
end
$$;
