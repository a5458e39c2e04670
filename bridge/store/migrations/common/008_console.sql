-- v8: the operators' console (issue 19): server-side sign-in sessions, and the audit
-- indexes its search pages with (newest first, keyset on id).
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
CREATE INDEX audit_user_id ON audit (user_id, id);
CREATE INDEX audit_room_id ON audit (room_id, id);
CREATE INDEX audit_rule_id ON audit (rule_id, id);
CREATE INDEX audit_actor_id ON audit (actor, id);
CREATE INDEX audit_outcome_id ON audit (outcome, id);
