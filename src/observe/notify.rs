//! systemd service notification (`Type=notify`): `READY=1` once the broker accepts
//! connections, `STOPPING=1` when a graceful shutdown starts, and `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while the router and the store writer answer (see [`watchdog`]). Without
//! `NOTIFY_SOCKET` (not under systemd) all of this does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Observer;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// `READY=1` with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog timeout systemd expects pings within: `WATCHDOG_USEC`, when set and
/// `WATCHDOG_PID` (if set) is this process, as `sd_watchdog_enabled(3)` reads them.
pub fn watchdog_timeout() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` every `timeout / 2` as long as the router and the store writer both
/// answer within that half period; a wedged router or writer stops the pings, and systemd
/// kills and restarts the service once `timeout` passes without one. Returns when
/// `shutdown` is cancelled.
pub async fn watchdog(observer: Arc<Observer>, timeout: Duration, shutdown: CancellationToken) {
    let period = timeout / 2;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let health = tokio::select! {
            h = observer.health(period) => h,
            _ = shutdown.cancelled() => return,
        };
        if health.ok() {
            if !was_ok {
                warn!("router and store writer answer again: watchdog pings resume");
            }
            send(&[NotifyState::Watchdog]);
            debug!("watchdog ping");
        } else if was_ok {
            warn!(
                router = health.router,
                store = health.store,
                "not answering: watchdog pings withheld (systemd restarts the service if this lasts)"
            );
        }
        was_ok = health.ok();
    }
}
