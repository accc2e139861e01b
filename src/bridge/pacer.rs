//! The drain pacer: `max_rate` messages/s and `max_bytes_rate` payload bytes/s (0 = no
//! limit), allowing a burst of one message. Reloaded on SIGHUP (`super::Rates`).

use std::time::Duration;

use tokio::time::Instant;

/// Paces the drain to `max_rate` messages/s and `max_bytes_rate` payload bytes/s (0 = no
/// limit), allowing a burst of one message.
pub(super) struct Pacer {
    per_message: Option<Duration>,
    bytes_per_sec: u64,
    pub next: Instant,
}

impl Pacer {
    pub fn new(max_rate: u32, max_bytes_rate: u64) -> Self {
        Pacer {
            per_message: (max_rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(max_rate))),
            bytes_per_sec: max_bytes_rate,
            next: Instant::now(),
        }
    }

    pub fn ready(&self) -> bool {
        Instant::now() >= self.next
    }

    pub fn sent(&mut self, bytes: usize) {
        if bytes == 0 && self.per_message.is_none() {
            return;
        }
        let by_bytes = if self.bytes_per_sec > 0 {
            Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
        } else {
            Duration::ZERO
        };
        let cost = self.per_message.unwrap_or(Duration::ZERO).max(by_bytes);
        if cost.is_zero() {
            return;
        }
        let now = Instant::now();
        self.next = self.next.max(now.checked_sub(cost).unwrap_or(now)) + cost;
    }
}
