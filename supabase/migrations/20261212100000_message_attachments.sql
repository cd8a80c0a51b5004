-- A user message's files: [{attachment_id, name, mime_type, size}] as the message named them
-- (the files themselves are in `attachments`). Null for every other event, and for rows written
-- with plain SQL.
alter table public.events add column if not exists attachments jsonb;
