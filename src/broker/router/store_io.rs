//! The router's side of the store: submitting collected ops as tokens, commands that
//! must follow them, and what the writer reports back (commits, queue read-backs,
//! removals), including releasing held output and backpressure gates.

use super::*;

/// Longest time bridge outbox bookkeeping waits for a commit to ride along with.
const LAZY_SUBMIT: Duration = Duration::from_millis(20);
/// Wait before asking again a queue read-back that failed.
const READ_RETRY: Duration = Duration::from_secs(1);
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
        let lazy = !self.commits.ops.is_empty()
            && self.commits.ops.len() < LAZY_MAX_OPS
            && self.commits.cur.sids.is_empty()
            && self.commits.cur.enqueued.is_empty()
            && self.commits.ops.iter().all(|op| match op {
                Op::Delete { sid, .. } | Op::MarkSent { sid, .. } => {
                    self.sessions.get(sid).is_some_and(|s| s.internal)
                }
                _ => false,
            });
        if !lazy {
            self.submit();
        } else if self.commits.lazy_until.is_none() {
            self.commits.lazy_until = Some(Instant::now() + LAZY_SUBMIT);
        }
    }

    /// Sends the collected ops to the writer as one token.
    pub(super) fn submit(&mut self) {
        self.commits.lazy_until = None;
        if self.commits.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.commits.ops);
        let token = self.commits.next_token;
        self.commits.next_token += 1;
        self.commits.event_ops_start = 0;
        self.commits
            .pending
            .insert(token, std::mem::take(&mut self.commits.cur));
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
                failed,
                sent,
            } => {
                if failed {
                    self.on_read_failed(sid);
                } else if sent {
                    self.read_answered(sid);
                    self.on_inflight_rows(sid, rows);
                } else {
                    self.on_queue_rows(sid, rows, from_seq, limit, next_seq_at_request)
                }
            }
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
                    // Subtracted only if still counted: a row read back before the removal
                    // was accounted for when it was taken or dropped.
                    s.forget_row(seq, u64::from(size));
                    if why == "disk budget" {
                        s.dropped += 1;
                    }
                }
            }
        }
    }

    pub(super) fn on_committed(&mut self, token: u64, ok: bool) {
        self.commits.completed = self.commits.completed.max(token);
        self.ids.committed(self.commits.completed);
        while let Some(&(t, key)) = self.commits.early_order.front() {
            if t > self.commits.completed {
                break;
            }
            self.commits.early_order.pop_front();
            if self.commits.early.get(&key).is_some_and(|e| e.2 == t) {
                self.commits.early.remove(&key);
            }
        }
        let Some(p) = self.commits.pending.remove(&token) else {
            return;
        };
        if !ok {
            self.stats.refused_store_failure += 1;
            for (sid, packet_id) in p.qos2 {
                // Refused, so not received: a resend is a new message.
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if s.incoming_qos2.get(&packet_id) == Some(&token) {
                        s.incoming_qos2.remove(&packet_id);
                    }
                }
            }
            let mut pump = Vec::new();
            for (sid, seq, size) in p.enqueued {
                let Some(s) = self.sessions.get_mut(&sid) else {
                    continue;
                };
                if s.forget_row(seq, size) != RowPlace::InFlight {
                    continue;
                }
                // Taken into the window before its row was refused: it was not accepted
                // (its publisher hears 0x97 or no acknowledgement), so it is not sent.
                if let Some(i) = s.inflight.iter().position(|m| m.seq == seq) {
                    if let Some(m) = s.inflight.remove(i) {
                        s.held.retain(|(_, item)| {
                            !matches!(item, Held::Deliver { packet_id, .. } if *packet_id == m.packet_id)
                        });
                    }
                    pump.push(sid);
                }
            }
            for undo in p.drops {
                self.undo_drop(undo, &mut pump);
            }
            for (sid, filter, before) in p.subs.into_iter().rev() {
                let Some(s) = self.sessions.get_mut(&sid) else {
                    continue;
                };
                let (inner, group) = super::super::session::split_share(&filter);
                match before {
                    Some(data) => {
                        self.tree
                            .subscribe(&inner, group.as_deref(), sid, data.clone());
                        s.subscriptions.insert(filter, data);
                    }
                    None => {
                        self.tree.unsubscribe(&inner, group.as_deref(), sid);
                        s.subscriptions.remove(&filter);
                    }
                }
            }
            for sid in pump {
                self.pump(sid);
            }
        }
        let mut sids = p.sids;
        sids.sort_unstable();
        sids.dedup();
        if !ok {
            for sid in &sids {
                if let Some(s) = self.sessions.get_mut(sid) {
                    for (t, _) in s.held.iter_mut() {
                        if *t & !(GATE_BIT | FAILED_BIT) == token {
                            *t |= FAILED_BIT;
                        }
                    }
                }
            }
        }
        for sid in sids {
            if let Some(s) = self.sessions.get_mut(&sid) {
                flush_held(s, self.commits.completed, &mut self.stats);
            }
        }
    }

    /// Takes back a queue-limit drop whose token failed: the message it made room for was
    /// refused, and the store kept the dropped one.
    fn undo_drop(&mut self, undo: DropUndo, pump: &mut Vec<SessionId>) {
        let (sid, bytes) = match &undo {
            DropUndo::Popped(sid, q) => (*sid, q.message.publish.payload.len() as u64),
            DropUndo::Oldest(sid, b) | DropUndo::Pending(sid, b) => (*sid, *b),
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        match undo {
            DropUndo::Popped(_, q) => {
                if s.is_online() && s.spilled_from().is_none_or(|f| q.seq < f) {
                    let at = s.queue.iter().position(|x| x.seq > q.seq);
                    s.queue_mem_bytes += q.message.publish.payload.len() as u64;
                    let at = at.unwrap_or(s.queue.len());
                    s.queue.insert(at, *q);
                } else {
                    // Its row is on disk, unsent: read back from it.
                    s.spill_all();
                    s.set_spilled_from(Some(s.spilled_from().map_or(q.seq, |f| f.min(q.seq))));
                }
                pump.push(sid);
            }
            DropUndo::Oldest(..) => {}
            DropUndo::Pending(..) => {
                if s.drops_pending == 0 {
                    return; // deleted already, with the read-back it waited for
                }
                s.drops_pending -= 1;
                s.drops_pending_bytes = s.drops_pending_bytes.saturating_sub(bytes);
            }
        }
        s.queue_len += 1;
        s.queued_bytes += bytes;
        s.dropped = s.dropped.saturating_sub(1);
        self.stats.dropped_queue_full = self.stats.dropped_queue_full.saturating_sub(1);
    }

    /// Releases the acknowledgements of publishers that waited for `sid`'s queue.
    pub(super) fn ungate_waiters(&mut self, sid: SessionId) {
        let waiters = match self.sessions.get_mut(&sid) {
            Some(s) if !s.gated.is_empty() => s.gated.take(),
            _ => return,
        };
        for p in waiters {
            if let Some(s) = self.sessions.get_mut(&p) {
                for (t, _) in s.held.iter_mut() {
                    *t &= !GATE_BIT;
                }
                flush_held(s, self.commits.completed, &mut self.stats);
            }
        }
    }

    /// A read-back failed (the writer logged why): nothing is known about the rows, so the
    /// read position stays and the read is asked again in a second.
    fn on_read_failed(&mut self, sid: SessionId) {
        self.read_answered(sid);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.reading = false;
        s.read_stale = false;
        if !self.read_retry.contains(&sid) {
            self.read_retry.push(sid);
        }
        self.read_retry_at
            .get_or_insert_with(|| Instant::now() + READ_RETRY);
    }

    /// Asks again the read-backs that failed.
    pub(super) fn retry_reads(&mut self) {
        self.read_retry_at = None;
        for sid in std::mem::take(&mut self.read_retry) {
            self.pump(sid);
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
        // The reservation goes back; the rows taken are charged one by one instead.
        self.read_answered(sid);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        debug!(client_id = %s.client_id, rows = rows.len(), from_seq, "queue read back from disk");
        s.reading = false;
        let stale = std::mem::take(&mut s.read_stale);
        if stale || !s.is_online() {
            // Asked for a position that has moved back since, or for a client that left:
            // read again (when it is back). Drops waiting for these rows go by position.
            if s.drops_pending > 0 {
                // A release op from here on: the tokens that made these drops are past.
                self.commits.ops.push(Op::DeleteOldest {
                    sid,
                    from_seq: s.spilled_from().unwrap_or(from_seq),
                    count: std::mem::take(&mut s.drops_pending),
                    refusable: false,
                });
                s.drops_pending_bytes = 0;
            }
            if s.is_online() {
                self.pump(sid);
            }
            return;
        }
        let now = Instant::now();
        let full = rows.len() as u32 >= limit;
        let mut last = None;
        // The queue limit dropped the oldest messages while this answer was on its way:
        // they are its first rows. Delete them, and put the exact sizes in place of the
        // estimate subtracted then.
        let pending = s.drops_pending;
        let skip = (pending as usize).min(rows.len());
        let estimate = s.drops_pending_bytes / u64::from(pending.max(1)) * skip as u64;
        let mut exact = 0;
        for (i, row) in rows.into_iter().enumerate() {
            last = Some(row.seq);
            let message = row_message(&self.clock, &row);
            if i < skip {
                exact += message.map_or(0, |m| m.publish.payload.len() as u64);
                self.commits.ops.push(Op::Delete { sid, seq: row.seq });
                continue;
            }
            match message {
                Some(m) if !m.is_expired(now) => s.push_read_back(
                    Queued {
                        seq: row.seq,
                        message: m,
                    },
                    &self.pool,
                ),
                expired => {
                    self.stats.expired += 1;
                    let size = expired.map_or(row.packet.len(), |m| m.publish.payload.len());
                    s.forget_queued(size as u64);
                    self.commits.ops.push(Op::Delete { sid, seq: row.seq });
                }
            }
        }
        s.queued_bytes = (s.queued_bytes + estimate).saturating_sub(exact);
        s.drops_pending -= skip as u32;
        s.drops_pending_bytes = s.drops_pending_bytes.saturating_sub(estimate);
        let next = last.map(|l| l + 1).unwrap_or(from_seq).max(from_seq);
        if s.drops_pending > 0 {
            // More were dropped than this answer held: the oldest after it.
            self.commits.ops.push(Op::DeleteOldest {
                sid,
                from_seq: next,
                count: std::mem::take(&mut s.drops_pending),
                refusable: false,
            });
            s.drops_pending_bytes = 0;
        }
        s.set_spilled_from(if !full && s.next_seq == next_seq_at_request {
            None
        } else {
            Some(next)
        });
        self.pump(sid);
    }

    pub(super) fn sweep(&mut self) {
        let now = Instant::now();
        let before = self.retained.len();
        self.retained
            .retain(|_, r| r.expires_at.is_none_or(|t| t > now));
        self.stats.expired += (before - self.retained.len()) as u64;
        self.store_command(Command::SweepExpired {
            now_ms: self.clock.now_ms(),
        });
    }
}
