-- Schema version 6: the staging log (src/store/staging.rs). A group commit that appends a
-- few messages to each of many sessions appends them here, keyed by a global increasing
-- `lid` (right-edge inserts: a page per ~8 small messages, not a `queue` leaf per
-- session); the writer moves the log into `queue` in `id` order (a merge) when it is long,
-- when idle, at a clean stop and at start-up. A row is in `queue` or here, never both.
CREATE TABLE queue_log (
    lid         INTEGER PRIMARY KEY,              -- append order
    qid         INTEGER NOT NULL,                 -- the row's queue.id, (sid << 40) | seq
    state       INTEGER NOT NULL,                 -- as queue.state
    packet_id   INTEGER,
    expires_at  INTEGER,
    size        INTEGER NOT NULL,
    packet      BLOB    NOT NULL,
    enqueued_at INTEGER
);

-- Every queue row, wherever it is (for readers other than the writer: `holdfast sessions`,
-- backups, tests).
CREATE VIEW queue_all AS
    SELECT id, state, packet_id, expires_at, size, packet, enqueued_at FROM queue
    UNION ALL
    SELECT qid, state, packet_id, expires_at, size, packet, enqueued_at FROM queue_log;
