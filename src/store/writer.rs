//! The writer thread: the only connection that writes. Group commit: it takes every command
//! that has arrived, applies all consecutive batches in one transaction, commits, then
//! reports each token. A queue read-back runs inside the group's transaction, after the
//! batches submitted before it (so it sees their writes), and its answer is reported only
//! after the commit, in submission order; maintenance (expiry sweep, staging-log merge,
//! checkpoint) runs between groups. The writer owns the index of the staging log
//! (`super::staging`) and merges the log into `queue`, a chunk per transaction: when it is
//! long and when idle (answering the commands that arrive between two chunks), and at a
//! clean stop.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use super::apply::{apply, apply_group, bump, oldest_unsent, read_rows, Item};
use super::counts::{Counts, Delta};
use super::metrics::StoreState;
use super::staging::Staging;
use crate::clock::Clock;

use super::{queue_id, BudgetPolicy, Command, Op, QueueRow, Sid, StoreEvent, StoreOptions};

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
/// Bytes ops that only release data may take above the disk budget (see `apply_release`):
/// 256 pages of 4 KiB, the same reserve whatever the page size.
const RELEASE_RESERVE_BYTES: i64 = 1024 * 1024;
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
    /// Per-session queue counters, exact after every commit; written to the `session`
    /// rows only at a clean stop (`super::counts`).
    counts: Counts,
    /// Which queue rows are in the staging log (`super::staging`).
    staging: Staging,
    /// How long without work before the idle merge and checkpoint ([`IDLE_CHECKPOINT`]).
    idle: Duration,
}

impl Writer {
    pub fn new(
        conn: Connection,
        opts: StoreOptions,
        events: UnboundedSender<StoreEvent>,
        clock: Clock,
        counts: Counts,
    ) -> Self {
        let mut budget =
            super::budget::Budget::new(&opts.path, opts.max_bytes, opts.min_free_percent);
        budget.apply(&conn, true);
        let staging = Staging::load(&conn).unwrap_or_else(|e| {
            warn!(cause = %e, "could not read the staging log: read again before the first commit");
            let mut s = Staging::default();
            s.invalidate();
            s
        });
        Writer {
            staging,
            budget,
            conn,
            opts,
            events,
            retry: Vec::new(),
            retry_tokens: Vec::new(),
            failing: None,
            metrics: Default::default(),
            clock,
            counts,
            idle: IDLE_CHECKPOINT,
        }
    }

    /// Test setting: the idle merge and checkpoint after `idle` without work.
    #[cfg(test)]
    pub fn idle_after(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The writer's commit statistics (shared with whoever reads them).
    pub fn metrics(&self) -> std::sync::Arc<super::metrics::StoreMetrics> {
        self.metrics.clone()
    }

    pub fn run(mut self, rx: Receiver<Command>) {
        let mut last_work = Instant::now();
        let mut checkpointed = true;
        // The idle merge of this idle period has been started (it runs chunk by chunk
        // below, like a full log's, then the checkpoint follows).
        let mut idle_merged = false;
        // Why the merge under way started (for the log).
        let mut merging = "log full";
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
            } else if self.staging.merging() {
                // A merge is under way: commit what arrived, else merge the next chunk.
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        self.merge(merging, false);
                        continue;
                    }
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                }
            } else if checkpointed {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(self.idle.saturating_sub(last_work.elapsed())) {
                    Ok(c) => c,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        // Merge first (chunk by chunk, in the branch above), then come
                        // back here to checkpoint; a merge that fails is not retried
                        // before the next idle period.
                        if !idle_merged && self.staging.start_merge() {
                            idle_merged = true;
                            merging = "idle";
                            continue;
                        }
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
                self.merge("clean stop", true);
                self.write_anchor();
                if let Err(e) = self.counts.write(&mut self.conn) {
                    warn!(cause = %e, "could not record the queue counters: they are counted again at the next start");
                }
                self.checkpoint();
                let _ = done.send(());
                info!("store closed");
                return;
            }
            if self.staging.wants_merge() {
                if !self.staging.merging() {
                    merging = "log full";
                }
                self.merge(merging, false);
            }
            if work {
                last_work = Instant::now();
                checkpointed = false;
                idle_merged = false;
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
                let rows = self.read_rows(sid, from_seq, limit, sent);
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
            Command::Checkpoint => {
                self.merge("checkpoint", true);
                self.checkpoint()
            }
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

    /// Moves the staging log into `queue` (`super::staging`), a chunk per transaction: the
    /// next chunk of the merge under way (`run` commits the groups that arrive between two
    /// chunks), or with `whole` every chunk, one after the other (a clean stop,
    /// `Checkpoint`). A failure (the disk budget, an I/O error) leaves the rows staged,
    /// merged at the next occasion.
    fn merge(&mut self, why: &'static str, whole: bool) {
        let started = Instant::now();
        let moved = if whole {
            self.staging.merge_all(&mut self.conn)
        } else {
            self.staging.merge_step(&mut self.conn)
        };
        match moved {
            Ok(0) => {}
            Ok(rows) => debug!(
                rows,
                why,
                whole,
                left = self.staging.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "staging log merged into the queue"
            ),
            Err(e) => {
                warn!(cause = %e, why, rows = self.staging.len(), "merging the staging log failed: the rows stay staged")
            }
        }
    }

    /// A queue read-back from outside a group's transaction.
    fn read_rows(
        &mut self,
        sid: Sid,
        from_seq: u64,
        limit: u32,
        sent: bool,
    ) -> rusqlite::Result<Vec<QueueRow>> {
        self.staging.ensure(&self.conn)?;
        read_rows(&self.conn, &self.staging, sid, from_seq, limit, sent)
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
            match apply_group(
                &mut self.conn,
                &mut self.staging,
                &self.retry,
                group,
                self.clock.now_ms(),
            ) {
                Ok((reads, per)) => {
                    self.counts.absorb(per);
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
                    let mut ok = !stuck && self.apply(&ops).is_ok();
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
                    let rows = self.read_rows(sid, from_seq, limit, sent);
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
        match self.apply(ops) {
            Err(e) if StoreState::of(&e) == StoreState::Full => {
                let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                let reserve = RELEASE_RESERVE_BYTES / page.max(512);
                self.conn
                    .pragma_update(None, "max_page_count", pages + reserve)?;
                let result = self.apply(ops);
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

    /// [`apply`] with the writer's clock, counting what it committed.
    fn apply(&mut self, ops: &[Op]) -> rusqlite::Result<()> {
        let per = apply(
            &mut self.conn,
            &mut self.staging,
            ops.iter(),
            self.clock.now_ms(),
        )?;
        self.counts.absorb(per);
        Ok(())
    }

    /// Disk budget reached under drop-oldest: deletes the oldest unsent messages of the
    /// session with the longest queue that has any (rows in flight, or being sent by the
    /// group that failed, are not dropped). Returns false if there was nothing to drop.
    fn make_room(&mut self, sending: &HashSet<(Sid, u64)>) -> bool {
        let sids = self.counts.longest_first();
        if let Err(e) = self.staging.ensure(&self.conn) {
            warn!(cause = %e, "could not make room under the disk budget");
            return false;
        }
        let staging = &mut self.staging;
        let result = (|| -> rusqlite::Result<Vec<(Sid, u64, u32)>> {
            let tx = self.conn.transaction()?;
            let mut removed = Vec::new();
            let mut sid = 0;
            for s in sids {
                sid = s;
                let skip = sending.iter().filter(|(x, _)| *x == sid).count() as i64;
                let candidates =
                    oldest_unsent(&tx, staging, sid, 0, (BUDGET_DROP_ROWS + skip) as u32)?;
                let mut del = tx.prepare_cached("DELETE FROM queue WHERE id = ?1")?;
                for (seq, size) in candidates {
                    if sending.contains(&(sid, seq)) || removed.len() as i64 >= BUDGET_DROP_ROWS {
                        continue;
                    }
                    let id = queue_id(sid, seq);
                    if staging.delete_one(&tx, id)?.is_none() {
                        del.execute([id])?;
                    }
                    removed.push((sid, seq, size));
                }
                if !removed.is_empty() {
                    break;
                }
            }
            if removed.is_empty() {
                return Ok(removed);
            }
            let n = removed.len() as i64;
            tx.execute(
                "UPDATE session SET dropped = dropped + ?2 WHERE sid = ?1",
                params![sid as i64, n],
            )?;
            bump(&tx, "dropped_disk_budget", n)?;
            tx.commit()?;
            Ok(removed)
        })();
        match result {
            Ok(rows) if !rows.is_empty() => {
                self.counts.absorb(removed_deltas(&rows));
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
                self.staging.invalidate();
                warn!(cause = %e, "could not make room under the disk budget");
                false
            }
        }
    }

    fn sweep(&mut self, now_ms: i64) -> rusqlite::Result<Vec<(Sid, u64, u32)>> {
        self.staging.ensure(&self.conn)?;
        let result = self.sweep_in(now_ms);
        if result.is_err() {
            self.staging.invalidate();
        }
        result
    }

    fn sweep_in(&mut self, now_ms: i64) -> rusqlite::Result<Vec<(Sid, u64, u32)>> {
        let tx = self.conn.transaction()?;
        let mut removed = self.staging.sweep(&tx, now_ms)?;
        {
            let mut st = tx.prepare_cached(
                "DELETE FROM queue WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND state = 0
                 RETURNING id, size",
            )?;
            let mut rows = st.query(params![now_ms])?;
            while let Some(r) = rows.next()? {
                let (sid, seq) = super::split_queue_id(r.get(0)?);
                removed.push((sid, seq, r.get::<_, i64>(1)? as u32));
            }
        }
        bump(&tx, "expired", removed.len() as i64)?;
        tx.execute(
            "DELETE FROM retained WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            params![now_ms],
        )?;
        // The next start continues the time line from here (a crash loses at most one
        // sweep interval of it, and only when the wall clock stepped in that interval).
        super::anchor::write(&tx, &self.clock.anchor())?;
        tx.commit()?;
        self.counts.absorb(removed_deltas(&removed));
        Ok(removed)
    }
}

/// The counter changes of rows removed by the store itself (expiry sweep, disk budget).
fn removed_deltas(rows: &[(Sid, u64, u32)]) -> HashMap<Sid, Delta> {
    let mut per: HashMap<Sid, Delta> = HashMap::new();
    for (sid, _, size) in rows {
        let d = per.entry(*sid).or_default();
        d.queued -= 1;
        d.bytes -= i64::from(*size);
    }
    per
}

/// The ops a command carries (0 for anything but a batch).
fn ops_in(cmd: &Command) -> usize {
    match cmd {
        Command::Batch { ops, .. } => ops.len(),
        _ => 0,
    }
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
