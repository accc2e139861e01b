//! Exponential backoff with full jitter, for retry loops that must not hammer a peer that
//! is down (the bridge reconnecting upstream, a serial port being reopened): each wait is
//! uniform in `[min, min + step)`, capped at `max`, and the step doubles up to `max` until
//! [`Backoff::reset`] after a success. Many gateways restarted by the same outage therefore
//! spread their reconnects instead of arriving together.

use std::time::Duration;

pub struct Backoff {
    min: u64,
    max: u64,
    current: u64,
    seed: u64,
}

impl Backoff {
    /// Bounds in milliseconds (`min` at least 1, `max` at least `min`).
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let min = min_ms.max(1);
        Backoff {
            min,
            max: max_ms.max(min),
            current: min,
            seed,
        }
    }

    /// After a success: the next wait starts from `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let wait = self.min + self.seed % self.current.max(1);
        self.current = self.current.saturating_mul(2).min(self.max);
        Duration::from_millis(wait.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_within_bounds_grow_and_reset() {
        let mut b = Backoff::new(100, 1_000);
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(200));
        let waits: Vec<Duration> = (0..50).map(|_| b.next_wait()).collect();
        assert!(waits
            .iter()
            .all(|w| *w >= Duration::from_millis(100) && *w <= Duration::from_millis(1_000)));
        // Once the step is at `max`, waits spread over the whole range.
        assert!(waits.iter().any(|w| *w > Duration::from_millis(500)));
        b.reset();
        assert!(b.next_wait() < Duration::from_millis(200));
        let mut zero = Backoff::new(0, 0);
        assert_eq!(zero.next_wait(), Duration::from_millis(1));
    }
}
