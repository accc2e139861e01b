//! Reading durable queues back from disk within the gateway-wide read-back budget
//! (`mqtt.read_back_budget_bytes`, see `broker::readback`).
//!
//! A session that wants more of its on-disk queue joins `read_wait`; `serve_reads` asks
//! the store for the front sessions' rows while the budget has room for them, reserving an
//! estimate of their size first. The answer gives the reservation back and charges each row
//! it brought instead (`Session::push_read_back`). Sessions are served in the order they
//! asked, each for at most one window's worth of rows at a time, so 10,000 sessions
//! reconnecting at once take turns instead of each pulling its own batch into memory.

use super::*;

impl Router {
    /// Rows one read-back of `s` asks for: a window's worth (what it can send at once),
    /// at most `READ_BATCH`.
    pub(super) fn read_limit(s: &Session) -> u32 {
        u32::from(s.params.window).clamp(1, READ_BATCH)
    }

    /// Whether `s` wants its in-flight bodies, or (more of) its on-disk queue, read back now.
    pub(super) fn wants_read(s: &Session) -> bool {
        s.durable
            && !s.reading
            && s.is_online()
            && (s.inflight_on_disk
                || (s.spilled_from().is_some() && s.queue.len() < Router::read_limit(s) as usize))
    }

    /// The first in-flight message whose body is on disk, and how many there are.
    fn inflight_read(s: &Session) -> (u64, u32) {
        let mut on_disk = s
            .inflight
            .iter()
            .filter(|m| m.state == InflightState::AwaitingAck && m.message.is_none());
        let first = on_disk.next().map_or(0, |m| m.seq);
        (first, 1 + on_disk.count() as u32)
    }

    /// Puts `sid` in line for a read-back (once).
    pub(super) fn want_read(&mut self, sid: SessionId) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            if !s.read_waiting {
                s.read_waiting = true;
                self.read_wait.push_back(sid);
            }
        }
    }

    /// Asks the read-backs at the front of the line while the budget has room for them.
    pub(super) fn serve_reads(&mut self) {
        while let Some(&sid) = self.read_wait.front() {
            let Some(s) = self.sessions.get_mut(&sid) else {
                self.read_wait.pop_front();
                continue;
            };
            if !Router::wants_read(s) {
                s.read_waiting = false;
                self.read_wait.pop_front();
                continue;
            }
            // The window first (resent before anything new), then the queue.
            let sent = s.inflight_on_disk;
            let (from_seq, mut limit) = if sent {
                Router::inflight_read(s)
            } else {
                (s.spilled_from().unwrap_or(0), Router::read_limit(s))
            };
            // Internal sessions are not charged (`broker::readback`): nothing to reserve.
            let per_row = s.budget(&self.pool).map(|_| {
                let average = s.queued_bytes / s.queue_len.max(1);
                average + crate::broker::readback::MESSAGE_OVERHEAD + 64
            });
            if let (Some(per_row), false) = (per_row, sent) {
                // A queue read asks only for the rows the budget has room for (at least one
                // when nothing is charged), so large messages cannot overshoot it by a
                // window. An in-flight read must take the whole window (a row it does not
                // bring back is taken as gone), so it waits for room instead.
                // Not a sliver either: reads of a row or two while the budget is nearly
                // used up would cost a query each and slow the whole drain down.
                let room = self.pool.limit().saturating_sub(self.pool.used()) / per_row;
                let want = u64::from(limit);
                if room < want && self.pool.used() > 0 && room < (want / 4).max(1) {
                    break; // first come, first served: the rest wait behind it
                }
                limit = want.min(room.max(1)) as u32;
            }
            let estimate = per_row.map_or(0, |r| u64::from(limit) * r);
            if estimate > 0 && !self.pool.fits(estimate) {
                break;
            }
            self.read_wait.pop_front();
            s.read_waiting = false;
            s.reading = true;
            let next_seq_at_request = s.next_seq;
            self.pool.reserve(estimate);
            self.read_reserved
                .entry(sid)
                .or_default()
                .push_back(estimate);
            debug!(sid, from_seq, limit, sent, "reading queue back from disk");
            self.store_command(Command::ReadQueue {
                sid,
                from_seq,
                limit,
                next_seq_at_request,
                sent,
            });
        }
    }

    /// A read-back of `sid` was answered (or failed): its reservation goes back. Answers of
    /// one session come in the order they were asked.
    pub(super) fn read_answered(&mut self, sid: SessionId) {
        let Some(list) = self.read_reserved.get_mut(&sid) else {
            return;
        };
        if let Some(bytes) = list.pop_front() {
            self.pool.unreserve(bytes);
        }
        if list.is_empty() {
            self.read_reserved.remove(&sid);
        }
    }
}

impl Router {
    /// The in-flight bodies of a session that came back, read from disk: the window is
    /// resent in its original order, PUBLISHes with DUP under their packet ids and PUBRELs
    /// (MQTT-4.4.0-1, 4.6.0-1); then new messages may follow.
    /// A row no longer on disk was removed by a counted policy (expiry, disk budget): its
    /// packet id is free again.
    pub(super) fn on_inflight_rows(&mut self, sid: SessionId, rows: Vec<QueueRow>) {
        let Router {
            sessions,
            clock,
            stats,
            commits: super::commits::Commits { ops, cur, .. },
            ..
        } = self;
        let Some(s) = sessions.get_mut(&sid) else {
            return;
        };
        s.reading = false;
        s.read_stale = false;
        if s.drops_pending > 0 {
            // The queue limit dropped the oldest queued messages while this read was out,
            // counting on its answer to hold them; it held in-flight rows instead. As for a
            // stale answer: a release op from here on (the tokens that made the drops are
            // past).
            ops.push(Op::DeleteOldest {
                sid,
                from_seq: s.spilled_from().unwrap_or(0),
                count: std::mem::take(&mut s.drops_pending),
                refusable: false,
            });
            s.drops_pending_bytes = 0;
        }
        if !s.is_online() {
            return; // still on disk; read again when it is back
        }
        let now = Instant::now();
        let mut rows = rows.into_iter().peekable();
        let mut i = 0;
        while i < s.inflight.len() {
            let (seq, packet_id) = (s.inflight[i].seq, s.inflight[i].packet_id);
            if s.inflight[i].state == InflightState::AwaitingComp {
                // In the original order with the resent PUBLISHes (MQTT-4.6.0-1).
                let rel = Held::packet(Packet::PubRel(PubAckLike::new(packet_id)));
                hold(s, 0, rel, cur, stats);
                i += 1;
                continue;
            }
            let message = match s.inflight[i].message.take() {
                Some(m) => Some(m),
                None => {
                    while rows.next_if(|r| r.seq < seq).is_some() {}
                    rows.next_if(|r| r.seq == seq)
                        .and_then(|r| row_message(clock, &r))
                        .map(Box::new)
                }
            };
            match message {
                Some(mut m) if !m.is_expired(now) => {
                    s.charge(&mut m, &self.pool);
                    s.inflight[i].message = Some(m);
                    let item = Held::Deliver {
                        packet_id,
                        dup: true,
                        fresh: false,
                    };
                    hold(s, 0, item, cur, stats);
                    i += 1;
                }
                Some(_) => {
                    stats.expired += 1;
                    ops.push(Op::Delete { sid, seq });
                    s.inflight.remove(i);
                }
                None => {
                    s.inflight.remove(i);
                }
            }
        }
        s.inflight_on_disk = false;
        self.pump(sid);
    }
}
