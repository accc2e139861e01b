//! Per-session queue counters: rows in each session's queue and their payload bytes (the
//! router's queue limits start from them after a restart; drop-oldest under the disk
//! budget picks the longest queue by them).
//!
//! # Kept in memory, written at shutdown
//! Updating `session.queued` / `queued_bytes` in every commit cost a second page per
//! durable message (the session row's leaf, next to the queue's), twice the WAL bytes of a
//! message at a low rate (flash wear). So the writer keeps them in memory ([`Counts`]),
//! exact after every commit, and writes them to the `session` rows only when it stops
//! cleanly, together with the `counter` row [`EXACT`] = 1. Start-up sets [`EXACT`] to 0
//! before anything changes the queue: after a crash or power cut the columns are stale and
//! the counters are counted again from the queue rows ([`count_queue`], one pass over the
//! queue, only then). `session.dropped` (policy drops: rare) is still updated in the commit
//! that drops.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{queue_range, Sid};

/// `counter` row: 1 when `session.queued` / `queued_bytes` match the queue rows (written
/// by a clean stop, or by migration 0005 for a database whose counters were kept exact in
/// every commit), 0 while a Holdfast runs on the file.
pub const EXACT: &str = "session_counts_exact";

/// Per-session changes to the queue counters accumulated over one transaction.
#[derive(Default)]
pub struct Delta {
    pub queued: i64,
    pub bytes: i64,
    pub dropped: i64,
    /// The session was deleted in the transaction: its counters start again from zero
    /// (the changes above came after the delete).
    pub deleted: bool,
}

/// The writer's exact per-session counters: (rows, payload bytes); a session without
/// counters has (0, 0).
///
/// Kept by session id in a vector (`dense`), not in a hash map (25-byte slots, a power of
/// two of them: 0.39 MiB at 10,000 sessions, issue 17): session ids are slots, the smallest
/// free ones (`router::ids`), so they run from 1 to about the number of sessions. A database
/// written before ids were slots can hold larger ones, far apart: the vector only grows over
/// an id below twice the sessions with counters (plus [`DENSE_SLACK`]); ids beyond go to
/// `sparse`, so memory stays proportional to the sessions whatever their ids.
#[derive(Debug, Default)]
pub struct Counts {
    /// Counters of sessions `0..dense.len()`, by id.
    dense: Vec<(i64, i64)>,
    /// Non-zero counters of sessions at or beyond `dense.len()`.
    sparse: HashMap<Sid, (i64, i64)>,
    /// Sessions with non-zero counters (in either).
    live: usize,
}

/// Ids the dense vector may cover beyond twice the sessions with counters.
const DENSE_SLACK: usize = 64;

impl Counts {
    pub fn new(sessions: impl IntoIterator<Item = (Sid, u64, u64)>) -> Counts {
        let mut c = Counts::default();
        for (sid, n, b) in sessions {
            c.update(sid, |v| *v = (n as i64, b as i64));
        }
        c
    }

    /// The counters of the sessions loaded at start-up.
    pub fn of(rec: &super::Recovered) -> Counts {
        Counts::new(
            rec.sessions
                .iter()
                .map(|s| (s.sid, s.queued, s.queued_bytes)),
        )
    }

    /// Takes in the changes of a committed transaction.
    pub fn absorb(&mut self, per: HashMap<Sid, Delta>) {
        for (sid, d) in per {
            self.update(sid, |c| {
                if d.deleted {
                    *c = (0, 0);
                }
                c.0 += d.queued;
                c.1 += d.bytes;
            });
        }
    }

    /// Changes the counters of `sid`.
    fn update(&mut self, sid: Sid, change: impl FnOnce(&mut (i64, i64))) {
        self.cover(sid);
        let dense = usize::try_from(sid).ok().filter(|&i| i < self.dense.len());
        let slot = match dense {
            Some(i) => &mut self.dense[i],
            None => self.sparse.entry(sid).or_default(),
        };
        let was = *slot != (0, 0);
        change(slot);
        let is = *slot != (0, 0);
        match (was, is) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
        if !is && dense.is_none() {
            self.sparse.remove(&sid);
        }
    }

    /// Extends the dense vector over `sid` if it is near enough (see [`Counts`]), moving
    /// the counters it now covers out of `sparse`.
    fn cover(&mut self, sid: Sid) {
        let Ok(i) = usize::try_from(sid) else {
            return;
        };
        let len = self.dense.len();
        if i < len || i >= 2 * (self.live + 1) + DENSE_SLACK {
            return;
        }
        if i >= self.dense.capacity() {
            // About an eighth more at a time: little left over, few copies.
            self.dense.reserve_exact((i + 1 - len).max(len / 8));
        }
        self.dense.resize(i + 1, (0, 0));
        if !self.sparse.is_empty() {
            let covered: Vec<Sid> = self.sparse.keys().filter(|&&s| s <= sid).copied().collect();
            for s in covered {
                if let Some(v) = self.sparse.remove(&s) {
                    self.dense[s as usize] = v;
                }
            }
            // A hash map keeps its table when emptied: give back what it no longer needs.
            if self.sparse.len() * 4 < self.sparse.capacity() {
                self.sparse.shrink_to_fit();
            }
        }
    }

    /// Every session's non-zero counters: (sid, (rows, bytes)).
    fn entries(&self) -> impl Iterator<Item = (Sid, (i64, i64))> + '_ {
        let dense = self
            .dense
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != (0, 0))
            .map(|(i, c)| (i as Sid, *c));
        dense.chain(self.sparse.iter().map(|(s, c)| (*s, *c)))
    }

    /// Heap bytes of the counters.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        let cap = self.sparse.capacity();
        let sparse = if cap == 0 {
            0
        } else {
            (cap * 8 / 7).next_power_of_two() * (std::mem::size_of::<(Sid, (i64, i64))>() + 1)
        };
        self.dense.capacity() * std::mem::size_of::<(i64, i64)>() + sparse
    }

    /// Sessions with queued rows, longest queue first.
    pub fn longest_first(&self) -> Vec<Sid> {
        let mut v: Vec<(i64, Sid)> = self
            .entries()
            .filter(|(_, c)| c.0 > 0)
            .map(|(sid, c)| (c.0, sid))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, sid)| sid).collect()
    }

    /// Writes every session's counters and marks them exact (a clean stop).
    pub fn write(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE session SET queued = ?2, queued_bytes = ?3 WHERE sid = ?1",
            )?;
            // Sessions the writer never saw a row of have none.
            tx.execute("UPDATE session SET queued = 0, queued_bytes = 0", [])?;
            for (sid, (n, b)) in self.entries() {
                st.execute(params![sid as i64, n, b])?;
            }
        }
        set_exact(&tx, true)?;
        tx.commit()
    }
}

/// Whether the `session` counters match the queue rows (see the module doc).
pub fn exact(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row("SELECT value FROM counter WHERE name = ?1", [EXACT], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        == Some(1))
}

pub fn set_exact(conn: &Connection, exact: bool) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO counter (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![EXACT, i64::from(exact)])?;
    Ok(())
}

/// (rows, payload bytes) of a session's queue, counted from the rows.
pub fn count_queue(conn: &Connection, sid: Sid) -> rusqlite::Result<(u64, u64)> {
    let (lo, hi) = queue_range(sid);
    let (n, b): (i64, i64) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(size), 0) FROM queue WHERE id BETWEEN ?1 AND ?2",
        )?
        .query_row(params![lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok((n.max(0) as u64, b.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::params;

    use super::super::writer::Writer;
    use super::super::*;
    use super::*;

    fn opts(dir: &Path) -> StoreOptions {
        StoreOptions::for_test(dir)
    }

    fn enqueue(sid: Sid, seq: u64, size: usize) -> Op {
        Op::Enqueue {
            sid,
            seq,
            packet_id: None,
            expires_at: None,
            size: size as u32,
            packet: bytes::Bytes::from(vec![b'm'; size]),
        }
    }

    fn upsert(sid: Sid) -> Op {
        Op::UpsertSession {
            sid,
            client_id: Arc::from(format!("c{sid}")),
            protocol: 4,
            expiry: u32::MAX,
            will: None,
        }
    }

    /// Runs a writer over `batches`; `clean` ends it with a shutdown, otherwise it ends as
    /// after a crash (its channel closes without one: no counters written).
    fn run(o: &StoreOptions, batches: Vec<Vec<Op>>, clean: bool) -> load::Recovered {
        let (conn, rec) = load::open_and_load(o).expect("open");
        let (tx, rx) = std::sync::mpsc::channel();
        let (ev_tx, _ev_rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, ops) in batches.into_iter().enumerate() {
            tx.send(Command::Batch {
                token: i as u64 + 1,
                ops,
            })
            .unwrap();
        }
        if clean {
            let (done, _done_rx) = tokio::sync::oneshot::channel();
            tx.send(Command::Shutdown(done)).unwrap();
        }
        drop(tx);
        let counts = Counts::of(&rec);
        Writer::new(conn, o.clone(), ev_tx, rec.clock, counts).run(rx);
        rec
    }

    fn counts_of(rec: &load::Recovered) -> Vec<(Sid, u64, u64)> {
        let mut v: Vec<_> = rec
            .sessions
            .iter()
            .map(|s| (s.sid, s.queued, s.queued_bytes))
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn queue_counters_are_exact_after_a_clean_stop_and_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        run(
            &o,
            vec![vec![
                upsert(1),
                upsert(2),
                enqueue(1, 0, 10),
                enqueue(1, 1, 20),
                enqueue(2, 0, 5),
            ]],
            true,
        );
        let stored: (i64, i64) = Connection::open(&o.path)
            .unwrap()
            .query_row(
                "SELECT queued, queued_bytes FROM session WHERE sid = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(stored, (2, 30), "a clean stop writes the counters");
        // This run ends as after a crash: the counters it kept are not written...
        let rec = run(
            &o,
            vec![
                vec![enqueue(1, 2, 40), Op::Delete { sid: 1, seq: 0 }],
                vec![Op::DeleteSession { sid: 2 }, upsert(2), enqueue(2, 0, 7)],
            ],
            false,
        );
        assert_eq!(counts_of(&rec), [(1, 2, 30), (2, 1, 5)]);
        // ...so the next start counts them from the rows.
        let rec = run(&o, vec![], true);
        assert_eq!(counts_of(&rec), [(1, 2, 60), (2, 1, 7)]);
        let rec = run(&o, vec![], true);
        assert_eq!(counts_of(&rec), [(1, 2, 60), (2, 1, 7)], "and keeps them");
    }

    /// A database written by the previous schema (4), whose counters were updated in every
    /// commit, opens with its counters and delivers every queued message.
    #[test]
    fn a_schema_4_database_keeps_its_counters_and_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        {
            let c = Connection::open(&o.path).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            for (_, sql) in &schema::MIGRATIONS[..4] {
                c.execute_batch(sql).unwrap();
            }
            c.pragma_update(None, "user_version", 4).unwrap();
            c.execute(
                "INSERT INTO session (sid, client_id, protocol, expiry_interval, queued,
                                      queued_bytes, created_at)
                 VALUES (3, 'old', 4, 100, 3, 33, 0)",
                [],
            )
            .unwrap();
            for seq in 0..3u64 {
                c.execute(
                    "INSERT INTO queue (id, state, size, packet) VALUES (?1, 0, 11, ?2)",
                    params![queue_id(3, seq), vec![seq as u8; 11]],
                )
                .unwrap();
            }
        }
        let (conn, rec) = load::open_and_load(&o).expect("open a schema 4 database");
        let v: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::latest_version());
        assert_eq!(counts_of(&rec), [(3, 3, 33)]);
        drop(conn);
        let (store, _, mut ev) = Store::open(&o).unwrap();
        store
            .send(Command::ReadQueue {
                sid: 3,
                from_seq: 0,
                limit: 10,
                next_seq_at_request: 3,
                sent: false,
            })
            .unwrap();
        match ev.blocking_recv().expect("rows") {
            StoreEvent::QueueRows { rows, .. } => {
                let got: Vec<(u64, Vec<u8>)> =
                    rows.iter().map(|r| (r.seq, r.packet.to_vec())).collect();
                assert_eq!(
                    got,
                    (0..3u64)
                        .map(|s| (s, vec![s as u8; 11]))
                        .collect::<Vec<_>>()
                );
            }
            other => panic!("expected rows, got {other:?}"),
        }
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(store.close());
    }

    /// The writer keeps a pair of counters per session with queued rows: at 10,000
    /// sessions a hash map of 16,384 slots of 25 bytes held 0.39 MiB (issue 17).
    #[test]
    fn per_session_counters_take_little_more_than_their_values() {
        let n = 10_000u64;
        let mut c = Counts::default();
        let delta = || Delta {
            queued: 1,
            bytes: 64,
            dropped: 0,
            deleted: false,
        };
        c.absorb((1..=n).map(|sid| (sid, delta())).collect());
        let per = c.heap_bytes() as f64 / n as f64;
        assert!(per <= 20.0, "{per:.1} bytes per session");
        assert_eq!(c.longest_first().len(), n as usize);
    }

    proptest::proptest! {
        /// The counters equal those of a plain map, for ids near one another (dense) and
        /// far apart (an older database's), deleted sessions included; the vector stays
        /// within twice the sessions with counters.
        #[test]
        fn counters_match_a_plain_map_whatever_the_ids(
            ops in proptest::collection::vec(
                (
                    proptest::prop_oneof![1u64..300, 1u64..5_000_000],
                    -3i64..6,
                    proptest::bool::weighted(0.1),
                ),
                1..500,
            )
        ) {
            let mut c = Counts::default();
            let mut model: HashMap<Sid, (i64, i64)> = HashMap::new();
            let mut most_live = 0;
            for chunk in ops.chunks(7) {
                let mut per: HashMap<Sid, Delta> = HashMap::new();
                for &(sid, q, deleted) in chunk {
                    let d = per.entry(sid).or_default();
                    if deleted {
                        *d = Delta { deleted: true, ..Default::default() };
                    }
                    d.queued += q;
                    d.bytes += q * 10;
                }
                for (sid, d) in &per {
                    if d.deleted {
                        model.remove(sid);
                    }
                    let e = model.entry(*sid).or_default();
                    e.0 += d.queued;
                    e.1 += d.bytes;
                }
                c.absorb(per);
                let mut want: Vec<(Sid, (i64, i64))> = model
                    .iter()
                    .filter(|(_, v)| **v != (0, 0))
                    .map(|(s, v)| (*s, *v))
                    .collect();
                want.sort_unstable();
                let mut got: Vec<(Sid, (i64, i64))> = c.entries().collect();
                got.sort_unstable();
                proptest::prop_assert_eq!(&got, &want);
                proptest::prop_assert_eq!(c.live, want.len());
                // Within one transaction a session's counters may pass through non-zero.
                most_live = most_live.max(want.len() + chunk.len());
                proptest::prop_assert!(c.dense.len() <= 2 * (most_live + 1) + DENSE_SLACK);
                let mut longest: Vec<(i64, Sid)> = want
                    .iter()
                    .filter(|(_, v)| v.0 > 0)
                    .map(|(s, v)| (v.0, *s))
                    .collect();
                longest.sort_unstable_by(|a, b| b.cmp(a));
                let longest: Vec<Sid> = longest.into_iter().map(|(_, s)| s).collect();
                proptest::prop_assert_eq!(c.longest_first(), longest);
            }
        }
    }
}
