-- Failed reminders and escalations (bots v2; Enclave's own v7 before). Both engines. ``reminders``
-- counts only the reminders the homeserver accepted; a reminder whose send failed takes its
-- place in the schedule (the next one, or the escalation, follows at its time) and is
-- counted in reminder_failures with the last failure's reason. An escalation whose message
-- failed keeps escalated_at (it is not tried again) with escalation_error saying why, so a
-- report never shows a failed message as sent.
ALTER TABLE announcement_deliveries ADD COLUMN reminder_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE announcement_deliveries ADD COLUMN reminder_error TEXT;
ALTER TABLE announcement_deliveries ADD COLUMN escalation_error TEXT;
