//! Start-up: open the database (quarantining a corrupt file if configured), migrate, and
//! read what the router keeps in memory: sessions, their subscriptions, their in-flight
//! messages (bounded by the in-flight window) and queue counters (counted from the queue
//! rows when the last run did not stop cleanly, see `counts`), incoming QoS 2 state and
//! retained messages. Queued messages themselves stay on disk; rows a crash left in the
//! staging log are merged into `queue` first (`staging`), so everything here reads `queue`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use tracing::{error, info, warn};

use crate::clock::{self, Clock, Resumed};

use super::{
    anchor, configure, counts, queue_range, schema, split_queue_id, staging, unix_ms, OnCorrupt,
    QueueRow, Sid, StoreError, StoreOptions, StoredWill, MAX_SEQ, MAX_SID, SEQ_BITS,
};

#[derive(Debug, Clone)]
pub struct RecoveredSubscription {
    pub filter: String,
    pub options: u8,
    pub identifier: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct RecoveredSession {
    pub sid: Sid,
    pub client_id: String,
    pub protocol: u8,
    pub expiry: u32,
    /// When it went offline (store time line, ms); None if it was connected when the
    /// broker stopped.
    pub disconnected_at: Option<i64>,
    pub will: Option<StoredWill>,
    pub subscriptions: Vec<RecoveredSubscription>,
    pub incoming_qos2: Vec<u16>,
    /// Rows in the queue (in flight included) and their payload bytes.
    pub queued: u64,
    pub queued_bytes: u64,
    pub dropped: u64,
    /// Next sequence number to assign.
    pub next_seq: u64,
    /// Rows already sent (state >= 1), in order; they are resent with DUP = 1.
    pub inflight: Vec<QueueRow>,
    /// Who owns the session (`user:<name>` / `anonymous`); None if not recorded.
    pub owner: Option<String>,
}

#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    /// (topic, expires_at on the store time line in ms, v5 PUBLISH packet)
    pub retained: Vec<(String, Option<i64>, Bytes)>,
    /// Where a corrupt database was moved, if that happened.
    pub quarantined: Option<PathBuf>,
    /// The store's time line, continued from the last run (see [`crate::clock`]): stored
    /// deadlines (`disconnected_at`, `expires_at`) are on it.
    pub clock: Clock,
}

fn is_corrupt(e: &StoreError) -> Option<String> {
    if let StoreError::Integrity { detail, .. } = e {
        return Some(format!("integrity check: {detail}"));
    }
    let sqlite = match e {
        StoreError::Open { source, .. } | StoreError::Migration { source, .. } => source,
        StoreError::Sqlite(s) => s,
        _ => return None,
    };
    match sqlite.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt) | Some(ErrorCode::NotADatabase) => {
            Some(sqlite.to_string())
        }
        _ => None,
    }
}

pub fn open_and_load(opts: &StoreOptions) -> Result<(Connection, Recovered), StoreError> {
    if let Some(dir) = opts.path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    // TEST ONLY (off unless HOLDFAST_TEST_POWERCUT_VFS=1): simulated power cuts.
    super::powercut::install_from_env(&opts.path)?;
    match try_open(opts) {
        Ok(x) => Ok(x),
        Err(e) => {
            let Some(cause) = is_corrupt(&e) else {
                return Err(e);
            };
            if opts.on_corrupt == OnCorrupt::Refuse {
                return Err(StoreError::Corrupt {
                    path: opts.path.clone(),
                    cause,
                });
            }
            let moved = quarantine(&opts.path).map_err(|source| StoreError::DataDir {
                path: opts.path.clone(),
                source,
            })?;
            error!(
                path = %opts.path.display(),
                moved_to = %moved.display(),
                %cause,
                "DATABASE IS CORRUPT: moved it aside and starting with an empty store; \
                 sessions and queued messages in the old file are NOT loaded"
            );
            let (conn, mut recovered) = try_open(opts)?;
            recovered.quarantined = Some(moved);
            Ok((conn, recovered))
        }
    }
}

/// Moves `path` (and its -wal/-shm files) to `path.corrupt-<unix ms>`.
fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = unix_ms();
    let target = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &target)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{suffix}", target.display()));
        }
    }
    Ok(target)
}

fn try_open(opts: &StoreOptions) -> Result<(Connection, Recovered), StoreError> {
    let open_err = |source| StoreError::Open {
        path: opts.path.clone(),
        source,
    };
    let mut conn = Connection::open(&opts.path).map_err(open_err)?;
    configure(&conn, opts.synchronous, opts.page_size, opts.cache_kib).map_err(open_err)?;
    let found = schema::migrate(&mut conn)?;
    if found < schema::latest_version() {
        info!(
            from = found,
            to = schema::latest_version(),
            "database schema upgraded"
        );
    }
    if opts.integrity_check {
        quick_check(&conn, &opts.path)?;
    }
    merge_staged(&mut conn)?;
    renumber_out_of_range(&mut conn)?;
    if found < 3 {
        resend_sent_rows_in_order(&mut conn)?;
    }
    let mut recovered = load(&conn)?;
    count_queues_unless_exact(&conn, &mut recovered)?;
    recovered.clock = continue_time_line(&conn)?;
    Ok((conn, recovered))
}

/// Continues the store's time line from the last run's anchor, counting the offline time
/// only when the wall clock can measure it ([`clock::resume`]), and records the new anchor.
fn continue_time_line(conn: &Connection) -> Result<Clock, StoreError> {
    let last = anchor::read(conn)?;
    let (wall, synced) = (clock::wall_ms(), clock::synchronised());
    let (base, how) = clock::resume(last, wall, synced);
    let clock = Clock::starting_at(base);
    match how {
        Resumed::Fresh => {}
        Resumed::Counted { offline } => info!(
            offline_secs = offline.as_secs(),
            clock_synchronised = synced,
            "time while stopped counted for expiries"
        ),
        Resumed::NotCounted { why } => warn!(
            why,
            wall_ms = wall,
            last_wall_ms = last.map(|a| a.wall_ms),
            clock_synchronised = synced,
            "WALL CLOCK STEPPED: the time while stopped is not counted; session expiry, will \
             delay and message expiry resume where they stopped"
        ),
    }
    anchor::write(conn, &clock.anchor())?;
    Ok(clock)
}

/// Makes the loaded queue counters exact: as stored after a clean stop, counted from the
/// queue rows otherwise (a crash or power cut: the writer keeps them in memory, see
/// `super::counts`). Then records that the stored ones are stale from here on, before
/// anything changes the queue.
fn count_queues_unless_exact(conn: &Connection, rec: &mut Recovered) -> Result<(), StoreError> {
    if !counts::exact(conn)? {
        let started = std::time::Instant::now();
        for s in &mut rec.sessions {
            (s.queued, s.queued_bytes) = counts::count_queue(conn, s.sid)?;
        }
        info!(
            sessions = rec.sessions.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "queue counters counted from the queue rows (the last run did not stop cleanly)"
        );
    }
    counts::set_exact(conn, false)?;
    Ok(())
}

/// `PRAGMA quick_check` (every page read once, O(file size)): a file that opens but is
/// damaged inside is found before anything is served from it, not at the first read of the
/// damaged page (a message then lost from a read-back).
fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let problems: Vec<String> = conn
        .prepare("PRAGMA quick_check(5)")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if problems.len() == 1 && problems[0] == "ok" {
        info!(
            took_ms = started.elapsed().as_millis() as u64,
            "store integrity check passed"
        );
        return Ok(());
    }
    Err(StoreError::Integrity {
        path: path.to_path_buf(),
        detail: problems.join("; "),
    })
}

/// Moves rows a crash left in the staging log into `queue` (`super::staging`), before
/// anything below reads `queue`: a chunk per transaction, like every merge (SQLite's
/// statement journal holds one chunk, not the log; a crash in between leaves each row in
/// one table, and the next start merges the rest).
fn merge_staged(conn: &mut Connection) -> Result<(), StoreError> {
    let moved = staging::Staging::load(conn)?.merge_all(conn)?;
    if moved > 0 {
        info!(
            rows = moved,
            "staged queue rows merged (the last run did not stop cleanly)"
        );
    }
    Ok(())
}

/// Gives sessions whose ids a Holdfast before schema 3 counted up past `MAX_SID` (one id
/// per connection ever made) the smallest free ids, moving their queues along where the old
/// ids still addressed them (ids in `[2^23, 2^24)` put their rows at negative row ids, which
/// overlap nothing; beyond that the rows wrapped onto other sessions and cannot be told
/// apart).
fn renumber_out_of_range(conn: &mut Connection) -> Result<(), StoreError> {
    let sids: Vec<i64> = conn
        .prepare("SELECT sid FROM session ORDER BY sid")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let valid = |sid: i64| sid >= 1 && sid as u64 <= MAX_SID;
    if sids.iter().all(|s| valid(*s)) {
        return Ok(());
    }
    let mut used: std::collections::BTreeSet<i64> =
        sids.iter().copied().filter(|s| valid(*s)).collect();
    let tx = conn.transaction()?;
    let mut candidate = 1i64;
    for old in sids.into_iter().filter(|s| !valid(*s)) {
        let new = loop {
            let (lo, hi) = queue_range(candidate as Sid);
            let rows: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM queue WHERE id BETWEEN ?1 AND ?2 LIMIT 1",
                    params![lo, hi],
                    |r| r.get(0),
                )
                .optional()?;
            if !used.contains(&candidate) && rows.is_none() {
                break candidate;
            }
            candidate += 1;
        };
        used.insert(new);
        for table in ["session", "subscription", "incoming_qos2"] {
            tx.execute(
                &format!("UPDATE {table} SET sid = ?2 WHERE sid = ?1"),
                params![old, new],
            )?;
        }
        let moved = if (1i64 << 23..1i64 << 24).contains(&old) {
            let lo = ((old as u64) << SEQ_BITS) as i64;
            tx.execute(
                "UPDATE queue SET id = (id - ?1) + ?3 WHERE id BETWEEN ?1 AND ?2",
                params![lo, lo + MAX_SEQ as i64, queue_range(new as Sid).0],
            )?
        } else {
            0
        };
        warn!(
            old_sid = old,
            new_sid = new,
            moved_rows = moved,
            "session id out of range (written by an older Holdfast): renumbered"
        );
    }
    tx.commit()?;
    Ok(())
}

/// Before schema 3 a message could be sent while older ones still waited on disk (the
/// router's queue count drifted), leaving rows marked sent after unsent ones, which
/// recovery (it resends the sent rows at the front of each queue) would strand. Marks such
/// rows unsent again, once, so they are delivered in order.
fn resend_sent_rows_in_order(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let mut fixed = 0;
    {
        let sids: Vec<i64> = tx
            .prepare("SELECT sid FROM session")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut first_unsent =
            tx.prepare("SELECT min(id) FROM queue WHERE id BETWEEN ?1 AND ?2 AND state = 0")?;
        let mut reset = tx.prepare(
            "UPDATE queue SET state = 0, packet_id = NULL
             WHERE id BETWEEN ?1 AND ?2 AND state > 0",
        )?;
        for sid in sids {
            let (lo, hi) = queue_range(sid as Sid);
            let first: Option<i64> = first_unsent.query_row(params![lo, hi], |r| r.get(0))?;
            if let Some(first) = first {
                fixed += reset.execute(params![first, hi])?;
            }
        }
    }
    tx.commit()?;
    if fixed > 0 {
        warn!(
            rows = fixed,
            "messages marked sent behind unsent ones (older Holdfast): they are delivered again, in order"
        );
    }
    Ok(())
}

fn load(conn: &Connection) -> Result<Recovered, StoreError> {
    let mut subs: HashMap<Sid, Vec<RecoveredSubscription>> = HashMap::new();
    {
        let mut st = conn.prepare("SELECT sid, filter, options, identifier FROM subscription")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as Sid,
                RecoveredSubscription {
                    filter: r.get(1)?,
                    options: r.get::<_, i64>(2)? as u8,
                    identifier: r.get::<_, Option<i64>>(3)?.map(|v| v as u32),
                },
            ))
        })?;
        for row in rows {
            let (sid, s) = row?;
            subs.entry(sid).or_default().push(s);
        }
    }
    let mut qos2: HashMap<Sid, Vec<u16>> = HashMap::new();
    {
        let mut st = conn.prepare("SELECT sid, packet_id FROM incoming_qos2")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as Sid, r.get::<_, i64>(1)? as u16))
        })?;
        for row in rows {
            let (sid, p) = row?;
            qos2.entry(sid).or_default().push(p);
        }
    }
    let mut sessions = Vec::new();
    {
        let mut st = conn.prepare(
            "SELECT sid, client_id, protocol, expiry_interval, disconnected_at, will, will_delay,
                    queued, queued_bytes, dropped, owner FROM session",
        )?;
        let rows = st.query_map([], |r| {
            let will: Option<Vec<u8>> = r.get(5)?;
            Ok(RecoveredSession {
                sid: r.get::<_, i64>(0)? as Sid,
                client_id: r.get(1)?,
                protocol: r.get::<_, i64>(2)? as u8,
                expiry: r.get::<_, i64>(3)? as u32,
                disconnected_at: r.get(4)?,
                will: will.map(|w| StoredWill {
                    packet: Bytes::from(w),
                    delay: 0,
                }),
                subscriptions: Vec::new(),
                incoming_qos2: Vec::new(),
                queued: r.get::<_, i64>(7)?.max(0) as u64,
                queued_bytes: r.get::<_, i64>(8)?.max(0) as u64,
                dropped: r.get::<_, i64>(9)?.max(0) as u64,
                next_seq: 0,
                inflight: Vec::new(),
                owner: r.get(10)?,
            })
            .map(|mut s| {
                if let (Some(w), Ok(d)) = (s.will.as_mut(), r.get::<_, i64>(6)) {
                    w.delay = d as u32;
                }
                s
            })
        })?;
        for row in rows {
            sessions.push(row?);
        }
    }
    let mut max_st = conn.prepare("SELECT max(id) FROM queue WHERE id BETWEEN ?1 AND ?2")?;
    let mut front_st = conn.prepare(
        "SELECT id, state, packet_id, expires_at, packet FROM queue
         WHERE id BETWEEN ?1 AND ?2 ORDER BY id",
    )?;
    for s in &mut sessions {
        s.subscriptions = subs.remove(&s.sid).unwrap_or_default();
        s.incoming_qos2 = qos2.remove(&s.sid).unwrap_or_default();
        let (lo, hi) = queue_range(s.sid);
        let max: Option<i64> = max_st
            .query_row(params![lo, hi], |r| r.get(0))
            .optional()?
            .flatten();
        let Some(max) = max else {
            // An empty queue: sequence numbers start again from 0.
            s.next_seq = 0;
            continue;
        };
        s.next_seq = split_queue_id(max).1 + 1;
        // Rows marked sent form the front of each queue (the router sends a message only
        // when nothing older waits), so the scan stops at the first unsent row.
        // The sent rows form the front of the queue (messages go out in order).
        let mut rows = front_st.query(params![lo, hi])?;
        while let Some(r) = rows.next()? {
            let state: i64 = r.get(1)?;
            if state == 0 {
                break;
            }
            let blob: Vec<u8> = r.get(4)?;
            s.inflight.push(QueueRow {
                seq: split_queue_id(r.get(0)?).1,
                state: state as u8,
                packet_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u16),
                expires_at: r.get(3)?,
                packet: Bytes::from(blob),
            });
        }
    }
    let mut retained = Vec::new();
    {
        let mut st = conn.prepare("SELECT topic, expires_at, packet FROM retained")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                Bytes::from(r.get::<_, Vec<u8>>(2)?),
            ))
        })?;
        for row in rows {
            retained.push(row?);
        }
    }
    Ok(Recovered {
        sessions,
        retained,
        quarantined: None,
        clock: Clock::default(),
    })
}
