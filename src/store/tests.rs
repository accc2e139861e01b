//! Unit tests of the store layer on its own: the writer's group commit, the queue layout,
//! read-back, the counted drop policies, the counters kept in `session`, recovery, and what
//! a failed commit (disk budget) reports and still applies.
//!
//! Most tests build a `Writer` directly over a channel that already holds every command, then
//! run it on the test thread: the writer takes everything that has arrived as one group, so
//! grouping is deterministic (no races with a writer thread).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use rusqlite::params;
use tokio::sync::oneshot;

use super::writer::Writer;
use super::*;

fn opts(dir: &Path) -> StoreOptions {
    StoreOptions {
        on_corrupt: OnCorrupt::Quarantine,
        ..StoreOptions::for_test(dir)
    }
}

/// Opens the store, runs a writer over `cmds` (queued before it starts, so consecutive
/// batches form one group), stops it and returns every event it reported.
fn run_writer(o: &StoreOptions, cmds: Vec<Command>) -> Vec<StoreEvent> {
    let (conn, rec) = load::open_and_load(o).expect("open");
    let (tx, rx) = std::sync::mpsc::channel();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    for c in cmds {
        tx.send(c).unwrap();
    }
    let (done, _done_rx) = oneshot::channel();
    tx.send(Command::Shutdown(done)).unwrap();
    let counts = super::counts::Counts::of(&rec);
    Writer::new(conn, o.clone(), ev_tx, rec.clock, counts).run(rx);
    let mut events = Vec::new();
    while let Ok(e) = ev_rx.try_recv() {
        events.push(e);
    }
    events
}

/// Commits each batch as its own group (waiting for one before sending the next) through
/// the real writer thread; returns every event.
fn commit_each(o: &StoreOptions, batches: Vec<Vec<Op>>) -> Vec<StoreEvent> {
    let (store, _, mut ev) = Store::open(o).expect("open");
    let mut events = Vec::new();
    for (i, ops) in batches.into_iter().enumerate() {
        let token = i as u64 + 1;
        store.send(batch(token, ops)).unwrap();
        loop {
            let e = ev.blocking_recv().expect("writer alive");
            let done = matches!(e, StoreEvent::Committed { token: t, .. } if t == token);
            events.push(e);
            if done {
                break;
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
    events
}

fn batch(token: u64, ops: Vec<Op>) -> Command {
    Command::Batch { token, ops }
}

fn upsert(sid: Sid) -> Op {
    Op::UpsertSession {
        sid,
        client_id: Arc::from(format!("client-{sid}")),
        protocol: 5,
        expiry: 300,
        will: None,
    }
}

fn enqueue(sid: Sid, seq: u64, size: usize) -> Op {
    Op::Enqueue {
        sid,
        seq,
        packet_id: None,
        expires_at: None,
        size: size as u32,
        packet: Bytes::from(vec![seq as u8; size]),
    }
}

fn committed(events: &[StoreEvent]) -> Vec<(u64, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            StoreEvent::Committed { token, ok } => Some((*token, *ok)),
            _ => None,
        })
        .collect()
}

fn db(o: &StoreOptions) -> Connection {
    Connection::open(&o.path).expect("open db for inspection")
}

/// (seq, state) of a session's rows, in order.
fn rows(o: &StoreOptions, sid: Sid) -> Vec<(u64, u8)> {
    let c = db(o);
    let mut st = c
        .prepare("SELECT id, state FROM queue_all WHERE id >= ?1 AND id < ?2 ORDER BY id")
        .unwrap();
    st.query_map(params![queue_id(sid, 0), queue_id(sid + 1, 0)], |r| {
        Ok((split_queue_id(r.get(0)?).1, r.get::<_, i64>(1)? as u8))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn counter(o: &StoreOptions, name: &str) -> i64 {
    db(o)
        .query_row(
            "SELECT coalesce((SELECT value FROM counter WHERE name = ?1), 0)",
            [name],
            |r| r.get(0),
        )
        .unwrap()
}

/// Every session's `queued` / `queued_bytes` equals what its queue rows say, and no queue
/// row belongs to a session that does not exist.
fn assert_counters_consistent(o: &StoreOptions) {
    let c = db(o);
    let mut st = c
        .prepare("SELECT sid, queued, queued_bytes FROM session")
        .unwrap();
    let sessions: Vec<(i64, i64, i64)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (sid, queued, bytes) in &sessions {
        let (n, sum): (i64, i64) = c
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM queue_all WHERE id >= ?1 AND id < ?2",
                params![queue_id(*sid as Sid, 0), queue_id(*sid as Sid + 1, 0)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (*queued, *bytes),
            (n, sum),
            "session {sid}: counters vs queue rows"
        );
    }
    let orphans: i64 = c
        .query_row(
            "SELECT count(*) FROM queue_all WHERE (id >> 40) NOT IN (SELECT sid FROM session)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0, "queue rows without a session");
}

#[test]
fn queue_id_layout_keeps_sessions_contiguous_and_in_seq_order() {
    assert_eq!(queue_id(0, 0), 0);
    assert_eq!(queue_id(1, 0), 1 << 40);
    assert_eq!(queue_id(3, 7), (3 << 40) | 7);
    for (sid, seq) in [(1, 0), (1, 1), (2, 12345), (7, (1 << 40) - 1), (1 << 22, 9)] {
        let id = queue_id(sid, seq);
        assert!(id >= 0, "ids stay positive");
        assert_eq!(split_queue_id(id), (sid, seq));
        // Every id of a session lies in [queue_id(sid, 0), queue_id(sid + 1, 0)).
        assert!(queue_id(sid, 0) <= id && id < queue_id(sid + 1, 0));
    }
    // Within a session, id order is seq order; the largest seq sorts before the next sid.
    assert!(queue_id(5, 1) < queue_id(5, 2));
    assert!(queue_id(5, (1 << 40) - 1) < queue_id(6, 0));
}

#[test]
fn group_commit_reports_every_token_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut cmds = vec![batch(1, vec![upsert(1), upsert(2)])];
    for t in 2..=40u64 {
        cmds.push(batch(t, vec![enqueue(t % 2 + 1, t, 10)]));
    }
    let ev = run_writer(&o, cmds);
    let c = committed(&ev);
    assert_eq!(c, (1..=40).map(|t| (t, true)).collect::<Vec<_>>());
    assert_eq!(rows(&o, 1).len() + rows(&o, 2).len(), 39);
    assert_counters_consistent(&o);

    // Through the real writer thread, whatever the grouping turns out to be.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let (store, _, mut ev) = Store::open(&o).unwrap();
    store.send(batch(1, vec![upsert(1)])).unwrap();
    for t in 2..=300u64 {
        store.send(batch(t, vec![enqueue(1, t, 8)])).unwrap();
    }
    for t in 1..=300u64 {
        match ev.blocking_recv() {
            Some(StoreEvent::Committed { token, ok }) => assert_eq!((token, ok), (t, true)),
            other => panic!("expected Committed {t}, got {other:?}"),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
    assert_eq!(rows(&o, 1).len(), 299);
}

#[test]
fn read_queue_sees_earlier_batches_and_only_unsent_rows() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut first = vec![upsert(4)];
    first.extend((0..5).map(|s| enqueue(4, s, 3)));
    let ev = run_writer(
        &o,
        vec![
            batch(1, first),
            batch(
                2,
                vec![Op::MarkSent {
                    sid: 4,
                    seq: 0,
                    packet_id: 9,
                }],
            ),
            Command::ReadQueue {
                sid: 4,
                from_seq: 0,
                limit: 10,
                next_seq_at_request: 5,
                sent: false,
            },
            batch(3, vec![enqueue(4, 5, 3)]),
            Command::ReadQueue {
                sid: 4,
                from_seq: 3,
                limit: 2,
                next_seq_at_request: 6,
                sent: false,
            },
        ],
    );
    let shape: Vec<String> = ev
        .iter()
        .map(|e| match e {
            StoreEvent::Committed { token, ok } => format!("c{token}{ok}"),
            StoreEvent::QueueRows {
                rows,
                from_seq,
                limit,
                next_seq_at_request,
                ..
            } => format!(
                "r{from_seq}/{limit}/{next_seq_at_request}:{:?}",
                rows.iter().map(|r| (r.seq, r.state)).collect::<Vec<_>>()
            ),
            StoreEvent::Removed { .. } => "removed".into(),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "c1true",
            "c2true",
            "r0/10/5:[(1, 0), (2, 0), (3, 0), (4, 0)]",
            "c3true",
            "r3/2/6:[(3, 0), (4, 0)]",
        ]
    );
    // The packet bytes come back as stored.
    let StoreEvent::QueueRows { rows, .. } = &ev[2] else {
        unreachable!()
    };
    assert_eq!(rows[0].packet, Bytes::from(vec![1u8; 3]));
}

/// A read-back asks for as many rows as the session's window and the gateway's read-back
/// budget leave, a different `LIMIT` almost every time. SQLite (3.47+) plans a bound
/// `LIMIT ?` as a constant and re-prepares the statement whenever the value bound changes,
/// unless the connection asks for query-planner stability: measured at 10,000 sessions × 100
/// queued, re-parsing that one SELECT took 7% of the broker's CPU during a drain.
#[test]
fn a_read_back_is_not_re_prepared_when_its_limit_changes() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut ops = vec![upsert(4)];
    ops.extend((0..20).map(|s| enqueue(4, s, 3)));
    commit_each(&o, vec![ops]);
    let (conn, _rec) = load::open_and_load(&o).expect("open");
    let staging = staging::Staging::load(&conn).unwrap();
    for limit in 1..=8u32 {
        let rows = apply::read_rows(&conn, &staging, 4, u64::from(limit), limit, false).unwrap();
        assert_eq!(rows.len(), limit as usize);
        assert_eq!(rows[0].seq, u64::from(limit));
    }
    let st = conn.prepare_cached(apply::READ_QUEUE_SQL).unwrap();
    assert_eq!(
        st.get_status(rusqlite::StatementStatus::RePrepare),
        0,
        "the read-back statement was re-prepared"
    );
}

#[test]
fn delete_oldest_drops_only_unsent_rows_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut first = vec![upsert(2)];
    first.extend((0..6).map(|s| enqueue(2, s, 10 + s as usize)));
    let ev = run_writer(
        &o,
        vec![
            batch(1, first),
            batch(
                2,
                vec![
                    Op::MarkSent {
                        sid: 2,
                        seq: 0,
                        packet_id: 1,
                    },
                    Op::DeleteOldest {
                        sid: 2,
                        from_seq: 0,
                        count: 2,
                        refusable: false,
                    },
                ],
            ),
        ],
    );
    assert_eq!(committed(&ev), [(1, true), (2, true)]);
    assert_eq!(rows(&o, 2), [(0, 1), (3, 0), (4, 0), (5, 0)]);
    let (queued, bytes, dropped): (i64, i64, i64) = db(&o)
        .query_row(
            "SELECT queued, queued_bytes, dropped FROM session WHERE sid = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((queued, bytes, dropped), (4, 10 + 13 + 14 + 15, 2));
    assert_counters_consistent(&o);
}

#[derive(Debug, Clone)]
enum TestOp {
    Enqueue {
        sid: Sid,
        size: usize,
        sent: bool,
    },
    MarkSent {
        sid: Sid,
        nth: usize,
    },
    Delete {
        sid: Sid,
        nth: usize,
    },
    DeleteOldest {
        sid: Sid,
        count: u32,
    },
    /// The session ends and a new one takes its place (new rows start from seq 0 again).
    Recreate {
        sid: Sid,
    },
    /// Enqueue something that expires at once, then sweep.
    Sweep {
        sid: Sid,
    },
    /// Ends the current group (a read between batches).
    Read {
        sid: Sid,
    },
}

fn test_op() -> impl Strategy<Value = TestOp> {
    let sid = 1..4u64;
    prop_oneof![
        4 => (sid.clone(), 0..200usize, any::<bool>())
            .prop_map(|(sid, size, sent)| TestOp::Enqueue { sid, size, sent }),
        2 => (sid.clone(), 0..8usize).prop_map(|(sid, nth)| TestOp::MarkSent { sid, nth }),
        3 => (sid.clone(), 0..8usize).prop_map(|(sid, nth)| TestOp::Delete { sid, nth }),
        1 => (sid.clone(), 0..4u32).prop_map(|(sid, count)| TestOp::DeleteOldest { sid, count }),
        1 => sid.clone().prop_map(|sid| TestOp::Recreate { sid }),
        1 => sid.clone().prop_map(|sid| TestOp::Sweep { sid }),
        1 => sid.prop_map(|sid| TestOp::Read { sid }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// After any mix of ops (several tokens per group, groups split by reads and sweeps),
    /// `session.queued` / `queued_bytes` equal `count(*)` / `sum(size)` of the queue rows.
    #[test]
    fn session_counters_match_queue_rows_after_mixed_ops(
        ops in proptest::collection::vec(test_op(), 1..60),
        per_token in 1..4usize,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let mut next_seq = [0u64; 4];
        let mut cmds = vec![batch(1, (1..4).map(upsert).collect())];
        let mut token = 2;
        let mut pending: Vec<Op> = Vec::new();
        let flush = |pending: &mut Vec<Op>, cmds: &mut Vec<Command>, token: &mut u64| {
            if !pending.is_empty() {
                cmds.push(batch(*token, std::mem::take(pending)));
                *token += 1;
            }
        };
        for op in ops {
            match op {
                TestOp::Enqueue { sid, size, sent } => {
                    let seq = next_seq[sid as usize];
                    next_seq[sid as usize] += 1;
                    let mut e = enqueue(sid, seq, size);
                    if let Op::Enqueue { packet_id, .. } = &mut e {
                        *packet_id = sent.then_some(7);
                    }
                    pending.push(e);
                }
                TestOp::MarkSent { sid, nth } => pending.push(Op::MarkSent {
                    sid,
                    seq: nth as u64 % next_seq[sid as usize].max(1),
                    packet_id: 3,
                }),
                TestOp::Delete { sid, nth } => pending.push(Op::Delete {
                    sid,
                    seq: nth as u64 % next_seq[sid as usize].max(1),
                }),
                TestOp::DeleteOldest { sid, count } => {
                    pending.push(Op::DeleteOldest {
                        sid,
                        from_seq: 0,
                        count,
                        refusable: false,
                    })
                }
                TestOp::Recreate { sid } => {
                    pending.push(Op::DeleteSession { sid });
                    pending.push(upsert(sid));
                    next_seq[sid as usize] = 0;
                }
                TestOp::Sweep { sid } => {
                    let seq = next_seq[sid as usize];
                    next_seq[sid as usize] += 1;
                    let mut e = enqueue(sid, seq, 5);
                    if let Op::Enqueue { expires_at, .. } = &mut e {
                        *expires_at = Some(1);
                    }
                    pending.push(e);
                    flush(&mut pending, &mut cmds, &mut token);
                    cmds.push(Command::SweepExpired { now_ms: unix_ms() });
                }
                TestOp::Read { sid } => {
                    flush(&mut pending, &mut cmds, &mut token);
                    cmds.push(Command::ReadQueue {
                        sid,
                        from_seq: 0,
                        limit: 100,
                        next_seq_at_request: 0,
                        sent: false,
                    });
                }
            }
            if pending.len() >= per_token {
                flush(&mut pending, &mut cmds, &mut token);
            }
        }
        flush(&mut pending, &mut cmds, &mut token);
        let ev = run_writer(&o, cmds);
        let c = committed(&ev);
        prop_assert_eq!(c.len() as u64, token - 1);
        prop_assert!(c.iter().all(|(_, ok)| *ok));
        prop_assert!(c.windows(2).all(|w| w[0].0 < w[1].0));
        assert_counters_consistent(&o);
    }
}

#[test]
fn recovery_returns_sent_rows_in_order_and_next_seq_after_the_last_row() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let mut first = vec![upsert(3), upsert(5), upsert(6)];
    first.extend((0..6).map(|s| enqueue(3, s, 4)));
    first.extend((0..3).map(|s| enqueue(5, s, 4)));
    let mark = |sid, seq, packet_id| Op::MarkSent {
        sid,
        seq,
        packet_id,
    };
    run_writer(
        &o,
        vec![
            batch(1, first),
            batch(2, vec![mark(3, 0, 10), mark(3, 1, 11), mark(3, 2, 12)]),
            batch(
                3,
                vec![
                    Op::MarkReleased { sid: 3, seq: 1 },
                    Op::Delete { sid: 3, seq: 0 },
                    // Session 5: everything acknowledged.
                    Op::Delete { sid: 5, seq: 0 },
                    Op::Delete { sid: 5, seq: 1 },
                    Op::Delete { sid: 5, seq: 2 },
                    Op::SessionOffline {
                        sid: 6,
                        at_ms: 1234,
                        expiry: 77,
                        will: None,
                    },
                ],
            ),
        ],
    );
    let (_conn, rec) = load::open_and_load(&o).unwrap();
    let s3 = rec.sessions.iter().find(|s| s.sid == 3).unwrap();
    let inflight: Vec<(u64, u8, Option<u16>)> = s3
        .inflight
        .iter()
        .map(|r| (r.seq, r.state, r.packet_id))
        .collect();
    assert_eq!(inflight, [(1, 2, Some(11)), (2, 1, Some(12))]);
    assert_eq!(s3.inflight[0].packet, Bytes::from(vec![1u8; 4]));
    assert_eq!((s3.queued, s3.queued_bytes), (5, 20));
    assert_eq!(s3.next_seq, 6);
    assert_eq!(
        s3.disconnected_at, None,
        "was connected when the store closed"
    );
    let s5 = rec.sessions.iter().find(|s| s.sid == 5).unwrap();
    assert!(s5.inflight.is_empty());
    assert_eq!((s5.queued, s5.next_seq), (0, 0));
    let s6 = rec.sessions.iter().find(|s| s.sid == 6).unwrap();
    assert_eq!((s6.disconnected_at, s6.expiry), (Some(1234), 77));
    assert_eq!(s6.client_id, "client-6");
}

/// A budget that no single 100 KiB message fits into.
fn tiny_budget(dir: &Path, policy: BudgetPolicy) -> StoreOptions {
    StoreOptions {
        max_bytes: 64 * 1024,
        budget_policy: policy,
        ..opts(dir)
    }
}

#[test]
fn a_failed_commit_refuses_only_tokens_that_accept_data_and_still_applies_release_ops() {
    let dir = tempfile::tempdir().unwrap();
    let o = tiny_budget(dir.path(), BudgetPolicy::RejectNew);
    let mut first = vec![upsert(1)];
    first.extend((0..4).map(|s| enqueue(1, s, 100)));
    let big = 100 * 1024;
    assert_eq!(
        committed(&run_writer(&o, vec![batch(1, first)])),
        [(1, true)]
    );
    // One group: tokens 3, 5, 6 cannot fit whatever else happens.
    let ev = run_writer(
        &o,
        vec![
            batch(2, vec![Op::Delete { sid: 1, seq: 0 }]),
            batch(3, vec![enqueue(1, 4, big)]),
            batch(
                4,
                vec![
                    Op::MarkSent {
                        sid: 1,
                        seq: 1,
                        packet_id: 5,
                    },
                    Op::Count {
                        name: "test",
                        add: 2,
                    },
                ],
            ),
            batch(5, vec![enqueue(1, 5, big), Op::Delete { sid: 1, seq: 2 }]),
            batch(
                6,
                vec![Op::Retain {
                    topic: "t".into(),
                    message: Some((None, Bytes::from(vec![0; big]))),
                }],
            ),
            batch(7, vec![Op::MarkReleased { sid: 1, seq: 1 }]),
        ],
    );
    assert_eq!(
        committed(&ev),
        [
            (2, true),
            (3, false),
            (4, true),
            (5, false),
            (6, false),
            (7, true)
        ]
    );
    // Release ops of refused and accepted tokens alike are applied; nothing refused is.
    assert_eq!(rows(&o, 1), [(1, 2), (3, 0)]);
    assert_eq!(counter(&o, "test"), 2);
    let retained: i64 = db(&o)
        .query_row("SELECT count(*) FROM retained", [], |r| r.get(0))
        .unwrap();
    assert_eq!(retained, 0);
    assert_counters_consistent(&o);

    // The budget is not a one-way door: small messages fit again.
    let ev = run_writer(&o, vec![batch(8, vec![enqueue(1, 6, 100)])]);
    assert_eq!(committed(&ev), [(8, true)]);
    assert_eq!(rows(&o, 1), [(1, 2), (3, 0), (6, 0)]);
}

#[test]
fn drop_oldest_budget_makes_room_by_dropping_the_longest_queue_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = tiny_budget(dir.path(), BudgetPolicy::DropOldest);
    // Session 2 has a short queue; session 1's grows past the budget, one message at a
    // time (so each is its own group, as with a steady publisher).
    let mut batches = vec![vec![upsert(1), upsert(2)]];
    batches.extend((0..3).map(|s| vec![enqueue(2, s, 1000)]));
    batches.extend((0..60).map(|s| vec![enqueue(1, s, 1000)]));
    let ev = commit_each(&o, batches);
    let c = committed(&ev);
    assert!(c.iter().all(|(_, ok)| *ok), "drop-oldest accepts: {c:?}");
    let removed: Vec<(Sid, u64, u32)> = ev
        .iter()
        .filter_map(|e| match e {
            StoreEvent::Removed { rows, why } => {
                assert_eq!(*why, "disk budget");
                Some(rows.clone())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert!(!removed.is_empty(), "the budget was reached");
    assert!(removed.iter().all(|r| r.0 == 1), "only the longest queue");
    let left = rows(&o, 1);
    // What is left is a suffix: everything after the dropped ones, in order.
    let first_left = left[0].0;
    assert_eq!(
        left.iter().map(|r| r.0).collect::<Vec<_>>(),
        (first_left..60).collect::<Vec<_>>()
    );
    assert_eq!(removed.len() as u64, first_left);
    assert_eq!(rows(&o, 2).len(), 3, "the shorter queue is untouched");
    assert_eq!(counter(&o, "dropped_disk_budget"), first_left as i64);
    let dropped: i64 = db(&o)
        .query_row("SELECT dropped FROM session WHERE sid = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(dropped, first_left as i64);
    assert_counters_consistent(&o);
}

#[test]
fn drop_oldest_budget_drops_queued_rows_when_the_longest_queue_is_all_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let o = tiny_budget(dir.path(), BudgetPolicy::DropOldest);
    // Session 1: 12 rows, all sent (in flight: not droppable). Session 2: 5 queued rows.
    let mut first = vec![upsert(1), upsert(2)];
    for s in 0..12 {
        let mut e = enqueue(1, s, 1000);
        if let Op::Enqueue { packet_id, .. } = &mut e {
            *packet_id = Some(s as u16 + 1);
        }
        first.push(e);
    }
    first.extend((0..5).map(|s| enqueue(2, s, 1000)));
    let ev = run_writer(&o, vec![batch(1, first)]);
    assert_eq!(committed(&ev), [(1, true)], "the fill fits the budget");
    // Now more than what is free, one message at a time.
    let ev = commit_each(&o, (5..30).map(|s| vec![enqueue(2, s, 1000)]).collect());
    let c = committed(&ev);
    assert!(
        c.iter().all(|(_, ok)| *ok),
        "drop-oldest must make room from droppable rows: {c:?}"
    );
    assert_eq!(rows(&o, 1).len(), 12, "in-flight rows are never dropped");
    assert_eq!(rows(&o, 2).last().map(|r| r.0), Some(29));
    assert_counters_consistent(&o);
}

#[test]
fn drop_oldest_budget_does_not_drop_a_row_being_marked_sent_in_the_same_group() {
    let dir = tempfile::tempdir().unwrap();
    let o = tiny_budget(dir.path(), BudgetPolicy::DropOldest);
    // Fill to the brim (under reject-new, so nothing is dropped yet).
    let fill = StoreOptions {
        budget_policy: BudgetPolicy::RejectNew,
        ..o.clone()
    };
    // (More than 64 KiB of messages, whatever the page size.)
    let mut batches = vec![vec![upsert(1)]];
    batches.extend((0..80).map(|s| vec![enqueue(1, s, 1000)]));
    let c = committed(&commit_each(&fill, batches));
    assert!(c.iter().any(|(_, ok)| !ok), "the fill reached the budget");
    // The router sends seq 0 (its PUBLISH waits for this token) while a new message needs
    // room: the row about to be sent must not be the one dropped.
    let mark = Op::MarkSent {
        sid: 1,
        seq: 0,
        packet_id: 1,
    };
    let ev = run_writer(
        &o,
        vec![batch(2, vec![mark]), batch(3, vec![enqueue(1, 80, 1000)])],
    );
    assert_eq!(committed(&ev), [(2, true), (3, true)]);
    let dropped: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            StoreEvent::Removed { rows, .. } => Some(rows.iter().map(|r| r.1)),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(!dropped.is_empty());
    assert!(!dropped.contains(&0), "dropped {dropped:?}");
    assert_eq!(rows(&o, 1)[0], (0, 1), "seq 0 is on disk as sent");
    assert_counters_consistent(&o);
}

#[test]
fn a_newer_schema_is_refused_and_an_empty_file_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    // Version 0: an SQLite file with nothing in it.
    Connection::open(&o.path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 0; VACUUM;")
        .unwrap();
    let (conn, rec) = load::open_and_load(&o).unwrap();
    assert!(rec.sessions.is_empty());
    let v: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, schema::latest_version());
    drop(conn);

    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    Connection::open(&o.path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99;")
        .unwrap();
    match load::open_and_load(&o) {
        Err(StoreError::TooNew { found: 99, latest }) => {
            assert_eq!(latest, schema::latest_version())
        }
        Err(e) => panic!("expected TooNew, got {e}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
}

#[test]
fn the_connection_gets_the_configured_page_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = opts(dir.path());
    let conn = Connection::open(&o.path).expect("open");
    configure(&conn, o.synchronous, o.page_size, 512).expect("configure");
    let kib: i64 = conn
        .query_row("PRAGMA cache_size", [], |r| r.get(0))
        .expect("cache_size");
    assert_eq!(kib, -512, "negative: KiB, not pages");
}

/// A small page cache holds fewer clean pages (memory), but a transaction still keeps its
/// changes in memory up to [`SPILL_KIB`] before it writes any to the WAL: spilling early
/// would write pages twice (flash wear) whatever `store.cache_size_kib` says.
#[test]
fn a_transaction_larger_than_the_page_cache_is_not_spilled_before_its_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = opts(dir.path());
    let mut conn = Connection::open(&o.path).expect("open");
    configure(&conn, o.synchronous, o.page_size, 256).expect("configure");
    conn.execute_batch("CREATE TABLE t(v BLOB);")
        .expect("create");
    let wal = dir.path().join(format!(
        "{}-wal",
        o.path.file_name().and_then(|n| n.to_str()).expect("name")
    ));
    let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let before = wal_len();
    let tx = conn.transaction().expect("begin");
    // ~2 MiB of pages: 8 times the cache, a quarter of the spill point.
    for _ in 0..2048 {
        tx.execute("INSERT INTO t(v) VALUES (zeroblob(900))", [])
            .expect("insert");
    }
    let during = wal_len();
    tx.commit().expect("commit");
    assert_eq!(
        during,
        before,
        "{} bytes went to the WAL before the commit",
        during - before
    );
    assert!(
        wal_len() > before + 1024 * 1024,
        "the commit wrote its pages"
    );
}
