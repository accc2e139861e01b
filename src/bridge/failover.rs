//! Which upstream address a bridge uses: `address` is a list tried in order, the first
//! being the primary.
//!
//! - An attempt that fails, or a link that is lost, moves to the next address at once; the
//!   reconnect backoff pauses only after a whole round of addresses failed without
//!   progress (with one address: after every attempt, as before).
//! - While connected to any other address, the primary is probed every `failback_secs`
//!   (a TCP connect to each address its name resolves to, nothing sent); once it answers,
//!   the connected period ends politely and the bridge connects to the primary.
//! - The outbox does not depend on the address: what the old address did not acknowledge
//!   is still in flight in the router's internal session, which resends it first, in
//!   order (DUP, same packet id), on the next connection, whatever the address.

use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub(super) struct Failover {
    addresses: Vec<String>,
    /// How often the primary is probed while connected elsewhere; zero = never.
    every: Duration,
    /// Bound of one probe (TCP connect).
    probe_timeout: Duration,
    state: Mutex<State>,
}

struct State {
    /// Index of the address in use (or being tried).
    current: usize,
    /// Attempts since the last backoff pause or progress.
    tried: usize,
    /// Cancelled when the probe found the primary reachable (ends the connected period).
    failback: CancellationToken,
    /// Cancelled when the connected period ends (stops the probe).
    probe_stop: CancellationToken,
}

impl Failover {
    pub fn new(addresses: Vec<String>, failback_secs: u64, probe_timeout: Duration) -> Failover {
        Failover {
            addresses,
            every: Duration::from_secs(failback_secs),
            probe_timeout,
            state: Mutex::new(State {
                current: 0,
                tried: 0,
                failback: CancellationToken::new(),
                probe_stop: CancellationToken::new(),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    /// The address in use (or to try next).
    pub fn current(&self) -> String {
        let i = self.with(|s| s.current).unwrap_or(0);
        self.addresses.get(i).cloned().unwrap_or_default()
    }

    /// After an attempt that failed or a connected period that ended: moves to the next
    /// address. `progress` (something moved, or the link stayed up) starts a new round.
    /// Returns whether to pause with the backoff first (a whole round went without
    /// progress).
    pub fn next(&self, progress: bool) -> bool {
        let n = self.addresses.len().max(1);
        self.with(|s| {
            if progress {
                s.tried = 0;
            }
            s.current = (s.current + 1) % n;
            s.tried += 1;
            if s.tried >= n {
                s.tried = 0;
                true
            } else {
                false
            }
        })
        .unwrap_or(true)
    }

    /// Back to the primary (it answered the probe): no pause.
    pub fn to_primary(&self) {
        self.with(|s| {
            s.current = 0;
            s.tried = 0;
        });
    }

    /// A connected period starts: on a backup address (and with `failback_secs` > 0) the
    /// primary is probed until it answers or the period ends.
    pub fn connected(&self, shutdown: &CancellationToken, bridge: &str) {
        let Some((current, failback, stop)) = self.with(|s| {
            s.failback = CancellationToken::new();
            s.probe_stop = CancellationToken::new();
            (s.current, s.failback.clone(), s.probe_stop.clone())
        }) else {
            return;
        };
        if current == 0 || self.every.is_zero() {
            return;
        }
        let primary = self.addresses[0].clone();
        let every = self.every;
        let timeout = self.probe_timeout;
        let shutdown = shutdown.clone();
        let bridge = bridge.to_string();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                    _ = shutdown.cancelled() => return,
                }
                if reachable(&primary, timeout).await {
                    info!(bridge = %bridge, primary = %primary, "the primary upstream answers again: failing back to it");
                    failback.cancel();
                    return;
                }
            }
        });
    }

    /// The connected period ended: the probe stops.
    pub fn disconnected(&self) {
        self.with(|s| s.probe_stop.cancel());
    }

    /// Cancelled when the bridge should go back to the primary.
    pub fn failback(&self) -> CancellationToken {
        self.with(|s| s.failback.clone()).unwrap_or_default()
    }
}

/// Whether a TCP connection to `address` (any address it resolves to) succeeds within
/// `timeout`; the connection is closed at once.
async fn reachable(address: &str, timeout: Duration) -> bool {
    let probe = async {
        let Ok(ips) = tokio::net::lookup_host(address).await else {
            return false;
        };
        for ip in ips {
            if TcpStream::connect(ip).await.is_ok() {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(timeout, probe).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_pause_only_after_every_address_failed() {
        let f = Failover::new(vec!["a:1".into(), "b:1".into()], 60, Duration::ZERO);
        assert_eq!(f.current(), "a:1");
        assert!(!f.next(false), "primary failed: the backup at once");
        assert_eq!(f.current(), "b:1");
        assert!(f.next(false), "both failed: back off");
        assert_eq!(f.current(), "a:1");
        // A link that made progress and was lost: the other address at once.
        assert!(!f.next(true));
        assert_eq!(f.current(), "b:1");
        f.to_primary();
        assert_eq!(f.current(), "a:1");
        let one = Failover::new(vec!["a:1".into()], 60, Duration::ZERO);
        assert!(
            one.next(true),
            "one address: the backoff after every attempt"
        );
        assert_eq!(one.current(), "a:1");
    }
}
