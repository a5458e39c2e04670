-- v8: the operators' console (issue 19): server-side sign-in sessions, and the audit
-- indexes its search pages with (newest first: ORDER BY ts DESC, id DESC, keyset on
-- (ts, id)); each filter column leads one index, so a filtered page reads only its rows.
CREATE TABLE console_sessions (
    -- sha256 of the random id in the browser's cookie: a reader of the database cannot
    -- use a row to act as its owner
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    roles TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX console_sessions_user ON console_sessions (user_id);
CREATE INDEX console_sessions_seen ON console_sessions (last_seen);
DROP INDEX IF EXISTS audit_ts;
DROP INDEX IF EXISTS audit_user;
DROP INDEX IF EXISTS audit_room;
DROP INDEX IF EXISTS audit_rule;
CREATE INDEX audit_ts_id ON audit (ts, id);
CREATE INDEX audit_user_ts ON audit (user_id, ts, id);
CREATE INDEX audit_room_ts ON audit (room_id, ts, id);
CREATE INDEX audit_rule_ts ON audit (rule_id, ts, id);
CREATE INDEX audit_actor_ts ON audit (actor, ts, id);
CREATE INDEX audit_outcome_ts ON audit (outcome, ts, id);
