-- Rows written with plain SQL on the base columns stay valid, and an answer keeps how its turn ended.
-- Safe to apply more than once.
--
-- * `insert into events (session_id, event_type, content)` needs every added column to have a
--   default: such an event gets a key of its own ('external:<uuid>'), which the service's keys
--   ('user:...', 'ai:...', 'tool_call:...') never collide with, so its idempotent writes stay unique.
-- * An `ai_message` carries its turn's `finish_reason` and `error` ({code, message}), as the
--   turn's `done` had them, so a reloaded history tells a failed or cancelled answer from an empty
--   one. Null on other events and on rows that predate these columns.
alter table public.events alter column event_key set default ('external:' || gen_random_uuid()::text);
alter table public.events add column if not exists finish_reason text;
alter table public.events add column if not exists error jsonb;
