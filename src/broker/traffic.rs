//! Bytes received from and sent to MQTT clients, per listener.
//!
//! Each connection counts in plain local integers ([`Meter`]) and adds them to its
//! listener's shared atomics ([`ListenerTraffic`]) only every [`FLUSH_BYTES`], on the first
//! read or write after [`FLUSH_EVERY`], and when the connection ends — so the hot path does
//! an addition and a comparison per socket read or write and touches a shared cache line
//! rarely. The totals therefore lag the sockets by less than `FLUSH_BYTES` per connection
//! (what a connection counted in the second before it fell idle waits for its next read or
//! write), and are exact once a connection closed.
//! Bytes are counted at the socket: MQTT packets including headers; for TLS listeners,
//! the decrypted MQTT bytes (not the TLS records).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Pending bytes that make a connection add its counts to the listener's.
pub const FLUSH_BYTES: u64 = 16 * 1024;
/// A read or write this long after the last flush flushes too.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One listener's byte counters.
#[derive(Debug, Default)]
pub struct ListenerTraffic {
    /// `bind` as configured (label of the metrics).
    pub name: String,
    received: AtomicU64,
    sent: AtomicU64,
}

impl ListenerTraffic {
    pub fn new(name: impl Into<String>) -> ListenerTraffic {
        ListenerTraffic {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Bytes received from clients of this listener since start.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes sent to clients of this listener since start.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A connection's local byte counts; flushes to its listener when dropped.
#[derive(Debug)]
pub struct Meter {
    listener: Arc<ListenerTraffic>,
    pending_in: u64,
    pending_out: u64,
    last_flush: Instant,
}

impl Meter {
    pub fn new(listener: Arc<ListenerTraffic>) -> Meter {
        Meter {
            listener,
            pending_in: 0,
            pending_out: 0,
            last_flush: Instant::now(),
        }
    }

    /// `n` bytes were read at `now`.
    pub fn read(&mut self, n: usize, now: Instant) {
        self.pending_in += n as u64;
        if self.pending_in + self.pending_out >= FLUSH_BYTES
            || now.saturating_duration_since(self.last_flush) >= FLUSH_EVERY
        {
            self.flush(now);
        }
    }

    /// `n` bytes were written.
    pub fn wrote(&mut self, n: usize) {
        self.pending_out += n as u64;
        let now = Instant::now();
        if self.pending_out >= FLUSH_BYTES
            || now.saturating_duration_since(self.last_flush) >= FLUSH_EVERY
        {
            self.flush(now);
        }
    }

    fn flush(&mut self, now: Instant) {
        if self.pending_in > 0 {
            self.listener
                .received
                .fetch_add(self.pending_in, Ordering::Relaxed);
        }
        if self.pending_out > 0 {
            self.listener
                .sent
                .fetch_add(self.pending_out, Ordering::Relaxed);
        }
        self.pending_in = 0;
        self.pending_out = 0;
        self.last_flush = now;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.flush(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused clock: `Instant::now()` stands still, so only the given times move it.
    #[tokio::test(start_paused = true)]
    async fn small_counts_wait_for_a_threshold_or_the_end() {
        let l = Arc::new(ListenerTraffic::new("l"));
        let mut m = Meter::new(l.clone());
        let t0 = Instant::now();
        m.read(100, t0);
        m.wrote(200);
        assert_eq!((l.received(), l.sent()), (0, 0), "nothing shared yet");
        m.read(1, t0 + FLUSH_EVERY);
        assert_eq!(
            (l.received(), l.sent()),
            (101, 200),
            "a read after a second"
        );
        m.wrote(FLUSH_BYTES as usize);
        assert_eq!(l.sent(), 200 + FLUSH_BYTES, "a full batch");
        m.read(7, t0 + FLUSH_EVERY);
        drop(m);
        assert_eq!(l.received(), 108, "the rest when the connection ends");
    }
}
