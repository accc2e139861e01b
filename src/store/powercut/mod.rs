//! TEST ONLY: power cuts for the durable store.
//!
//! A SIGKILL cannot tell `synchronous = "full"` from `"normal"`: the kernel keeps every
//! write the process made, synced or not. A power cut keeps only what was synced. This
//! module makes a SIGKILL behave like a power cut, so the crash tests can prove what the
//! durability settings promise (`tests/durable/power_cut.rs`, `scripts/powercut_soak.sh`).
//!
//! # The model
//! With [`ENV_VAR`]` = 1`, the process's SQLite default VFS becomes `holdfast-powercut`
//! (`vfs`), which wraps the unix VFS. Every write or truncate of the database file, its WAL
//! or its rollback journal first appends what it overwrites to an undo log next to the file
//! (`<file>-powercut`, see `undo`), then happens for real. A sync (`fsync`/`fdatasync`)
//! marks the logged writes durable one by one in a random order, with the real sync
//! somewhere in between, then empties the log. So at any moment the log holds exactly the
//! writes no sync has covered yet.
//!
//! The cut is applied when the store opens again ([`install_from_env`]): every undo log in
//! the data directory is reverted (newest first), which leaves each file as a disk would
//! after losing power: every write since its last completed sync is gone. A process killed
//! inside a sync leaves a torn sync: some of that sync's writes durable, the others not,
//! in no particular order (a disk may reorder writes it has not been told to flush).
//!
//! Not modelled (treated as durable at once): creating and deleting files and directory
//! entries, and the `-shm` wal-index (SQLite rebuilds it from the WAL when the first
//! connection after a crash opens the database: the unix VFS truncates the `-shm` file
//! when no other process holds it). Torn writes inside one `write` call are not modelled
//! either (SQLite's WAL frame checksums are meant for those).
//!
//! # Rules
//! - Production behaviour is unchanged unless the variable is set; when it is, a `warn!`
//!   says so at start-up.
//! - One process at a time may use the VFS on a data directory (the broker, or an admin
//!   command while the broker is stopped): the cut is applied only when the previous owner
//!   (recorded in `holdfast.db-powercut-owner`) is gone. While it is alive, another process
//!   leaves the VFS off and reads the real files (as it would read the page cache).

mod undo;
mod vfs;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tracing::warn;

pub use undo::Reverted;

/// The switch: `1` turns the power-cut VFS on (tests only).
pub const ENV_VAR: &str = "HOLDFAST_TEST_POWERCUT_VFS";

/// The VFS name (for `Connection::open_with_flags_and_vfs` in tests).
pub const VFS_NAME: &str = "holdfast-powercut";

/// Suffix of undo log files (`holdfast.db-wal-powercut`).
const LOG_SUFFIX: &str = "-powercut";

#[derive(Debug, thiserror::Error)]
pub enum PowercutError {
    #[error("{ENV_VAR}: cannot apply the power cut to {path}: {source}")]
    Revert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{ENV_VAR}: cannot record the owner in {path}: {source}")]
    Owner {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{ENV_VAR}: SQLite has no default VFS to wrap")]
    NoDefaultVfs,
}

fn clock_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Registers `holdfast-powercut` without making it the default (tests that open
/// connections with it by name).
pub fn register() -> Result<(), PowercutError> {
    vfs::register(false)
        .then_some(())
        .ok_or(PowercutError::NoDefaultVfs)
}

/// Called before the process opens the database at `db`. Unless [`ENV_VAR`] is `1`, does
/// nothing and returns false. Otherwise, the first time: applies the power cut left by the
/// previous process (if it is gone), makes `holdfast-powercut` the default VFS of this
/// process, and returns true. Later calls return the first call's answer.
pub fn install_from_env(db: &Path) -> Result<bool, PowercutError> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    if std::env::var_os(ENV_VAR).is_none_or(|v| v != "1") {
        return Ok(false);
    }
    if let Some(&on) = INSTALLED.get() {
        return Ok(on);
    }
    let on = install(db)?;
    Ok(*INSTALLED.get_or_init(|| on))
}

fn install(db: &Path) -> Result<bool, PowercutError> {
    let owner = owner_path(db);
    if let Some(pid) = live_owner(&owner) {
        warn!(
            env = ENV_VAR,
            owner_pid = pid,
            "TEST ONLY power-cut VFS left off: another process uses it on this database"
        );
        return Ok(false);
    }
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for (file, r) in apply_cut(&dir)? {
        warn!(
            file = %file.display(),
            reverted_writes = r.writes,
            reverted_bytes = r.bytes,
            inside_sync = r.inside_sync,
            persisted_of_sync = r.persisted,
            len_before = r.len_before,
            len_after = r.len_after,
            "power cut applied: writes never synced are gone"
        );
    }
    std::fs::write(&owner, std::process::id().to_string()).map_err(|source| {
        PowercutError::Owner {
            path: owner.clone(),
            source,
        }
    })?;
    if !vfs::register(true) {
        return Err(PowercutError::NoDefaultVfs);
    }
    warn!(
        env = ENV_VAR,
        vfs = VFS_NAME,
        "TEST ONLY: power-cut VFS on; every write not covered by a sync is lost when this \
         process dies (never set this on a real gateway)"
    );
    Ok(true)
}

fn owner_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-powercut-owner");
    PathBuf::from(name)
}

/// The pid in the owner file, if that process is alive and is not this one.
fn live_owner(owner: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(owner).ok()?.trim().parse().ok()?;
    (pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// The cut: reverts every undo log in `dir` (see the module doc) and reports what each
/// file lost, files that lost nothing left out.
pub fn apply_cut(dir: &Path) -> Result<Vec<(PathBuf, Reverted)>, PowercutError> {
    let revert_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PowercutError::Revert { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(revert_err(dir)(e)),
    };
    let mut logs = Vec::new();
    for entry in entries {
        let path = entry.map_err(revert_err(dir))?.path();
        let name = path.to_string_lossy();
        if let Some(file) = name.strip_suffix(LOG_SUFFIX) {
            logs.push((PathBuf::from(file), path.clone()));
        }
    }
    logs.sort();
    let mut out = Vec::new();
    for (file, log) in logs {
        let r = undo::revert(&file, &log).map_err(revert_err(&file))?;
        if r.writes > 0 || r.inside_sync {
            out.push((file, r));
        }
    }
    Ok(out)
}
