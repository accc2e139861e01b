//! The VFS against real SQLite files: a child process (this test binary again) writes
//! through `holdfast-powercut` and dies with `abort()`; the parent applies the cut and
//! opens the files with the ordinary VFS.

use std::path::Path;
use std::process::{Command, Stdio};

use rusqlite::{Connection, OpenFlags};

use super::{apply_cut, register, VFS_NAME};

const CHILD_VAR: &str = "HOLDFAST_TEST_POWERCUT_CHILD";

/// In the child: writes rows 0..10, then 10..20, each batch in its own commits, with the
/// given `synchronous` modes (and a checkpoint between them if asked), then aborts.
fn child(db: &Path, first: &str, checkpoint: bool, second: &str) -> ! {
    register().expect("register the VFS");
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
    let conn = Connection::open_with_flags_and_vfs(db, flags, VFS_NAME).expect("open");
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {first};
         CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB);"
    ))
    .expect("create");
    let insert = |n: i64| {
        conn.execute("INSERT INTO t VALUES (?1, zeroblob(3000))", [n])
            .expect("insert")
    };
    (0..10).for_each(|n| {
        insert(n);
    });
    if checkpoint {
        conn.execute_batch("PRAGMA wal_checkpoint(FULL)")
            .expect("checkpoint");
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {second}"))
        .expect("pragma");
    (10..20).for_each(|n| {
        insert(n);
    });
    std::process::abort();
}

fn run_child(test: &str, dir: &Path) {
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run child");
    assert!(!status.success(), "the child aborts");
}

fn rows(db: &Path) -> rusqlite::Result<Vec<i64>> {
    let conn = Connection::open(db)?;
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE name = 't'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare("SELECT n FROM t ORDER BY n")?;
    let v = st.query_map([], |r| r.get(0))?.collect();
    v
}

/// Copies the database and its WAL: what a SIGKILL alone (no power cut) leaves.
fn copy_as_after_sigkill(db: &Path, to: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    let copy = to.join("t.db");
    std::fs::copy(db, &copy).unwrap();
    let wal = Path::new(&format!("{}-wal", db.display())).to_path_buf();
    if wal.exists() {
        std::fs::copy(&wal, format!("{}-wal", copy.display())).unwrap();
    }
    copy
}

#[test]
// Re-runs this test binary as a child process; under qemu-user (the CI's aarch64 run) the
// child cannot start (no binfmt handler), so these run on the build machine's own target.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "x86")),
    ignore = "re-executes the test binary as a child: not possible under qemu-user"
)]
fn writes_not_covered_by_a_sync_are_lost_at_the_cut_and_synced_ones_stay() {
    let test = "store::powercut::tests::writes_not_covered_by_a_sync_are_lost_at_the_cut_and_synced_ones_stay";
    if let Some(dir) = std::env::var_os(CHILD_VAR) {
        child(&Path::new(&dir).join("t.db"), "FULL", false, "NORMAL");
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    run_child(test, dir.path());
    // A SIGKILL alone loses nothing: the VFS writes through to the real files.
    let killed = copy_as_after_sigkill(&db, &dir.path().join("sigkill"));
    assert_eq!(rows(&killed).unwrap(), (0..20).collect::<Vec<_>>());
    // The power cut: the commits made with synchronous = FULL (a WAL sync each) stay,
    // those made with NORMAL (no sync) are gone, and the file opens.
    let cut = apply_cut(dir.path()).unwrap();
    assert!(
        cut.iter()
            .any(|(f, r)| f.ends_with("t.db-wal") && r.writes > 0),
        "{cut:?}"
    );
    assert_eq!(rows(&db).unwrap(), (0..10).collect::<Vec<_>>());
    assert_eq!(apply_cut(dir.path()).unwrap(), vec![], "the logs are gone");
}

#[test]
// Re-runs this test binary as a child process; under qemu-user (the CI's aarch64 run) the
// child cannot start (no binfmt handler), so these run on the build machine's own target.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "x86")),
    ignore = "re-executes the test binary as a child: not possible under qemu-user"
)]
fn a_checkpoint_makes_normal_commits_durable_and_a_cut_of_nothing_synced_leaves_an_empty_file() {
    let test = "store::powercut::tests::a_checkpoint_makes_normal_commits_durable_and_a_cut_of_nothing_synced_leaves_an_empty_file";
    if let Some(dir) = std::env::var_os(CHILD_VAR) {
        let dir = Path::new(&dir);
        // Two databases: one checkpointed half-way, one never synced at all.
        if dir.ends_with("never") {
            child(&dir.join("t.db"), "NORMAL", false, "NORMAL");
        }
        child(&dir.join("t.db"), "NORMAL", true, "NORMAL");
    }
    let root = tempfile::tempdir().unwrap();
    let (half, never) = (root.path().join("half"), root.path().join("never"));
    for d in [&half, &never] {
        std::fs::create_dir_all(d).unwrap();
        run_child(test, d);
    }
    apply_cut(&half).unwrap();
    assert_eq!(
        rows(&half.join("t.db")).unwrap(),
        (0..10).collect::<Vec<_>>()
    );
    apply_cut(&never).unwrap();
    assert_eq!(rows(&never.join("t.db")).unwrap(), Vec::<i64>::new());
}
