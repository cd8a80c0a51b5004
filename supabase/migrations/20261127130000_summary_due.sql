-- When a session emptied and still waits for its summary: set when the last client leaves,
-- cleared when the summary for that emptying (or a later one) is written. A summary that failed,
-- or whose process stopped, is found here and made later. Safe to apply more than once.
alter table public.sessions add column if not exists summary_due_at timestamptz;
create index if not exists sessions_summary_due on public.sessions (summary_due_at)
    where summary_due_at is not null;
