-- The embedded default's schema, as of SCHEMA_VERSION in server/storage/sqlite.py (PRAGMA user_version).
-- Every added column has a default, so plain SQL's `insert into sessions (session_id, user_id)`
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
    open_turn_id     TEXT,
    title            TEXT,
    -- When the session last changed (creation, a stored event, a rename), always in this one format
    -- (UTC, milliseconds), so that comparing the text orders the moments: the listing's keyset.
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    -- Set once the session is deleted: the row stays, so that its id is never used again.
    deleted_at       TEXT,
    -- The compaction summary of the oldest events, and the last event_id it covers (internal).
    context_summary  TEXT,
    context_upto     INTEGER
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
    attachments   TEXT,
    UNIQUE (session_id, event_key)
);
CREATE INDEX IF NOT EXISTS events_session_order ON events (session_id, event_id);
CREATE INDEX IF NOT EXISTS sessions_open_turn ON sessions (session_id) WHERE open_turn_id IS NOT NULL;
-- A user's sessions, most recently updated first: the listing reads this index in order.
CREATE INDEX IF NOT EXISTS sessions_by_user_updated
    ON sessions (user_id, updated_at DESC, session_id DESC) WHERE deleted_at IS NULL;
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
-- A deleted session takes no more events, whoever writes them (another process's late write, the
-- plain SQL): the row is skipped, the statement succeeds having stored nothing.
CREATE TRIGGER IF NOT EXISTS events_of_deleted_session_refused BEFORE INSERT ON events
    WHEN (SELECT deleted_at FROM sessions WHERE session_id = NEW.session_id) IS NOT NULL
BEGIN
    SELECT RAISE(IGNORE);
END;
-- Every stored event updates its session, in the statement that stores it.
CREATE TRIGGER IF NOT EXISTS events_session_updated AFTER INSERT ON events
BEGIN
    UPDATE sessions SET updated_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE session_id = NEW.session_id;
END;
-- Deleting a session is one UPDATE setting deleted_at (the shared connection runs no multi-statement
-- transaction): its events go in that same statement.
CREATE TRIGGER IF NOT EXISTS sessions_deleted_events_removed AFTER UPDATE OF deleted_at ON sessions
    WHEN OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL
BEGIN
    DELETE FROM events WHERE session_id = NEW.session_id;
END;
-- Files uploaded to a session, bytes included. `created_at` in one fixed format (UTC,
-- microseconds), so that comparing the text orders the moments. `used`: a stored message names it.
CREATE TABLE IF NOT EXISTS attachments (
    attachment_id TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    mime_type     TEXT NOT NULL,
    size          INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    used          INTEGER NOT NULL DEFAULT 0,
    data          BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS attachments_by_session ON attachments (session_id);
-- The expiry scan: uploads no message names, oldest first.
CREATE INDEX IF NOT EXISTS attachments_unused_by_age ON attachments (used, created_at);
-- Only a live session takes files: for a deleted (or unknown) one the row is skipped, the
-- statement succeeds having stored nothing.
CREATE TRIGGER IF NOT EXISTS attachments_of_deleted_session_refused BEFORE INSERT ON attachments
    WHEN NOT EXISTS (SELECT 1 FROM sessions WHERE session_id = NEW.session_id AND deleted_at IS NULL)
BEGIN
    SELECT RAISE(IGNORE);
END;
-- A session's files go in the statement that deletes it, with its events.
CREATE TRIGGER IF NOT EXISTS sessions_deleted_attachments_removed AFTER UPDATE OF deleted_at ON sessions
    WHEN OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL
BEGIN
    DELETE FROM attachments WHERE session_id = NEW.session_id;
END;
