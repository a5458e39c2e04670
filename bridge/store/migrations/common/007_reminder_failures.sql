-- v7 added the announcement bot's reminder failure columns here; they moved with the bots'
-- tables to bots/migrations (002_reminder_failures.sql). Kept so the numbering holds.
SELECT 1;
