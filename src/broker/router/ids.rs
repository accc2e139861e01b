//! Session ids that never wrap (issue 12, `store::Sid`).
//!
//! A session id names the session in the router and, for a durable session, its rows in the
//! store (`queue.id = (sid << 40) | seq`). Ids are slots: a new session takes the smallest
//! free id in `1..=MAX_SID`, and an ended session's id becomes free again, so ids stay below
//! the number of sessions that exist at once (a gateway holds thousands, the space is 8.4
//! million) however many connections it sees in its life.
//!
//! An id is reused only when nothing can still refer to the old session: a durable
//! session's id is free once the commit that deletes its rows is reported (store events
//! about the old rows, such as a queue read-back or an expiry sweep, all come before that
//! report, in order). Timers name a session by id *and* generation, and generations come
//! from one counter for the whole router, so a stale timer never matches a new session.

use std::collections::{BTreeMap, VecDeque};

use crate::store::{Sid, MAX_SID};

pub struct SessionIds {
    /// Free ids as ranges `start -> end` (exclusive), smallest first.
    free: BTreeMap<Sid, Sid>,
    /// Ids of ended durable sessions, free once their token is committed: (token, id).
    releasing: VecDeque<(u64, Sid)>,
    next_generation: u64,
}

impl SessionIds {
    /// Every id free except `used` (the sessions recovered from the store).
    pub fn new(used: impl IntoIterator<Item = Sid>) -> Self {
        let mut used: Vec<Sid> = used.into_iter().filter(|s| *s <= MAX_SID).collect();
        used.sort_unstable();
        used.dedup();
        let mut free = BTreeMap::new();
        let mut start = 1;
        for sid in used {
            if sid > start {
                free.insert(start, sid);
            }
            start = start.max(sid + 1);
        }
        if start <= MAX_SID {
            free.insert(start, MAX_SID + 1);
        }
        SessionIds {
            free,
            releasing: VecDeque::new(),
            next_generation: 1,
        }
    }

    /// The smallest free id, or None if `MAX_SID` sessions exist at once.
    pub fn allocate(&mut self) -> Option<Sid> {
        let (start, end) = self.free.pop_first()?;
        if start + 1 < end {
            self.free.insert(start + 1, end);
        }
        Some(start)
    }

    /// `sid` ended; it is free once `token` is committed (0: at once).
    pub fn release(&mut self, sid: Sid, token: u64, completed: u64) {
        if token == 0 || token <= completed {
            self.free_now(sid);
        } else {
            self.releasing.push_back((token, sid));
        }
    }

    /// Tokens up to `completed` are committed.
    pub fn committed(&mut self, completed: u64) {
        while let Some(&(t, sid)) = self.releasing.front() {
            if t > completed {
                break;
            }
            self.releasing.pop_front();
            self.free_now(sid);
        }
    }

    fn free_now(&mut self, sid: Sid) {
        // Join a range that starts right after it; ranges that end right before it stay
        // apart (a few more entries, never more than the ids in use).
        let end = match self.free.remove(&(sid + 1)) {
            Some(end) => end,
            None => sid + 1,
        };
        self.free.insert(sid, end);
    }

    /// A generation no session or timer has had before.
    pub fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_smallest_free_ones_and_come_back_after_their_commit() {
        let mut ids = SessionIds::new([1, 2, 5]);
        assert_eq!(ids.allocate(), Some(3));
        assert_eq!(ids.allocate(), Some(4));
        assert_eq!(ids.allocate(), Some(6));
        ids.release(2, 7, 6);
        assert_eq!(ids.allocate(), Some(7), "2 waits for token 7");
        ids.committed(7);
        assert_eq!(ids.allocate(), Some(2));
        ids.release(4, 0, 0);
        assert_eq!(ids.allocate(), Some(4));
    }

    #[test]
    fn millions_of_connections_reuse_a_handful_of_ids() {
        let mut ids = SessionIds::new([1]);
        for token in 1..=1_000_000u64 {
            let sid = ids.allocate().expect("an id");
            assert!(sid <= 3, "id {sid} after {token} connections");
            ids.release(sid, token, token - 1);
            ids.committed(token);
        }
    }

    #[test]
    fn recovered_ids_at_the_edges_leave_the_rest_free() {
        let mut ids = SessionIds::new([(1 << 23) - 2, MAX_SID, 1 << 24, u64::MAX]);
        assert_eq!(ids.allocate(), Some(1));
        let mut ids = SessionIds::new((1..=MAX_SID).filter(|s| *s != (1 << 23) - 3));
        assert_eq!(ids.allocate(), Some((1 << 23) - 3));
        assert_eq!(ids.allocate(), None, "full: refused, never wrapped");
        ids.release(MAX_SID, 0, 0);
        assert_eq!(ids.allocate(), Some(MAX_SID));
    }
}
