-- The announcement bot's tables (bots v1; Enclave's own v5 before). Both engines.
-- One row per occurrence of an announcement: a scheduled time, a manual or ad-hoc send or
-- a webhook call. `spec` is the announcement as it was when the occurrence was made (JSON:
-- title, body, audience, delivery, acks, reminders, expiry), so a config edit does not
-- change what a fan-out in progress sends. The primary key is the once-only guard that
-- makes a scheduled time fire once across restarts and processes.
CREATE TABLE announcement_occurrences (
    announcement_id TEXT NOT NULL,
    occurrence_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    scheduled_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    delivered_at BIGINT,
    closed_at BIGINT,
    PRIMARY KEY (announcement_id, occurrence_id)
);
CREATE INDEX announcement_occurrences_status ON announcement_occurrences (status);
-- One row per target of an occurrence: a person (@…) or an explicit room (!…). Delivery,
-- acknowledgement, reminders and escalation of that person; the report reads it.
CREATE TABLE announcement_deliveries (
    announcement_id TEXT NOT NULL,
    occurrence_id TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    room_id TEXT,
    event_id TEXT,
    detail TEXT,
    attempts INTEGER NOT NULL,
    sent_at BIGINT,
    acked_at BIGINT,
    ack_method TEXT,
    ack_event_id TEXT,
    reminders INTEGER NOT NULL,
    last_reminder_at BIGINT,
    escalated_at BIGINT,
    escalated_to TEXT,
    PRIMARY KEY (announcement_id, occurrence_id, target)
);
-- Every message the announcement bot sent (announcement, reminder, escalation, summary),
-- by event id: a reaction or a reply to one of them finds its announcement here.
CREATE TABLE announcement_messages (
    event_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    announcement_id TEXT NOT NULL,
    occurrence_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT,
    sent_at BIGINT NOT NULL
);
CREATE INDEX announcement_messages_room ON announcement_messages (room_id, sent_at);
