-- v9: the S3 archive's staged entries. An append computes its manifest entries and
-- commits them here with the index rows and the new head, in one transaction (the durable
-- point); a sealer later writes a room's staged entries as one manifest object and one
-- part object per segment (with Object Lock), then deletes the rows. Staged and sealed
-- entries together are the room's chain. ``entry`` is the canonical JSON of the manifest
-- entry, ``data`` the segment bytes of an append entry (UTF-8 JSON lines; '' otherwise).
CREATE TABLE archive_staged (
    room_id TEXT NOT NULL,
    entry_index BIGINT NOT NULL,
    entry TEXT NOT NULL,
    data TEXT NOT NULL,
    staged_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, entry_index)
);
