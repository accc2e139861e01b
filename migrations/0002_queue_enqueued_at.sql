-- Schema version 2: when each queued message was enqueued (unix ms), so operators can see
-- the age of the oldest message in a queue (bridge backlogs in particular).
ALTER TABLE queue ADD COLUMN enqueued_at INTEGER;
