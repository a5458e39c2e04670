-- Rooms waiting for a retry are found through this index instead of a scan of every
-- pending event (the backlog after downtime would otherwise slow every dispatch pass).
-- SQLite keeps the transaction journal in its own file (see store/journal.py).
CREATE INDEX inbox_retrying ON inbox (next_attempt_at, room_id)
    WHERE status = 'pending' AND next_attempt_at > 0;
