//! What the writer thread reports about itself: commit counts and commit latency.
//!
//! The writer records every group commit (the whole transaction: apply, commit, fsync with
//! `synchronous = full`) here without blocking on anyone: counters and histogram buckets
//! are atomics, and the recent-sample buffer is a short `Mutex` section that only the
//! `observe` task contends with once per interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the commit-latency histogram buckets, in microseconds (the Prometheus
/// histogram `holdfast_store_commit_duration_seconds`; `+Inf` is implied).
pub const COMMIT_BUCKETS_US: [u64; 13] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

/// At most this many samples are kept between two drains; beyond it, new samples replace
/// old ones round-robin (the percentiles stay representative of the interval).
const MAX_SAMPLES: usize = 8192;

/// What the store can do right now, as the writer last found it. Each failure has its own
/// behaviour (`writer`), log line, health answer and counter:
/// - `Full`: the disk budget or the disk is full. New QoS 1/2 messages are refused (or the
///   oldest dropped, per `store.budget_policy`); the gateway is healthy, by design.
/// - `Locked`: another process held the database lock past the busy timeout. The writer
///   retries the same commit (publishers wait for their acknowledgements) for up to
///   `LOCK_PATIENCE`, then refuses new messages until the lock is gone. Unhealthy.
/// - `IoError`: the storage failed a read or write (a dying SD card). New messages are
///   refused, everything accepted is kept and retried. Unhealthy.
/// - `Corrupt`: SQLite found the file corrupt. As `IoError`; a restart runs the integrity
///   check and applies `store.on_corrupt`. Unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    Ok = 0,
    Full = 1,
    Locked = 2,
    IoError = 3,
    Corrupt = 4,
}

impl StoreState {
    pub const ALL: [StoreState; 5] = [
        StoreState::Ok,
        StoreState::Full,
        StoreState::Locked,
        StoreState::IoError,
        StoreState::Corrupt,
    ];

    /// Classifies a failed store operation.
    pub fn of(e: &rusqlite::Error) -> StoreState {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreState::Full,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreState::Locked,
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreState::Corrupt,
            _ => StoreState::IoError,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StoreState::Ok => "ok",
            StoreState::Full => "full",
            StoreState::Locked => "locked",
            StoreState::IoError => "io_error",
            StoreState::Corrupt => "corrupt",
        }
    }

    /// What `/healthz` says about it.
    pub fn describe(self) -> &'static str {
        match self {
            StoreState::Ok => "ok",
            StoreState::Full => "full: refusing new QoS 1/2 messages (disk budget)",
            StoreState::Locked => "locked by another process past the busy timeout",
            StoreState::IoError => "I/O error: refusing new QoS 1/2 messages (failing storage?)",
            StoreState::Corrupt => "corrupt: refusing new QoS 1/2 messages; restart to check",
        }
    }

    /// Whether the gateway is healthy in this state (a full budget is working as designed).
    pub fn healthy(self) -> bool {
        matches!(self, StoreState::Ok | StoreState::Full)
    }

    fn from_u8(v: u8) -> StoreState {
        StoreState::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(StoreState::IoError)
    }
}

/// Commit statistics shared between the writer thread and readers.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    commits: AtomicU64,
    failures: AtomicU64,
    /// `StoreState` as u8.
    state: std::sync::atomic::AtomicU8,
    /// Failed operations by `StoreState` (index; `Ok` unused), queue reads included.
    errors: [AtomicU64; 5],
    /// Queue read-backs that failed (retried).
    read_failures: AtomicU64,
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; COMMIT_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    recent: Mutex<Vec<u32>>,
}

/// A consistent-enough copy of the cumulative figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitCounts {
    /// Group commits that succeeded.
    pub commits: u64,
    /// Group commits that failed (disk full, budget, I/O error).
    pub failures: u64,
    /// Cumulative counts per bucket of [`COMMIT_BUCKETS_US`], then `+Inf` (= `count`).
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_us: u64,
}

/// Percentiles of the commit durations since the previous drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySummary {
    /// Commits measured in the interval (including failed ones).
    pub count: u64,
    pub p50_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

impl StoreMetrics {
    /// Records one group commit attempt that took `took`.
    pub fn record(&self, took: Duration, ok: bool) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if ok {
            self.commits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let i = COMMIT_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(COMMIT_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        let sample = u32::try_from(us).unwrap_or(u32::MAX);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() < MAX_SAMPLES {
                recent.push(sample);
            } else {
                let n = (self.commits.load(Ordering::Relaxed)
                    + self.failures.load(Ordering::Relaxed)) as usize;
                recent[n % MAX_SAMPLES] = sample;
            }
        }
    }

    /// The writer's view of the store now.
    pub fn state(&self) -> StoreState {
        StoreState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, s: StoreState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Counts one failed operation of kind `s`.
    pub fn record_error(&self, s: StoreState) {
        self.errors[s as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_read_failure(&self) {
        self.read_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed operations per kind (`StoreState::ALL` order) and failed queue reads.
    pub fn error_counts(&self) -> ([u64; 5], u64) {
        let mut out = [0; 5];
        for (o, e) in out.iter_mut().zip(&self.errors) {
            *o = e.load(Ordering::Relaxed);
        }
        (out, self.read_failures.load(Ordering::Relaxed))
    }

    /// Cumulative counters (for Prometheus).
    pub fn counts(&self) -> CommitCounts {
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        let mut total = 0;
        for b in &self.buckets {
            total += b.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        CommitCounts {
            commits: self.commits.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            cumulative,
            count: total,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }

    /// Takes the samples recorded since the last call and summarises them.
    pub fn drain_interval(&self) -> LatencySummary {
        let mut samples = match self.recent.lock() {
            Ok(mut recent) => std::mem::take(&mut *recent),
            Err(_) => Vec::new(),
        };
        summarize(&mut samples)
    }
}

/// Nearest-rank percentiles of `samples` (sorted in place).
pub fn summarize(samples: &mut [u32]) -> LatencySummary {
    if samples.is_empty() {
        return LatencySummary::default();
    }
    samples.sort_unstable();
    let rank = |p: usize| {
        let n = samples.len();
        let r = (p * n).div_ceil(100).max(1);
        samples[r.min(n) - 1]
    };
    LatencySummary {
        count: samples.len() as u64,
        p50_us: rank(50),
        p99_us: rank(99),
        max_us: samples[samples.len() - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let s = summarize(&mut v);
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (100, 50, 99, 100));
        let s = summarize(&mut [7]);
        assert_eq!((s.p50_us, s.p99_us, s.max_us), (7, 7, 7));
        assert_eq!(summarize(&mut []), LatencySummary::default());
    }

    #[test]
    fn record_fills_buckets_and_drains_samples() {
        let m = StoreMetrics::default();
        m.record(Duration::from_micros(100), true);
        m.record(Duration::from_micros(3_000), true);
        m.record(Duration::from_secs(10), false);
        let c = m.counts();
        assert_eq!((c.commits, c.failures, c.count), (2, 1, 3));
        assert_eq!(c.cumulative[0], 1, "100 µs <= 250 µs");
        assert_eq!(c.cumulative[4], 2, "3 ms <= 5 ms");
        assert_eq!(*c.cumulative.last().unwrap(), 3);
        assert_eq!(
            c.cumulative[COMMIT_BUCKETS_US.len() - 1],
            2,
            "10 s only in +Inf"
        );
        let s = m.drain_interval();
        assert_eq!((s.count, s.p50_us, s.max_us), (3, 3_000, 10_000_000));
        assert_eq!(m.drain_interval().count, 0, "drained");
        assert_eq!(m.counts().count, 3, "cumulative figures stay");
    }

    #[test]
    fn samples_are_bounded() {
        let m = StoreMetrics::default();
        for i in 0..(MAX_SAMPLES as u64 * 2) {
            m.record(Duration::from_micros(i), true);
        }
        assert_eq!(m.drain_interval().count, MAX_SAMPLES as u64);
    }
}
