//! Rows in the staging log (`store::staging`) behave like rows in `queue`: read back in
//! order with merged ones, marked sent, acknowledged, dropped, expired, deleted with their
//! session, seen by `inspect`, and recovered exactly once after a stop without a merge.
//!
//! Each fan-in round appends one message to each of [`SESSIONS`] sessions in one group,
//! which the writer stages whatever the thresholds (`staging::STAGE_MIN_GROUP`,
//! `DIRECT_PER_SESSION`); the tests check the log holds rows before they look.

use std::sync::Arc;

use bytes::Bytes;
use rusqlite::params;

use super::writer::Writer;
use super::*;

pub(super) const SESSIONS: Sid = 40;

pub(super) fn upsert(sid: Sid) -> Op {
    Op::UpsertSession {
        sid,
        client_id: Arc::from(format!("client-{sid}")),
        protocol: 5,
        expiry: 3600,
        will: None,
    }
}

fn msg(sid: Sid, seq: u64, expires_at: Option<i64>) -> Op {
    Op::Enqueue {
        sid,
        seq,
        packet_id: None,
        expires_at,
        size: 64,
        packet: Bytes::from(vec![seq as u8; 64]),
    }
}

/// One message `seq` for every session, in one batch.
pub(super) fn round(seq: u64) -> Vec<Op> {
    (1..=SESSIONS).map(|sid| msg(sid, seq, None)).collect()
}

pub(super) fn staged(o: &StoreOptions) -> i64 {
    Connection::open(&o.path)
        .unwrap()
        .query_row("SELECT count(*) FROM queue_log", [], |r| r.get(0))
        .unwrap()
}

/// (seq, state) of a session's rows in `queue` and in the log.
pub(super) fn rows(o: &StoreOptions, sid: Sid) -> Vec<(u64, u8)> {
    let c = Connection::open(&o.path).unwrap();
    let (lo, hi) = queue_range(sid);
    let mut st = c
        .prepare("SELECT id, state FROM queue_all WHERE id BETWEEN ?1 AND ?2 ORDER BY id")
        .unwrap();
    st.query_map(params![lo, hi], |r| {
        Ok((split_queue_id(r.get(0)?).1, r.get::<_, i64>(1)? as u8))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// A writer on the test thread over `cmds`; `clean` ends with a shutdown (merge, counters
/// written), otherwise the channel just closes (the log and stale counters stay, as after
/// a crash, but everything reported is committed).
pub(super) fn run(o: &StoreOptions, cmds: Vec<Command>, clean: bool) -> Vec<StoreEvent> {
    run_on(o, cmds, clean, |_| {})
}

/// [`run`], with `prepare` given the writer's connection first.
pub(super) fn run_on(
    o: &StoreOptions,
    cmds: Vec<Command>,
    clean: bool,
    prepare: impl FnOnce(&Connection),
) -> Vec<StoreEvent> {
    let (conn, rec) = load::open_and_load(o).expect("open");
    prepare(&conn);
    let (tx, rx) = std::sync::mpsc::channel();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    for c in cmds {
        tx.send(c).unwrap();
    }
    if clean {
        let (done, _done_rx) = tokio::sync::oneshot::channel();
        tx.send(Command::Shutdown(done)).unwrap();
    }
    drop(tx);
    let counts = super::counts::Counts::of(&rec);
    Writer::new(conn, o.clone(), ev_tx, rec.clock, counts).run(rx);
    let mut events = Vec::new();
    while let Ok(e) = ev_rx.try_recv() {
        events.push(e);
    }
    events
}

pub(super) fn batch(token: u64, ops: Vec<Op>) -> Command {
    Command::Batch { token, ops }
}

/// Ends the writer's group: what follows is applied in a transaction of its own (a row
/// staged before is staged when it is touched).
pub(super) fn group_end() -> Command {
    Command::Ping(tokio::sync::oneshot::channel().0)
}

fn read(sid: Sid, sent: bool) -> Command {
    Command::ReadQueue {
        sid,
        from_seq: 0,
        limit: 100,
        next_seq_at_request: 0,
        sent,
    }
}

fn read_seqs(events: &[StoreEvent]) -> Vec<Vec<u64>> {
    events
        .iter()
        .filter_map(|e| match e {
            StoreEvent::QueueRows { rows, failed, .. } => {
                assert!(!failed, "a read failed");
                Some(rows.iter().map(|r| r.seq).collect())
            }
            _ => None,
        })
        .collect()
}

pub(super) fn all_committed(events: &[StoreEvent]) {
    for e in events {
        if let StoreEvent::Committed { token, ok } = e {
            assert!(ok, "token {token} refused");
        }
    }
}

pub(super) fn sessions_set_up(o: &StoreOptions) {
    let events = run(
        o,
        vec![batch(1, (1..=SESSIONS).map(upsert).collect())],
        true,
    );
    all_committed(&events);
}

#[test]
fn staged_rows_are_read_back_in_order_after_merged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    // Round 0 merged (the checkpoint merges first), rounds 1 and 2 staged.
    let events = run(
        &o,
        vec![
            batch(1, round(0)),
            Command::Checkpoint,
            batch(2, round(1)),
            batch(3, round(2)),
        ],
        false,
    );
    all_committed(&events);
    assert_eq!(staged(&o), 2 * SESSIONS as i64, "rounds 1 and 2 are staged");
    // The next run starts by merging: read within a run whose rows are staged again.
    let events = run(
        &o,
        vec![batch(1, round(3)), read(7, false), read(7, true)],
        false,
    );
    all_committed(&events);
    assert_eq!(read_seqs(&events), vec![vec![0, 1, 2, 3], vec![]]);
    assert_eq!(staged(&o), SESSIONS as i64, "round 3 is staged");
    // Marked sent while staged: read as in flight, not as queued.
    let events = run(
        &o,
        vec![
            batch(1, round(4)),
            group_end(),
            batch(
                2,
                vec![
                    Op::MarkSent {
                        sid: 7,
                        seq: 3,
                        packet_id: 9,
                    },
                    Op::MarkSent {
                        sid: 7,
                        seq: 4,
                        packet_id: 10,
                    },
                ],
            ),
            read(7, true),
        ],
        false,
    );
    assert_eq!(read_seqs(&events), vec![vec![3, 4]]);
    assert!(staged(&o) > 0);
}

#[test]
fn staged_rows_are_acknowledged_dropped_and_deleted_like_queued_ones() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let events = run(
        &o,
        vec![
            batch(1, round(0)),
            batch(2, round(1)),
            group_end(),
            batch(
                3,
                vec![
                    // Session 1: sent, released and acknowledged (QoS 2) while staged.
                    Op::MarkSent {
                        sid: 1,
                        seq: 0,
                        packet_id: 1,
                    },
                    Op::MarkReleased { sid: 1, seq: 0 },
                    Op::Delete { sid: 1, seq: 0 },
                    // Session 2: the queue limit drops one, then the oldest one.
                    Op::Drop { sid: 2, seq: 1 },
                    Op::DeleteOldest {
                        sid: 2,
                        from_seq: 0,
                        count: 1,
                        refusable: false,
                    },
                    // Session 3 ends.
                    Op::DeleteSession { sid: 3 },
                ],
            ),
        ],
        false,
    );
    all_committed(&events);
    assert!(staged(&o) > 0, "the rows are still staged");
    assert_eq!(rows(&o, 1), vec![(1, 0)]);
    assert_eq!(rows(&o, 2), vec![]);
    assert_eq!(rows(&o, 3), vec![]);
    assert_eq!(rows(&o, 4), vec![(0, 0), (1, 0)]);
    // The next start merges and counts again (no clean stop): what was deleted stays
    // deleted, nothing is there twice.
    let (conn, rec) = load::open_and_load(&o).unwrap();
    let staged_after: i64 = conn
        .query_row("SELECT count(*) FROM queue_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(staged_after, 0, "start-up merges the log");
    drop(conn);
    let s = |sid: Sid| rec.sessions.iter().find(|s| s.sid == sid);
    assert!(s(3).is_none(), "the deleted session stays deleted");
    assert_eq!((s(1).unwrap().queued, s(1).unwrap().next_seq), (1, 2));
    assert_eq!((s(2).unwrap().queued, s(2).unwrap().dropped), (0, 2));
    assert_eq!((s(4).unwrap().queued, s(4).unwrap().queued_bytes), (2, 128));
    let total: u64 = rec.sessions.iter().map(|s| s.queued).sum();
    assert_eq!(total, 2 * (SESSIONS - 3) + 1);
    assert_eq!(rows(&o, 4), vec![(0, 0), (1, 0)]);
}

#[test]
fn staged_rows_in_flight_are_recovered_at_the_front_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let events = run(
        &o,
        vec![
            batch(1, round(0)),
            batch(2, round(1)),
            group_end(),
            batch(
                3,
                vec![Op::MarkSent {
                    sid: 5,
                    seq: 0,
                    packet_id: 42,
                }],
            ),
        ],
        false,
    );
    all_committed(&events);
    assert_eq!(staged(&o), 2 * SESSIONS as i64);
    let (_, rec) = load::open_and_load(&o).unwrap();
    let s5 = rec.sessions.iter().find(|s| s.sid == 5).unwrap();
    assert_eq!(s5.inflight.len(), 1);
    assert_eq!(
        (s5.inflight[0].seq, s5.inflight[0].packet_id),
        (0, Some(42))
    );
    assert_eq!((s5.queued, s5.next_seq), (2, 2));
    for sid in 1..=SESSIONS {
        assert_eq!(rows(&o, sid).len(), 2, "session {sid}");
    }
}

#[test]
fn staged_rows_expire_in_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let expiring: Vec<Op> = (1..=SESSIONS).map(|sid| msg(sid, 0, Some(1_000))).collect();
    let events = run(
        &o,
        vec![
            batch(1, expiring),
            batch(2, round(1)),
            Command::SweepExpired { now_ms: 2_000 },
            read(9, false),
        ],
        false,
    );
    all_committed(&events);
    let removed: Vec<(Sid, u64)> = events
        .iter()
        .filter_map(|e| match e {
            StoreEvent::Removed { rows, .. } => Some(rows.iter().map(|r| (r.0, r.1))),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(removed.len(), SESSIONS as usize, "{removed:?}");
    assert!(removed.iter().all(|(_, seq)| *seq == 0));
    assert_eq!(read_seqs(&events), vec![vec![1]]);
    assert_eq!(staged(&o), SESSIONS as i64, "round 1 is still staged");
}

#[test]
fn inspect_sees_and_deletes_staged_rows() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    all_committed(&run(
        &o,
        vec![batch(1, round(0)), batch(2, round(1))],
        false,
    ));
    assert_eq!(staged(&o), 2 * SESSIONS as i64);
    let list = inspect::list_sessions(dir.path()).unwrap();
    assert_eq!(list.len(), SESSIONS as usize);
    assert!(list.iter().all(|s| s.queued == 2 && s.queued_bytes == 128));
    let detail = inspect::show_session(dir.path(), "client-6", 10)
        .unwrap()
        .unwrap();
    assert_eq!(
        detail.queue.iter().map(|q| q.seq).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let deleted = inspect::delete_session(dir.path(), "client-6")
        .unwrap()
        .unwrap();
    assert_eq!(deleted.queued, 2);
    assert_eq!(rows(&o, 6), vec![]);
}

/// A full log is merged a chunk at a time (`staging::CHUNK_ROWS` rows per transaction),
/// taking new commands between two chunks, so a merge does not hold acknowledgements for
/// the whole log: here the channel closes after the first chunk, and the rest is still
/// staged; the next start merges it, and every row is read back once, in order.
#[test]
fn a_full_log_is_merged_a_chunk_at_a_time() {
    use super::staging::{CHUNK_ROWS, MERGE_ROWS};
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let rounds = MERGE_ROWS as u64 / SESSIONS;
    assert!(rounds * SESSIONS >= MERGE_ROWS as u64 && MERGE_ROWS > CHUNK_ROWS);
    let mut cmds = Vec::new();
    for r in 0..rounds {
        cmds.push(batch(r + 1, round(r)));
        cmds.push(group_end());
    }
    let events = run(&o, cmds, false);
    all_committed(&events);
    assert_eq!(
        staged(&o),
        (rounds * SESSIONS) as i64 - CHUNK_ROWS as i64,
        "one chunk merged, the rest still staged"
    );
    assert_eq!(
        rows(&o, 1).len() as u64,
        rounds,
        "each row in exactly one table"
    );
    let events = run(&o, vec![read(1, false), read(SESSIONS, false)], true);
    let all: Vec<u64> = (0..rounds).collect();
    assert_eq!(read_seqs(&events), vec![all.clone(), all]);
    assert_eq!(staged(&o), 0);
}
