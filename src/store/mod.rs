//! The durable store: the only code that speaks SQL.
//!
//! # Durability contract
//! - One SQLite file (`<data_dir>/holdfast.db`) in WAL mode. With `synchronous = FULL`
//!   (default) a commit survives power loss; with `NORMAL` it survives a process crash, but
//!   a power cut loses everything committed since the last WAL checkpoint (the WAL is
//!   synced only then). Both are tested with simulated power cuts (`powercut`,
//!   `tests/durable/power_cut.rs`).
//! - One writer thread owns the only write connection. The router submits `Batch`es of
//!   `Op`s, each with a token; the writer takes whatever batches have arrived, applies them
//!   in one transaction, commits, and only then reports every token as `Committed`
//!   (group commit). Tokens complete in submission order.
//! - The router sends a QoS 1 PUBACK / QoS 2 PUBREC, a SUBACK, a PUBREL or a PUBLISH to a
//!   durable session only after the batch carrying the matching rows is committed
//!   (`router` module, "held" output). So an acknowledged message is on disk, and a message
//!   a client may have seen is marked as sent (state >= 1) on disk, which is what makes a
//!   redelivery after a restart carry DUP = 1 and the same packet id.
//! - A queue row is deleted only by `Op::Delete` (the subscriber's PUBACK / PUBCOMP), or by
//!   a counted policy: `DeleteOldest` (queue limit), `DeleteSession` (session expiry or
//!   clean start), the expiry sweep, or the disk budget's drop-oldest.
//! - If a commit fails (disk full, disk budget reached, I/O error), the batch is rolled
//!   back and retried without the ops that accept new data; tokens that carried such ops are
//!   reported as failed, so their publishers get 0x97 instead of an acknowledgement. Ops
//!   that release data (deletes, state changes) are retried until they succeed.
//! - Per-session queue counters (`session.queued` / `queued_bytes`) are not written per
//!   commit: the writer keeps them exact in memory and writes them at a clean stop; after a
//!   crash they are counted again from the queue rows at start-up (`counts`). A durable
//!   message thus changes one page, the queue's (flash wear, commit cost).
//! - Queued messages stay on disk; the router keeps at most a bounded window of each
//!   session's queue in memory and reads the rest back with `Command::ReadQueue`, which the
//!   writer answers after committing everything submitted before it.
//! - Stored deadlines (`session.disconnected_at`, `queue.expires_at`, `retained.expires_at`)
//!   and stamps (`created_at`, `enqueued_at`) are milliseconds on the store's time line
//!   ([`crate::clock`]), never compared with the wall clock; the clock anchor that continues
//!   the line across restarts is kept in `counter` (`anchor`).

mod anchor;
mod apply;
pub mod budget;
mod counts;
pub mod inspect;
mod load;
pub mod metrics;
pub mod powercut;
pub mod schema;
mod staging;
mod writer;

#[cfg(test)]
mod merge_tests;
#[cfg(test)]
mod staging_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wear_tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use anchor::wall_offset_ms;
pub use load::{Recovered, RecoveredSession, RecoveredSubscription};

/// Session id, as used by the router and the store; stored in the high bits of `queue.id`.
///
/// # Ids that never wrap
/// `queue.id = (sid << SEQ_BITS) | seq` keeps every queue in one B-tree, each session's rows
/// contiguous and in delivery order. It is only sound while `sid <= MAX_SID` and
/// `seq <= MAX_SEQ`, so:
/// - session ids are slots, not counters: the router hands out the smallest free id and
///   takes it back when the session ends (`router::ids`), so ids stay below the number of
///   sessions that exist at once, however many connections a gateway sees in its life;
/// - a database written by an older Holdfast with larger ids is renumbered at start-up
///   (`load`);
/// - a session whose sequence numbers would pass `MAX_SEQ` (2^40 messages without its
///   queue ever being empty at a start-up) refuses new messages, counted, rather than wrap.
pub type Sid = u64;

/// Bits of `queue.id` that hold the per-session sequence number.
pub const SEQ_BITS: u32 = 40;
/// Largest per-session sequence number.
pub const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
/// Largest session id: `(MAX_SID << SEQ_BITS) | MAX_SEQ` is `i64::MAX`.
pub const MAX_SID: Sid = (1 << (63 - SEQ_BITS)) - 1;

/// The row id of message `seq` of session `sid` (both within their limits).
pub fn queue_id(sid: Sid, seq: u64) -> i64 {
    debug_assert!(sid <= MAX_SID && seq <= MAX_SEQ, "queue id out of range");
    ((sid << SEQ_BITS) | (seq & MAX_SEQ)) as i64
}

/// The first and last row id of session `sid` (inclusive bounds: the range of `MAX_SID`
/// ends at `i64::MAX`, so an exclusive bound would overflow).
pub fn queue_range(sid: Sid) -> (i64, i64) {
    (queue_id(sid, 0), queue_id(sid, MAX_SEQ))
}

pub fn split_queue_id(id: i64) -> (Sid, u64) {
    let id = id as u64;
    (id >> SEQ_BITS, id & MAX_SEQ)
}

/// Milliseconds since the Unix epoch (wall clock: for people, never for deadlines that
/// outlive a run, which use the store's time line, [`crate::clock`]).
pub fn unix_ms() -> i64 {
    crate::clock::wall_ms()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database schema version {found} is newer than this binary supports ({latest}); \
         run a newer holdfast or restore a backup"
    )]
    TooNew { found: u32, latest: u32 },
    #[error("schema migration {name} failed: {source}")]
    Migration {
        name: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} is corrupt ({cause}) and store.on_corrupt = \"refuse\"; \
         move it aside or restore a backup"
    )]
    Corrupt { path: PathBuf, cause: String },
    #[error("integrity check of {path} failed: {detail}")]
    Integrity { path: PathBuf, detail: String },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store writer thread is gone")]
    WriterGone,
    #[error(transparent)]
    Powercut(#[from] powercut::PowercutError),
}

/// A will kept with its session (for Will Delay across restarts).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWill {
    /// The will as a v5 PUBLISH packet.
    pub packet: Bytes,
    pub delay: u32,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum Op {
    /// Creates or updates a session row; marks it connected.
    UpsertSession {
        sid: Sid,
        client_id: Arc<str>,
        protocol: u8,
        expiry: u32,
        will: Option<StoredWill>,
    },
    /// Records who owns a session (`user:<name>` or `anonymous`, see
    /// `broker::router::security`). Follows the session's `UpsertSession`.
    SetOwner {
        sid: Sid,
        owner: Arc<str>,
    },
    /// The session is connected again (clears `disconnected_at`). A release op, unlike
    /// `UpsertSession`: a resumed session whose update the store refuses must not keep the
    /// old disconnect time, which would expire it at the next start.
    MarkOnline {
        sid: Sid,
    },
    /// The session went offline at `at_ms`; its expiry (maybe changed on DISCONNECT) and
    /// its pending delayed will.
    SessionOffline {
        sid: Sid,
        at_ms: i64,
        expiry: u32,
        will: Option<StoredWill>,
    },
    /// Removes the session with its subscriptions, queue and QoS 2 state.
    DeleteSession {
        sid: Sid,
    },
    Subscribe {
        sid: Sid,
        filter: String,
        options: u8,
        identifier: Option<u32>,
    },
    Unsubscribe {
        sid: Sid,
        filter: String,
    },
    /// Appends a message to a session's queue; `packet_id` set means it is sent at once
    /// (state 1).
    Enqueue {
        sid: Sid,
        seq: u64,
        packet_id: Option<u16>,
        expires_at: Option<i64>,
        size: u32,
        packet: Bytes,
    },
    /// The queued message is about to be sent with this packet id (state 1).
    MarkSent {
        sid: Sid,
        seq: u64,
        packet_id: u16,
    },
    /// PUBREC received, PUBREL about to be sent (state 2).
    MarkReleased {
        sid: Sid,
        seq: u64,
    },
    /// Acknowledged (or otherwise done): remove.
    Delete {
        sid: Sid,
        seq: u64,
    },
    /// Queue limit policy: drops one queued (not yet sent) message, counted. Refused with
    /// its token, like the `Enqueue` it makes room for: a refused message deletes nothing.
    Drop {
        sid: Sid,
        seq: u64,
    },
    /// Queue limit policy: remove the `count` oldest not-yet-sent messages of a session
    /// from `from_seq` on (the router has the ones before in memory, or had them).
    /// Refused with its token, like `Drop`, when it makes room for a message of the same
    /// token (`refusable`); otherwise a release op like any delete.
    DeleteOldest {
        sid: Sid,
        from_seq: u64,
        count: u32,
        refusable: bool,
    },
    /// Sets (Some) or deletes (None) the retained message of a topic.
    Retain {
        topic: Arc<str>,
        message: Option<(Option<i64>, Bytes)>,
    },
    /// An incoming QoS 2 packet id was received (true) or released (false).
    IncomingQos2 {
        sid: Sid,
        packet_id: u16,
        present: bool,
    },
    /// Adds to a named counter.
    Count {
        name: &'static str,
        add: i64,
    },
}

impl Op {
    /// Ops that accept new data. When a commit fails these are refused (their tokens
    /// report failure); every other op is retried until it succeeds.
    pub fn accepts_data(&self) -> bool {
        matches!(
            self,
            Op::Enqueue { .. }
                | Op::Retain {
                    message: Some(_),
                    ..
                }
                | Op::IncomingQos2 { present: true, .. }
                | Op::Subscribe { .. }
                | Op::UpsertSession { .. }
                // Queue-limit drops make room for an `Enqueue` of the same token: when it
                // is refused they must not delete what is stored.
                | Op::Drop { .. }
                | Op::DeleteOldest {
                    refusable: true,
                    ..
                }
        )
    }
}

/// A queued message read back from disk.
#[derive(Debug, Clone)]
pub struct QueueRow {
    pub seq: u64,
    pub state: u8,
    pub packet_id: Option<u16>,
    pub expires_at: Option<i64>,
    pub packet: Bytes,
}

pub enum Command {
    Batch {
        token: u64,
        ops: Vec<Op>,
    },
    /// Reads up to `limit` not-yet-sent rows of a session with seq >= `from_seq`.
    ReadQueue {
        sid: Sid,
        from_seq: u64,
        limit: u32,
        /// Echoed back so the router can tell whether new rows arrived meanwhile.
        next_seq_at_request: u64,
        /// Read the rows sent and awaiting their PUBACK / PUBREC (state 1) instead: the
        /// in-flight window of a session, whose bodies are not kept in memory while it is
        /// offline (`broker::readback`).
        sent: bool,
    },
    /// Deletes not-yet-sent messages whose expiry has passed (`now_ms` on the store's time
    /// line, [`Recovered::clock`]) and records the clock anchor.
    SweepExpired {
        now_ms: i64,
    },
    /// Merges the staging log and checkpoints the WAL (what the writer does when idle).
    Checkpoint,
    /// Commits what is pending and stops.
    Shutdown(oneshot::Sender<()>),
    /// Answered once everything submitted before it is committed (health checks).
    Ping(oneshot::Sender<()>),
}

/// What the writer reports back to the router, in order.
#[derive(Debug)]
pub enum StoreEvent {
    Committed {
        token: u64,
        ok: bool,
    },
    QueueRows {
        sid: Sid,
        rows: Vec<QueueRow>,
        from_seq: u64,
        limit: u32,
        next_seq_at_request: u64,
        /// The read failed (I/O error, corruption): `rows` is empty and says nothing about
        /// the queue; read again later.
        failed: bool,
        /// Echoed from the request: these are in-flight rows.
        sent: bool,
    },
    /// Rows removed by the store itself (expiry sweep, disk budget); the router forgets
    /// them and adjusts its counts.
    Removed {
        rows: Vec<(Sid, u64, u32)>,
        why: &'static str,
    },
}

/// How commits are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

/// What to do when the disk budget is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetPolicy {
    DropOldest,
    RejectNew,
}

/// What to do with a database file that turns out to be corrupt at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorrupt {
    Quarantine,
    Refuse,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// Largest database size in bytes (0 = no fixed limit).
    pub max_bytes: u64,
    /// Share of the filesystem (percent) the database never eats into (0 = off).
    pub min_free_percent: u8,
    pub budget_policy: BudgetPolicy,
    pub on_corrupt: OnCorrupt,
    /// `PRAGMA quick_check` at start-up: a corrupt file is handled by `on_corrupt` before
    /// anything is served from it.
    pub integrity_check: bool,
    /// Opt-in: how long the writer may wait, after the first batch of a group arrives, for
    /// more batches to commit with it (zero = commit at once). Fewer, larger commits write
    /// fewer bytes per message (flash wear); every acknowledgement still waits for the
    /// fsync of its own commit, so it is delayed by up to this much.
    pub commit_delay: std::time::Duration,
    /// SQLite page size of a database this store creates (`DEFAULT_PAGE_SIZE`).
    pub page_size: u32,
    /// SQLite's page cache, KiB (`DEFAULT_CACHE_KIB`).
    pub cache_kib: u32,
}

#[cfg(test)]
impl StoreOptions {
    /// Test defaults for a database in `dir`: `synchronous = normal`, no disk budget,
    /// `reject-new`, `refuse` a corrupt file, integrity check on, no commit delay.
    pub fn for_test(dir: &Path) -> StoreOptions {
        StoreOptions {
            path: db_path(dir),
            synchronous: Synchronous::Normal,
            max_bytes: 0,
            min_free_percent: 0,
            budget_policy: BudgetPolicy::RejectNew,
            on_corrupt: OnCorrupt::Refuse,
            integrity_check: true,
            commit_delay: std::time::Duration::ZERO,
            page_size: DEFAULT_PAGE_SIZE,
            cache_kib: DEFAULT_CACHE_KIB,
        }
    }
}

/// Handle to the writer thread.
pub struct Store {
    tx: std::sync::mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<metrics::StoreMetrics>,
}

/// Asks the writer thread whether it is making progress (see [`Store::probe`]).
#[derive(Clone)]
pub struct StoreProbe {
    tx: std::sync::mpsc::Sender<Command>,
    metrics: Arc<metrics::StoreMetrics>,
}

impl StoreProbe {
    /// Resolves once the writer has committed everything submitted before this call;
    /// false if the writer is gone. Callers put a deadline on it.
    pub async fn ping(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Ping(reply)).is_err() {
            return false;
        }
        rx.await.is_ok()
    }

    /// The writer's commit statistics.
    pub fn metrics(&self) -> &Arc<metrics::StoreMetrics> {
        &self.metrics
    }
}

impl Store {
    /// Opens (creating, migrating, or quarantining a corrupt file as configured) the
    /// database, loads what the router needs, and starts the writer thread.
    pub fn open(
        opts: &StoreOptions,
    ) -> Result<(Store, Recovered, mpsc::UnboundedReceiver<StoreEvent>), StoreError> {
        let (conn, recovered) = load::open_and_load(opts)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let counts = counts::Counts::of(&recovered);
        let w = writer::Writer::new(conn, opts.clone(), ev_tx, recovered.clock, counts);
        let metrics = w.metrics();
        let thread = std::thread::Builder::new()
            .name("holdfast-store".into())
            .spawn(move || w.run(rx))
            .map_err(|e| StoreError::DataDir {
                path: opts.path.clone(),
                source: e,
            })?;
        Ok((
            Store {
                tx,
                thread: Some(thread),
                metrics,
            },
            recovered,
            ev_rx,
        ))
    }

    /// A handle for health checks and statistics that outlives no one: once the store is
    /// closed its pings fail.
    pub fn probe(&self) -> StoreProbe {
        StoreProbe {
            tx: self.tx.clone(),
            metrics: self.metrics.clone(),
        }
    }

    pub fn send(&self, cmd: Command) -> Result<(), StoreError> {
        self.tx.send(cmd).map_err(|_| StoreError::WriterGone)
    }

    /// Commits everything pending and stops the writer.
    pub async fn close(mut self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(done_tx)).is_ok() {
            let _ = done_rx.await;
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// The database file inside a data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("holdfast.db")
}

/// Holdfast's default page size (`store.page_size`): 1 KiB, a quarter of SQLite's.
///
/// # Flash wear and commit cost
/// Every commit appends each page it changed to the WAL as a frame of page size + 24
/// bytes, and is fsync'd (`synchronous = full`). A durable message at a low rate is one
/// commit that changes one page, the queue's leaf where the session's rows end (the
/// session counters are not written per commit, see `counts`): 1,048 bytes with 1 KiB
/// pages, which the file system writes as one 4 KiB block or two (4,120 bytes, always two
/// blocks, with 4 KiB pages). At full load with many sessions a commit changes one leaf
/// per session it appends to, each holding only that session's few new rows: smaller
/// pages mean fewer bytes written, checksummed and checkpointed per message, and more of
/// those leaves fit the page cache (`benches/flash_wear.rs`, `durable_compare --fanout`,
/// README "Flash wear" and "Fan-in").
///
/// The cost: a message larger than about 1 KiB is stored with overflow pages, which are
/// rewritten when it is marked sent (more bytes for such messages, and at the disk budget
/// the rewrite needs the writer's release reserve, `writer::RELEASE_RESERVE_BYTES`).
///
/// The page size only applies when the file is created: an existing database keeps its own
/// (`VACUUM` changes it, see docs/operations.md).
pub const DEFAULT_PAGE_SIZE: u32 = 1024;

/// SQLite's page cache of the store's one connection (`store.cache_size_kib`), KiB:
/// 2 MiB. It holds the pages of the queue's B-trees that commits, read-backs and merges
/// touch again, so fewer of them are read back from the file (the kernel's page cache, a
/// few microseconds each). 8 MiB (the default before) kept more of them for no measured
/// gain in drain or fan-in CPU, at 0.6 MiB more at 10,000 sessions × 1 message and 6 MiB
/// more at 10,000 × 100; 1 MiB costs ~20% more CPU per drained message (README, "Memory at
/// 10,000 durable sessions").
pub const DEFAULT_CACHE_KIB: u32 = 2048;

/// Dirty pages a transaction keeps in memory before it writes any of them to the WAL
/// ahead of its commit (`PRAGMA cache_spill`), KiB: 8 MiB (or the page cache, if that is
/// larger). Without it SQLite spills at the page-cache size, so a smaller
/// `store.cache_size_kib` would also make a large transaction (a staging merge chunk, a
/// burst of session rows) write pages to the WAL twice. With it the cache size decides
/// only how many clean pages stay cached: memory and re-reads, never bytes written.
pub const SPILL_KIB: u32 = 8192;

/// WAL bytes after which a commit checkpoints them into the database file: SQLite's
/// default of 1,000 pages at 4 KiB, kept in bytes whatever the page size (a checkpoint
/// writes every page changed since the last one once more, however often it changed, so
/// smaller pages must not mean more frequent checkpoints; and `synchronous = normal` loses
/// up to this much on a power cut).
pub const WAL_AUTOCHECKPOINT_BYTES: u32 = 4000 * 1024;

/// Opens a connection with the pragmas every Holdfast connection uses.
/// `page_size` applies only if this connection creates the file.
pub fn configure(
    conn: &Connection,
    synchronous: Synchronous,
    page_size: u32,
    cache_kib: u32,
) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Query-planner stability: plans never depend on the values bound. Without it SQLite
    // plans a bound `LIMIT ?` as a constant and re-prepares the statement whenever the
    // value changes (every read-back asks for a different number of rows: 7% of the
    // broker's CPU in a 10,000-session drain went to re-parsing that one SELECT).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Before anything creates the file (setting WAL mode does): a no-op on an existing
    // database.
    conn.pragma_update(None, "page_size", page_size)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    let page: u32 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        WAL_AUTOCHECKPOINT_BYTES / page.max(512),
    )?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    // Negative: KiB rather than pages.
    conn.pragma_update(None, "cache_size", -i64::from(cache_kib))?;
    conn.pragma_update(None, "cache_spill", -i64::from(SPILL_KIB.max(cache_kib)))?;
    Ok(())
}

pub use rusqlite::Connection;
