//! The writer thread: the only connection that writes. Group commit: it takes every command
//! that has arrived, applies all consecutive batches in one transaction, commits, then
//! reports each token. Reads that must see earlier writes (queue read-back) and
//! maintenance (expiry sweep, checkpoint) run between groups, in submission order.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use super::{
    queue_id, split_queue_id, unix_ms, BudgetPolicy, Command, Op, QueueRow, Sid, StoreEvent,
    StoreOptions,
};

/// Most commands taken per group.
const MAX_GROUP: usize = 4096;
/// Rows dropped at a time when the disk budget is full under drop-oldest.
const BUDGET_DROP_ROWS: i64 = 256;
/// Checkpoint the WAL after this long without work.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(5);

pub struct Writer {
    conn: Connection,
    opts: StoreOptions,
    events: UnboundedSender<StoreEvent>,
    /// Release ops from failed commits, retried with the next group.
    retry: Vec<Op>,
    /// Whether the last commit failed (for logging once per episode).
    failing: bool,
}

/// Per-session changes to the queue counters accumulated over one transaction.
#[derive(Default)]
struct Delta {
    queued: i64,
    bytes: i64,
    dropped: i64,
}

impl Writer {
    pub fn new(conn: Connection, opts: StoreOptions, events: UnboundedSender<StoreEvent>) -> Self {
        Writer {
            conn,
            opts,
            events,
            retry: Vec::new(),
            failing: false,
        }
    }

    pub fn run(mut self, rx: Receiver<Command>) {
        let mut last_work = Instant::now();
        let mut checkpointed = true;
        loop {
            let first = if checkpointed {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(IDLE_CHECKPOINT.saturating_sub(last_work.elapsed())) {
                    Ok(c) => c,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.checkpoint();
                        checkpointed = true;
                        continue;
                    }
                    Err(_) => break,
                }
            };
            let mut cmds = vec![first];
            while cmds.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let mut group: Vec<(u64, Vec<Op>)> = Vec::new();
            let mut stop = None;
            for c in cmds {
                match c {
                    Command::Batch { token, ops } => group.push((token, ops)),
                    Command::Shutdown(done) => {
                        stop = Some(done);
                        break;
                    }
                    other => {
                        self.commit_group(&mut group);
                        self.other(other);
                    }
                }
            }
            self.commit_group(&mut group);
            if !self.retry.is_empty() {
                // Still failing: don't spin.
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(done) = stop {
                self.checkpoint();
                let _ = done.send(());
                info!("store closed");
                return;
            }
            last_work = Instant::now();
            checkpointed = false;
        }
        self.checkpoint();
    }

    fn other(&mut self, cmd: Command) {
        match cmd {
            Command::ReadQueue {
                sid,
                from_seq,
                limit,
                next_seq_at_request,
            } => {
                let rows = match self.read_queue(sid, from_seq, limit) {
                    Ok(r) => r,
                    Err(e) => {
                        error!(sid, cause = %e, "reading a queue back from disk failed");
                        Vec::new()
                    }
                };
                let _ = self.events.send(StoreEvent::QueueRows {
                    sid,
                    rows,
                    from_seq,
                    limit,
                    next_seq_at_request,
                });
            }
            Command::SweepExpired { now_ms } => match self.sweep(now_ms) {
                Ok(rows) if !rows.is_empty() => {
                    debug!(rows = rows.len(), "expired queued messages deleted");
                    let _ = self.events.send(StoreEvent::Removed {
                        rows,
                        why: "message expired",
                    });
                }
                Ok(_) => {}
                Err(e) => warn!(cause = %e, "expiry sweep failed"),
            },
            Command::Checkpoint => self.checkpoint(),
            Command::Batch { .. } | Command::Shutdown(_) => {}
        }
    }

    fn checkpoint(&mut self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            debug!(cause = %e, "WAL checkpoint failed");
        }
    }

    fn commit_group(&mut self, group: &mut Vec<(u64, Vec<Op>)>) {
        if group.is_empty() && self.retry.is_empty() {
            return;
        }
        let mut attempts = 0;
        // Rows this group marks as sent: the router sends them once it commits, so the
        // budget must not drop them (they are still state 0 on disk until then).
        let sending: HashSet<(Sid, u64)> = self
            .retry
            .iter()
            .chain(group.iter().flat_map(|(_, ops)| ops.iter()))
            .filter_map(|op| match op {
                Op::MarkSent { sid, seq, .. } => Some((*sid, *seq)),
                _ => None,
            })
            .collect();
        loop {
            let ops = self
                .retry
                .iter()
                .chain(group.iter().flat_map(|(_, ops)| ops.iter()));
            match apply(&mut self.conn, ops) {
                Ok(()) => {
                    self.retry.clear();
                    if self.failing {
                        self.failing = false;
                        info!("store writes succeed again");
                    }
                    for (token, _) in group.drain(..) {
                        let _ = self.events.send(StoreEvent::Committed { token, ok: true });
                    }
                    return;
                }
                Err(e) => {
                    let full = e.sqlite_error_code() == Some(ErrorCode::DiskFull);
                    if !self.failing {
                        error!(cause = %e, full, "store commit failed: refusing new QoS 1/2 messages until it succeeds (logged once per episode)");
                        self.failing = true;
                    }
                    attempts += 1;
                    if full
                        && self.opts.budget_policy == BudgetPolicy::DropOldest
                        && attempts <= 8
                        && self.make_room(&sending)
                    {
                        continue;
                    }
                    break;
                }
            }
        }
        // Keep what releases data; refuse what accepts it.
        let mut release: Vec<Op> = std::mem::take(&mut self.retry);
        for (token, ops) in group.drain(..) {
            let ok = !ops.iter().any(Op::accepts_data);
            release.extend(ops.into_iter().filter(|o| !o.accepts_data()));
            let _ = self.events.send(StoreEvent::Committed { token, ok });
        }
        if let Err(e) = apply(&mut self.conn, release.iter()) {
            debug!(cause = %e, ops = release.len(), "release ops kept for retry");
            self.retry = release;
        }
    }

    /// Disk budget reached under drop-oldest: deletes the oldest unsent messages of the
    /// session with the longest queue that has any (rows in flight, or being sent by the
    /// group that failed, are not dropped). Returns false if there was nothing to drop.
    fn make_room(&mut self, sending: &HashSet<(Sid, u64)>) -> bool {
        let result = (|| -> rusqlite::Result<Vec<(Sid, u64, u32)>> {
            let tx = self.conn.transaction()?;
            let sids: Vec<i64> = tx
                .prepare_cached("SELECT sid FROM session WHERE queued > 0 ORDER BY queued DESC")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut removed = Vec::new();
            let mut sid = 0;
            for s in sids {
                sid = s as Sid;
                let skip = sending.iter().filter(|(x, _)| *x == sid).count() as i64;
                let candidates: Vec<(i64, i64)> = tx
                    .prepare_cached(
                        "SELECT id, size FROM queue WHERE id >= ?1 AND id < ?2 AND state = 0
                         ORDER BY id LIMIT ?3",
                    )?
                    .query_map(
                        params![
                            queue_id(sid, 0),
                            queue_id(sid + 1, 0),
                            BUDGET_DROP_ROWS + skip
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?
                    .collect::<rusqlite::Result<_>>()?;
                let mut del = tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?;
                for (id, size) in candidates {
                    let (_, seq) = split_queue_id(id);
                    if sending.contains(&(sid, seq)) || removed.len() as i64 >= BUDGET_DROP_ROWS {
                        continue;
                    }
                    del.execute([id])?;
                    removed.push((sid, seq, size as u32));
                }
                if !removed.is_empty() {
                    break;
                }
            }
            if removed.is_empty() {
                return Ok(removed);
            }
            let bytes: i64 = removed.iter().map(|r| i64::from(r.2)).sum();
            let n = removed.len() as i64;
            tx.execute(
                "UPDATE session SET queued = queued - ?2, queued_bytes = queued_bytes - ?3,
                 dropped = dropped + ?2 WHERE sid = ?1",
                params![sid as i64, n, bytes],
            )?;
            bump(&tx, "dropped_disk_budget", n)?;
            tx.commit()?;
            Ok(removed)
        })();
        match result {
            Ok(rows) if !rows.is_empty() => {
                warn!(
                    rows = rows.len(),
                    sid = rows[0].0,
                    "disk budget reached: dropped the oldest queued messages of the longest queue (policy drop-oldest)"
                );
                let _ = self.events.send(StoreEvent::Removed {
                    rows,
                    why: "disk budget",
                });
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!(cause = %e, "could not make room under the disk budget");
                false
            }
        }
    }

    fn read_queue(
        &mut self,
        sid: Sid,
        from_seq: u64,
        limit: u32,
    ) -> rusqlite::Result<Vec<QueueRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, state, packet_id, expires_at, packet FROM queue
             WHERE id >= ?1 AND id < ?2 AND state = 0 ORDER BY id LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![queue_id(sid, from_seq), queue_id(sid + 1, 0), limit],
            |r| {
                Ok(QueueRow {
                    seq: split_queue_id(r.get(0)?).1,
                    state: r.get::<_, i64>(1)? as u8,
                    packet_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u16),
                    expires_at: r.get(3)?,
                    packet: bytes::Bytes::from(r.get::<_, Vec<u8>>(4)?),
                })
            },
        )?;
        rows.collect()
    }

    fn sweep(&mut self, now_ms: i64) -> rusqlite::Result<Vec<(Sid, u64, u32)>> {
        let tx = self.conn.transaction()?;
        let mut removed = Vec::new();
        {
            let mut st = tx.prepare_cached(
                "DELETE FROM queue WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND state = 0
                 RETURNING id, size",
            )?;
            let mut rows = st.query(params![now_ms])?;
            while let Some(r) = rows.next()? {
                let (sid, seq) = split_queue_id(r.get(0)?);
                removed.push((sid, seq, r.get::<_, i64>(1)? as u32));
            }
        }
        let mut per: HashMap<Sid, Delta> = HashMap::new();
        for (sid, _, size) in &removed {
            let d = per.entry(*sid).or_default();
            d.queued -= 1;
            d.bytes -= i64::from(*size);
        }
        apply_deltas(&tx, &per)?;
        bump(&tx, "expired", removed.len() as i64)?;
        tx.execute(
            "DELETE FROM retained WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            params![now_ms],
        )?;
        tx.commit()?;
        Ok(removed)
    }
}

fn bump(tx: &rusqlite::Transaction, name: &str, add: i64) -> rusqlite::Result<()> {
    if add != 0 {
        tx.prepare_cached(
            "INSERT INTO counter (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        )?
        .execute(params![name, add])?;
    }
    Ok(())
}

fn apply_deltas(tx: &rusqlite::Transaction, per: &HashMap<Sid, Delta>) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "UPDATE session SET queued = queued + ?2, queued_bytes = queued_bytes + ?3,
         dropped = dropped + ?4 WHERE sid = ?1",
    )?;
    for (sid, d) in per {
        if d.queued != 0 || d.bytes != 0 || d.dropped != 0 {
            st.execute(params![*sid as i64, d.queued, d.bytes, d.dropped])?;
        }
    }
    Ok(())
}

/// Applies ops in one transaction. Any error rolls everything back.
fn apply<'a>(conn: &mut Connection, ops: impl Iterator<Item = &'a Op>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut per: HashMap<Sid, Delta> = HashMap::new();
    let now = unix_ms();
    for op in ops {
        match op {
            Op::UpsertSession {
                sid,
                client_id,
                protocol,
                expiry,
                will,
            } => {
                tx.prepare_cached(
                    "INSERT INTO session (sid, client_id, protocol, expiry_interval, disconnected_at,
                                          will, will_delay, created_at)
                     VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7)
                     ON CONFLICT(sid) DO UPDATE SET protocol = excluded.protocol,
                        expiry_interval = excluded.expiry_interval, disconnected_at = NULL,
                        will = excluded.will, will_delay = excluded.will_delay",
                )?
                .execute(params![
                    *sid as i64,
                    &**client_id,
                    *protocol,
                    i64::from(*expiry),
                    will.as_ref().map(|w| &w.packet[..]),
                    will.as_ref().map(|w| i64::from(w.delay)).unwrap_or(0),
                    now
                ])?;
            }
            Op::SessionOffline {
                sid,
                at_ms,
                expiry,
                will,
            } => {
                tx.prepare_cached(
                    "UPDATE session SET disconnected_at = ?2, expiry_interval = ?3, will = ?4,
                     will_delay = ?5 WHERE sid = ?1",
                )?
                .execute(params![
                    *sid as i64,
                    at_ms,
                    i64::from(*expiry),
                    will.as_ref().map(|w| &w.packet[..]),
                    will.as_ref().map(|w| i64::from(w.delay)).unwrap_or(0)
                ])?;
            }
            Op::DeleteSession { sid } => {
                let s = *sid as i64;
                tx.prepare_cached("DELETE FROM session WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM subscription WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM incoming_qos2 WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM queue WHERE id >= ?1 AND id < ?2")?
                    .execute(params![queue_id(*sid, 0), queue_id(*sid + 1, 0)])?;
                per.remove(sid);
            }
            Op::Subscribe {
                sid,
                filter,
                options,
                identifier,
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO subscription (sid, filter, options, identifier)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    *sid as i64,
                    filter,
                    *options,
                    identifier.map(i64::from)
                ])?;
            }
            Op::Unsubscribe { sid, filter } => {
                tx.prepare_cached("DELETE FROM subscription WHERE sid = ?1 AND filter = ?2")?
                    .execute(params![*sid as i64, filter])?;
            }
            Op::Enqueue {
                sid,
                seq,
                packet_id,
                expires_at,
                size,
                packet,
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO queue (id, state, packet_id, expires_at, size, packet,
                                                   enqueued_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    queue_id(*sid, *seq),
                    if packet_id.is_some() { 1 } else { 0 },
                    packet_id.map(i64::from),
                    expires_at,
                    *size,
                    &packet[..],
                    now
                ])?;
                let d = per.entry(*sid).or_default();
                d.queued += 1;
                d.bytes += i64::from(*size);
            }
            Op::MarkSent {
                sid,
                seq,
                packet_id,
            } => {
                tx.prepare_cached("UPDATE queue SET state = 1, packet_id = ?2 WHERE id = ?1")?
                    .execute(params![queue_id(*sid, *seq), *packet_id])?;
            }
            Op::MarkReleased { sid, seq } => {
                tx.prepare_cached("UPDATE queue SET state = 2 WHERE id = ?1")?
                    .execute(params![queue_id(*sid, *seq)])?;
            }
            Op::Delete { sid, seq } => {
                let size: Option<i64> = tx
                    .prepare_cached("DELETE FROM queue WHERE id = ?1 RETURNING size")?
                    .query_row(params![queue_id(*sid, *seq)], |r| r.get(0))
                    .ok();
                if let Some(size) = size {
                    let d = per.entry(*sid).or_default();
                    d.queued -= 1;
                    d.bytes -= size;
                }
            }
            Op::DeleteOldest { sid, count } => {
                let mut st = tx.prepare_cached(
                    "DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE id >= ?1 AND id < ?2
                     AND state = 0 ORDER BY id LIMIT ?3) RETURNING size",
                )?;
                let mut rows =
                    st.query(params![queue_id(*sid, 0), queue_id(*sid + 1, 0), *count])?;
                let d = per.entry(*sid).or_default();
                while let Some(r) = rows.next()? {
                    d.queued -= 1;
                    d.bytes -= r.get::<_, i64>(0)?;
                    d.dropped += 1;
                }
            }
            Op::Retain { topic, message } => match message {
                Some((expires_at, packet)) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO retained (topic, expires_at, packet) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![&**topic, expires_at, &packet[..]])?;
                }
                None => {
                    tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                        .execute(params![&**topic])?;
                }
            },
            Op::IncomingQos2 {
                sid,
                packet_id,
                present,
            } => {
                if *present {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO incoming_qos2 (sid, packet_id) VALUES (?1, ?2)",
                    )?
                    .execute(params![*sid as i64, *packet_id])?;
                } else {
                    tx.prepare_cached(
                        "DELETE FROM incoming_qos2 WHERE sid = ?1 AND packet_id = ?2",
                    )?
                    .execute(params![*sid as i64, *packet_id])?;
                }
            }
            Op::Count { name, add } => bump(&tx, name, *add)?,
        }
    }
    apply_deltas(&tx, &per)?;
    tx.commit()
}
