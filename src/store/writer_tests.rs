//! Tests of the writer thread: group commit, held-back deletes, transient rows, reads in
//! a group, refused batches and the disk budget.

use std::sync::Arc;

use bytes::Bytes;

use super::super::apply::transient_rows;
use super::super::{queue_id, Command, Op, Store, StoreEvent, StoreOptions};
use super::*;

fn open(
    dir: &std::path::Path,
    max_bytes: u64,
) -> (Store, tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) {
    let opts = StoreOptions {
        max_bytes,
        ..StoreOptions::for_test(dir)
    };
    let (store, _, rx) = Store::open(&opts).expect("open store");
    (store, rx)
}

fn enqueue(sid: Sid, seq: u64, len: usize) -> Op {
    Op::Enqueue {
        sid,
        seq,
        packet_id: None,
        expires_at: None,
        size: len as u32,
        packet: Bytes::from(vec![7u8; len]),
    }
}

fn session(sid: Sid) -> Op {
    Op::UpsertSession {
        sid,
        client_id: Arc::from("c"),
        protocol: 4,
        expiry: 60,
        will: None,
    }
}

fn read(sid: Sid) -> Command {
    Command::ReadQueue {
        sid,
        from_seq: 0,
        limit: 100,
        next_seq_at_request: 0,
        sent: false,
    }
}

/// Events in submission order; a read sees exactly the batches submitted before it.
fn expect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) -> Vec<String> {
    expect_n(rx, 3)
}

fn expect_n(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| match rx.blocking_recv().expect("event") {
            StoreEvent::Committed { token, ok } => format!("commit {token} {ok}"),
            StoreEvent::QueueRows { rows, .. } => {
                format!("rows {:?}", rows.iter().map(|r| r.seq).collect::<Vec<_>>())
            }
            StoreEvent::Removed { .. } => "removed".into(),
        })
        .collect()
}

#[test]
fn rows_inserted_and_deleted_in_one_group_are_not_written() {
    let del = |sid, seq| Op::Delete { sid, seq };
    let batch = |ops| Item::Batch(0, ops);
    let read = |sid| Item::Read {
        sid,
        from_seq: 0,
        limit: 1,
        next_seq_at_request: 0,
        sent: false,
    };
    let group = vec![
        batch(vec![enqueue(1, 0, 5), enqueue(1, 1, 5), enqueue(2, 0, 5)]),
        batch(vec![del(1, 0), del(2, 0), del(3, 0)]),
        read(2),
        batch(vec![
            enqueue(4, 0, 5),
            Op::DeleteOldest {
                sid: 4,
                from_seq: 0,
                count: 1,
                refusable: false,
            },
        ]),
        batch(vec![del(4, 0)]),
        batch(vec![Op::Enqueue {
            sid: 5,
            seq: 0,
            packet_id: Some(9),
            expires_at: None,
            size: 5,
            packet: Bytes::from_static(b"12345"),
        }]),
        read(5),
        batch(vec![del(5, 0)]),
    ];
    // Session 2 is read and session 4 trimmed in the group: their unsent rows are left
    // alone. Session 5's row was inserted as sent: no read can see it. Row (3, 0) was
    // inserted by an earlier group: deleted for real.
    assert_eq!(transient_rows(&group), HashSet::from([(1, 0), (5, 0)]));

    let dir = tempfile::tempdir().unwrap();
    let (store, mut rx) = open(dir.path(), 0);
    let session = session(1);
    store
        .send(Command::Batch {
            token: 1,
            ops: vec![
                session,
                enqueue(1, 0, 10),
                Op::MarkSent {
                    sid: 1,
                    seq: 0,
                    packet_id: 1,
                },
                enqueue(1, 1, 10),
                del(1, 0),
            ],
        })
        .unwrap();
    assert_eq!(expect_one(&mut rx), "commit 1 true");
    let db = Connection::open(dir.path().join("holdfast.db")).unwrap();
    let rows: Vec<i64> = db
        .prepare("SELECT id FROM queue_all")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec![queue_id(1, 1)]);
    close(store);
    let (queued, bytes): (i64, i64) = db
        .query_row(
            "SELECT queued, queued_bytes FROM session WHERE sid = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((queued, bytes), (1, 10), "counters match the rows");
}

#[test]
fn held_back_deletes_are_applied_as_ranges_before_anything_that_could_see_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rx) = open(dir.path(), 0);
    let mut ops = vec![session(1)];
    ops.extend((0..10).map(|seq| enqueue(1, seq, 10)));
    store.send(Command::Batch { token: 1, ops }).unwrap();
    assert_eq!(expect_one(&mut rx), "commit 1 true");
    let del = |seq| Op::Delete { sid: 1, seq };
    // 0 and 3..=5 and 9 are deleted (two runs and a single row, out of order); the
    // oldest unsent row is then 1, which the trim must drop (not 0, already deleted);
    // row 2 is deleted and then enqueued again, so it must exist at the end.
    let ops = vec![
        del(5),
        del(3),
        del(0),
        del(4),
        del(9),
        del(42),
        Op::DeleteOldest {
            sid: 1,
            from_seq: 0,
            count: 1,
            refusable: false,
        },
        del(2),
        enqueue(1, 2, 20),
        del(7),
    ];
    store.send(Command::Batch { token: 2, ops }).unwrap();
    assert_eq!(expect_one(&mut rx), "commit 2 true");
    store.send(read(1)).unwrap();
    match rx.blocking_recv().expect("rows") {
        StoreEvent::QueueRows { rows, .. } => {
            let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, vec![2, 6, 8]);
        }
        _ => panic!("expected queue rows"),
    }
    close(store);
    let db = Connection::open(dir.path().join("holdfast.db")).unwrap();
    let counters: (i64, i64, i64) = db
        .query_row(
            "SELECT queued, queued_bytes, dropped FROM session WHERE sid = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(counters, (3, 40, 1), "counters match the rows");
}

#[test]
fn read_in_a_group_sees_earlier_batches_only_and_is_reported_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rx) = open(dir.path(), 0);
    let session = session(1);
    store
        .send(Command::Batch {
            token: 1,
            ops: vec![session, enqueue(1, 0, 10), enqueue(1, 1, 10)],
        })
        .unwrap();
    store.send(read(1)).unwrap();
    store
        .send(Command::Batch {
            token: 2,
            ops: vec![enqueue(1, 2, 10)],
        })
        .unwrap();
    assert_eq!(
        expect(&mut rx),
        ["commit 1 true", "rows [0, 1]", "commit 2 true"]
    );
}

#[test]
fn one_oversized_message_does_not_fail_the_rest_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        max_bytes: 64 * 1024,
        ..StoreOptions::for_test(dir.path())
    };
    let (conn, rec) = super::super::load::open_and_load(&opts).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let counts = super::super::counts::Counts::of(&rec);
    let mut w = Writer::new(conn, opts, tx, rec.clock, counts);
    let mut group = vec![
        Item::Batch(1, vec![session(1), enqueue(1, 0, 10)]),
        Item::Batch(2, vec![enqueue(1, 1, 200 * 1024)]),
        Item::Read {
            sid: 1,
            from_seq: 0,
            limit: 10,
            next_seq_at_request: 3,
            sent: false,
        },
        Item::Batch(3, vec![enqueue(1, 2, 10)]),
    ];
    w.commit_group(&mut group);
    let got = expect_n(&mut rx, 4);
    assert_eq!(
        got,
        vec![
            "commit 1 true",
            "commit 2 false",
            "rows [0]",
            "commit 3 true"
        ],
        "only the message that cannot fit is refused, in order"
    );
}

#[test]
fn a_refused_resume_still_clears_the_disconnect_time() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rx) = open(dir.path(), 64 * 1024);
    let offline = Op::SessionOffline {
        sid: 1,
        at_ms: 1_000,
        expiry: 60,
        will: None,
    };
    store
        .send(Command::Batch {
            token: 1,
            ops: vec![session(1), offline],
        })
        .unwrap();
    assert_eq!(expect_one(&mut rx), "commit 1 true");
    // The resume carries a will too large for the budget: refused, but the session is
    // online, and its row must not keep the old disconnect time.
    let resume = Op::UpsertSession {
        sid: 1,
        client_id: Arc::from("c"),
        protocol: 5,
        expiry: 60,
        will: Some(super::super::StoredWill {
            packet: Bytes::from(vec![1u8; 200 * 1024]),
            delay: 0,
        }),
    };
    store
        .send(Command::Batch {
            token: 2,
            ops: vec![Op::MarkOnline { sid: 1 }, resume],
        })
        .unwrap();
    assert_eq!(expect_one(&mut rx), "commit 2 false");
    let db = Connection::open(dir.path().join("holdfast.db")).unwrap();
    let at: Option<i64> = db
        .query_row(
            "SELECT disconnected_at FROM session WHERE sid = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(at, None);
}

#[test]
fn rows_with_overflow_pages_can_be_marked_sent_at_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rx) = open(dir.path(), 64 * 1024);
    store
        .send(Command::Batch {
            token: 1,
            ops: vec![session(1), enqueue(1, 0, 6000)],
        })
        .unwrap();
    assert_eq!(expect_one(&mut rx), "commit 1 true");
    let mut token = 2;
    loop {
        store
            .send(Command::Batch {
                token,
                ops: vec![enqueue(1, token, 6000)],
            })
            .unwrap();
        let got = expect_one(&mut rx);
        if got.ends_with("false") {
            break;
        }
        token += 1;
        assert!(token < 100, "the budget never filled");
    }
    token += 1;
    for seq in 0..3 {
        store
            .send(Command::Batch {
                token,
                ops: vec![Op::MarkSent {
                    sid: 1,
                    seq,
                    packet_id: seq as u16 + 1,
                }],
            })
            .unwrap();
        assert_eq!(expect_one(&mut rx), format!("commit {token} true"));
        token += 1;
    }
}

#[test]
fn a_read_in_a_failed_group_never_returns_refused_rows() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB budget: the 200 KiB message of token 2 cannot be stored.
    let (store, mut rx) = open(dir.path(), 64 * 1024);
    store
        .send(Command::Batch {
            token: 1,
            ops: vec![enqueue(1, 0, 10)],
        })
        .unwrap();
    assert_eq!(expect_one(&mut rx), "commit 1 true", "a small message fits");
    store
        .send(Command::Batch {
            token: 2,
            ops: vec![enqueue(1, 1, 200 * 1024), Op::Delete { sid: 1, seq: 0 }],
        })
        .unwrap();
    store.send(read(1)).unwrap();
    store
        .send(Command::Batch {
            token: 3,
            ops: vec![enqueue(1, 2, 10)],
        })
        .unwrap();
    let got = expect(&mut rx);
    assert_eq!(got[0], "commit 2 false");
    // The refused row 1 is never returned; the delete (a release op) was kept.
    assert_eq!(got[1], "rows []");
    assert!(got[2].starts_with("commit 3"), "{got:?}");
}

/// Stops the writer cleanly (it writes the queue counters to the `session` rows).
fn close(store: Store) {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(store.close());
}

fn expect_one(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) -> String {
    match rx.blocking_recv().expect("event") {
        StoreEvent::Committed { token, ok } => format!("commit {token} {ok}"),
        other => format!("{other:?}"),
    }
}
