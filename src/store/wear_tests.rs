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
/// rounds it to whole 4 KiB blocks; with small pages it is about a quarter of that.
#[test]
fn a_commit_of_one_small_message_appends_little_to_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path());
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
