-- Retention, legal holds and the compliance archive (v6). One file for both engines.
-- The index of the archive: one row per archived event, where its JSON line lives (segment
-- file and 1-based line in it). The event itself is only in the archive files. purged_at is
-- set once the homeserver's copy was purged, so an export still finds it here.
CREATE TABLE archive_events (
    event_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    sender TEXT,
    type TEXT NOT NULL,
    state_key TEXT,
    ts BIGINT NOT NULL,
    segment TEXT NOT NULL,
    line INTEGER NOT NULL,
    archived_at BIGINT NOT NULL,
    purged_at BIGINT
);
CREATE INDEX archive_events_room_ts ON archive_events (room_id, ts, segment, line);
CREATE INDEX archive_events_sender_ts ON archive_events (sender, ts);
CREATE INDEX archive_events_segment ON archive_events (room_id, segment);
-- The last manifest entry of each room's archive (count and chained hash), committed after
-- the files are durable: a manifest truncated or rewritten as a whole no longer matches it.
CREATE TABLE archive_heads (
    room_id TEXT PRIMARY KEY,
    entries INTEGER NOT NULL,
    head TEXT NOT NULL,
    segment TEXT,
    segment_bytes BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- Media copied into the archive, by mxc URI; the file is content-addressed by sha256, so
-- two URIs with the same bytes share one file.
CREATE TABLE archive_media (
    mxc TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    content_type TEXT,
    room_id TEXT NOT NULL,
    event_id TEXT,
    ts BIGINT,
    archived_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX archive_media_room ON archive_media (room_id, ts);
CREATE INDEX archive_media_sha ON archive_media (sha256);
-- Legal holds. users and rooms are JSON arrays (empty: any). A released hold stays, for
-- the record.
CREATE TABLE legal_holds (
    id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    placed_by TEXT NOT NULL,
    users TEXT NOT NULL,
    rooms TEXT NOT NULL,
    since_ms BIGINT,
    until_ms BIGINT,
    created_at BIGINT NOT NULL,
    released_at BIGINT,
    released_by TEXT
);
-- Per room retention state: its class when last seen, a moderator's adjustment, how far
-- history was purged and what Enclave posted to make the period visible.
CREATE TABLE retention_rooms (
    room_id TEXT PRIMARY KEY,
    room_class TEXT,
    override_ms BIGINT,
    override_by TEXT,
    purged_up_to BIGINT,
    last_purge_at BIGINT,
    notice_event_id TEXT,
    state_set_at BIGINT,
    updated_at BIGINT NOT NULL
);
