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
    summary_due_at   TEXT,
    -- The turn whose user message is stored and whose answer is not (kept by the triggers below).
    open_turn_id     TEXT
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
CREATE INDEX IF NOT EXISTS sessions_open_turn ON sessions (session_id) WHERE open_turn_id IS NOT NULL;
-- A turn is open from its user message being stored to its answer being stored; one still open
-- at start was cut off by a crash. The marker is written in the statement that stores the event.
CREATE TRIGGER IF NOT EXISTS events_turn_opened AFTER INSERT ON events
    WHEN NEW.turn_id IS NOT NULL AND NEW.event_type = 'user_message'
BEGIN
    UPDATE sessions SET open_turn_id = NEW.turn_id WHERE session_id = NEW.session_id;
END;
CREATE TRIGGER IF NOT EXISTS events_turn_answered AFTER INSERT ON events
    WHEN NEW.turn_id IS NOT NULL AND NEW.event_type = 'ai_message'
BEGIN
    UPDATE sessions SET open_turn_id = NULL WHERE session_id = NEW.session_id AND open_turn_id = NEW.turn_id;
END;
