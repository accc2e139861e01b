//! The writer thread: the only connection that writes. Group commit: it takes every command
//! that has arrived, applies all consecutive batches in one transaction, commits, then
//! reports each token. A queue read-back runs inside the group's transaction, after the
//! batches submitted before it (so it sees their writes), and its answer is reported only
//! after the commit, in submission order; maintenance (expiry sweep, checkpoint) runs
//! between groups.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use super::metrics::StoreState;
use crate::clock::Clock;

use super::{
    queue_id, queue_range, split_queue_id, BudgetPolicy, Command, Op, QueueRow, Sid, StoreEvent,
    StoreOptions,
};

/// Most commands taken per group.
const MAX_GROUP: usize = 4096;
/// Rows dropped at a time when the disk budget is full under drop-oldest.
const BUDGET_DROP_ROWS: i64 = 256;
/// How long a commit is retried while another process holds the database lock (each try
/// already waits out the 5 s busy timeout) before new messages are refused.
const LOCK_PATIENCE: Duration = Duration::from_secs(30);
/// With `commit_delay`, a group with this many ops is committed without waiting out the
/// delay: its commit's fixed cost (the pages and fsync every commit pays) is already shared
/// by enough messages, and a publisher with this many messages in flight is not held to
/// `window / commit_delay` messages per second. Ops, not batches: the router puts what it
/// handled in one turn (often several publishes) into one batch.
pub(crate) const DELAY_ENOUGH_OPS: usize = 16;
/// Pages ops that only release data may take above the disk budget (see `apply_release`).
const RELEASE_RESERVE_PAGES: i64 = 256;
/// Checkpoint the WAL after this long without work.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(5);

pub struct Writer {
    conn: Connection,
    opts: StoreOptions,
    events: UnboundedSender<StoreEvent>,
    /// Release ops from failed commits, retried with the next group.
    retry: Vec<Op>,
    /// Tokens of failed groups, with their outcome, reported only once `retry` is applied
    /// (so an acknowledgement never gets ahead of the change it acknowledges, and tokens
    /// are still reported in order).
    retry_tokens: Vec<(u64, bool)>,
    /// What made the last commit fail, if it did (for logging once per episode).
    failing: Option<StoreState>,
    /// Commit counts and latency, read by `observe`.
    metrics: std::sync::Arc<super::metrics::StoreMetrics>,
    /// How large the database may grow (`max_page_count`), refreshed between groups.
    budget: super::budget::Budget,
    /// The store's time line: `created_at` / `enqueued_at` stamps and the clock anchor.
    clock: Clock,
}

/// One entry of a group, in submission order.
enum Item {
    Batch(u64, Vec<Op>),
    /// `Command::ReadQueue`: answered from inside the group's transaction, reported after
    /// the commit.
    Read {
        sid: Sid,
        from_seq: u64,
        limit: u32,
        next_seq_at_request: u64,
        /// Rows sent and awaiting their PUBACK / PUBREC (state 1) instead of unsent ones.
        sent: bool,
    },
}

/// Per-session changes to the queue counters accumulated over one transaction.
#[derive(Default)]
struct Delta {
    queued: i64,
    bytes: i64,
    dropped: i64,
}

impl Writer {
    pub fn new(
        conn: Connection,
        opts: StoreOptions,
        events: UnboundedSender<StoreEvent>,
        clock: Clock,
    ) -> Self {
        let mut budget =
            super::budget::Budget::new(&opts.path, opts.max_bytes, opts.min_free_percent);
        budget.apply(&conn, true);
        Writer {
            budget,
            conn,
            opts,
            events,
            retry: Vec::new(),
            retry_tokens: Vec::new(),
            failing: None,
            metrics: Default::default(),
            clock,
        }
    }

    /// The writer's commit statistics (shared with whoever reads them).
    pub fn metrics(&self) -> std::sync::Arc<super::metrics::StoreMetrics> {
        self.metrics.clone()
    }

    pub fn run(mut self, rx: Receiver<Command>) {
        let mut last_work = Instant::now();
        let mut checkpointed = true;
        loop {
            let first = if !self.retry.is_empty() {
                // A failed commit is waiting to be retried: don't wait for new work forever.
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => c,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.commit_group(&mut Vec::new());
                        continue;
                    }
                    Err(_) => break,
                }
            } else if checkpointed {
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
            let cmds = self.gather(first, &rx);
            let mut group: Vec<Item> = Vec::new();
            let mut stop = None;
            // Health-check pings alone are no work (no idle checkpoint after them).
            let work = cmds.iter().any(|c| !matches!(c, Command::Ping(_)));
            for c in cmds {
                match c {
                    Command::Batch { token, ops } => group.push(Item::Batch(token, ops)),
                    // A read does not end the group: committing the batches before it
                    // separately would cost one more commit (an fsync with FULL).
                    Command::ReadQueue {
                        sid,
                        from_seq,
                        limit,
                        next_seq_at_request,
                        sent,
                    } => group.push(Item::Read {
                        sid,
                        from_seq,
                        limit,
                        next_seq_at_request,
                        sent,
                    }),
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
                self.write_anchor();
                self.checkpoint();
                let _ = done.send(());
                info!("store closed");
                return;
            }
            if work {
                last_work = Instant::now();
                checkpointed = false;
            }
        }
        self.checkpoint();
    }

    /// The commands of one group: `first`, then whatever has arrived, up to `MAX_GROUP`.
    /// With `commit_delay` (opt-in), a group that starts with a batch also waits up to that
    /// long after it for more batches to share its commit, until it holds
    /// `DELAY_ENOUGH_OPS`; a shutdown ends the wait.
    fn gather(&self, first: Command, rx: &Receiver<Command>) -> Vec<Command> {
        let deadline = (!self.opts.commit_delay.is_zero()
            && matches!(first, Command::Batch { .. }))
        .then(|| Instant::now() + self.opts.commit_delay);
        let mut ops = ops_in(&first);
        let mut cmds = vec![first];
        while cmds.len() < MAX_GROUP {
            let next = match rx.try_recv() {
                Ok(c) => c,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    if ops >= DELAY_ENOUGH_OPS {
                        break;
                    }
                    let Some(left) = deadline
                        .map(|d| d.saturating_duration_since(Instant::now()))
                        .filter(|left| !left.is_zero())
                    else {
                        break;
                    };
                    match rx.recv_timeout(left) {
                        Ok(c) => c,
                        Err(_) => break,
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            };
            let stop = matches!(next, Command::Shutdown(_));
            ops += ops_in(&next);
            cmds.push(next);
            if stop {
                break;
            }
        }
        cmds
    }

    fn other(&mut self, cmd: Command) {
        match cmd {
            Command::ReadQueue {
                sid,
                from_seq,
                limit,
                next_seq_at_request,
                sent,
            } => {
                let rows = read_rows(&self.conn, sid, from_seq, limit, sent);
                self.send_rows(sid, rows, (from_seq, limit, next_seq_at_request, sent));
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
            // Everything submitted before the ping is committed by now (`run` commits the
            // group before handing other commands here).
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
            Command::Batch { .. } | Command::Shutdown(_) => {}
        }
    }

    /// Records where the time line is (at shutdown; sweeps record it in their own commit).
    fn write_anchor(&mut self) {
        if let Err(e) = super::anchor::write(&self.conn, &self.clock.anchor()) {
            warn!(cause = %e, "could not record the clock anchor");
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

    /// Answers a queue read-back. A failed read is reported as failed (the router keeps its
    /// read position and asks again), never as an empty queue.
    fn send_rows(
        &self,
        sid: Sid,
        rows: rusqlite::Result<Vec<QueueRow>>,
        (from_seq, limit, next_seq_at_request, sent): (u64, u32, u64, bool),
    ) {
        let (rows, failed) = match rows {
            Ok(rows) => (rows, false),
            Err(e) => {
                let kind = StoreState::of(&e);
                error!(sid, cause = %e, state = kind.name(), "reading a queue back from disk failed: it is read again");
                self.metrics.record_read_failure();
                self.metrics.record_error(kind);
                self.metrics.set_state(kind);
                (Vec::new(), true)
            }
        };
        let _ = self.events.send(StoreEvent::QueueRows {
            sid,
            rows,
            from_seq,
            limit,
            next_seq_at_request,
            failed,
            sent,
        });
    }

    fn commit_group(&mut self, group: &mut Vec<Item>) {
        if group.is_empty() && self.retry.is_empty() {
            return;
        }
        // While refusing, look at the free space before every retry: room may be back.
        self.budget.apply(&self.conn, self.failing.is_some());
        let mut attempts = 0;
        // Rows this group marks as sent: the router sends them once it commits, so the
        // budget must not drop them (they are still state 0 on disk until then).
        let sending: HashSet<(Sid, u64)> = self
            .retry
            .iter()
            .chain(group.iter().flat_map(|item| match item {
                Item::Batch(_, ops) => ops.iter(),
                Item::Read { .. } => [].iter(),
            }))
            .filter_map(|op| match op {
                Op::MarkSent { sid, seq, .. } => Some((*sid, *seq)),
                _ => None,
            })
            .collect();
        let started = Instant::now();
        loop {
            match apply_group(&mut self.conn, &self.retry, group, self.clock.now_ms()) {
                Ok(reads) => {
                    self.metrics.record(started.elapsed(), true);
                    self.retry.clear();
                    for (token, ok) in self.retry_tokens.drain(..) {
                        let _ = self.events.send(StoreEvent::Committed { token, ok });
                    }
                    if let Some(was) = self.failing.take() {
                        info!(was = was.name(), "store writes succeed again");
                    }
                    self.metrics.set_state(StoreState::Ok);
                    let mut reads = reads.into_iter();
                    for item in group.drain(..) {
                        match item {
                            Item::Batch(token, _) => {
                                let _ = self.events.send(StoreEvent::Committed { token, ok: true });
                            }
                            Item::Read {
                                sid,
                                from_seq,
                                limit,
                                next_seq_at_request,
                                sent,
                            } => {
                                let rows = reads.next().unwrap_or_else(|| Ok(Vec::new()));
                                let asked = (from_seq, limit, next_seq_at_request, sent);
                                self.send_rows(sid, rows, asked);
                            }
                        }
                    }
                    return;
                }
                Err(e) => {
                    let kind = StoreState::of(&e);
                    self.metrics.record_error(kind);
                    self.metrics.set_state(kind);
                    if self.failing != Some(kind) {
                        self.failing = Some(kind);
                        match kind {
                            StoreState::Full => {
                                warn!(cause = %e, "store full (disk budget or disk): applying store.budget_policy (logged once per episode)")
                            }
                            StoreState::Locked => {
                                error!(cause = %e, patience_secs = LOCK_PATIENCE.as_secs(), "DATABASE LOCKED by another process: retrying the commit, acknowledgements wait (logged once per episode)")
                            }
                            StoreState::Corrupt => {
                                error!(cause = %e, "DATABASE CORRUPT at run time: refusing new QoS 1/2 messages, keeping what is stored; restart to run the integrity check (store.on_corrupt)")
                            }
                            StoreState::IoError | StoreState::Ok => {
                                error!(cause = %e, "STORAGE I/O ERROR: refusing new QoS 1/2 messages until writes succeed, keeping what is stored (check the SD card / disk)")
                            }
                        }
                    }
                    attempts += 1;
                    if kind == StoreState::Full
                        && self.opts.budget_policy == BudgetPolicy::DropOldest
                        && attempts <= 8
                        && self.make_room(&sending)
                    {
                        continue;
                    }
                    if kind == StoreState::Locked && started.elapsed() < LOCK_PATIENCE {
                        // Someone else holds the lock (a backup, a stray sqlite3 shell):
                        // wait for it rather than refuse what was sent to us.
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    self.metrics.record(started.elapsed(), false);
                    break;
                }
            }
        }
        // One batch at a time, each in its own transaction, so only the batches that do
        // not fit are refused (one oversized message must not fail its neighbours). A
        // refused batch keeps what releases data and refuses what accepts it. Reads are
        // answered in their place, from what is committed.
        let retry = std::mem::take(&mut self.retry);
        let mut stuck = !retry.is_empty() && self.apply_release(&retry).is_err();
        if stuck {
            self.retry = retry;
        } else {
            for (token, ok) in self.retry_tokens.drain(..) {
                let _ = self.events.send(StoreEvent::Committed { token, ok });
            }
        }
        for item in group.drain(..) {
            match item {
                Item::Batch(token, ops) => {
                    let mut ok =
                        !stuck && apply(&mut self.conn, ops.iter(), self.clock.now_ms()).is_ok();
                    if !ok {
                        let release: Vec<Op> =
                            ops.iter().filter(|o| !o.accepts_data()).cloned().collect();
                        let refused_nothing = release.len() == ops.len();
                        if !stuck && self.apply_release(&release).is_ok() {
                            ok = refused_nothing;
                        } else {
                            // Nothing of this token is reported until its releases are
                            // on disk (and nothing after it, to keep the order).
                            stuck = true;
                            self.retry.extend(release);
                            self.retry_tokens.push((token, refused_nothing));
                            continue;
                        }
                    }
                    if stuck {
                        self.retry_tokens.push((token, ok));
                    } else {
                        let _ = self.events.send(StoreEvent::Committed { token, ok });
                    }
                }
                Item::Read {
                    sid,
                    from_seq,
                    limit,
                    next_seq_at_request,
                    sent,
                } => {
                    let rows = read_rows(&self.conn, sid, from_seq, limit, sent);
                    self.send_rows(sid, rows, (from_seq, limit, next_seq_at_request, sent));
                }
            }
        }
        if stuck {
            debug!(ops = self.retry.len(), "release ops kept for retry");
        }
    }

    /// Applies ops that only release data (deletes, sent marks, state changes). At the disk
    /// budget even these can need a page (a row with overflow pages is rewritten when it is
    /// marked sent), and they are retried until they succeed, holding every later token:
    /// so they may go over the budget by a bounded reserve, which their deletes give back.
    fn apply_release(&mut self, ops: &[Op]) -> rusqlite::Result<()> {
        match apply(&mut self.conn, ops.iter(), self.clock.now_ms()) {
            Err(e) if StoreState::of(&e) == StoreState::Full => {
                let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                self.conn
                    .pragma_update(None, "max_page_count", pages + RELEASE_RESERVE_PAGES)?;
                let result = apply(&mut self.conn, ops.iter(), self.clock.now_ms());
                self.budget.reapply(&self.conn);
                if result.is_ok() {
                    debug!(
                        ops = ops.len(),
                        "release ops used the page reserve above the budget"
                    );
                }
                result
            }
            other => other,
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
                        "SELECT id, size FROM queue WHERE id BETWEEN ?1 AND ?2 AND state = 0
                         ORDER BY id LIMIT ?3",
                    )?
                    .query_map(
                        params![
                            queue_range(sid).0,
                            queue_range(sid).1,
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
        // The next start continues the time line from here (a crash loses at most one
        // sweep interval of it, and only when the wall clock stepped in that interval).
        super::anchor::write(&tx, &self.clock.anchor())?;
        tx.commit()?;
        Ok(removed)
    }
}

/// The ops a command carries (0 for anything but a batch).
fn ops_in(cmd: &Command) -> usize {
    match cmd {
        Command::Batch { ops, .. } => ops.len(),
        _ => 0,
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

/// Up to `limit` not-yet-sent rows (`sent`: rows sent and awaiting their PUBACK / PUBREC)
/// of a session's queue with seq >= `from_seq` (on error: logged, none).
fn read_rows(
    conn: &Connection,
    sid: Sid,
    from_seq: u64,
    limit: u32,
    sent: bool,
) -> rusqlite::Result<Vec<QueueRow>> {
    (|| -> rusqlite::Result<Vec<QueueRow>> {
        let mut st = conn.prepare_cached(
            "SELECT id, state, packet_id, expires_at, packet FROM queue
             WHERE id BETWEEN ?1 AND ?2 AND state = ?4 ORDER BY id LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![
                queue_id(sid, from_seq),
                queue_range(sid).1,
                limit,
                i64::from(sent)
            ],
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
    })()
}

/// The queue row an op touches, for the row ops that [`transient_rows`] may skip.
fn row_of(op: &Op) -> Option<(Sid, u64)> {
    match op {
        Op::Enqueue { sid, seq, .. }
        | Op::MarkSent { sid, seq, .. }
        | Op::MarkReleased { sid, seq }
        | Op::Delete { sid, seq } => Some((*sid, *seq)),
        _ => None,
    }
}

/// Queue rows both inserted and deleted by the same group: a bridge's message that the
/// upstream acknowledged while its insert was still waiting for this commit. Writing and
/// then deleting it would change nothing on disk, so neither (nor anything in between) is
/// written: the upstream has the message, and the local publisher's PUBACK still waits for
/// this commit.
///
/// A row inserted as sent (`packet_id` set, state 1) is invisible to reads and to
/// `DeleteOldest` (both look at state 0 only), so it always qualifies. A row inserted
/// unsent qualifies only if no read, `DeleteOldest` or `DeleteSession` of the group looks
/// at its session (their outcome may depend on the row being there).
fn transient_rows(group: &[Item]) -> HashSet<(Sid, u64)> {
    // (sid, seq) -> inserted as sent
    let mut inserted = HashMap::new();
    let mut transient = HashSet::new();
    let mut untouchable = HashSet::new();
    for item in group {
        match item {
            Item::Read { sid, .. } => {
                untouchable.insert(*sid);
            }
            Item::Batch(_, ops) => {
                for op in ops {
                    match op {
                        Op::Enqueue {
                            sid,
                            seq,
                            packet_id,
                            ..
                        } => {
                            inserted.insert((*sid, *seq), packet_id.is_some());
                        }
                        Op::Delete { sid, seq } if inserted.contains_key(&(*sid, *seq)) => {
                            transient.insert((*sid, *seq));
                        }
                        Op::DeleteOldest { sid, .. } | Op::DeleteSession { sid } => {
                            untouchable.insert(*sid);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    transient.retain(|row| inserted.get(row) == Some(&true) || !untouchable.contains(&row.0));
    transient
}

/// Applies `retry`, then the group's batches in one transaction, answering its reads from
/// inside it (each sees exactly the writes submitted before it), and skipping the
/// [`transient_rows`]. Any error rolls everything back. Returns the reads' rows, in order.
fn apply_group(
    conn: &mut Connection,
    retry: &[Op],
    group: &[Item],
    now: i64,
) -> rusqlite::Result<Vec<rusqlite::Result<Vec<QueueRow>>>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut per: HashMap<Sid, Delta> = HashMap::new();
    let mut reads = Vec::new();
    for op in retry {
        apply_op(&tx, op, &mut per, now)?;
    }
    let transient = transient_rows(group);
    let mut deletes = Deletes::default();
    for item in group {
        match item {
            Item::Batch(_, ops) => {
                for op in ops {
                    if row_of(op).is_some_and(|r| transient.contains(&r)) {
                        continue;
                    }
                    if !deletes.defer(&tx, op, &mut per)? {
                        apply_op(&tx, op, &mut per, now)?;
                    }
                }
            }
            Item::Read {
                sid,
                from_seq,
                limit,
                sent,
                ..
            } => {
                deletes.flush(&tx, *sid, &mut per)?;
                reads.push(read_rows(&tx, *sid, *from_seq, *limit, *sent));
            }
        }
    }
    deletes.flush_all(&tx, &mut per)?;
    apply_deltas(&tx, &per)?;
    tx.commit()?;
    Ok(reads)
}

/// Deletes the queue rows of `sid` with `lo <= seq <= hi` (those that exist), counting
/// them in `per`. Two plain statements: `DELETE ... RETURNING` would build an ephemeral
/// table for every call.
fn delete_range(
    tx: &rusqlite::Transaction,
    sid: Sid,
    lo: u64,
    hi: u64,
    per: &mut HashMap<Sid, Delta>,
) -> rusqlite::Result<()> {
    let range = params![queue_id(sid, lo), queue_id(sid, hi)];
    let (rows, bytes): (i64, i64) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(size), 0) FROM queue WHERE id >= ?1 AND id <= ?2",
        )?
        .query_row(range, |r| Ok((r.get(0)?, r.get(1)?)))?;
    if rows > 0 {
        tx.prepare_cached("DELETE FROM queue WHERE id >= ?1 AND id <= ?2")?
            .execute(range)?;
        let d = per.entry(sid).or_default();
        d.queued -= rows;
        d.bytes -= bytes;
    }
    Ok(())
}

/// `Op::Delete`s of a group held back and applied as ranges of consecutive rows: an
/// upstream or subscriber acknowledges in order, so a group's deletes of one session are
/// usually one run, deleted by one statement instead of one per row.
///
/// Holding a delete back is equivalent to applying it in place as long as nothing in
/// between can see the row: the session's deletes are applied first when a read, a
/// `DeleteOldest` or a `DeleteSession` of that session comes, or an `Enqueue` of a row that
/// is waiting to be deleted. Marking a row that is then deleted ends the same either way.
#[derive(Default)]
struct Deletes {
    /// Per session: the seqs to delete, in submission order, and the highest of them.
    pending: HashMap<Sid, (Vec<u64>, u64)>,
}

impl Deletes {
    /// Holds `op` back if it is a delete (returns true); first applies what must not be
    /// held past `op`.
    fn defer(
        &mut self,
        tx: &rusqlite::Transaction,
        op: &Op,
        per: &mut HashMap<Sid, Delta>,
    ) -> rusqlite::Result<bool> {
        match op {
            Op::Delete { sid, seq } => {
                let (seqs, max) = self.pending.entry(*sid).or_default();
                seqs.push(*seq);
                *max = (*max).max(*seq);
                return Ok(true);
            }
            Op::Enqueue { sid, seq, .. }
                if self
                    .pending
                    .get(sid)
                    .is_some_and(|(seqs, max)| *seq <= *max && seqs.contains(seq)) =>
            {
                self.flush(tx, *sid, per)?;
            }
            Op::DeleteOldest { sid, .. } | Op::DeleteSession { sid } | Op::Drop { sid, .. } => {
                self.flush(tx, *sid, per)?
            }
            _ => {}
        }
        Ok(false)
    }

    /// Applies the held deletes of `sid`.
    fn flush(
        &mut self,
        tx: &rusqlite::Transaction,
        sid: Sid,
        per: &mut HashMap<Sid, Delta>,
    ) -> rusqlite::Result<()> {
        let Some((mut seqs, _)) = self.pending.remove(&sid) else {
            return Ok(());
        };
        seqs.sort_unstable();
        seqs.dedup();
        let mut i = 0;
        while i < seqs.len() {
            let lo = seqs[i];
            let mut hi = lo;
            i += 1;
            while i < seqs.len() && seqs[i] == hi + 1 {
                hi += 1;
                i += 1;
            }
            delete_range(tx, sid, lo, hi, per)?;
        }
        Ok(())
    }

    /// Applies every held delete.
    fn flush_all(
        &mut self,
        tx: &rusqlite::Transaction,
        per: &mut HashMap<Sid, Delta>,
    ) -> rusqlite::Result<()> {
        let sids: Vec<Sid> = self.pending.keys().copied().collect();
        for sid in sids {
            self.flush(tx, sid, per)?;
        }
        Ok(())
    }
}

/// Applies ops in one transaction, `now` on the store time line. Any error rolls
/// everything back.
fn apply<'a>(
    conn: &mut Connection,
    ops: impl Iterator<Item = &'a Op>,
    now: i64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut per: HashMap<Sid, Delta> = HashMap::new();
    for op in ops {
        apply_op(&tx, op, &mut per, now)?;
    }
    apply_deltas(&tx, &per)?;
    tx.commit()
}

/// One op inside a transaction; queue counter changes go to `per`.
fn apply_op(
    tx: &rusqlite::Transaction,
    op: &Op,
    per: &mut HashMap<Sid, Delta>,
    now: i64,
) -> rusqlite::Result<()> {
    {
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
            Op::MarkOnline { sid } => {
                tx.prepare_cached("UPDATE session SET disconnected_at = NULL WHERE sid = ?1")?
                    .execute([*sid as i64])?;
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
            Op::SetOwner { sid, owner } => {
                tx.prepare_cached("UPDATE session SET owner = ?2 WHERE sid = ?1")?
                    .execute(params![*sid as i64, &**owner])?;
            }
            Op::DeleteSession { sid } => {
                let s = *sid as i64;
                tx.prepare_cached("DELETE FROM session WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM subscription WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM incoming_qos2 WHERE sid = ?1")?
                    .execute([s])?;
                tx.prepare_cached("DELETE FROM queue WHERE id BETWEEN ?1 AND ?2")?
                    .execute(params![queue_range(*sid).0, queue_range(*sid).1])?;
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
            Op::Delete { sid, seq } => delete_range(tx, *sid, *seq, *seq, per)?,
            Op::Drop { sid, seq } => {
                let before = per.get(sid).map_or(0, |d| d.queued);
                delete_range(tx, *sid, *seq, *seq, per)?;
                let d = per.entry(*sid).or_default();
                d.dropped += before - d.queued;
            }
            Op::DeleteOldest {
                sid,
                from_seq,
                count,
                ..
            } => {
                let mut st = tx.prepare_cached(
                    "DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE id BETWEEN ?1 AND ?2
                     AND state = 0 ORDER BY id LIMIT ?3) RETURNING size",
                )?;
                let mut rows = st.query(params![
                    queue_id(*sid, *from_seq),
                    queue_range(*sid).1,
                    *count
                ])?;
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
            Op::Count { name, add } => bump(tx, name, *add)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::{Command, Op, Store, StoreEvent, StoreOptions};
    use super::*;

    fn open(
        dir: &std::path::Path,
        max_bytes: u64,
    ) -> (Store, tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) {
        let opts = StoreOptions {
            max_bytes,
            ..StoreOptions::for_test(dir)
        };
        let (store, _, rx) = Store::open(&opts).expect("open store");
        (store, rx)
    }

    fn enqueue(sid: Sid, seq: u64, len: usize) -> Op {
        Op::Enqueue {
            sid,
            seq,
            packet_id: None,
            expires_at: None,
            size: len as u32,
            packet: Bytes::from(vec![7u8; len]),
        }
    }

    fn session(sid: Sid) -> Op {
        Op::UpsertSession {
            sid,
            client_id: Arc::from("c"),
            protocol: 4,
            expiry: 60,
            will: None,
        }
    }

    fn read(sid: Sid) -> Command {
        Command::ReadQueue {
            sid,
            from_seq: 0,
            limit: 100,
            next_seq_at_request: 0,
            sent: false,
        }
    }

    /// Events in submission order; a read sees exactly the batches submitted before it.
    fn expect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) -> Vec<String> {
        expect_n(rx, 3)
    }

    fn expect_n(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>,
        n: usize,
    ) -> Vec<String> {
        (0..n)
            .map(|_| match rx.blocking_recv().expect("event") {
                StoreEvent::Committed { token, ok } => format!("commit {token} {ok}"),
                StoreEvent::QueueRows { rows, .. } => {
                    format!("rows {:?}", rows.iter().map(|r| r.seq).collect::<Vec<_>>())
                }
                StoreEvent::Removed { .. } => "removed".into(),
            })
            .collect()
    }

    #[test]
    fn rows_inserted_and_deleted_in_one_group_are_not_written() {
        let del = |sid, seq| Op::Delete { sid, seq };
        let batch = |ops| Item::Batch(0, ops);
        let read = |sid| Item::Read {
            sid,
            from_seq: 0,
            limit: 1,
            next_seq_at_request: 0,
            sent: false,
        };
        let group = vec![
            batch(vec![enqueue(1, 0, 5), enqueue(1, 1, 5), enqueue(2, 0, 5)]),
            batch(vec![del(1, 0), del(2, 0), del(3, 0)]),
            read(2),
            batch(vec![
                enqueue(4, 0, 5),
                Op::DeleteOldest {
                    sid: 4,
                    from_seq: 0,
                    count: 1,
                    refusable: false,
                },
            ]),
            batch(vec![del(4, 0)]),
            batch(vec![Op::Enqueue {
                sid: 5,
                seq: 0,
                packet_id: Some(9),
                expires_at: None,
                size: 5,
                packet: Bytes::from_static(b"12345"),
            }]),
            read(5),
            batch(vec![del(5, 0)]),
        ];
        // Session 2 is read and session 4 trimmed in the group: their unsent rows are left
        // alone. Session 5's row was inserted as sent: no read can see it. Row (3, 0) was
        // inserted by an earlier group: deleted for real.
        assert_eq!(transient_rows(&group), HashSet::from([(1, 0), (5, 0)]));

        let dir = tempfile::tempdir().unwrap();
        let (store, mut rx) = open(dir.path(), 0);
        let session = session(1);
        store
            .send(Command::Batch {
                token: 1,
                ops: vec![
                    session,
                    enqueue(1, 0, 10),
                    Op::MarkSent {
                        sid: 1,
                        seq: 0,
                        packet_id: 1,
                    },
                    enqueue(1, 1, 10),
                    del(1, 0),
                ],
            })
            .unwrap();
        assert_eq!(expect_one(&mut rx), "commit 1 true");
        let db = Connection::open(dir.path().join("holdfast.db")).unwrap();
        let rows: Vec<i64> = db
            .prepare("SELECT id FROM queue")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![queue_id(1, 1)]);
        let (queued, bytes): (i64, i64) = db
            .query_row(
                "SELECT queued, queued_bytes FROM session WHERE sid = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((queued, bytes), (1, 10), "counters match the rows");
    }

    #[test]
    fn held_back_deletes_are_applied_as_ranges_before_anything_that_could_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut rx) = open(dir.path(), 0);
        let mut ops = vec![session(1)];
        ops.extend((0..10).map(|seq| enqueue(1, seq, 10)));
        store.send(Command::Batch { token: 1, ops }).unwrap();
        assert_eq!(expect_one(&mut rx), "commit 1 true");
        let del = |seq| Op::Delete { sid: 1, seq };
        // 0 and 3..=5 and 9 are deleted (two runs and a single row, out of order); the
        // oldest unsent row is then 1, which the trim must drop (not 0, already deleted);
        // row 2 is deleted and then enqueued again, so it must exist at the end.
        let ops = vec![
            del(5),
            del(3),
            del(0),
            del(4),
            del(9),
            del(42),
            Op::DeleteOldest {
                sid: 1,
                from_seq: 0,
                count: 1,
                refusable: false,
            },
            del(2),
            enqueue(1, 2, 20),
            del(7),
        ];
        store.send(Command::Batch { token: 2, ops }).unwrap();
        assert_eq!(expect_one(&mut rx), "commit 2 true");
        store.send(read(1)).unwrap();
        match rx.blocking_recv().expect("rows") {
            StoreEvent::QueueRows { rows, .. } => {
                let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
                assert_eq!(seqs, vec![2, 6, 8]);
            }
            _ => panic!("expected queue rows"),
        }
        let db = Connection::open(dir.path().join("holdfast.db")).unwrap();
        let counters: (i64, i64, i64) = db
            .query_row(
                "SELECT queued, queued_bytes, dropped FROM session WHERE sid = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(counters, (3, 40, 1), "counters match the rows");
    }

    #[test]
    fn read_in_a_group_sees_earlier_batches_only_and_is_reported_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut rx) = open(dir.path(), 0);
        let session = session(1);
        store
            .send(Command::Batch {
                token: 1,
                ops: vec![session, enqueue(1, 0, 10), enqueue(1, 1, 10)],
            })
            .unwrap();
        store.send(read(1)).unwrap();
        store
            .send(Command::Batch {
                token: 2,
                ops: vec![enqueue(1, 2, 10)],
            })
            .unwrap();
        assert_eq!(
            expect(&mut rx),
            ["commit 1 true", "rows [0, 1]", "commit 2 true"]
        );
    }

    #[test]
    fn one_oversized_message_does_not_fail_the_rest_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            max_bytes: 64 * 1024,
            ..StoreOptions::for_test(dir.path())
        };
        let (conn, rec) = super::super::load::open_and_load(&opts).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = Writer::new(conn, opts, tx, rec.clock);
        let mut group = vec![
            Item::Batch(1, vec![session(1), enqueue(1, 0, 10)]),
            Item::Batch(2, vec![enqueue(1, 1, 200 * 1024)]),
            Item::Read {
                sid: 1,
                from_seq: 0,
                limit: 10,
                next_seq_at_request: 3,
                sent: false,
            },
            Item::Batch(3, vec![enqueue(1, 2, 10)]),
        ];
        w.commit_group(&mut group);
        let got = expect_n(&mut rx, 4);
        assert_eq!(
            got,
            vec![
                "commit 1 true",
                "commit 2 false",
                "rows [0]",
                "commit 3 true"
            ],
            "only the message that cannot fit is refused, in order"
        );
    }

    #[test]
    fn a_refused_resume_still_clears_the_disconnect_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut rx) = open(dir.path(), 64 * 1024);
        let offline = Op::SessionOffline {
            sid: 1,
            at_ms: 1_000,
            expiry: 60,
            will: None,
        };
        store
            .send(Command::Batch {
                token: 1,
                ops: vec![session(1), offline],
            })
            .unwrap();
        assert_eq!(expect_one(&mut rx), "commit 1 true");
        // The resume carries a will too large for the budget: refused, but the session is
        // online, and its row must not keep the old disconnect time.
        let resume = Op::UpsertSession {
            sid: 1,
            client_id: Arc::from("c"),
            protocol: 5,
            expiry: 60,
            will: Some(super::super::StoredWill {
                packet: Bytes::from(vec![1u8; 200 * 1024]),
                delay: 0,
            }),
        };
        store
            .send(Command::Batch {
                token: 2,
                ops: vec![Op::MarkOnline { sid: 1 }, resume],
            })
            .unwrap();
        assert_eq!(expect_one(&mut rx), "commit 2 false");
        let db = Connection::open(dir.path().join("holdfast.db")).unwrap();
        let at: Option<i64> = db
            .query_row(
                "SELECT disconnected_at FROM session WHERE sid = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(at, None);
    }

    #[test]
    fn rows_with_overflow_pages_can_be_marked_sent_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut rx) = open(dir.path(), 64 * 1024);
        store
            .send(Command::Batch {
                token: 1,
                ops: vec![session(1), enqueue(1, 0, 6000)],
            })
            .unwrap();
        assert_eq!(expect_one(&mut rx), "commit 1 true");
        let mut token = 2;
        loop {
            store
                .send(Command::Batch {
                    token,
                    ops: vec![enqueue(1, token, 6000)],
                })
                .unwrap();
            let got = expect_one(&mut rx);
            if got.ends_with("false") {
                break;
            }
            token += 1;
            assert!(token < 100, "the budget never filled");
        }
        token += 1;
        for seq in 0..3 {
            store
                .send(Command::Batch {
                    token,
                    ops: vec![Op::MarkSent {
                        sid: 1,
                        seq,
                        packet_id: seq as u16 + 1,
                    }],
                })
                .unwrap();
            assert_eq!(expect_one(&mut rx), format!("commit {token} true"));
            token += 1;
        }
    }

    #[test]
    fn a_read_in_a_failed_group_never_returns_refused_rows() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB budget: the 200 KiB message of token 2 cannot be stored.
        let (store, mut rx) = open(dir.path(), 64 * 1024);
        store
            .send(Command::Batch {
                token: 1,
                ops: vec![enqueue(1, 0, 10)],
            })
            .unwrap();
        assert_eq!(expect_one(&mut rx), "commit 1 true", "a small message fits");
        store
            .send(Command::Batch {
                token: 2,
                ops: vec![enqueue(1, 1, 200 * 1024), Op::Delete { sid: 1, seq: 0 }],
            })
            .unwrap();
        store.send(read(1)).unwrap();
        store
            .send(Command::Batch {
                token: 3,
                ops: vec![enqueue(1, 2, 10)],
            })
            .unwrap();
        let got = expect(&mut rx);
        assert_eq!(got[0], "commit 2 false");
        // The refused row 1 is never returned; the delete (a release op) was kept.
        assert_eq!(got[1], "rows []");
        assert!(got[2].starts_with("commit 3"), "{got:?}");
    }

    fn expect_one(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) -> String {
        match rx.blocking_recv().expect("event") {
            StoreEvent::Committed { token, ok } => format!("commit {token} {ok}"),
            other => format!("{other:?}"),
        }
    }
}
