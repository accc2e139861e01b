//! Every merge of the staging log (`store::staging`) moves it in bounded chunks, one
//! transaction each (so SQLite's statement journal holds one chunk, not the log): when the
//! writer is idle (committing what arrives between two chunks), on `Checkpoint`, at a clean
//! stop and at start-up; a crash between two chunks leaves each row in exactly one table.
//!
//! Observed on the writer's own connection with SQLite's commit and update hooks (the rows
//! each committed transaction inserted into `queue`), and for start-up, which runs before
//! the writer, in the WAL it leaves: the database as a crash after each of its commits
//! would leave it. The log is longer than a chunk and shorter than a full log
//! (`staging::MERGE_ROWS`), so only the merge under test moves it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::hooks::Action;

use super::staging::{CHUNK_ROWS, MERGE_ROWS};
use super::staging_tests::{
    all_committed, batch, group_end, round, rows, run, run_on, sessions_set_up, staged, upsert,
    SESSIONS,
};
use super::writer::Writer;
use super::*;

/// Rounds staged before the merge under test (one message for each of `SESSIONS`).
const ROUNDS: u64 = 10;
const TOTAL: usize = (ROUNDS * SESSIONS) as usize;
const _: () = assert!(TOTAL > 2 * CHUNK_ROWS && TOTAL < MERGE_ROWS);

/// What one committed transaction of the writer's connection changed.
#[derive(Debug, Default, Clone, Copy)]
struct Txn {
    /// Rows inserted into `queue` (only merges insert there: every append here is staged).
    queued: usize,
    /// Rows inserted into or changed in `session`.
    sessions: usize,
}

#[derive(Debug, Default)]
struct Watch {
    open: Txn,
    committed: Vec<Txn>,
}

/// Records what each transaction of `conn` changes; `on_commit` sees each as it commits.
fn watch(conn: &Connection, mut on_commit: impl FnMut(&Txn) + Send + 'static) -> Arc<Mutex<Watch>> {
    let w = Arc::new(Mutex::new(Watch::default()));
    let u = w.clone();
    conn.update_hook(Some(
        move |action: Action, _db: &str, table: &str, _rowid: i64| {
            let mut w = u.lock().unwrap();
            match (action, table) {
                (Action::SQLITE_INSERT, "queue") => w.open.queued += 1,
                (Action::SQLITE_INSERT | Action::SQLITE_UPDATE, "session") => w.open.sessions += 1,
                _ => {}
            }
        },
    ))
    .unwrap();
    let c = w.clone();
    conn.commit_hook(Some(move || {
        let txn = std::mem::take(&mut c.lock().unwrap().open);
        on_commit(&txn);
        c.lock().unwrap().committed.push(txn);
        false
    }))
    .unwrap();
    let r = w.clone();
    conn.rollback_hook(Some(move || r.lock().unwrap().open = Txn::default()))
        .unwrap();
    w
}

/// `ROUNDS` rounds, each committed on its own (so each is staged).
fn stage_rounds() -> Vec<Command> {
    (0..ROUNDS)
        .flat_map(|r| [batch(r + 1, round(r)), group_end()])
        .collect()
}

/// The merge moved every staged row, at most a chunk per transaction, and each row is in
/// exactly one table.
fn assert_merged_in_chunks(o: &StoreOptions, txns: &[Txn]) {
    let merges: Vec<usize> = txns.iter().map(|t| t.queued).filter(|n| *n > 0).collect();
    assert!(
        merges.iter().all(|n| *n <= CHUNK_ROWS),
        "a transaction moved more than {CHUNK_ROWS} rows: {merges:?}"
    );
    assert_eq!(merges.iter().sum::<usize>(), TOTAL, "{merges:?}");
    assert_eq!(staged(o), 0);
    let all: Vec<(u64, u8)> = (0..ROUNDS).map(|seq| (seq, 0)).collect();
    for sid in 1..=SESSIONS {
        assert_eq!(rows(o, sid), all, "session {sid}");
    }
}

fn watched_run(o: &StoreOptions, cmds: Vec<Command>, clean: bool) -> Vec<Txn> {
    let mut watched = None;
    let events = run_on(o, cmds, clean, |conn| watched = Some(watch(conn, |_| {})));
    all_committed(&events);
    let w = watched.expect("watched");
    let txns = w.lock().unwrap().committed.clone();
    txns
}

#[test]
fn a_clean_stop_merges_the_log_a_chunk_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let txns = watched_run(&o, stage_rounds(), true);
    assert_merged_in_chunks(&o, &txns);
}

#[test]
fn a_checkpoint_merges_the_log_a_chunk_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let mut cmds = stage_rounds();
    cmds.push(Command::Checkpoint);
    let txns = watched_run(&o, cmds, false);
    assert_merged_in_chunks(&o, &txns);
}

/// A publisher that arrives while the idle writer merges waits for a chunk, not for the
/// log: here a batch sent when the first chunk commits is committed before the last one.
#[test]
fn an_idle_merge_goes_in_chunks_and_commits_arrivals_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    let (conn, rec) = load::open_and_load(&o).expect("open");
    let (tx, rx) = std::sync::mpsc::channel();
    let arrival = Mutex::new(Some(tx.clone()));
    let w = watch(&conn, move |txn| {
        if txn.queued > 0 {
            if let Some(tx) = arrival.lock().unwrap().take() {
                let _ = tx.send(batch(99, vec![upsert(SESSIONS + 1)]));
            }
        }
    });
    // Queued before the writer starts, so all of it is staged before it is first idle.
    for c in stage_rounds() {
        tx.send(c).unwrap();
    }
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let counts = super::counts::Counts::of(&rec);
    let opts = o.clone();
    let writer = std::thread::spawn(move || {
        Writer::new(conn, opts, ev_tx, rec.clock, counts)
            .idle_after(Duration::from_millis(50))
            .run(rx)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    loop {
        while let Ok(e) = ev_rx.try_recv() {
            events.push(e);
        }
        let arrived = events
            .iter()
            .any(|e| matches!(e, StoreEvent::Committed { token: 99, .. }));
        if arrived && staged(&o) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no idle merge within 30 s: arrival committed {arrived}, {} rows staged",
            staged(&o)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(tx);
    writer.join().expect("writer");
    all_committed(&events);
    let txns = w.lock().unwrap().committed.clone();
    assert_merged_in_chunks(&o, &txns);
    let arrival = txns.iter().position(|t| t.sessions > 0).expect("arrival");
    let last_chunk = txns.iter().rposition(|t| t.queued > 0).expect("merged");
    assert!(
        arrival < last_chunk,
        "the arrival waited for the whole merge: {txns:?}"
    );
}

/// The commits in a WAL: the length of the WAL up to and including each commit frame.
fn commit_ends(wal: &[u8]) -> Vec<usize> {
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if wal.len() < 32 {
        return Vec::new();
    }
    let frame = 24 + be(&wal[8..12]);
    let salt = &wal[16..24];
    let mut ends = Vec::new();
    let mut at = 32;
    while at + frame <= wal.len() && &wal[at + 8..at + 16] == salt {
        if be(&wal[at + 4..at + 8]) != 0 {
            ends.push(at + frame);
        }
        at += frame;
    }
    ends
}

/// Start-up merges what a crash left staged a chunk per transaction, and a crash after
/// any of its commits (the database file with the WAL cut after that commit) leaves every
/// row in exactly one table.
#[test]
fn the_start_up_merge_goes_in_chunks_and_each_crash_point_keeps_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions::for_test(dir.path());
    sessions_set_up(&o);
    all_committed(&run(&o, stage_rounds(), false));
    assert_eq!(staged(&o), TOTAL as i64);
    // A second connection stays open, so closing the start-up's does not checkpoint: the
    // WAL holds every commit of the start-up, over the database file as it was before.
    let holder = Connection::open(&o.path).unwrap();
    let _: i64 = holder
        .query_row("SELECT count(*) FROM session", [], |r| r.get(0))
        .unwrap();
    let (conn, _) = load::open_and_load(&o).expect("start");
    drop(conn);
    let db = std::fs::read(&o.path).unwrap();
    let wal = std::fs::read(format!("{}-wal", o.path.display())).unwrap();
    drop(holder);
    let ends = commit_ends(&wal);
    let mut staged_at = Vec::new();
    for end in std::iter::once(0).chain(ends) {
        let crash = tempfile::tempdir().unwrap();
        let path = crash.path().join("copy.db");
        std::fs::write(&path, &db).unwrap();
        std::fs::write(format!("{}-wal", path.display()), &wal[..end]).unwrap();
        let c = Connection::open(&path).unwrap();
        let count =
            |sql: &str| -> usize { c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as usize };
        let log = count("SELECT count(*) FROM queue_log");
        let queued = count("SELECT count(*) FROM queue");
        let both = count("SELECT count(*) FROM queue_log JOIN queue ON queue.id = queue_log.qid");
        assert_eq!(
            (log + queued, both),
            (TOTAL, 0),
            "after {end} WAL bytes: {log} staged, {queued} queued"
        );
        staged_at.push(log);
    }
    assert_eq!(staged_at.first(), Some(&TOTAL));
    assert_eq!(staged_at.last(), Some(&0), "{staged_at:?}");
    assert!(
        staged_at
            .windows(2)
            .all(|w| w[0] >= w[1] && w[0] - w[1] <= CHUNK_ROWS),
        "a start-up transaction moved more than {CHUNK_ROWS} rows: staged after each commit {staged_at:?}"
    );
}
