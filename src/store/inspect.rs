//! Reading (and, with no broker running, editing) the store from outside the broker:
//! the SQL behind `holdfast sessions list|show|drop`, `bridge status` and `backup`. With
//! `store::writer` and `store::load`, the only code that speaks SQL.
//!
//! # Reading
//! The store runs in WAL mode, so a reader sees the last committed state and never blocks
//! the broker's writer (and vice versa): [`list_sessions`] and [`show_session`] open the
//! database read-only and read one consistent snapshot each; they work the same with the
//! broker running or stopped. Queue rows are read from `queue` and the staging log
//! (`super::staging`; the view `queue_all`), where a running broker may have put them.
//!
//! # Writing
//! [`delete_session`] edits the database directly and may only be used when no broker runs
//! on it (a running broker owns its sessions in memory; `admin` asks it over its socket
//! instead). It deletes in one immediate transaction.
//!
//! # Backups
//! [`backup`] copies the live database with SQLite's online backup API,
//! [`BACKUP_STEP_PAGES`] pages per step with a short pause between steps, from inside one
//! read transaction: the copy is the snapshot of the moment the backup started, the
//! broker keeps committing meanwhile (WAL readers do not block the writer), and the backup
//! never restarts. The copy is written to a temporary file next to the target, switched to
//! rollback-journal mode (a single self-contained file), checked with
//! `PRAGMA integrity_check`, synced and renamed into place.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use super::{db_path, queue_range, schema, split_queue_id};
use crate::protocol::{self, Packet, ProtocolVersion, Publish};

/// Why reading or editing the store from outside the broker failed. Messages name the
/// database file and say what to check.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A missing or foreign database, a bad backup target, a failed integrity check.
    #[error("{0}")]
    Invalid(String),
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Powercut(#[from] super::powercut::PowercutError),
}

pub type InspectResult<T> = Result<T, InspectError>;

macro_rules! bail_invalid {
    ($($arg:tt)*) => {
        return Err(InspectError::Invalid(format!($($arg)*)))
    };
}

/// Adds what was being done (and on which file) to a SQLite or I/O error.
trait Ctx<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> InspectResult<T>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> InspectResult<T> {
        self.map_err(|source| InspectError::Sql {
            context: context(),
            source,
        })
    }
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> InspectResult<T> {
        self.map_err(|source| InspectError::Io {
            context: context(),
            source,
        })
    }
}

/// What [`delete_session`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Queued messages discarded.
    pub queued: u64,
    /// A pending will was discarded.
    pub had_will: bool,
}

pub fn open_ro(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

// ----- the operator side: reading the store ----------------------------------------------

/// Opens the store read-only, with clear errors for a missing or foreign file.
pub fn open_store_read_only(data_dir: &Path) -> InspectResult<Connection> {
    let db = db_path(data_dir);
    if !db.exists() {
        bail_invalid!(
            "database {} does not exist (check data_dir; the broker creates it on its first start)",
            db.display()
        );
    }
    crate::store::powercut::install_from_env(&db)?;
    let conn = open_ro(&db).ctx(|| format!("opening database {}", db.display()))?;
    check_schema(&conn, &db)?;
    Ok(conn)
}

fn check_schema(conn: &Connection, db: &Path) -> InspectResult<()> {
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .ctx(|| format!("reading database {}", db.display()))?;
    if version == 0 {
        bail_invalid!(
            "database {} has no Holdfast schema (never started, or not a Holdfast database)",
            db.display()
        );
    }
    if version > schema::latest_version() {
        bail_invalid!(
            "database {} has schema version {version}, newer than this binary supports ({})",
            db.display(),
            schema::latest_version()
        );
    }
    Ok(())
}

/// One durable session, as `sessions list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    #[serde(skip)]
    pub sid: i64,
    pub client_id: String,
    /// `3.1`, `3.1.1` or `5.0`.
    pub protocol: &'static str,
    /// The store says connected (`disconnected_at` NULL): online, or the broker stopped
    /// abruptly while it was.
    pub online: bool,
    pub disconnected_at_ms: Option<i64>,
    /// Session Expiry Interval; `None` = never expires.
    pub expiry_interval_secs: Option<u32>,
    /// When an offline session expires (Unix ms); `None` while online or if it never does.
    pub expires_at_ms: Option<i64>,
    /// Rows in the queue, in flight included, and their payload bytes.
    pub queued: u64,
    pub queued_bytes: u64,
    /// Rows already sent (PUBLISH or PUBREL out, awaiting the acknowledgement).
    pub inflight: u64,
    /// Messages dropped by a queue or disk policy.
    pub dropped: u64,
    pub subscriptions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInfo {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub identifier: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueuedInfo {
    pub seq: u64,
    /// `queued`, `sent` (PUBLISH out) or `released` (PUBREL out).
    pub state: &'static str,
    pub packet_id: Option<u16>,
    pub qos: Option<u8>,
    pub topic: Option<String>,
    pub size: u64,
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WillInfo {
    pub topic: Option<String>,
    pub qos: Option<u8>,
    pub retain: Option<bool>,
    pub payload_bytes: Option<usize>,
    pub delay_secs: u32,
}

/// Everything about one session, as `sessions show` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionDetail {
    pub session: SessionSummary,
    pub subscriptions: Vec<SubscriptionInfo>,
    /// The first queued messages, in delivery order (at most the requested limit).
    pub queue: Vec<QueuedInfo>,
    pub incoming_qos2: Vec<u16>,
    pub will: Option<WillInfo>,
}

const NEVER: i64 = u32::MAX as i64;

fn protocol_name(level: i64) -> &'static str {
    match level {
        3 => "3.1",
        4 => "3.1.1",
        5 => "5.0",
        _ => "?",
    }
}

/// Whether the database has the staging log (schema 6 on; an older file is read as is).
fn has_staging_log(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'queue_log'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Where queue rows are read from: `queue` and the staging log, or `queue` alone in a
/// database older than the log.
fn queue_rows(conn: &Connection) -> rusqlite::Result<&'static str> {
    Ok(if has_staging_log(conn)? {
        "queue_all"
    } else {
        "queue"
    })
}

/// Per session (sid): rows in the staging log, their bytes and how many are in flight.
/// One pass over the log (which holds at most `staging::CAP_ROWS` rows).
type StagedCounts = std::collections::HashMap<i64, (i64, i64, i64)>;

fn staged_counts(conn: &Connection) -> rusqlite::Result<StagedCounts> {
    if !has_staging_log(conn)? {
        return Ok(StagedCounts::new());
    }
    conn.prepare(
        "SELECT qid >> 40, count(*), coalesce(sum(size), 0), coalesce(sum(state >= 1), 0)
         FROM queue_log GROUP BY 1",
    )?
    .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
    .collect()
}

fn summary_from_row(
    conn: &Connection,
    staged: &StagedCounts,
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<SessionSummary> {
    let sid: i64 = r.get(0)?;
    let expiry: i64 = r.get(3)?;
    let disconnected_at: Option<i64> = r.get(4)?;
    let (lo, hi) = queue_range(sid as u64);
    let (queued, bytes, inflight): (i64, i64, i64) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(state >= 1), 0)
             FROM queue WHERE id BETWEEN ?1 AND ?2",
        )?
        .query_row(params![lo, hi], |q| Ok((q.get(0)?, q.get(1)?, q.get(2)?)))?;
    let (s_queued, s_bytes, s_inflight) = staged.get(&sid).copied().unwrap_or_default();
    let (queued, bytes, inflight) = (queued + s_queued, bytes + s_bytes, inflight + s_inflight);
    let subscriptions: i64 = conn
        .prepare_cached("SELECT count(*) FROM subscription WHERE sid = ?1")?
        .query_row([sid], |q| q.get(0))?;
    // Stored times are on the store's time line (`crate::clock`); shown as wall clock.
    let disconnected_at = disconnected_at.map(|t| t + crate::store::wall_offset_ms(conn));
    Ok(SessionSummary {
        sid,
        client_id: r.get(1)?,
        protocol: protocol_name(r.get(2)?),
        online: disconnected_at.is_none(),
        disconnected_at_ms: disconnected_at,
        expiry_interval_secs: (expiry < NEVER).then_some(expiry.max(0) as u32),
        expires_at_ms: match disconnected_at {
            Some(at) if expiry < NEVER => Some(at + expiry * 1000),
            _ => None,
        },
        queued: queued.max(0) as u64,
        queued_bytes: bytes.max(0) as u64,
        inflight: inflight.max(0) as u64,
        dropped: r.get::<_, i64>(5)?.max(0) as u64,
        subscriptions: subscriptions.max(0) as u64,
    })
}

const SESSION_COLUMNS: &str =
    "SELECT sid, client_id, protocol, expiry_interval, disconnected_at, dropped FROM session";

/// Every durable session, ordered by client id. Reads one consistent snapshot.
pub fn list_sessions(data_dir: &Path) -> InspectResult<Vec<SessionSummary>> {
    let conn = open_store_read_only(data_dir)?;
    let db = db_path(data_dir);
    let read = || -> rusqlite::Result<Vec<SessionSummary>> {
        conn.execute_batch("BEGIN")?;
        let staged = staged_counts(&conn)?;
        let mut st = conn.prepare(&format!("{SESSION_COLUMNS} ORDER BY client_id"))?;
        let rows = st.query_map([], |r| summary_from_row(&conn, &staged, r))?;
        let out = rows.collect::<rusqlite::Result<Vec<_>>>();
        drop(st);
        conn.execute_batch("COMMIT")?;
        out
    };
    read().ctx(|| format!("reading sessions from {}", db.display()))
}

/// One session, with up to `queue_limit` queued messages. `Ok(None)` if there is none.
pub fn show_session(
    data_dir: &Path,
    client_id: &str,
    queue_limit: u32,
) -> InspectResult<Option<SessionDetail>> {
    let conn = open_store_read_only(data_dir)?;
    let db = db_path(data_dir);
    let read = || -> rusqlite::Result<Option<SessionDetail>> {
        conn.execute_batch("BEGIN")?;
        let out = read_detail(&conn, client_id, queue_limit);
        conn.execute_batch("COMMIT")?;
        out
    };
    read().ctx(|| format!("reading session {client_id:?} from {}", db.display()))
}

fn read_detail(
    conn: &Connection,
    client_id: &str,
    queue_limit: u32,
) -> rusqlite::Result<Option<SessionDetail>> {
    let staged = staged_counts(conn)?;
    let Some(session) = conn
        .query_row(
            &format!("{SESSION_COLUMNS} WHERE client_id = ?1"),
            [client_id],
            |r| summary_from_row(conn, &staged, r),
        )
        .optional()?
    else {
        return Ok(None);
    };
    let sid = session.sid;
    let mut st = conn.prepare(
        "SELECT filter, options, identifier FROM subscription WHERE sid = ?1 ORDER BY filter",
    )?;
    let subscriptions = st
        .query_map([sid], |r| {
            let o: i64 = r.get(1)?;
            Ok(SubscriptionInfo {
                filter: r.get(0)?,
                qos: (o & 3) as u8,
                no_local: o & 4 != 0,
                retain_as_published: o & 8 != 0,
                retain_handling: ((o >> 4) & 3) as u8,
                identifier: r.get::<_, Option<i64>>(2)?.map(|v| v as u32),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let (lo, hi) = queue_range(sid as u64);
    let mut st = conn.prepare(&format!(
        "SELECT id, state, packet_id, expires_at, size, packet FROM {}
         WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT ?3",
        queue_rows(conn)?
    ))?;
    let queue = st
        .query_map(params![lo, hi, queue_limit], |r| {
            let publish = decode_publish(r.get::<_, Vec<u8>>(5)?);
            Ok(QueuedInfo {
                seq: split_queue_id(r.get(0)?).1,
                state: match r.get::<_, i64>(1)? {
                    0 => "queued",
                    1 => "sent",
                    2 => "released",
                    _ => "?",
                },
                packet_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u16),
                qos: publish.as_ref().map(|p| p.qos as u8),
                topic: publish.map(|p| p.topic.to_string()),
                size: r.get::<_, i64>(4)?.max(0) as u64,
                expires_at_ms: r
                    .get::<_, Option<i64>>(3)?
                    .map(|t| t + crate::store::wall_offset_ms(conn)),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut st =
        conn.prepare("SELECT packet_id FROM incoming_qos2 WHERE sid = ?1 ORDER BY packet_id")?;
    let incoming_qos2 = st
        .query_map([sid], |r| Ok(r.get::<_, i64>(0)? as u16))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let will = conn.query_row(
        "SELECT will, will_delay FROM session WHERE sid = ?1",
        [sid],
        |r| {
            let blob: Option<Vec<u8>> = r.get(0)?;
            let delay: i64 = r.get(1)?;
            Ok(blob.map(|b| {
                let p = decode_publish(b);
                WillInfo {
                    topic: p.as_ref().map(|p| p.topic.to_string()),
                    qos: p.as_ref().map(|p| p.qos as u8),
                    retain: p.as_ref().map(|p| p.retain),
                    payload_bytes: p.as_ref().map(|p| p.payload.len()),
                    delay_secs: delay.max(0) as u32,
                }
            }))
        },
    )?;
    Ok(Some(SessionDetail {
        session,
        subscriptions,
        queue,
        incoming_qos2,
        will,
    }))
}

/// Decodes a stored message or will (an encoded v5 PUBLISH).
fn decode_publish(blob: Vec<u8>) -> Option<Publish> {
    let mut buf = BytesMut::from(Bytes::from(blob));
    match protocol::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
        Ok(Some(Packet::Publish(p))) => Some(p),
        _ => None,
    }
}

/// Unix ms (wall clock, as of the store's clock anchor) when the oldest message still
/// queued for `client_id` was enqueued.
pub fn oldest_enqueued(db: &Path, client_id: &str) -> Option<i64> {
    let conn = open_ro(db).ok()?;
    let sid: i64 = conn
        .query_row(
            "SELECT sid FROM session WHERE client_id = ?1",
            [client_id],
            |r| r.get(0),
        )
        .ok()?;
    let (lo, hi) = crate::store::queue_range(sid as u64);
    conn.query_row(
        &format!(
            "SELECT enqueued_at FROM {} WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT 1",
            queue_rows(&conn).ok()?
        ),
        [lo, hi],
        |r| r.get::<_, Option<i64>>(0),
    )
    .ok()
    .flatten()
    .map(|t| t + crate::store::wall_offset_ms(&conn))
}

/// The row id of session `client_id` (None if there is none or the file cannot be read).
pub fn session_sid(db: &Path, client_id: &str) -> InspectResult<Option<i64>> {
    let conn = open_ro(db).ctx(|| format!("opening database {}", db.display()))?;
    conn.query_row(
        "SELECT sid FROM session WHERE client_id = ?1",
        [client_id],
        |r| r.get(0),
    )
    .optional()
    .ctx(|| format!("looking up session {client_id:?} in {}", db.display()))
}

/// Polls until the session row `sid` is gone (committed), up to `wait`.
pub fn wait_deleted(db: &Path, sid: i64, wait: Duration) -> bool {
    let Ok(conn) = open_ro(db) else {
        return false;
    };
    let deadline = Instant::now() + wait;
    loop {
        let present = conn
            .query_row("SELECT 1 FROM session WHERE sid = ?1", [sid], |_| Ok(()))
            .optional();
        match present {
            Ok(None) => return true,
            Ok(Some(())) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return false,
        }
    }
}

/// Deletes the session `client_id` and everything it owns (subscriptions, queue, incoming
/// QoS 2 ids, will) in one transaction, directly in the database: only for when no broker
/// runs on it (a running broker owns its sessions in memory). `Ok(None)` if there is none.
pub fn delete_session(data_dir: &Path, client_id: &str) -> Result<Option<Deleted>, InspectError> {
    let db = db_path(data_dir);
    if !db.exists() {
        bail_invalid!(
            "database {} does not exist (check data_dir; the broker creates it on its first start)",
            db.display()
        );
    }
    crate::store::powercut::install_from_env(&db)?;
    let mut conn = Connection::open_with_flags(
        &db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx(|| format!("opening database {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    check_schema(&conn, &db)?;
    let mut delete = || -> rusqlite::Result<Option<Deleted>> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(i64, bool)> = tx
            .query_row(
                "SELECT sid, will IS NOT NULL FROM session WHERE client_id = ?1",
                [client_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((sid, had_will)) = row else {
            return Ok(None);
        };
        let (lo, hi) = queue_range(sid as u64);
        tx.execute("DELETE FROM session WHERE sid = ?1", [sid])?;
        tx.execute("DELETE FROM subscription WHERE sid = ?1", [sid])?;
        tx.execute("DELETE FROM incoming_qos2 WHERE sid = ?1", [sid])?;
        let mut queued = tx.execute("DELETE FROM queue WHERE id BETWEEN ?1 AND ?2", [lo, hi])?;
        if has_staging_log(&tx)? {
            queued += tx.execute(
                "DELETE FROM queue_log WHERE qid BETWEEN ?1 AND ?2",
                [lo, hi],
            )?;
        }
        tx.commit()?;
        Ok(Some(Deleted {
            queued: queued as u64,
            had_will,
        }))
    };
    delete().ctx(|| {
        format!(
            "deleting session {client_id:?} from database {}",
            db.display()
        )
    })
}

/// Pages copied per backup step.
pub const BACKUP_STEP_PAGES: i32 = 256;
/// Pause between backup steps, so the broker's writer gets the disk.
pub const BACKUP_STEP_PAUSE: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages: u64,
    pub steps: u64,
    pub sessions: u64,
    pub queued: u64,
    pub duration: Duration,
}

/// Copies the store of `data_dir` to `dest` (see the module documentation).
pub fn backup(data_dir: &Path, dest: &Path, force: bool) -> InspectResult<BackupReport> {
    let t0 = Instant::now();
    let src = open_store_read_only(data_dir)?;
    let db = db_path(data_dir);
    if dest.exists() && !force {
        bail_invalid!(
            "{} already exists; pass --force to overwrite it",
            dest.display()
        );
    }
    if dest.is_dir() {
        bail_invalid!("{} is a directory; give a file name", dest.display());
    }
    let name = dest
        .file_name()
        .ok_or_else(|| InspectError::Invalid(format!("{} is not a file name", dest.display())))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail_invalid!("directory {} does not exist", dir.display());
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = copy_and_verify(&src, &db, &tmp);
    let (pages, steps, sessions, queued) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dest).ctx(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("moving the backup into place at {}", dest.display())
    })?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    let bytes = std::fs::metadata(dest)
        .ctx(|| format!("reading {}", dest.display()))?
        .len();
    Ok(BackupReport {
        path: dest.to_path_buf(),
        bytes,
        pages,
        steps,
        sessions,
        queued,
        duration: t0.elapsed(),
    })
}

/// Returns (pages, steps, sessions, queued messages) of the verified copy at `tmp`.
fn copy_and_verify(src: &Connection, db: &Path, tmp: &Path) -> InspectResult<(u64, u64, u64, u64)> {
    let _ = std::fs::remove_file(tmp);
    let mut dst = Connection::open(tmp).ctx(|| format!("creating {}", tmp.display()))?;
    // One read transaction over the whole copy: a fixed snapshot, so the writer's commits
    // meanwhile neither block us nor restart the backup.
    src.execute_batch("BEGIN")
        .and_then(|_| src.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())))
        .ctx(|| format!("starting a read transaction on {}", db.display()))?;
    let mut steps = 0u64;
    let copied = (|| -> rusqlite::Result<u64> {
        let b = rusqlite::backup::Backup::new(src, &mut dst)?;
        loop {
            steps += 1;
            match b.step(BACKUP_STEP_PAGES)? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => std::thread::sleep(BACKUP_STEP_PAUSE),
                _ => std::thread::sleep(Duration::from_millis(50)), // busy / locked
            }
        }
        Ok(b.progress().pagecount.max(0) as u64)
    })();
    let _ = src.execute_batch("COMMIT");
    let pages = copied.ctx(|| format!("copying {} to {}", db.display(), tmp.display()))?;
    // A single self-contained file: leave WAL mode in the copy.
    dst.pragma_update(None, "journal_mode", "DELETE")
        .ctx(|| format!("finishing {}", tmp.display()))?;
    drop(dst);
    let check = Connection::open_with_flags(tmp, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ctx(|| format!("reopening {}", tmp.display()))?;
    let mut st = check.prepare("PRAGMA integrity_check")?;
    let problems = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx(|| format!("checking {}", tmp.display()))?;
    drop(st);
    if problems != ["ok"] {
        bail_invalid!(
            "the copy failed PRAGMA integrity_check: {}",
            problems.join("; ")
        );
    }
    let sessions: i64 = check.query_row("SELECT count(*) FROM session", [], |r| r.get(0))?;
    let queued: i64 = check.query_row(
        &format!("SELECT count(*) FROM {}", queue_rows(&check)?),
        [],
        |r| r.get(0),
    )?;
    drop(check);
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", tmp.display()))?;
    Ok((pages, steps, sessions.max(0) as u64, queued.max(0) as u64))
}
