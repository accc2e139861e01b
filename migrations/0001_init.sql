-- Holdfast durable store, schema version 1.
-- Applied inside one transaction together with `PRAGMA user_version = 1`, so a crash
-- half-way leaves version 0 and the next start applies it again.

-- One row per durable session (Session Expiry Interval > 0, or 3.1.1 clean session = 0).
CREATE TABLE session (
    sid             INTEGER PRIMARY KEY,          -- router's session id; also the high bits of queue.id
    client_id       TEXT    NOT NULL UNIQUE,
    protocol        INTEGER NOT NULL,             -- 3, 4 or 5
    expiry_interval INTEGER NOT NULL,             -- seconds; 4294967295 = never
    disconnected_at INTEGER,                      -- unix ms when it went offline; NULL while connected
    will            BLOB,                         -- the will as an encoded v5 PUBLISH, if any
    will_delay      INTEGER NOT NULL DEFAULT 0,   -- seconds
    queued          INTEGER NOT NULL DEFAULT 0,   -- rows in `queue` for this session
    queued_bytes    INTEGER NOT NULL DEFAULT 0,   -- sum of their payload sizes
    dropped         INTEGER NOT NULL DEFAULT 0,   -- messages dropped by a policy (counted, never silent)
    created_at      INTEGER NOT NULL              -- unix ms
);

CREATE TABLE subscription (
    sid        INTEGER NOT NULL,
    filter     TEXT    NOT NULL,                  -- as subscribed, including any $share/{group}/
    options    INTEGER NOT NULL,                  -- the SUBSCRIBE options byte (QoS already capped)
    identifier INTEGER,                           -- v5 Subscription Identifier
    PRIMARY KEY (sid, filter)
) WITHOUT ROWID;

-- Messages waiting for (or in flight to) a session. id = (sid << 40) | seq, so one B-tree
-- holds every queue, each session's rows are contiguous and in delivery order, and an
-- append is a right-edge insert within the session's range.
CREATE TABLE queue (
    id         INTEGER PRIMARY KEY,
    state      INTEGER NOT NULL,                  -- 0 queued, 1 PUBLISH sent, 2 PUBREL sent
    packet_id  INTEGER,                           -- set once state >= 1
    expires_at INTEGER,                           -- unix ms (v5 Message Expiry), NULL = never
    size       INTEGER NOT NULL,                  -- payload bytes (for limits)
    packet     BLOB    NOT NULL                   -- the PUBLISH as delivered, encoded as v5
);
CREATE INDEX queue_expiry ON queue (expires_at) WHERE expires_at IS NOT NULL;

-- Incoming QoS 2 packet ids received from a durable session and not yet released.
CREATE TABLE incoming_qos2 (
    sid       INTEGER NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (sid, packet_id)
) WITHOUT ROWID;

CREATE TABLE retained (
    topic      TEXT PRIMARY KEY,
    expires_at INTEGER,
    packet     BLOB NOT NULL
);

-- Totals that outlive sessions (messages dropped by the disk budget, sessions expired, ...).
CREATE TABLE counter (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
