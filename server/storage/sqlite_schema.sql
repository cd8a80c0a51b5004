-- The embedded default's schema, as of SCHEMA_VERSION in server/storage/sqlite.py (PRAGMA user_version).
-- Every added column has a default, so the original design's `insert into sessions (session_id, user_id)`
-- and `insert into events (session_id, event_type, content)` work; such an event gets a key of its own
-- ('external:...'), which the service's keys ('user:...', 'ai:...', 'tool_call:...') never collide with.
-- PostgreSQL's schema (Supabase's too) is supabase/migrations/.
CREATE TABLE IF NOT EXISTS sessions (
    session_id       TEXT PRIMARY KEY,
    user_id          TEXT,
    start_time       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    end_time         TEXT,
    summary          TEXT,
    duration_seconds INTEGER,
    summary_due_at   TEXT
);
CREATE TABLE IF NOT EXISTS events (
    event_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id    TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    timestamp     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    event_type    TEXT NOT NULL
        CHECK (event_type IN ('user_message', 'ai_message', 'tool_call', 'tool_result')),
    content       TEXT NOT NULL,
    turn_id       TEXT,
    event_key     TEXT NOT NULL DEFAULT ('external:' || lower(hex(randomblob(16)))),
    finish_reason TEXT,
    error         TEXT,
    UNIQUE (session_id, event_key)
);
CREATE INDEX IF NOT EXISTS events_session_order ON events (session_id, event_id);
