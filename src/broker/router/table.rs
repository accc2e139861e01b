//! The router's sessions, found by session id, by client id and by connection (issue 17:
//! router memory per session at 10,000 sessions).
//!
//! Hash tables whose slots are small: sessions by id hold one `Box<Session>` per slot
//! (8 bytes; the id is the session's own), and the client-id and connection indexes hold a
//! 4-byte session id per slot, their key being the session's own `client_id` / `conn` (no
//! copy: a lookup compares against the session it names). Three `HashMap`s with the key
//! copied into each slot held 17 + 25 + 17 bytes per slot, 0.96 MiB at 10,000 connected
//! sessions (16,384 slots each).
//!
//! Invariants:
//! - every entry of the client-id index names a session of the table whose `client_id` is
//!   the entry's key, and there is at most one entry per client id (the session inserted
//!   last with that id; ending it removes the entry);
//! - session ids are at most `store::MAX_SID` (< 2^23: `router::ids`, and the store
//!   renumbers larger ones at start-up), so they fit the index's `u32`.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::{ConnId, Session, SessionId};
use crate::store::MAX_SID;

const _: () = assert!(MAX_SID <= u32::MAX as u64, "session ids fit in u32");

#[derive(Default)]
pub struct Sessions {
    /// Boxed: the table then holds 8 bytes per slot, not a whole `Session` in each of its
    /// up to twice as many slots as sessions.
    by_sid: HashTable<Box<Session>>,
    /// Session ids by the hash of their client id.
    by_client: HashTable<u32>,
    hasher: RandomState,
}

impl Sessions {
    fn sid_hash(&self, sid: SessionId) -> u64 {
        self.hasher.hash_one(sid)
    }

    fn client_hash(&self, client_id: &str) -> u64 {
        self.hasher.hash_one(client_id)
    }

    pub fn len(&self) -> usize {
        self.by_sid.len()
    }

    pub fn get(&self, sid: &SessionId) -> Option<&Session> {
        self.by_sid
            .find(self.sid_hash(*sid), |s| s.id == *sid)
            .map(|s| &**s)
    }

    pub fn get_mut(&mut self, sid: &SessionId) -> Option<&mut Session> {
        let hash = self.sid_hash(*sid);
        self.by_sid
            .find_mut(hash, |s| s.id == *sid)
            .map(|s| &mut **s)
    }

    /// The id of the session of `client_id`, if there is one.
    pub fn sid_of(&self, client_id: &str) -> Option<SessionId> {
        let by_sid = &self.by_sid;
        let hasher = &self.hasher;
        self.by_client
            .find(self.client_hash(client_id), |&sid| {
                let sid = SessionId::from(sid);
                by_sid
                    .find(hasher.hash_one(sid), |s| s.id == sid)
                    .is_some_and(|s| *s.client_id == *client_id)
            })
            .map(|&sid| SessionId::from(sid))
    }

    /// Adds a session (its id is not in the table) and makes it the one of its client id.
    pub fn insert(&mut self, s: Box<Session>) {
        let Ok(short) = u32::try_from(s.id) else {
            // Unreachable: ids are at most MAX_SID (see the module doc).
            tracing::error!(sid = s.id, "session id out of range: session not kept");
            return;
        };
        let client_hash = self.client_hash(&s.client_id);
        self.unindex_client(&s.client_id, None);
        let Sessions {
            by_sid,
            by_client,
            hasher,
        } = self;
        by_client.insert_unique(client_hash, short, |&sid| {
            let sid = SessionId::from(sid);
            by_sid
                .find(hasher.hash_one(sid), |s| s.id == sid)
                .map_or(0, |s| hasher.hash_one(&*s.client_id))
        });
        let sid_hash = hasher.hash_one(s.id);
        by_sid.insert_unique(sid_hash, s, |s| hasher.hash_one(s.id));
    }

    /// Removes a session, and its client id's entry if that names it.
    pub fn remove(&mut self, sid: &SessionId) -> Option<Box<Session>> {
        let hash = self.sid_hash(*sid);
        let s = self
            .by_sid
            .find_entry(hash, |s| s.id == *sid)
            .ok()?
            .remove()
            .0;
        self.unindex_client(&s.client_id, Some(*sid));
        Some(s)
    }

    /// Removes the index entry of `client_id` (only if it names `only`, when given). The
    /// session it names may be gone already: the entry is found by its hash and id.
    fn unindex_client(&mut self, client_id: &str, only: Option<SessionId>) {
        let Some(sid) = only.or_else(|| self.sid_of(client_id)) else {
            return;
        };
        let hash = self.client_hash(client_id);
        if let Ok(e) = self
            .by_client
            .find_entry(hash, |&s| SessionId::from(s) == sid)
        {
            e.remove();
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &Session> {
        self.by_sid.iter().map(|s| &**s)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.by_sid.iter_mut().map(|s| &mut **s)
    }

    /// Heap bytes of the two tables (not of the sessions).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        buckets(self.by_sid.capacity()) * (std::mem::size_of::<Box<Session>>() + 1)
            + buckets(self.by_client.capacity()) * (std::mem::size_of::<u32>() + 1)
    }
}

#[cfg(test)]
impl std::ops::Index<&SessionId> for Sessions {
    type Output = Session;

    fn index(&self, sid: &SessionId) -> &Session {
        self.get(sid).expect("no such session")
    }
}

/// Session ids by connection id (every event of a connection names it). The key is the
/// session's own connection (`Session::conn`), not a copy: a slot is a 4-byte session id,
/// not a 16-byte pair. An entry is added once the session holds its connection and removed
/// when it lets it go; an entry whose session no longer holds that connection never
/// matches.
#[derive(Default)]
pub struct ByConn {
    table: HashTable<u32>,
    hasher: RandomState,
}

/// Whether `sid`'s session is attached to connection `conn`.
fn holds(sessions: &Sessions, sid: u32, conn: ConnId) -> bool {
    sessions
        .get(&SessionId::from(sid))
        .is_some_and(|s| s.conn.as_ref().is_some_and(|c| c.id == conn))
}

impl ByConn {
    fn hash(&self, conn: ConnId) -> u64 {
        self.hasher.hash_one(conn)
    }

    /// The session attached to `conn`.
    pub fn get(&self, conn: &ConnId, sessions: &Sessions) -> Option<SessionId> {
        self.table
            .find(self.hash(*conn), |&sid| holds(sessions, sid, *conn))
            .map(|&sid| SessionId::from(sid))
    }

    /// `sid` now holds `conn` (set `Session::conn` first).
    pub fn insert(&mut self, conn: ConnId, sid: SessionId, sessions: &Sessions) {
        let Ok(short) = u32::try_from(sid) else {
            // Unreachable: ids are at most MAX_SID (see the module doc).
            tracing::error!(sid, "session id out of range: connection not indexed");
            return;
        };
        let hasher = &self.hasher;
        self.table.insert_unique(self.hash(conn), short, |&sid| {
            let conn = sessions
                .get(&SessionId::from(sid))
                .and_then(|s| s.conn.as_ref())
                .map_or(0, |c| c.id);
            hasher.hash_one(conn)
        });
    }

    /// Removes the entry of `conn` that names `sid`, whether or not the session still
    /// holds the connection.
    pub fn remove(&mut self, conn: ConnId, sid: SessionId) {
        if let Ok(e) = self
            .table
            .find_entry(self.hash(conn), |&s| SessionId::from(s) == sid)
        {
            e.remove();
        }
    }

    /// Removes the entry of `conn` and returns the session attached to it.
    pub fn take(&mut self, conn: &ConnId, sessions: &Sessions) -> Option<SessionId> {
        let hash = self.hash(*conn);
        let e = self
            .table
            .find_entry(hash, |&sid| holds(sessions, sid, *conn))
            .ok()?;
        Some(SessionId::from(e.remove().0))
    }

    /// Heap bytes of the table.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        buckets(self.table.capacity()) * (std::mem::size_of::<u32>() + 1)
    }
}

/// Slots of a hashbrown table of this capacity.
#[cfg(test)]
fn buckets(cap: usize) -> usize {
    if cap == 0 {
        0
    } else if cap < 8 {
        (cap + 1).next_power_of_two()
    } else {
        (cap * 8 / 7).next_power_of_two()
    }
}
