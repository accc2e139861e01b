//! The staging log: a two-level queue for fan-in into many sessions.
//!
//! # Why
//! `queue` is keyed `id = (sid << 40) | seq`: each session's rows are contiguous, which
//! makes read-back a range scan, but a group commit that appends one message to each of
//! 500 sessions changes 500 different leaves (one WAL frame each, written again by the next
//! checkpoint, and mostly page-cache misses at 10,000 sessions). So when a group appends
//! only a few rows per session, the rows go to `queue_log` instead, keyed by a global
//! increasing `lid`: right-edge appends, ~8 rows per 1 KiB page. A **merge** later moves
//! the whole log into `queue` in `id` order, touching each session's leaf once per merge
//! instead of once per commit.
//!
//! # Where a row is
//! A queue row (`qid`) is in `queue` or in `queue_log`, never both: the log is in the same
//! database, and every move (stage, merge) is one transaction with the ops around it, so a
//! crash or power cut leaves each row in exactly one of them. The writer keeps an index of
//! the staged rows in memory ([`Staging`]: qid → lid, payload size, state), bounded by
//! [`CAP_ROWS`]; every op that touches a queue row looks there first: marks and deletes
//! of a staged row go to the log row by `lid`; reads, `DeleteOldest`, the disk budget and
//! the expiry sweep see both tables. If a transaction fails the index is rebuilt from the
//! log (it may hold changes the rollback undid).
//!
//! # When rows are merged
//! When the log holds [`MERGE_ROWS`], when the writer is idle (before its checkpoint), at a
//! clean stop, on `Command::Checkpoint`, and at start-up before anything reads `queue`
//! (`load`): outside the writer (`inspect`, start-up) nothing but the view `queue_all`
//! needs to know about the log.
//!
//! Every merge moves [`CHUNK_ROWS`] rows per transaction, by qid range
//! ([`Staging::merge_step`], the one statement pair that moves rows): a transaction that
//! moved the whole log held SQLite's statement journal of all of it in memory (~30 MB for
//! 64k rows at 10,000 sessions) and, while the writer had work, held every acknowledgement
//! until it ended. The merges of a full log and at idle run while publishers may wait, so
//! the writer commits the groups that arrive between two chunks; at a clean stop, on
//! `Checkpoint` and at start-up nobody waits and the chunks follow one another.
//! A chunk needs room for the rows it moves until its commit frees their log pages; a
//! merge that fails (disk budget) is retried when idle and at the clean stop, and until one
//! succeeds, and past [`CAP_ROWS`], new rows go straight to `queue`.
//!
//! # Which rows are staged
//! Only the rows of sessions that get fewer than [`DIRECT_PER_SESSION`] rows in a group of
//! at least [`STAGE_MIN_GROUP`] appends: a session with a run of rows fills its own leaf
//! (staging would write them twice), and a lone message at a low rate changes one page
//! either way (staging would add the merge).

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use rusqlite::{params, Connection, Transaction};

use super::{queue_range, split_queue_id, Op, QueueRow, Sid};

/// Log rows that trigger a merge. Each merge touches every session with staged rows once:
/// at 10,000 sessions a larger log means more rows per leaf touched (fewer pages per
/// message) and a larger in-memory index (~28 bytes a row: 1.8 MB at this size). Measured
/// (`durable_compare --fanout 10000x100`, broker CPU ms per 1,000 messages): 32k 15.2,
/// 64k 11.0, 128k 10.4 (and less flat as the store fills); a 32 MiB page cache during the
/// merge did not help (12.1 at 64k).
#[cfg(not(test))]
pub(super) const MERGE_ROWS: usize = 64 * 1024;
/// Most rows a merge moves in one transaction. The writer answers commits between two
/// chunks, so this bounds how long a merge holds acknowledgements (and what a transaction
/// of the merge keeps in memory): a whole 64k-row merge took up to 545 ms here
/// (`durable_compare --fanout 10000x100`, PUBACK max 549 ms); a chunk of 8k rows is an
/// eighth of that.
/// Chunks split the log by qid (session) range, so each session's leaf is still written
/// once per merge; what chunks cost is the log's pages, rewritten by each chunk's deletes.
#[cfg(not(test))]
pub(super) const CHUNK_ROWS: usize = 8 * 1024;
#[cfg(test)]
pub(super) const CHUNK_ROWS: usize = 128;
/// Most rows staged at once (a merge that keeps failing): later rows go to `queue`.
pub(super) const CAP_ROWS: usize = 2 * MERGE_ROWS;
/// Groups with fewer appends than this append to `queue` directly.
#[cfg(not(test))]
pub(super) const STAGE_MIN_GROUP: usize = 32;
/// A session with at least this many appends in a group appends to `queue` directly.
#[cfg(not(test))]
pub(super) const DIRECT_PER_SESSION: usize = 4;

// Unit tests (the store's and the router's, on a real store) stage every group of two or
// more appends and merge more often, so queue ops meet rows in both tables, and each side
// of a merge;
// the production thresholds are exercised by the integration tests and the benches.
#[cfg(test)]
pub(super) const MERGE_ROWS: usize = 600;
#[cfg(test)]
pub(super) const STAGE_MIN_GROUP: usize = 2;
#[cfg(test)]
pub(super) const DIRECT_PER_SESSION: usize = 16;

/// A staged row, as the writer remembers it.
#[derive(Debug, Clone, Copy)]
struct Staged {
    lid: i64,
    size: u32,
    state: u8,
}

// The index's memory: 16 bytes a row, its 8-byte key, and the B-tree's nodes.
const _: () = assert!(std::mem::size_of::<Staged>() == 16);

/// The writer's index of `queue_log` (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Staging {
    /// qid → staged row; ordered, so a session's rows are a range.
    rows: BTreeMap<i64, Staged>,
    next_lid: i64,
    /// Sessions whose appends the current transaction stages.
    stage: HashSet<Sid>,
    /// A transaction failed after changing the index: rebuild it before the next use.
    stale: bool,
    /// The last merge failed (the disk budget: a merge needs room for the rows it moves
    /// until the log's pages are freed at its end): nothing is staged until one succeeds.
    paused: bool,
    /// A chunked merge is under way: the next chunk starts at this qid.
    cursor: Option<i64>,
}

impl Staging {
    /// The index of what the log holds now.
    pub fn load(conn: &Connection) -> rusqlite::Result<Staging> {
        let mut s = Staging::default();
        s.reload(conn)?;
        Ok(s)
    }

    fn reload(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let mut rows = BTreeMap::new();
        let mut max = 0;
        let mut st = conn.prepare_cached("SELECT lid, qid, size, state FROM queue_log")?;
        let mut q = st.query([])?;
        while let Some(r) = q.next()? {
            let lid: i64 = r.get(0)?;
            max = max.max(lid);
            rows.insert(
                r.get(1)?,
                Staged {
                    lid,
                    size: r.get::<_, i64>(2)?.max(0) as u32,
                    state: r.get::<_, i64>(3)? as u8,
                },
            );
        }
        self.rows = rows;
        self.next_lid = self.next_lid.max(max + 1);
        self.stale = false;
        Ok(())
    }

    /// Called when a transaction that used the index failed (it was rolled back).
    pub fn invalidate(&mut self) {
        self.stale = true;
    }

    /// Rebuilds the index if a failed transaction left it stale. Call before a
    /// transaction that uses it.
    pub fn ensure(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if self.stale {
            self.reload(conn)?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the log is long enough to merge (and the last merge did not fail).
    pub fn wants_merge(&self) -> bool {
        !self.paused && (self.cursor.is_some() || self.rows.len() >= MERGE_ROWS)
    }

    /// Whether a chunked merge is under way (more chunks to move).
    pub fn merging(&self) -> bool {
        !self.paused && self.cursor.is_some()
    }

    /// Decides which sessions' appends the next transaction stages (see the module doc).
    pub fn plan<'a>(&mut self, ops: impl Iterator<Item = &'a Op>) {
        self.stage.clear();
        let mut per: HashMap<Sid, usize> = HashMap::new();
        let mut total = 0;
        for op in ops {
            if let Op::Enqueue { sid, .. } = op {
                *per.entry(*sid).or_default() += 1;
                total += 1;
            }
        }
        if self.paused || total < STAGE_MIN_GROUP || self.rows.len() + total > CAP_ROWS {
            return;
        }
        self.stage.extend(
            per.into_iter()
                .filter(|(_, n)| *n < DIRECT_PER_SESSION)
                .map(|(sid, _)| sid),
        );
    }

    /// Appends a row: to the log if its session is staged in this transaction (returns
    /// true), else the caller inserts it into `queue`. A staged row with the same qid is
    /// replaced either way.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue(
        &mut self,
        tx: &Transaction,
        qid: i64,
        state: u8,
        packet_id: Option<u16>,
        expires_at: Option<i64>,
        size: u32,
        packet: &Bytes,
        now: i64,
    ) -> rusqlite::Result<bool> {
        self.delete_one(tx, qid)?;
        let (sid, _) = split_queue_id(qid);
        if !self.stage.contains(&sid) {
            return Ok(false);
        }
        let lid = self.next_lid;
        tx.prepare_cached(
            "INSERT INTO queue_log (lid, qid, state, packet_id, expires_at, size, packet,
                                    enqueued_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            lid,
            qid,
            state,
            packet_id.map(i64::from),
            expires_at,
            size,
            &packet[..],
            now
        ])?;
        self.next_lid += 1;
        self.rows.insert(qid, Staged { lid, size, state });
        Ok(true)
    }

    /// Sets the state (and packet id, if given) of a staged row; false if it is not staged.
    pub fn mark(
        &mut self,
        tx: &Transaction,
        qid: i64,
        state: u8,
        packet_id: Option<u16>,
    ) -> rusqlite::Result<bool> {
        let Some(row) = self.rows.get_mut(&qid) else {
            return Ok(false);
        };
        match packet_id {
            Some(p) => tx
                .prepare_cached("UPDATE queue_log SET state = ?2, packet_id = ?3 WHERE lid = ?1")?
                .execute(params![row.lid, state, p])?,
            None => tx
                .prepare_cached("UPDATE queue_log SET state = ?2 WHERE lid = ?1")?
                .execute(params![row.lid, state])?,
        };
        row.state = state;
        Ok(true)
    }

    /// Deletes a staged row; its payload size if it was staged.
    pub fn delete_one(&mut self, tx: &Transaction, qid: i64) -> rusqlite::Result<Option<u32>> {
        let Some(row) = self.rows.get(&qid).copied() else {
            return Ok(None);
        };
        tx.prepare_cached("DELETE FROM queue_log WHERE lid = ?1")?
            .execute([row.lid])?;
        self.rows.remove(&qid);
        Ok(Some(row.size))
    }

    /// Deletes the staged rows with `lo <= qid <= hi`: (rows, payload bytes).
    pub fn delete_range(
        &mut self,
        tx: &Transaction,
        lo: i64,
        hi: i64,
    ) -> rusqlite::Result<(i64, i64)> {
        let qids: Vec<i64> = self.rows.range(lo..=hi).map(|(q, _)| *q).collect();
        let (mut n, mut bytes) = (0, 0);
        for qid in qids {
            if let Some(size) = self.delete_one(tx, qid)? {
                n += 1;
                bytes += i64::from(size);
            }
        }
        Ok((n, bytes))
    }

    /// Whether any row of `sid` is staged.
    pub fn has_session(&self, sid: Sid) -> bool {
        let (lo, hi) = queue_range(sid);
        self.rows.range(lo..=hi).next().is_some()
    }

    /// Up to `limit` staged rows of `sid` in state `state` from qid `from` on, in order:
    /// (qid, size).
    pub fn in_state(&self, sid: Sid, from: i64, state: u8, limit: usize) -> Vec<(i64, u32)> {
        let hi = queue_range(sid).1;
        if from > hi {
            return Vec::new();
        }
        self.rows
            .range(from..=hi)
            .filter(|(_, r)| r.state == state)
            .take(limit)
            .map(|(q, r)| (*q, r.size))
            .collect()
    }

    /// Reads staged rows (for a read-back).
    pub fn read(&self, conn: &Connection, qids: &[(i64, u32)]) -> rusqlite::Result<Vec<QueueRow>> {
        let mut st = conn.prepare_cached(
            "SELECT qid, state, packet_id, expires_at, packet FROM queue_log WHERE lid = ?1",
        )?;
        let mut out = Vec::with_capacity(qids.len());
        for (qid, _) in qids {
            let Some(row) = self.rows.get(qid) else {
                continue;
            };
            out.push(st.query_row([row.lid], |r| {
                Ok(QueueRow {
                    seq: split_queue_id(r.get(0)?).1,
                    state: r.get::<_, i64>(1)? as u8,
                    packet_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u16),
                    expires_at: r.get(3)?,
                    packet: Bytes::from(r.get::<_, Vec<u8>>(4)?),
                })
            })?);
        }
        Ok(out)
    }

    /// Deletes staged, unsent rows whose expiry has passed: (sid, seq, size) each.
    pub fn sweep(
        &mut self,
        tx: &Transaction,
        now_ms: i64,
    ) -> rusqlite::Result<Vec<(Sid, u64, u32)>> {
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut removed = Vec::new();
        let mut st = tx.prepare_cached(
            "DELETE FROM queue_log WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND state = 0
             RETURNING qid, size",
        )?;
        let mut rows = st.query(params![now_ms])?;
        while let Some(r) = rows.next()? {
            let qid: i64 = r.get(0)?;
            self.rows.remove(&qid);
            let (sid, seq) = split_queue_id(qid);
            removed.push((sid, seq, r.get::<_, i64>(1)?.max(0) as u32));
        }
        Ok(removed)
    }
}

impl Staging {
    /// Starts a merge of the whole log (unless one is under way), moved a chunk at a time
    /// by [`Staging::merge_step`] and retried even if the last merge failed. False if the
    /// log is empty.
    pub fn start_merge(&mut self) -> bool {
        if self.rows.is_empty() && !self.stale {
            return false;
        }
        self.paused = false;
        self.cursor.get_or_insert(i64::MIN);
        true
    }

    /// Moves every staged row into `queue`, a chunk per transaction ([`CHUNK_ROWS`]), with
    /// nothing committed in between (a clean stop, start-up, `Checkpoint`). Returns the
    /// rows moved; on an error the rows not yet moved stay staged.
    pub fn merge_all(&mut self, conn: &mut Connection) -> rusqlite::Result<usize> {
        self.ensure(conn)?;
        self.start_merge();
        let mut moved = 0;
        // Each step moves at least one row, or ends a pass that left rows behind its
        // cursor (staged while it ran), which the next step starts again from the start.
        while !self.rows.is_empty() {
            moved += self.merge_step(conn)?;
        }
        self.cursor = None;
        Ok(moved)
    }

    /// Moves the next chunk of up to [`CHUNK_ROWS`] staged rows, in qid order from where
    /// the last chunk ended, into `queue` (one transaction of its own), and starts a merge
    /// if none is under way. Rows staged behind the cursor meanwhile wait for the next
    /// merge. Returns the rows moved (0 when the merge is over).
    pub fn merge_step(&mut self, conn: &mut Connection) -> rusqlite::Result<usize> {
        self.ensure(conn)?;
        let from = self.cursor.unwrap_or(i64::MIN);
        let chunk: Vec<(i64, i64)> = self
            .rows
            .range(from..)
            .take(CHUNK_ROWS)
            .map(|(q, r)| (*q, r.lid))
            .collect();
        let Some(&(last, _)) = chunk.last() else {
            self.cursor = None;
            return Ok(0);
        };
        let result = (|| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut copy = tx.prepare_cached(
                    "INSERT OR REPLACE INTO queue (id, state, packet_id, expires_at, size,
                                                   packet, enqueued_at)
                     SELECT qid, state, packet_id, expires_at, size, packet, enqueued_at
                     FROM queue_log WHERE lid = ?1",
                )?;
                let mut del = tx.prepare_cached("DELETE FROM queue_log WHERE lid = ?1")?;
                for (_, lid) in &chunk {
                    copy.execute([lid])?;
                    del.execute([lid])?;
                }
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                for (qid, _) in &chunk {
                    self.rows.remove(qid);
                }
                self.paused = false;
                self.cursor = last
                    .checked_add(1)
                    .filter(|next| self.rows.range(*next..).next().is_some());
                Ok(chunk.len())
            }
            Err(e) => {
                self.invalidate();
                self.paused = true;
                self.cursor = None;
                Err(e)
            }
        }
    }
}
