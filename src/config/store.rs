//! `[store]`: the durable store's settings and their checks.

use super::*;

/// The durable store (SQLite file `<data_dir>/holdfast.db`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `full`: every commit is fsynced (survives power loss). `normal`: survives a process
    /// crash, but a power cut loses everything committed since the last WAL checkpoint.
    pub synchronous: crate::store::Synchronous,
    /// Largest database file in bytes (0 = no fixed size; `min_free_percent` still applies).
    pub max_bytes: u64,
    /// The store never grows the database while less than this share (percent) of its
    /// filesystem would stay free, so queued messages cannot fill the SD card the OS and
    /// its logs live on. 0 = off (only `max_bytes`, or the disk, limit the store).
    pub min_free_percent: u8,
    /// When the budget (or the disk) is full: `drop-oldest` drops the oldest queued messages
    /// of the longest queue (counted); `reject-new` refuses new QoS 1/2 messages (0x97).
    pub budget_policy: crate::store::BudgetPolicy,
    /// A database file found corrupt at start-up: `quarantine` moves it aside and starts
    /// empty (loudly); `refuse` stops with an error.
    pub on_corrupt: crate::store::OnCorrupt,
    /// Run SQLite's `quick_check` over the whole file at start-up (reads every page once:
    /// seconds per GB on an SD card), so damage is found before anything is served.
    pub integrity_check: bool,
    /// Seconds between sweeps that delete expired queued messages.
    pub sweep_interval_secs: u64,
    /// Opt-in flash-wear trade: the store writer waits up to this many milliseconds after
    /// a batch arrives for more to share its commit (one fsync, fewer bytes written per
    /// message at low rates). Acknowledgements still wait for their commit, so they are
    /// delayed by up to this much. 0 (default) = commit at once.
    pub commit_delay_ms: u64,
    /// SQLite page size (bytes, a power of two from 512 to 65536) of a database Holdfast
    /// creates; an existing file keeps its own. Default 1024: fewer bytes written per
    /// message (flash wear, commit cost); rows of messages larger than ~1 KiB spill into
    /// overflow pages (see `store::DEFAULT_PAGE_SIZE`).
    pub page_size: u32,
    /// SQLite's page cache of the store's connection, KiB (`PRAGMA cache_size`): memory
    /// against re-reading pages (`store::DEFAULT_CACHE_KIB`).
    pub cache_size_kib: u32,
}

/// Largest `store.commit_delay_ms`: beyond a second, publishers' acknowledgement timers
/// (and the MQTT keepalive of slow clients) start to matter, and the wear saved is small.
pub const MAX_COMMIT_DELAY_MS: u64 = 1000;

/// Smallest `store.cache_size_kib`: below a few hundred pages every statement re-reads the
/// B-tree's inner pages from the file.
pub const MIN_CACHE_KIB: u32 = 256;
/// Largest `store.cache_size_kib` (1 GiB): more than any gateway board has to spare.
pub const MAX_CACHE_KIB: u32 = 1024 * 1024;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            synchronous: crate::store::Synchronous::Full,
            max_bytes: 0,
            min_free_percent: 5,
            budget_policy: crate::store::BudgetPolicy::RejectNew,
            on_corrupt: crate::store::OnCorrupt::Quarantine,
            integrity_check: true,
            sweep_interval_secs: 60,
            commit_delay_ms: 0,
            page_size: crate::store::DEFAULT_PAGE_SIZE,
            cache_size_kib: crate::store::DEFAULT_CACHE_KIB,
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_bytes != 0 && self.max_bytes < 64 * 1024 {
            return Err(ConfigError::invalid(
                "store.max_bytes",
                format!(
                    "must be 0 (no limit) or at least 65536 (got {})",
                    self.max_bytes
                ),
            ));
        }
        if self.min_free_percent > 99 {
            return Err(ConfigError::invalid(
                "store.min_free_percent",
                format!("must be 0 (off) to 99 (got {})", self.min_free_percent),
            ));
        }
        if self.sweep_interval_secs == 0 {
            return Err(ConfigError::invalid(
                "store.sweep_interval_secs",
                "must be at least 1",
            ));
        }
        if !(512..=65536).contains(&self.page_size) || !self.page_size.is_power_of_two() {
            return Err(ConfigError::invalid(
                "store.page_size",
                format!(
                    "must be a power of two from 512 to 65536 (got {})",
                    self.page_size
                ),
            ));
        }
        if !(MIN_CACHE_KIB..=MAX_CACHE_KIB).contains(&self.cache_size_kib) {
            return Err(ConfigError::invalid(
                "store.cache_size_kib",
                format!(
                    "must be {MIN_CACHE_KIB} to {MAX_CACHE_KIB} KiB (got {})",
                    self.cache_size_kib
                ),
            ));
        }
        if self.commit_delay_ms > MAX_COMMIT_DELAY_MS {
            return Err(ConfigError::invalid(
                "store.commit_delay_ms",
                format!(
                    "must be 0 (commit at once) to {MAX_COMMIT_DELAY_MS} (got {}): every \
                     acknowledgement waits up to this long",
                    self.commit_delay_ms
                ),
            ));
        }
        Ok(())
    }
}
