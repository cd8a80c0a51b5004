-- Long conversations: a session's compaction summary. Safe to apply more than once.
--
-- * `context_summary`: the summary of the session's oldest events, which the model is sent in
--   their place; internal (not the `summary` clients read, never on the wire).
-- * `context_upto`: the last event_id it covers. The service writes both only when the stored
--   `context_upto` is the one it extended (a compare-and-set), so that no process overwrites a
--   newer summary with an older one. Deleting a session clears both.
-- Nullable without a default: existing rows keep everything and simply have none yet.
alter table public.sessions add column if not exists context_summary text;
alter table public.sessions add column if not exists context_upto bigint;
