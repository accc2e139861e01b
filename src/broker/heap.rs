//! Gives freed heap memory back to the kernel (issue 17 item 1).
//!
//! glibc's allocator returns memory to the kernel only from the top of a heap. A burst
//! (SQLite's in-memory statement journal during a large merge, thousands of sessions'
//! read-backs and windows during a drain) leaves many free chunks between allocations that
//! live on (sessions, connections), so after the burst the process stays at its peak RSS
//! although the memory is free: measured at 10,000 sessions × 100 queued, 91.6 MiB resident
//! after the drain of which 33 MiB was free (`malloc_trim(0)` by hand brought it to 58.6).
//!
//! [`spawn_trimmer`] checks every [`TRIM_INTERVAL`] how much the arenas hold free
//! (`mallinfo2`), and when that is at least [`TRIM_MIN_FREE`] calls `malloc_trim(0)`, which
//! releases the free pages in the middle of the heaps too. Both calls take the arenas'
//! locks for a few milliseconds at most; nothing is done while less is free. Other targets
//! (musl, macOS) have no such calls: there it does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free heap is looked at.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Free bytes in the allocator's arenas worth a `malloc_trim`.
pub const TRIM_MIN_FREE: usize = 4 * 1024 * 1024;

/// Bytes the allocator's arenas hold free (glibc; 0 elsewhere).
pub fn free_in_arenas() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        m.fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// Gives the free pages of the heap back to the kernel if at least `min_free` bytes are
/// free. Returns the free bytes it acted on, `None` if it did nothing.
pub fn trim_if_worth(min_free: usize) -> Option<usize> {
    let free = free_in_arenas();
    if free < min_free || free == 0 {
        return None;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory; it is thread-safe (takes each
        // arena's lock).
        unsafe { libc::malloc_trim(0) };
    }
    Some(free)
}

/// Checks the free heap every [`TRIM_INTERVAL`] until `shutdown`.
pub fn spawn_trimmer(shutdown: CancellationToken) {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(free) = trim_if_worth(TRIM_MIN_FREE) {
                tracing::debug!(free_bytes = free, "freed heap given back to the kernel");
            }
        }
    });
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Resident bytes of this process.
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("resident pages");
        // SAFETY: sysconf only reads a constant.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
    }

    /// A burst of small allocations interleaved with ones that stay (the shape of a drain:
    /// messages freed, sessions kept) leaves free memory below the top of the heap; the
    /// trim gives it back although the long-lived chunks stay where they are.
    #[test]
    fn memory_freed_between_live_allocations_goes_back_to_the_kernel() {
        const BURST: usize = 48 * 1024 * 1024;
        const CHUNK: usize = 1000;
        let mut kept = Vec::new();
        let mut burst = Vec::new();
        for i in 0..BURST / CHUNK {
            let mut v = vec![0u8; CHUNK];
            v[0] = i as u8;
            if i % 64 == 0 {
                kept.push(v);
            } else {
                burst.push(v);
            }
        }
        drop(burst);
        let before = rss();
        let acted = trim_if_worth(TRIM_MIN_FREE);
        let after = rss();
        assert!(acted.is_some(), "{} B free, nothing done", free_in_arenas());
        assert!(
            before.saturating_sub(after) >= BURST / 4,
            "resident {before} B before the trim, {after} B after"
        );
        assert!(kept.iter().enumerate().all(|(i, v)| v[0] == (i * 64) as u8));
    }

    #[test]
    fn little_free_memory_is_left_alone() {
        assert_eq!(trim_if_worth(usize::MAX), None);
    }
}
