-- The turn each session has open: from its user message being stored to its answer (`ai_message`)
-- being stored. A turn still open when no process runs it was cut off by a crash: the service
-- ends it (an `interrupted` answer) at its next start. Kept by a trigger, so the marker and the
-- event it stands for are written in one statement. Safe to apply more than once.
do $$
begin
    if not exists (
        select 1 from information_schema.columns
        where table_schema = 'public' and table_name = 'sessions' and column_name = 'open_turn_id'
    ) then
        alter table public.sessions add column open_turn_id text;
        -- Turns left open before this migration: each session's last unanswered user message.
        update public.sessions s set open_turn_id = (
            select u.turn_id from public.events u
            where u.session_id = s.session_id and u.event_type = 'user_message' and u.turn_id is not null
              and not exists (
                  select 1 from public.events a
                  where a.session_id = u.session_id and a.event_key = 'ai:' || u.turn_id
              )
            order by u.event_id desc limit 1
        );
    end if;
end
$$;

create index if not exists sessions_open_turn on public.sessions (session_id) where open_turn_id is not null;

create or replace function public.track_open_turn() returns trigger language plpgsql as $$
begin
    if new.event_type = 'user_message' then
        update public.sessions set open_turn_id = new.turn_id where session_id = new.session_id;
    else
        update public.sessions set open_turn_id = null
        where session_id = new.session_id and open_turn_id = new.turn_id;
    end if;
    return new;
end
$$;

drop trigger if exists events_track_open_turn on public.events;
create trigger events_track_open_turn after insert on public.events
    for each row when (new.turn_id is not null and new.event_type in ('user_message', 'ai_message'))
    execute function public.track_open_turn();
