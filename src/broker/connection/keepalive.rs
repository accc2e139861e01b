//! Keep-alive for every connection of the gateway: one sweep instead of a timer per
//! connection.
//!
//! MQTT-3.1.2-24: a connection that sent nothing for 1.5 × its keep-alive is closed (v5
//! clients get DISCONNECT 0x8D first). A connection with a keep-alive registers its link
//! here once, after CONNECT; every read stamps the time in its link
//! (`LinkRx::touch`, one relaxed atomic store); every `TICK` the sweep checks every
//! registered link and marks the ones past their limit expired, which wakes the
//! connection's task and makes it close (`LinkRx::expired`).
//!
//! Why not a `tokio::time::Sleep` per connection (as before): it lives in every connection
//! task's state for the connection's life (issue 17 item 1: ~10,000 sessions on a gateway),
//! and was re-armed on every read. Here a connection costs a 16-byte entry and an 8-byte
//! stamp.
//!
//! Invariants:
//! - a connection is closed no earlier than its limit after its last read, and no later than
//!   the limit plus one `TICK` (plus the time a loaded runtime takes to run the sweep);
//! - an entry holds its link weakly: it never keeps a closed connection's link alive, and it
//!   is dropped by the first sweep after the connection ended.

use std::sync::{Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{LinkRx, LinkState};

/// How often the sweep runs: the precision of the keep-alive timeout.
pub const TICK: Duration = Duration::from_millis(250);

/// One watched connection.
#[derive(Debug)]
struct Watched {
    link: Weak<LinkState>,
    /// 1.5 × keep-alive, ms.
    limit_ms: u64,
}

/// The gateway's keep-alive sweep (one, in `connection::Shared`).
#[derive(Debug)]
pub struct Sweep {
    /// Time zero of the stamps (ms since it).
    epoch: Instant,
    watched: Mutex<Vec<Watched>>,
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep {
            epoch: Instant::now(),
            watched: Mutex::new(Vec::new()),
        }
    }
}

impl Sweep {
    /// Milliseconds since the sweep's epoch, for `LinkRx::touch`.
    pub fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Watches a connection whose limit (1.5 × its keep-alive) is `limit`, from now on.
    pub fn watch(&self, rx: &LinkRx, limit: Duration) {
        rx.touch(self.now_ms(Instant::now()));
        let entry = Watched {
            link: rx.downgrade(),
            limit_ms: limit.as_millis() as u64,
        };
        self.lock().push(entry);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Watched>> {
        // Nothing panics while holding it; the list stays consistent.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One pass: expires the connections past their limit and forgets the ended ones.
    /// Returns how many it expired.
    pub fn sweep(&self, now: Instant) -> usize {
        let now_ms = self.now_ms(now);
        let mut expired = 0;
        self.lock().retain(|w| {
            let Some(link) = w.link.upgrade() else {
                return false; // the connection ended
            };
            if link.silent_ms(now_ms) < w.limit_ms {
                return true;
            }
            link.expire();
            expired += 1;
            false
        });
        expired
    }

    /// Connections watched (ended ones included until the next sweep).
    #[cfg(test)]
    pub fn watched(&self) -> usize {
        self.lock().len()
    }

    /// Sweeps every `TICK` until shutdown.
    pub async fn run(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.sweep(Instant::now());
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::link::ConnLink;
    use super::*;

    #[tokio::test]
    async fn a_silent_connection_expires_after_its_limit_and_not_before() {
        let sweep = Sweep::default();
        let (_link, rx) = ConnLink::new(1);
        sweep.watch(&rx, Duration::from_millis(1500));
        let t0 = Instant::now();
        assert_eq!(sweep.sweep(t0 + Duration::from_millis(1400)), 0);
        // A read at 1 s starts the count again.
        rx.touch(sweep.now_ms(t0 + Duration::from_millis(1000)));
        assert_eq!(sweep.sweep(t0 + Duration::from_millis(2400)), 0);
        assert_eq!(sweep.sweep(t0 + Duration::from_millis(2600)), 1);
        tokio::time::timeout(Duration::from_secs(5), rx.expired())
            .await
            .expect("the expiry reaches the connection");
        assert_eq!(
            sweep.watched(),
            0,
            "an expired connection is not swept again"
        );
    }

    #[tokio::test]
    async fn the_expiry_wakes_a_connection_waiting_for_packets_too() {
        let sweep = Sweep::default();
        let (_link, rx) = ConnLink::new(1);
        sweep.watch(&rx, Duration::from_millis(10));
        let waiting = tokio::spawn(async move {
            tokio::select! {
                _ = rx.recv() => false,
                _ = rx.expired() => true,
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sweep.sweep(Instant::now()), 1);
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(woke, Ok(Ok(true))), "{woke:?}");
    }

    #[test]
    fn an_ended_connection_is_forgotten_by_the_next_sweep() {
        let sweep = Sweep::default();
        let (link, rx) = ConnLink::new(1);
        sweep.watch(&rx, Duration::from_secs(60));
        drop((link, rx));
        assert_eq!(sweep.watched(), 1);
        assert_eq!(sweep.sweep(Instant::now()), 0);
        assert_eq!(sweep.watched(), 0);
    }
}
