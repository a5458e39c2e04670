-- Directory view (v4). One file for both engines.
-- What the last directory sync knew about each provisioned person, keyed by Matrix user id:
-- separation policy (staff, groups, barriers) and bots (audience targeting, managers) read
-- it, so both work without a directory round trip and agree with the last sync.
CREATE TABLE directory_view (
    user_id TEXT PRIMARY KEY,
    person_id TEXT NOT NULL,
    active INTEGER NOT NULL,
    username TEXT NOT NULL,
    display_name TEXT NOT NULL,
    email TEXT,
    title TEXT,
    department TEXT,
    location TEXT,
    manager_user_id TEXT,
    groups TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- Small durable key/value space per component (bots, separation notices), so each keeps
-- its own state without a migration of its own.
CREATE TABLE component_kv (
    component TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (component, key)
);
