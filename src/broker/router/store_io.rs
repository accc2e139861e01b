//! The router's side of the store: submitting collected ops as tokens, commands that
//! must follow them, and what the writer reports back (commits, queue read-backs,
//! removals), including releasing held output and backpressure gates.

use super::*;

/// Longest time bridge outbox bookkeeping waits for a commit to ride along with.
const LAZY_SUBMIT: Duration = Duration::from_millis(20);
/// Most such ops held back at once.
const LAZY_MAX_OPS: usize = 4096;

impl Router {
    /// Like [`Router::submit`], unless the collected ops are only bridge outbox
    /// bookkeeping that no acknowledgement waits for: rows the upstream acknowledged
    /// (deletes) and QoS 1 rows marked as sent. Those ride along with the next commit that
    /// something waits for, or go within `LAZY_SUBMIT` (one fsync less per acknowledgement
    /// burst). Nothing accepted depends on them: after a crash in between, such a message is
    /// sent upstream once more, as a QoS 1 duplicate.
    pub(super) fn submit_unless_lazy(&mut self) {
        let lazy = !self.ops.is_empty()
            && self.ops.len() < LAZY_MAX_OPS
            && self.cur.sids.is_empty()
            && self.cur.enqueued.is_empty()
            && self.ops.iter().all(|op| match op {
                Op::Delete { sid, .. } | Op::MarkSent { sid, .. } => {
                    self.sessions.get(sid).is_some_and(|s| s.internal)
                }
                _ => false,
            });
        if !lazy {
            self.submit();
        } else if self.lazy_until.is_none() {
            self.lazy_until = Some(Instant::now() + LAZY_SUBMIT);
        }
    }

    /// Sends the collected ops to the writer as one token.
    pub(super) fn submit(&mut self) {
        self.lazy_until = None;
        if self.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.ops);
        let token = self.next_token;
        self.next_token += 1;
        self.event_ops_start = 0;
        self.pending.insert(token, std::mem::take(&mut self.cur));
        let sent = self
            .store
            .as_ref()
            .map(|s| s.send(Command::Batch { token, ops }).is_ok())
            .unwrap_or(false);
        if !sent {
            error!("store writer is gone: durable operations fail");
            self.on_committed(token, false);
        }
    }

    pub(super) fn store_command(&mut self, cmd: Command) {
        // Commands must see every op collected so far.
        self.submit();
        if let Some(s) = &self.store {
            if s.send(cmd).is_err() {
                error!("store writer is gone");
            }
        }
    }

    pub(super) fn on_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Committed { token, ok } => self.on_committed(token, ok),
            StoreEvent::QueueRows {
                sid,
                rows,
                from_seq,
                limit,
                next_seq_at_request,
            } => self.on_queue_rows(sid, rows, from_seq, limit, next_seq_at_request),
            StoreEvent::Removed { rows, why } => {
                for (sid, seq, size) in rows {
                    if why == "disk budget" {
                        self.stats.dropped_disk_budget += 1;
                    } else {
                        self.stats.expired += 1;
                    }
                    let Some(s) = self.sessions.get_mut(&sid) else {
                        continue;
                    };
                    if let Some(i) = s.queue.iter().position(|q| q.seq == seq) {
                        s.queue.remove(i);
                    }
                    s.forget_queued(u64::from(size));
                    if why == "disk budget" {
                        s.dropped += 1;
                    }
                }
            }
        }
    }

    pub(super) fn on_committed(&mut self, token: u64, ok: bool) {
        self.completed = self.completed.max(token);
        while let Some(&(t, key)) = self.early_order.front() {
            if t > self.completed {
                break;
            }
            self.early_order.pop_front();
            if self.early.get(&key).is_some_and(|e| e.2 == t) {
                self.early.remove(&key);
            }
        }
        if !ok {
            self.failed.insert(token);
        }
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        if !ok {
            self.stats.refused_store_failure += 1;
            for (sid, seq, size) in p.enqueued {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if let Some(i) = s.queue.iter().position(|q| q.seq == seq) {
                        if let Some(q) = s.queue.remove(i) {
                            s.forget_queued(q.message.publish.payload.len() as u64);
                        }
                    } else if s.spilled_from.is_some() {
                        s.forget_queued(size);
                    }
                }
            }
        }
        let mut sids = p.sids;
        sids.sort_unstable();
        sids.dedup();
        for sid in sids {
            if let Some(s) = self.sessions.get_mut(&sid) {
                flush_held(s, self.completed, &self.failed, &mut self.stats);
            }
        }
    }

    /// Releases the acknowledgements of publishers that waited for `sid`'s queue.
    pub(super) fn ungate_waiters(&mut self, sid: SessionId) {
        let waiters = match self.sessions.get_mut(&sid) {
            Some(s) if !s.gated.is_empty() => std::mem::take(&mut s.gated),
            _ => return,
        };
        for p in waiters {
            if let Some(s) = self.sessions.get_mut(&p) {
                for (t, _) in s.held.iter_mut() {
                    *t &= !GATE_BIT;
                }
                flush_held(s, self.completed, &self.failed, &mut self.stats);
            }
        }
    }

    pub(super) fn on_queue_rows(
        &mut self,
        sid: SessionId,
        rows: Vec<QueueRow>,
        from_seq: u64,
        limit: u32,
        next_seq_at_request: u64,
    ) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        debug!(client_id = %s.client_id, rows = rows.len(), from_seq, "queue read back from disk");
        s.reading = false;
        if !s.is_online() {
            return; // read again when the client is back
        }
        let now = Instant::now();
        let full = rows.len() as u32 >= limit;
        let mut last = None;
        for row in rows {
            last = Some(row.seq);
            match row_message(&row) {
                Some(m) if !m.is_expired(now) => s.push_read_back(Queued {
                    seq: row.seq,
                    message: m,
                }),
                _ => {
                    self.stats.expired += 1;
                    s.forget_queued(row.packet.len() as u64);
                    self.ops.push(Op::Delete { sid, seq: row.seq });
                }
            }
        }
        s.spilled_from = if !full && s.next_seq == next_seq_at_request {
            None
        } else {
            Some(last.map(|l| l + 1).unwrap_or(from_seq).max(from_seq))
        };
        self.pump(sid);
    }

    pub(super) fn sweep(&mut self) {
        let now = Instant::now();
        let before = self.retained.len();
        self.retained
            .retain(|_, r| r.expires_at.is_none_or(|t| t > now));
        self.stats.expired += (before - self.retained.len()) as u64;
        self.store_command(Command::SweepExpired { now_ms: unix_ms() });
    }
}
