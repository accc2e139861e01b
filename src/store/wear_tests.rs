//! Flash wear of the store: how many bytes a commit writes. A durable message costs at
//! least one fsync'd WAL commit, and each commit appends whole database pages (plus a
//! 24-byte frame header each) to the WAL, so the page size and the pages a commit touches
//! decide the bytes written per message (`benches/flash_wear.rs` measures the whole
//! process).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::*;

fn opts(dir: &Path) -> StoreOptions {
    StoreOptions {
        path: db_path(dir),
        synchronous: Synchronous::Full,
        max_bytes: 0,
        min_free_percent: 0,
        budget_policy: BudgetPolicy::RejectNew,
        on_corrupt: OnCorrupt::Quarantine,
        integrity_check: true,
        commit_delay: std::time::Duration::ZERO,
        page_size: crate::store::DEFAULT_PAGE_SIZE,
        cache_kib: crate::store::DEFAULT_CACHE_KIB,
    }
}

fn wal_len(o: &StoreOptions) -> u64 {
    let mut wal = o.path.clone().into_os_string();
    wal.push("-wal");
    std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

/// Sends one batch and waits for its commit.
fn commit(
    store: &Store,
    ev: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>,
    token: u64,
    ops: Vec<Op>,
) {
    store
        .send(Command::Batch { token, ops })
        .expect("writer alive");
    loop {
        match ev.blocking_recv().expect("writer alive") {
            StoreEvent::Committed { token: t, ok } if t == token => {
                assert!(ok, "commit {token} refused");
                return;
            }
            _ => {}
        }
    }
}

/// One small message per commit (a sensor at a low rate): each commit appends the pages it
/// changed to the WAL. With 4 KiB pages that was 2 frames of 4,120 bytes (the queue leaf and
/// the session row with its counters), 8 KiB per 64-byte message before the file system
/// rounds it to whole 4 KiB blocks; with `store.page_size = 1024` it is about a quarter.
#[test]
fn a_commit_of_one_small_message_appends_little_to_the_wal_with_small_pages() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions {
        page_size: 1024,
        cache_kib: crate::store::DEFAULT_CACHE_KIB,
        ..opts(dir.path())
    };
    let (store, _, mut ev) = Store::open(&o).expect("open");
    commit(
        &store,
        &mut ev,
        1,
        vec![Op::UpsertSession {
            sid: 1,
            client_id: Arc::from("sensor"),
            protocol: 4,
            expiry: u32::MAX,
            will: None,
        }],
    );
    let commits = 60u64;
    let before = wal_len(&o);
    for seq in 0..commits {
        commit(
            &store,
            &mut ev,
            seq + 2,
            vec![Op::Enqueue {
                sid: 1,
                seq,
                packet_id: None,
                expires_at: None,
                size: 64,
                packet: Bytes::from(vec![b'x'; 90]),
            }],
        );
    }
    let per_commit = (wal_len(&o) - before) / commits;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
    assert!(
        per_commit <= 2600,
        "each one-message commit appended {per_commit} bytes to the WAL"
    );
}

/// `store.commit_delay_ms`: batches that arrive within the delay after the first share its
/// commit (one fsync for all), and none of them is reported committed before that commit.
#[test]
fn batches_within_the_commit_delay_share_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions {
        commit_delay: std::time::Duration::from_millis(400),
        ..opts(dir.path())
    };
    let (store, _, mut ev) = Store::open(&o).expect("open");
    let probe = store.probe();
    let started = std::time::Instant::now();
    store
        .send(Command::Batch {
            token: 1,
            ops: vec![Op::UpsertSession {
                sid: 1,
                client_id: Arc::from("sensor"),
                protocol: 4,
                expiry: u32::MAX,
                will: None,
            }],
        })
        .unwrap();
    for seq in 0..3u64 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(
            ev.try_recv().is_err(),
            "nothing is reported before the group's commit"
        );
        store
            .send(Command::Batch {
                token: seq + 2,
                ops: vec![Op::Enqueue {
                    sid: 1,
                    seq,
                    packet_id: None,
                    expires_at: None,
                    size: 64,
                    packet: Bytes::from(vec![b'x'; 90]),
                }],
            })
            .unwrap();
    }
    let mut tokens = Vec::new();
    while tokens.len() < 4 {
        match ev.blocking_recv().expect("writer alive") {
            StoreEvent::Committed { token, ok } => {
                assert!(ok);
                tokens.push(token);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let waited = started.elapsed();
    assert_eq!(tokens, vec![1, 2, 3, 4]);
    assert_eq!(
        probe.metrics().counts().commits,
        1,
        "one commit for all four"
    );
    assert!(
        waited >= std::time::Duration::from_millis(400)
            && waited < std::time::Duration::from_secs(3),
        "the first batch waited the delay, and not much longer ({waited:?})"
    );
    let rows: i64 = Connection::open(&o.path)
        .unwrap()
        .query_row("SELECT count(*) FROM queue_all", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3, "what was reported committed is on disk");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
}

/// Without a delay (the default) a batch is committed as soon as the writer takes it.
#[test]
fn without_a_commit_delay_a_lone_batch_is_committed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let (store, _, mut ev) = Store::open(&o).expect("open");
    let probe = store.probe();
    for token in 1..=3u64 {
        commit(
            &store,
            &mut ev,
            token,
            vec![Op::Count {
                name: "test",
                add: 1,
            }],
        );
    }
    assert_eq!(probe.metrics().counts().commits, 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
}

/// With a commit delay, a group that has gathered enough ops is committed without
/// waiting out the delay, so a busy publisher is not slowed to `window / delay`.
#[test]
fn a_full_delayed_group_is_committed_without_waiting_out_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions {
        commit_delay: std::time::Duration::from_secs(1),
        ..opts(dir.path())
    };
    let (store, _, mut ev) = Store::open(&o).expect("open");
    let started = std::time::Instant::now();
    // Exactly enough: one group however the writer's reads interleave with the sends.
    let n = super::writer::DELAY_ENOUGH_OPS as u64;
    for token in 1..=n {
        store
            .send(Command::Batch {
                token,
                ops: vec![Op::Count {
                    name: "test",
                    add: 1,
                }],
            })
            .unwrap();
    }
    let mut last = 0;
    while last < n {
        if let StoreEvent::Committed { token, ok } = ev.blocking_recv().expect("writer alive") {
            assert!(ok);
            last = token;
        }
    }
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_millis(800),
        "{n} batches waited {waited:?} for a 1 s delay"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
}

/// A message for a session that exists changes one page, the queue's leaf where the
/// session's rows end: no per-message bookkeeping row (the session's queue counters are
/// kept by the writer in memory and written at shutdown, see `store::counts`), and at the
/// default page size that page is small.
#[test]
fn a_commit_of_one_small_message_changes_one_page() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let (store, _, mut ev) = Store::open(&o).expect("open");
    let upsert = |sid: Sid| Op::UpsertSession {
        sid,
        client_id: Arc::from(format!("sensor-{sid}")),
        protocol: 4,
        expiry: u32::MAX,
        will: None,
    };
    commit(&store, &mut ev, 1, vec![upsert(1)]);
    let page = u64::from(o.page_size);
    let commits = 40u64;
    let before = wal_len(&o);
    for seq in 0..commits {
        commit(
            &store,
            &mut ev,
            seq + 2,
            vec![Op::Enqueue {
                sid: 1,
                seq,
                packet_id: None,
                expires_at: None,
                size: 64,
                packet: Bytes::from(vec![b'x'; 90]),
            }],
        );
    }
    let appended = wal_len(&o) - before;
    let frames = appended / (page + 24);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
    // One frame per commit, and two more when the leaf is full and splits (every few
    // messages with small pages).
    assert!(
        frames <= commits * 3 / 2,
        "{frames} WAL frames appended by {commits} one-message commits"
    );
    // The default page is small: a 64-byte message costs about 1 KiB of WAL, which the
    // file system writes as one 4 KiB block, or two when the frame straddles a boundary.
    assert!(
        appended / commits <= 1600,
        "{} WAL bytes per one-message commit at the default page size",
        appended / commits
    );
}

/// Fan-in: one group commit of a message for each of 500 sessions whose queues already
/// span more leaves than that. Appended to each session's own range of the queue B-tree,
/// the commit would change one leaf per session (~500 WAL frames, each written again by
/// the next checkpoint); appended to the staging log (`store::staging`) it changes the
/// log's right edge, a page per ~8 messages, plus the B-tree pages above it.
#[test]
fn a_commit_of_500_messages_into_500_sessions_writes_fewer_than_100_wal_frames() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
    let (store, _, mut ev) = Store::open(&o).expect("open");
    let sessions = 500u64;
    let upserts = (1..=sessions)
        .map(|sid| Op::UpsertSession {
            sid,
            client_id: Arc::from(format!("sensor-{sid}")),
            protocol: 4,
            expiry: u32::MAX,
            will: None,
        })
        .collect();
    commit(&store, &mut ev, 1, upserts);
    let msg = |sid: Sid, seq: u64| Op::Enqueue {
        sid,
        seq,
        packet_id: None,
        expires_at: None,
        size: 64,
        packet: Bytes::from(vec![b'x'; 90]),
    };
    // Ten rows per session, one session per commit: every session has its own leaves.
    for sid in 1..=sessions {
        commit(
            &store,
            &mut ev,
            sid + 1,
            (0..10).map(|seq| msg(sid, seq)).collect(),
        );
    }
    store.send(Command::Checkpoint).expect("writer alive");
    commit(&store, &mut ev, 10_000, vec![]);
    let before = wal_len(&o);
    assert_eq!(before, 0, "the checkpoint emptied the WAL");
    commit(
        &store,
        &mut ev,
        10_001,
        (1..=sessions).map(|sid| msg(sid, 10)).collect(),
    );
    let frames = (wal_len(&o) - before) / (u64::from(o.page_size) + 24);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.close());
    assert!(
        frames < 100,
        "one commit of {sessions} messages into {sessions} sessions appended {frames} WAL frames"
    );
}

/// The bundled SQLite is built with only what the store uses (`LIBSQLITE3_FLAGS` in
/// `.cargo/config.toml`, which every build of this repository reads: native, CI, cross).
/// libsqlite3-sys turns on full-text search, R-trees, JSON, `dbstat`, STAT4 and extension
/// loading by default: ~0.5 MB of code the gateway never runs but maps, and most of a
/// binary's pages are resident (issue 17 item 1, README "Memory at 10,000 durable
/// sessions"). Fails when a build does not read the flags (cargo run from outside the
/// repository) or a dependency's feature turns a module back on.
#[test]
fn the_bundled_sqlite_leaves_out_what_the_store_never_uses() {
    let conn = rusqlite::Connection::open_in_memory().expect("open");
    let mut stmt = conn.prepare("PRAGMA compile_options").expect("prepare");
    let options: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let has = |name: &str| {
        options
            .iter()
            .any(|o| o == name || o.starts_with(&format!("{name}=")))
    };
    for unused in [
        "ENABLE_FTS3",
        "ENABLE_FTS4",
        "ENABLE_FTS5",
        "ENABLE_RTREE",
        "ENABLE_DBSTAT_VTAB",
        "ENABLE_STAT4",
        "SOUNDEX",
        "ENABLE_COLUMN_METADATA",
        "ENABLE_LOAD_EXTENSION",
    ] {
        assert!(!has(unused), "{unused} is compiled in: {options:?}");
    }
    for wanted in [
        "OMIT_JSON",
        "OMIT_LOAD_EXTENSION",
        "OMIT_DEPRECATED",
        "OMIT_SHARED_CACHE",
        "DEFAULT_MEMSTATUS=0",
    ] {
        assert!(
            options.iter().any(|o| o == wanted),
            "{wanted} is not set: {options:?}"
        );
    }
}
