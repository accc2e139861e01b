//! Schema migrations: `migrations/NNNN_name.sql`, embedded at compile time and applied in
//! order. The schema version lives in `PRAGMA user_version`. All pending migrations and the
//! version bump run in one transaction, so a crash half-way leaves the old version and the
//! next start applies them again. A database whose version is newer than this binary knows
//! is refused (running it could corrupt data the newer binary relies on).

use rusqlite::Connection;

use super::StoreError;

/// (name, SQL), in order. Version N = the first N entries applied.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../migrations/0001_init.sql")),
    (
        "0002_queue_enqueued_at",
        include_str!("../../migrations/0002_queue_enqueued_at.sql"),
    ),
    (
        "0003_session_slots",
        include_str!("../../migrations/0003_session_slots.sql"),
    ),
    (
        "0004_session_owner",
        include_str!("../../migrations/0004_session_owner.sql"),
    ),
    (
        "0005_lazy_session_counts",
        include_str!("../../migrations/0005_lazy_session_counts.sql"),
    ),
    (
        "0006_queue_staging_log",
        include_str!("../../migrations/0006_queue_staging_log.sql"),
    ),
];

/// The schema version this binary writes.
pub fn latest_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// Brings the database up to `latest_version()`. Returns the version found.
pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    let found: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let latest = latest_version();
    if found > latest {
        return Err(StoreError::TooNew { found, latest });
    }
    for (name, sql) in &MIGRATIONS[found as usize..] {
        tracing::info!(migration = name, "applying schema migration");
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Migration { name, source: e })?;
    }
    tx.pragma_update(None, "user_version", latest)?;
    tx.commit()?;
    Ok(found)
}
