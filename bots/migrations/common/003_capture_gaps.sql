-- Capture gaps of the archive device (bots v3). Both engines. One row per encrypted event
-- in a `capture: required` room that the archive device could not decrypt: never skipped in
-- silence. `reason` says why (no session key, withheld with a code, sent before the archive
-- joined, ...); `event_json` keeps the ciphertext event so the gap can be retried when its
-- key arrives (a to-device room key, a forwarded key answering the key request, or the
-- periodic sweep). `recovered_at` is set once the plaintext is in the archive.
CREATE TABLE capture_gaps (
    event_id TEXT NOT NULL PRIMARY KEY,
    room_id TEXT NOT NULL,
    sender TEXT,
    session_id TEXT,
    sender_key TEXT,
    reason TEXT NOT NULL,
    event_json TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_attempt BIGINT,
    key_requested_at BIGINT,
    recovered_at BIGINT
);
CREATE INDEX capture_gaps_open ON capture_gaps (recovered_at, session_id);
