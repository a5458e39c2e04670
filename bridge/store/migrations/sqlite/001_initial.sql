-- Enclave schema v1 (SQLite). Keep in step with postgres/001_initial.sql.
CREATE TABLE transactions (
    txn_id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    event_count INTEGER NOT NULL,
    quarantined INTEGER NOT NULL
);
CREATE TABLE inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id TEXT NOT NULL,
    event_id TEXT,
    room_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    type TEXT NOT NULL,
    sender TEXT,
    origin_server_ts BIGINT,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    received_at BIGINT NOT NULL,
    done_at BIGINT
);
CREATE UNIQUE INDEX inbox_event_id ON inbox (event_id);
CREATE INDEX inbox_pending ON inbox (seq) WHERE status = 'pending';
CREATE INDEX inbox_parked ON inbox (seq) WHERE status = 'parked';
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    section TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq BIGINT NOT NULL,
    position INTEGER NOT NULL,
    lane TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    created_at BIGINT NOT NULL,
    applied_at BIGINT,
    UNIQUE (event_seq, position)
);
CREATE INDEX actions_pending ON actions (lane, id) WHERE status = 'pending';
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts BIGINT NOT NULL,
    source TEXT NOT NULL,
    actor TEXT,
    kind TEXT NOT NULL,
    user_id TEXT,
    room_id TEXT,
    rule_id TEXT,
    reason TEXT,
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX audit_ts ON audit (ts);
CREATE INDEX audit_user ON audit (user_id, ts);
CREATE INDEX audit_room ON audit (room_id, ts);
CREATE INDEX audit_rule ON audit (rule_id, ts);
CREATE TABLE kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
