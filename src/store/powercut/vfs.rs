//! The SQLite VFS `holdfast-powercut`: the default (unix) VFS with every write to the
//! database, its WAL and its rollback journal preceded by an undo record (see `undo`),
//! and every sync retiring those records. All other calls (reads, locks, the `-shm`
//! wal-index, file controls, memory mapping) go to the real file unchanged, so other
//! processes see what this one wrote, as they would see the page cache.
//!
//! Safety: SQLite calls these functions with the pointers it got from `x_open` (a
//! `PcFile` followed by the real VFS's file object, `szOsFile` bytes in all) and with the
//! VFS registered by [`register`]; nothing here unwinds (no panics across the FFI edge).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;

use super::undo::{log_path, UndoLog};

/// Our file object; the real VFS's file object follows it in the same allocation.
#[repr(C)]
struct PcFile {
    base: ffi::sqlite3_file,
    /// `Arc::into_raw` of the file's undo log; null for files that are not tracked
    /// (temporary files) or whose real open failed.
    log: *const Mutex<UndoLog>,
}

/// Every tracked file's undo log, by path, for the life of the process: unsynced writes
/// of a closed handle are still unsynced.
fn logs() -> MutexGuard<'static, HashMap<PathBuf, Arc<Mutex<UndoLog>>>> {
    static LOGS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<UndoLog>>>>> = OnceLock::new();
    lock(LOGS.get_or_init(Default::default))
}

/// A poisoned lock (a panic elsewhere while holding it) still guards consistent data:
/// every update under these locks is a single append or length change.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn log_for(file: &str) -> Arc<Mutex<UndoLog>> {
    let path = PathBuf::from(file);
    logs()
        .entry(path.clone())
        .or_insert_with(|| Arc::new(Mutex::new(UndoLog::new(log_path(&path)))))
        .clone()
}

unsafe fn real_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    (*vfs).pAppData as *mut ffi::sqlite3_vfs
}

unsafe fn real_file(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (f as *mut u8).add(std::mem::size_of::<PcFile>()) as *mut ffi::sqlite3_file
}

unsafe fn real_methods(f: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*real_file(f)).pMethods
}

unsafe fn undo_log<'a>(f: *mut ffi::sqlite3_file) -> Option<&'a Mutex<UndoLog>> {
    (*(f as *mut PcFile)).log.as_ref()
}

/// Registers the VFS (once per process; later calls only change whether it is the
/// default). Returns false if SQLite has no default VFS to wrap.
pub fn register(make_default: bool) -> bool {
    struct VfsPtr(*mut ffi::sqlite3_vfs);
    // SAFETY: the VFS struct is leaked, never written after registration, and SQLite
    // itself synchronises access to its VFS list.
    unsafe impl Send for VfsPtr {}
    unsafe impl Sync for VfsPtr {}
    static VFS: OnceLock<Option<VfsPtr>> = OnceLock::new();
    let vfs = VFS.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS (static, never freed).
        let real = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
        if real.is_null() {
            return None;
        }
        // SAFETY: `real` is a valid VFS (checked non-null above).
        let r = unsafe { &*real };
        let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
            iVersion: 2,
            szOsFile: std::mem::size_of::<PcFile>() as c_int + r.szOsFile,
            mxPathname: r.mxPathname,
            pNext: ptr::null_mut(),
            zName: c"holdfast-powercut".as_ptr(),
            pAppData: real as *mut c_void,
            xOpen: Some(x_open),
            xDelete: Some(x_delete),
            xAccess: Some(x_access),
            xFullPathname: Some(x_full_pathname),
            xDlOpen: Some(x_dl_open),
            xDlError: Some(x_dl_error),
            xDlSym: Some(x_dl_sym),
            xDlClose: Some(x_dl_close),
            xRandomness: Some(x_randomness),
            xSleep: Some(x_sleep),
            xCurrentTime: Some(x_current_time),
            xGetLastError: Some(x_get_last_error),
            xCurrentTimeInt64: Some(x_current_time_int64),
            xSetSystemCall: None,
            xGetSystemCall: None,
            xNextSystemCall: None,
        }));
        // SAFETY: `vfs` lives forever; registering makes SQLite link it into its list.
        unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
        Some(VfsPtr(vfs))
    });
    match vfs {
        Some(v) => {
            if make_default {
                // SAFETY: registering an already registered VFS again with makeDflt = 1
                // makes it the default (documented for sqlite3_vfs_register).
                unsafe { ffi::sqlite3_vfs_register(v.0, 1) };
            }
            true
        }
        None => false,
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

const TRACKED: c_int =
    ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_MAIN_JOURNAL | ffi::SQLITE_OPEN_WAL;

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let pc = file as *mut PcFile;
    ptr::write(
        pc,
        PcFile {
            base: ffi::sqlite3_file {
                pMethods: ptr::null(),
            },
            log: ptr::null(),
        },
    );
    let real_vfs = real_vfs(vfs);
    let real = real_file(file);
    (*real).pMethods = ptr::null();
    let Some(open) = (*real_vfs).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = open(real_vfs, name, real, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        if !(*real).pMethods.is_null() {
            if let Some(close) = (*(*real).pMethods).xClose {
                close(real);
            }
        }
        return rc;
    }
    if flags & TRACKED != 0 && !name.is_null() {
        if let Ok(path) = CStr::from_ptr(name).to_str() {
            (*pc).log = Arc::into_raw(log_for(path));
        }
    }
    (*pc).base.pMethods = &IO_METHODS;
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let real_vfs = real_vfs(vfs);
    let Some(delete) = (*real_vfs).xDelete else {
        return ffi::SQLITE_IOERR_DELETE;
    };
    let rc = delete(real_vfs, name, sync_dir);
    if rc == ffi::SQLITE_OK && !name.is_null() {
        if let Ok(path) = CStr::from_ptr(name).to_str() {
            let entry = logs().get(&PathBuf::from(path)).cloned();
            let forgot = match entry {
                Some(log) => lock(&log).forget(),
                None => UndoLog::new(log_path(path.as_ref())).forget(),
            };
            if forgot.is_err() {
                return ffi::SQLITE_IOERR_DELETE;
            }
        }
    }
    rc
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let rc = match real_methods(f).xClose {
        Some(close) => close(real_file(f)),
        None => ffi::SQLITE_OK,
    };
    let pc = f as *mut PcFile;
    if !(*pc).log.is_null() {
        drop(Arc::from_raw((*pc).log));
        (*pc).log = ptr::null();
    }
    rc
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    off: i64,
) -> c_int {
    match real_methods(f).xRead {
        Some(read) => read(real_file(f), buf, n, off),
        None => ffi::SQLITE_IOERR_READ,
    }
}

/// The real file's size, or None on error.
unsafe fn real_size(f: *mut ffi::sqlite3_file) -> Option<u64> {
    let size_fn = real_methods(f).xFileSize?;
    let mut size: i64 = 0;
    (size_fn(real_file(f), &mut size) == ffi::SQLITE_OK).then_some(size.max(0) as u64)
}

/// Reads what `[off, off + len)` holds now (the part inside the file) and appends it to
/// the undo log with the current size, before a write of `written` bytes (0: a truncate).
unsafe fn record_old(
    f: *mut ffi::sqlite3_file,
    log: &mut UndoLog,
    off: u64,
    len: u64,
    written: u32,
) -> bool {
    let Some(size) = real_size(f) else {
        return false;
    };
    let old_len = size.saturating_sub(off).min(len) as usize;
    let mut old = vec![0u8; old_len];
    if old_len > 0 {
        let Some(read) = real_methods(f).xRead else {
            return false;
        };
        if read(
            real_file(f),
            old.as_mut_ptr() as *mut c_void,
            old_len as c_int,
            off as i64,
        ) != ffi::SQLITE_OK
        {
            return false;
        }
    }
    log.record(off, size, written, &old).is_ok()
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    let Some(write) = real_methods(f).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let Some(log) = undo_log(f) else {
        return write(real_file(f), buf, n, off);
    };
    let mut log = lock(log);
    if !record_old(
        f,
        &mut log,
        off.max(0) as u64,
        n.max(0) as u64,
        n.max(0) as u32,
    ) {
        return ffi::SQLITE_IOERR_WRITE;
    }
    write(real_file(f), buf, n, off)
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    let Some(truncate) = real_methods(f).xTruncate else {
        return ffi::SQLITE_IOERR_TRUNCATE;
    };
    let Some(log) = undo_log(f) else {
        return truncate(real_file(f), size);
    };
    let mut log = lock(log);
    let size = size.max(0);
    let current = real_size(f).unwrap_or(0);
    if !record_old(
        f,
        &mut log,
        size as u64,
        current.saturating_sub(size as u64),
        0,
    ) {
        return ffi::SQLITE_IOERR_TRUNCATE;
    }
    truncate(real_file(f), size)
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let Some(sync) = real_methods(f).xSync else {
        return ffi::SQLITE_IOERR_FSYNC;
    };
    let Some(log) = undo_log(f) else {
        return sync(real_file(f), flags);
    };
    let mut rc = ffi::SQLITE_OK;
    let synced = lock(log).sync(|| {
        rc = sync(real_file(f), flags);
        rc == ffi::SQLITE_OK
    });
    match synced {
        Ok(_) => rc,
        Err(_) => ffi::SQLITE_IOERR_FSYNC,
    }
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    match real_methods(f).xFileSize {
        Some(g) => g(real_file(f), size),
        None => ffi::SQLITE_IOERR_FSTAT,
    }
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    match real_methods(f).xLock {
        Some(g) => g(real_file(f), level),
        None => ffi::SQLITE_IOERR_LOCK,
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    match real_methods(f).xUnlock {
        Some(g) => g(real_file(f), level),
        None => ffi::SQLITE_IOERR_UNLOCK,
    }
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    match real_methods(f).xCheckReservedLock {
        Some(g) => g(real_file(f), out),
        None => ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
    }
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    let Some(control) = real_methods(f).xFileControl else {
        return ffi::SQLITE_NOTFOUND;
    };
    // A size hint may extend the file (with a chunk size set): undo that too.
    if op == ffi::SQLITE_FCNTL_SIZE_HINT {
        if let Some(log) = undo_log(f) {
            let mut log = lock(log);
            if !record_old(f, &mut log, 0, 0, 0) {
                return ffi::SQLITE_IOERR_WRITE;
            }
            return control(real_file(f), op, arg);
        }
    }
    control(real_file(f), op, arg)
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    real_methods(f)
        .xSectorSize
        .map_or(4096, |g| g(real_file(f)))
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    real_methods(f)
        .xDeviceCharacteristics
        .map_or(0, |g| g(real_file(f)))
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    match real_methods(f).xShmMap {
        Some(g) => g(real_file(f), page, size, extend, out),
        None => ffi::SQLITE_IOERR_SHMMAP,
    }
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    match real_methods(f).xShmLock {
        Some(g) => g(real_file(f), off, n, flags),
        None => ffi::SQLITE_IOERR_SHMLOCK,
    }
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    if let Some(g) = real_methods(f).xShmBarrier {
        g(real_file(f));
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    match real_methods(f).xShmUnmap {
        Some(g) => g(real_file(f), delete),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    off: i64,
    n: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let m = real_methods(f);
    if m.iVersion < 3 {
        *out = ptr::null_mut();
        return ffi::SQLITE_OK;
    }
    match m.xFetch {
        Some(g) => g(real_file(f), off, n, out),
        None => {
            *out = ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, off: i64, p: *mut c_void) -> c_int {
    let m = real_methods(f);
    match m.xUnfetch {
        Some(g) if m.iVersion >= 3 => g(real_file(f), off, p),
        _ => ffi::SQLITE_OK,
    }
}

// ----- VFS-level calls that only forward to the real VFS ---------------------------------

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let r = real_vfs(vfs);
    match (*r).xAccess {
        Some(g) => g(r, name, flags, out),
        None => ffi::SQLITE_IOERR_ACCESS,
    }
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let r = real_vfs(vfs);
    match (*r).xFullPathname {
        Some(g) => g(r, name, n, out),
        None => ffi::SQLITE_CANTOPEN,
    }
}

unsafe extern "C" fn x_dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    let r = real_vfs(vfs);
    (*r).xDlOpen.map_or(ptr::null_mut(), |g| g(r, name))
}

unsafe extern "C" fn x_dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    let r = real_vfs(vfs);
    if let Some(g) = (*r).xDlError {
        g(r, n, out);
    }
}

type DlSym = Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)>;

unsafe extern "C" fn x_dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    h: *mut c_void,
    sym: *const c_char,
) -> DlSym {
    let r = real_vfs(vfs);
    (*r).xDlSym.and_then(|g| g(r, h, sym))
}

unsafe extern "C" fn x_dl_close(vfs: *mut ffi::sqlite3_vfs, h: *mut c_void) {
    let r = real_vfs(vfs);
    if let Some(g) = (*r).xDlClose {
        g(r, h);
    }
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let r = real_vfs(vfs);
    (*r).xRandomness.map_or(0, |g| g(r, n, out))
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    let r = real_vfs(vfs);
    (*r).xSleep.map_or(0, |g| g(r, us))
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let r = real_vfs(vfs);
    (*r).xCurrentTime.map_or(ffi::SQLITE_ERROR, |g| g(r, out))
}

unsafe extern "C" fn x_get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let r = real_vfs(vfs);
    (*r).xGetLastError.map_or(0, |g| g(r, n, out))
}

unsafe extern "C" fn x_current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    let r = real_vfs(vfs);
    if (*r).iVersion >= 2 {
        if let Some(g) = (*r).xCurrentTimeInt64 {
            return g(r, out);
        }
    }
    let mut days = 0.0;
    let rc = x_current_time(vfs, &mut days);
    *out = (days * 86_400_000.0) as i64;
    rc
}
