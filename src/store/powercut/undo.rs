//! The undo log of one file: what each write not yet covered by a sync overwrote, so a
//! simulated power cut can put it back.
//!
//! # Format
//! `<file>-powercut`, a sequence of records, appended with one `write` each:
//! - `U` offset:u64 old_size:u64 len:u32 old_len:u32 old_bytes[old_len] — before a write
//!   of `len` bytes at `offset` (or a truncate to `offset`): the file was `old_size` bytes
//!   long and `[offset, offset + old_len)` held `old_bytes` (the part that existed).
//! - `S` — a sync started: the records retired below reached the disk, the others may not.
//! - `R` index:u32 — undo record number `index` (0-based) reached the disk.
//!
//! A record cut short at the end of the file (the process died while appending it) is
//! ignored: the write it describes had not been issued yet.
//!
//! # Reverting (the cut)
//! The undo records that are not retired are applied newest first: write the old bytes
//! back, then set the length back to `old_size`. The result is the file as it was before
//! its first unsynced write, except for ranges whose writes were retired by a torn sync.
//! Applying the same log twice gives the same file, so a process killed while reverting
//! simply reverts again on its next start; the log is removed only after it is applied.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const UNDO: u8 = b'U';
const SYNC: u8 = b'S';
const RETIRE: u8 = b'R';
const UNDO_HEADER: usize = 1 + 8 + 8 + 4 + 4;

/// The undo log file next to `file`.
pub fn log_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(super::LOG_SUFFIX);
    PathBuf::from(name)
}

/// One undo record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo {
    pub offset: u64,
    pub old_size: u64,
    /// Bytes the write put there (what the cut loses).
    pub len: u32,
    pub old: Vec<u8>,
}

/// A parsed undo log.
#[derive(Debug, Default)]
pub struct Parsed {
    pub undos: Vec<Undo>,
    pub retired: HashSet<u32>,
    /// A sync was in progress when the process died.
    pub inside_sync: bool,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Parses a log; an incomplete last record is dropped, an unknown tag is an error.
pub fn parse(bytes: &[u8]) -> std::io::Result<Parsed> {
    let mut p = Parsed::default();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            UNDO => {
                if bytes.len() < at + UNDO_HEADER {
                    break;
                }
                let old_len = u32_at(bytes, at + 21) as usize;
                let end = at + UNDO_HEADER + old_len;
                if bytes.len() < end {
                    break;
                }
                p.undos.push(Undo {
                    offset: u64_at(bytes, at + 1),
                    old_size: u64_at(bytes, at + 9),
                    len: u32_at(bytes, at + 17),
                    old: bytes[at + UNDO_HEADER..end].to_vec(),
                });
                at = end;
            }
            SYNC => {
                p.inside_sync = true;
                at += 1;
            }
            RETIRE => {
                if bytes.len() < at + 5 {
                    break;
                }
                p.retired.insert(u32_at(bytes, at + 1));
                at += 5;
            }
            tag => {
                return Err(invalid(format!(
                    "unknown record tag {tag:#04x} at byte {at} of a power-cut undo log"
                )))
            }
        }
    }
    Ok(p)
}

/// What reverting one file did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reverted {
    /// Unsynced writes (and truncates) undone.
    pub writes: u32,
    /// Bytes those writes had written.
    pub bytes: u64,
    /// The cut landed inside a sync of this file.
    pub inside_sync: bool,
    /// Of the records that sync covered, how many reached the disk (torn sync).
    pub persisted: u32,
    /// File length before and after.
    pub len_before: u64,
    pub len_after: u64,
}

/// Applies the log at `log` to `file` (see the module doc) and removes the log.
pub fn revert(file: &Path, log: &Path) -> std::io::Result<Reverted> {
    let bytes = std::fs::read(log)?;
    let p = parse(&bytes)?;
    let mut r = Reverted {
        inside_sync: p.inside_sync,
        persisted: p.retired.len() as u32,
        ..Default::default()
    };
    match OpenOptions::new().read(true).write(true).open(file) {
        Ok(mut f) => {
            r.len_before = f.metadata()?.len();
            for (i, u) in p.undos.iter().enumerate().rev() {
                if p.retired.contains(&(i as u32)) {
                    continue;
                }
                if !u.old.is_empty() {
                    f.seek(SeekFrom::Start(u.offset))?;
                    f.write_all(&u.old)?;
                }
                f.set_len(u.old_size)?;
                r.writes += 1;
                r.bytes += u.len as u64;
            }
            r.len_after = f.metadata()?.len();
        }
        // Deleted after its last write (deletes are durable in this model).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::remove_file(log)?;
    Ok(r)
}

/// The live undo log of one file, shared by every handle this process has on it (a sync
/// through any handle covers the writes of all of them, as `fsync` does).
pub struct UndoLog {
    path: PathBuf,
    file: Option<File>,
    /// Undo records in the log (the next record's index).
    records: u32,
    rng: u64,
}

impl UndoLog {
    pub fn new(path: PathBuf) -> UndoLog {
        let seed = std::process::id() as u64 ^ super::clock_nanos() ^ 0x9E37_79B9_7F4A_7C15;
        UndoLog {
            path,
            file: None,
            records: 0,
            rng: seed | 1,
        }
    }

    fn file(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&self.path)?;
            // A log left by this process (a file closed and reopened) keeps its numbering.
            let mut existing = Vec::new();
            f.read_to_end(&mut existing)?;
            self.records = parse(&existing)?.undos.len() as u32;
            self.file = Some(f);
        }
        // Just set above when it was None.
        self.file
            .as_mut()
            .ok_or_else(|| invalid("undo log not open".into()))
    }

    /// Records that `[offset, offset + old.len())` held `old` and the file was `old_size`
    /// bytes long, before a write of `len` bytes (or a truncate) that is about to happen.
    pub fn record(
        &mut self,
        offset: u64,
        old_size: u64,
        len: u32,
        old: &[u8],
    ) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(UNDO_HEADER + old.len());
        rec.push(UNDO);
        rec.extend_from_slice(&offset.to_le_bytes());
        rec.extend_from_slice(&old_size.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&(old.len() as u32).to_le_bytes());
        rec.extend_from_slice(old);
        self.file()?.write_all(&rec)?;
        self.records += 1;
        Ok(())
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Makes every recorded write durable, the way a disk does during a sync: in a random
    /// order, one by one, `sync_real` (the real `fdatasync`, which takes most of the time)
    /// running after a random number of them. A process killed anywhere in here leaves a
    /// torn sync: some of the writes durable, the rest reverted at the next start.
    pub fn sync(&mut self, sync_real: impl FnOnce() -> bool) -> std::io::Result<bool> {
        let mut sync_real = Some(sync_real);
        let mut real = move || sync_real.take().is_none_or(|f| f());
        let n = self.records;
        if n == 0 {
            return Ok(real());
        }
        let mut order: Vec<u32> = (0..n).collect();
        for i in (1..order.len()).rev() {
            let j = (self.next_random() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let split = (self.next_random() % (n as u64 + 1)) as usize;
        self.file()?.write_all(&[SYNC])?;
        let mut ok = true;
        for (k, idx) in order.iter().enumerate() {
            if k == split {
                ok = real();
            }
            let mut rec = [RETIRE, 0, 0, 0, 0];
            rec[1..].copy_from_slice(&idx.to_le_bytes());
            self.file()?.write_all(&rec)?;
        }
        if split == order.len() {
            ok = real();
        }
        if ok {
            self.clear()?;
        }
        Ok(ok)
    }

    /// Empties the log: everything recorded is durable.
    pub fn clear(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.set_len(0)?;
        }
        self.records = 0;
        Ok(())
    }

    /// The file was deleted (durably, in this model): its log goes too.
    pub fn forget(&mut self) -> std::io::Result<()> {
        self.file = None;
        self.records = 0;
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_at(path: &Path, log: &mut UndoLog, offset: u64, data: &[u8]) {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        let size = f.metadata().unwrap().len();
        let old_len = size.saturating_sub(offset).min(data.len() as u64) as usize;
        let mut old = vec![0; old_len];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut old).unwrap();
        log.record(offset, size, data.len() as u32, &old).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn unsynced_writes_are_undone_newest_first_and_synced_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"aaaabbbb").unwrap();
        let lp = log_path(&file);
        let mut log = UndoLog::new(lp.clone());
        write_at(&file, &mut log, 0, b"1111");
        assert!(log.sync(|| true).unwrap());
        write_at(&file, &mut log, 4, b"2222");
        write_at(&file, &mut log, 4, b"3333cccc"); // overwrites the unsynced write, grows
        assert_eq!(std::fs::read(&file).unwrap(), b"11113333cccc");
        drop(log);
        let r = revert(&file, &lp).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"1111bbbb");
        assert_eq!(
            (r.writes, r.bytes, r.len_before, r.len_after),
            (2, 12, 12, 8)
        );
        assert!(!r.inside_sync);
        assert!(!lp.exists(), "the log is removed once applied");
    }

    #[test]
    fn a_torn_sync_keeps_exactly_the_retired_writes_and_reverting_twice_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"aaaabbbbcccc").unwrap();
        let lp = log_path(&file);
        let mut log = UndoLog::new(lp.clone());
        write_at(&file, &mut log, 0, b"1111");
        write_at(&file, &mut log, 8, b"3333");
        drop(log);
        // The process died inside a sync that had made record 1 durable.
        let mut f = OpenOptions::new().append(true).open(&lp).unwrap();
        f.write_all(&[SYNC, RETIRE, 1, 0, 0, 0, RETIRE, 0]).unwrap(); // last one cut short
        drop(f);
        let copy = dir.path().join("log-copy");
        std::fs::copy(&lp, &copy).unwrap();
        let r = revert(&file, &lp).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"aaaabbbb3333");
        assert_eq!((r.writes, r.inside_sync, r.persisted), (1, true, 1));
        // Killed while reverting: the next start applies the same log again.
        revert(&file, &copy).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"aaaabbbb3333");
    }

    #[test]
    fn a_truncate_is_undone_and_a_garbled_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"aaaabbbb").unwrap();
        let lp = log_path(&file);
        let mut log = UndoLog::new(lp.clone());
        log.record(2, 8, 0, b"aabbbb").unwrap();
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(2)
            .unwrap();
        drop(log);
        revert(&file, &lp).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"aaaabbbb");
        std::fs::write(&lp, b"X").unwrap();
        let err = revert(&file, &lp).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }
}
