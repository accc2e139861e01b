//! The disk budget: how large the database may grow. Two limits, the smaller wins:
//! - `store.max_bytes`, a fixed size (0 = none);
//! - `store.min_free_percent`: the database never grows while less than that share of its
//!   filesystem would stay free (the SD card also holds the OS, its logs and updates).
//!
//! Both become SQLite's `max_page_count`, so a commit that needs more pages fails with
//! SQLITE_FULL and the writer applies the budget policy (`reject-new` refuses the new
//! messages with 0x97 and keeps every stored one; `drop-oldest` makes room, counted). Pages
//! freed inside the file are reused without growing it. The free-space limit is
//! recomputed at most once a second (`statvfs`), and before every retry while refusing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tracing::{debug, warn};

/// Longest time between two looks at the filesystem's free space.
const REFRESH: Duration = Duration::from_secs(1);

pub struct Budget {
    max_bytes: u64,
    min_free_percent: u8,
    dir: PathBuf,
    checked: Option<Instant>,
    /// The `max_page_count` set last.
    pages: Option<u64>,
}

/// Free and total bytes of the filesystem holding `dir` (as an unprivileged user sees it).
pub fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

/// Largest database size the two limits allow, in bytes (None: no limit).
pub fn allowed_bytes(
    max_bytes: u64,
    min_free_percent: u8,
    db_bytes: u64,
    space: Option<(u64, u64)>,
) -> Option<u64> {
    let fixed = (max_bytes > 0).then_some(max_bytes);
    let by_free = match (min_free_percent, space) {
        (0, _) | (_, None) => None,
        (pct, Some((avail, total))) => {
            let reserve = total / 100 * u64::from(pct);
            Some(db_bytes + avail.saturating_sub(reserve))
        }
    };
    match (fixed, by_free) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Budget {
    pub fn new(db_path: &Path, max_bytes: u64, min_free_percent: u8) -> Budget {
        let dir = db_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        Budget {
            max_bytes,
            min_free_percent,
            dir,
            checked: None,
            pages: None,
        }
    }

    /// Sets `max_page_count` from the limits, unless it was done less than a second ago
    /// (`force`: do it now).
    pub fn apply(&mut self, conn: &Connection, force: bool) {
        if self.max_bytes == 0 && self.min_free_percent == 0 {
            return;
        }
        if !force && self.checked.is_some_and(|t| t.elapsed() < REFRESH) {
            return;
        }
        self.checked = Some(Instant::now());
        if let Err(e) = self.try_apply(conn) {
            warn!(cause = %e, "could not apply the disk budget");
        }
    }

    /// Sets `max_page_count` from the limits again, whatever was set since (after a
    /// temporary reserve for ops that only release data).
    pub fn reapply(&mut self, conn: &Connection) {
        self.pages = None;
        if self.max_bytes == 0 && self.min_free_percent == 0 {
            // SQLite's own maximum: no budget.
            if let Err(e) = conn.pragma_update(None, "max_page_count", 4_294_967_294i64) {
                warn!(cause = %e, "could not reset max_page_count");
            }
            return;
        }
        self.apply(conn, true);
    }

    fn try_apply(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))? as u64;
        let page_count: u64 =
            conn.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))? as u64;
        let space = if self.min_free_percent > 0 {
            match filesystem_space(&self.dir) {
                Ok(s) => Some(s),
                Err(e) => {
                    debug!(cause = %e, dir = %self.dir.display(), "statvfs failed");
                    None
                }
            }
        } else {
            None
        };
        let Some(bytes) = allowed_bytes(
            self.max_bytes,
            self.min_free_percent,
            page_count * page_size,
            space,
        ) else {
            return Ok(());
        };
        // Never below what the file holds now (SQLite would ignore it) nor below 16 pages.
        let pages = (bytes / page_size.max(512)).max(page_count).max(16);
        if self.pages != Some(pages) {
            conn.pragma_update(None, "max_page_count", pages as i64)?;
            self.pages = Some(pages);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smaller_limit_wins_and_a_full_reserve_stops_growth() {
        const G: u64 = 1 << 30;
        // 10% of 16 GiB kept free, 4 GiB available: the database may grow by 2.4 GiB.
        let reserve = 16 * G / 100 * 10;
        assert_eq!(
            allowed_bytes(0, 10, G, Some((4 * G, 16 * G))),
            Some(G + 4 * G - reserve)
        );
        assert_eq!(
            allowed_bytes(G / 2, 10, G, Some((4 * G, 16 * G))),
            Some(G / 2)
        );
        // Less free than the reserve: no growth at all.
        assert_eq!(allowed_bytes(0, 10, G, Some((G, 16 * G))), Some(G));
        assert_eq!(allowed_bytes(0, 0, G, Some((G, 16 * G))), None);
        assert_eq!(allowed_bytes(5 * G, 10, G, None), Some(5 * G));
    }

    #[test]
    fn filesystem_space_reads_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (avail, total) = filesystem_space(dir.path()).unwrap();
        assert!(total > 0 && avail <= total);
    }
}
