//! The gateway-wide read-back budget (`mqtt.read_back_budget_bytes`): how much memory the
//! bodies of durable sessions' queued messages may take, over all sessions together.
//!
//! A durable session's queue lives on disk; what is in memory is only the part about to be
//! sent: messages read back from SQLite, live messages kept in the in-memory front of an
//! online session's queue, and the bodies of its in-flight window. Each such message holds a
//! [`Charge`] on the one [`ReadPool`] of the gateway, given back when the message is dropped
//! (acknowledged, expired, dropped by a policy, its session gone or gone offline). Because
//! the charge is released by `Drop`, no path that forgets a message can leak budget.
//!
//! Invariants:
//! - the pool's `used` is the sum of live charges plus the reservations of read-backs on
//!   their way (a reservation becomes the charges of the rows it brought);
//! - a read-back is asked only with budget reserved for it, except when nothing at all is
//!   charged (so one message larger than the budget still moves);
//! - sessions waiting for budget are served first come, first served (the router's
//!   `read_wait` queue), so no session starves while others keep reading.
//!
//! Clean sessions' queues (bounded per session by `mqtt.max_queued_*`) and the few
//! internal sessions (bridge outboxes, with their own limits) are not charged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::protocol::Publish;

/// Memory one queued message costs beyond its topic and payload: the `Inflight` / `Queued`
/// slot, the `Publish` with its properties, allocation headers of the topic and payload.
pub const MESSAGE_OVERHEAD: u64 = 320;

/// The bytes a message in memory is charged.
pub fn cost(p: &Publish) -> u64 {
    MESSAGE_OVERHEAD + p.topic.len() as u64 + p.payload.len() as u64
}

/// The gateway's budget: a limit and what is charged against it.
#[derive(Debug)]
pub struct ReadPool {
    limit: u64,
    used: AtomicU64,
}

impl ReadPool {
    pub fn new(limit: u64) -> Arc<ReadPool> {
        Arc::new(ReadPool {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes charged now (messages in memory plus reservations).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether `bytes` more fit; with nothing charged anything fits (progress for a message
    /// larger than the whole budget).
    pub fn fits(&self, bytes: u64) -> bool {
        let used = self.used();
        used == 0 || used.saturating_add(bytes) <= self.limit
    }

    /// Takes `bytes` of the budget for a read-back on its way.
    pub fn reserve(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back a reservation (its answer came, or it was abandoned).
    pub fn unreserve(&self, bytes: u64) {
        // Never below zero, even if a caller miscounted: the pool would then refuse forever.
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// A charge for one message held in memory, given back when it is dropped.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Charge {
        self.reserve(bytes);
        Charge {
            bytes,
            pool: self.clone(),
        }
    }
}

/// One message's share of the [`ReadPool`]: released when dropped. Cloning a message
/// charges the copy too.
#[derive(Debug)]
pub struct Charge {
    bytes: u64,
    pool: Arc<ReadPool>,
}

impl Clone for Charge {
    fn clone(&self) -> Self {
        self.pool.charge(self.bytes)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.pool.unreserve(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_given_back_when_dropped_and_cloned_ones_count_twice() {
        let pool = ReadPool::new(1000);
        assert!(pool.fits(5000), "an empty pool takes anything");
        let a = pool.charge(600);
        assert_eq!(pool.used(), 600);
        assert!(pool.fits(400));
        assert!(!pool.fits(401));
        let b = a.clone();
        assert_eq!(pool.used(), 1200);
        drop(a);
        assert_eq!(pool.used(), 600);
        drop(b);
        assert_eq!(pool.used(), 0);
        pool.reserve(100);
        pool.unreserve(300);
        assert_eq!(pool.used(), 0, "never below zero");
    }
}
