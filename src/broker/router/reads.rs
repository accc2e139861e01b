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

    /// Whether `s` wants (more of) its on-disk queue read back now.
    pub(super) fn wants_read(s: &Session) -> bool {
        s.durable
            && s.spilled_from.is_some()
            && !s.reading
            && s.is_online()
            && s.queue.len() < Router::read_limit(s) as usize
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
            let limit = Router::read_limit(s);
            // Internal sessions are not charged (`broker::readback`): nothing to reserve.
            let estimate = if s.budget().is_some() {
                let average = s.queued_bytes / s.queue_len.max(1);
                u64::from(limit) * (average + crate::broker::readback::MESSAGE_OVERHEAD + 64)
            } else {
                0
            };
            if estimate > 0 && !self.pool.fits(estimate) {
                break; // first come, first served: the rest wait behind it
            }
            self.read_wait.pop_front();
            s.read_waiting = false;
            s.reading = true;
            let (from_seq, next_seq_at_request) = (s.spilled_from.unwrap_or(0), s.next_seq);
            self.pool.reserve(estimate);
            self.read_reserved
                .entry(sid)
                .or_default()
                .push_back(estimate);
            debug!(sid, from_seq, limit, "reading queue back from disk");
            self.store_command(Command::ReadQueue {
                sid,
                from_seq,
                limit,
                next_seq_at_request,
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
