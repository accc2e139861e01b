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

/// The writer's exact per-session counters: (rows, payload bytes).
#[derive(Debug, Default)]
pub struct Counts {
    map: HashMap<Sid, (i64, i64)>,
}

impl Counts {
    pub fn new(sessions: impl IntoIterator<Item = (Sid, u64, u64)>) -> Counts {
        Counts {
            map: sessions
                .into_iter()
                .map(|(sid, n, b)| (sid, (n as i64, b as i64)))
                .collect(),
        }
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
            if d.deleted {
                self.map.remove(&sid);
            }
            if d.queued != 0 || d.bytes != 0 {
                let c = self.map.entry(sid).or_default();
                c.0 += d.queued;
                c.1 += d.bytes;
            }
        }
    }

    /// Sessions with queued rows, longest queue first.
    pub fn longest_first(&self) -> Vec<Sid> {
        let mut v: Vec<(i64, Sid)> = self
            .map
            .iter()
            .filter(|(_, c)| c.0 > 0)
            .map(|(sid, c)| (c.0, *sid))
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
            for (sid, (n, b)) in &self.map {
                if *n != 0 || *b != 0 {
                    st.execute(params![*sid as i64, n, b])?;
                }
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
}
