-- Schema version 5: `session.queued` / `queued_bytes` are no longer updated in every commit
-- (a second page written per durable message); the writer keeps them in memory and writes
-- them when it stops cleanly. The `counter` row `session_counts_exact` says whether they
-- match the queue rows (1) or must be counted again at start-up (0, after a crash). A
-- database written by an older Holdfast kept them exact in every commit.
INSERT INTO counter (name, value) VALUES ('session_counts_exact', 1)
    ON CONFLICT(name) DO UPDATE SET value = 1;
