-- Directory sync (v3). One file for both engines.
-- One row per person Enclave has provisioned: the person's stable directory id keeps its
-- Matrix user id for life (Matrix ids cannot be renamed), and what was last applied, so an
-- unchanged person costs no admin write.
CREATE TABLE directory_people (
    person_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    email TEXT,
    displayname TEXT,
    updated_at BIGINT NOT NULL,
    deactivated_at BIGINT
);
-- Spaces and rooms the bot created for managed_rooms entries, by key 'entry/value'.
CREATE TABLE managed_rooms (
    key TEXT PRIMARY KEY,
    room_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
-- What identity providers provisioned through SCIM (the SCIM source reads it).
CREATE TABLE scim_resources (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    external_id TEXT,
    data TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (resource_type, id)
);
-- Named leases: one holder at a time across processes (a directory sync run from the CLI
-- while 'enclave run' syncs too); a holder that died loses it when it expires.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
