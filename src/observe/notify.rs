//! systemd service notification (`Type=notify`): `READY=1` once the broker accepts
//! connections, `STOPPING=1` when a graceful shutdown starts, and `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while the router and the store writer answer (see [`watchdog`]), and
//! `EXTEND_TIMEOUT_USEC` every [`EXTEND_EVERY`] while long start-up work runs (store
//! recovery and migrations, see [`extend_startup`]), so that a big database on a slow SD
//! card does not hit `TimeoutStartSec`. Without `NOTIFY_SOCKET` (not under systemd) all of
//! this does nothing.

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

/// How often `EXTEND_TIMEOUT_USEC` is sent during start-up work; each message asks for
/// three periods (so one lost or late message does not matter).
pub const EXTEND_EVERY: Duration = Duration::from_secs(10);

/// Test switch: the period in milliseconds instead of [`EXTEND_EVERY`].
pub const EXTEND_EVERY_TEST_VAR: &str = "HOLDFAST_TEST_EXTEND_INTERVAL_MS";

/// Sends `EXTEND_TIMEOUT_USEC` (and a `STATUS=` naming the work) from its own thread,
/// at once and then every period, until dropped. Start-up work blocks the runtime, hence
/// the thread.
#[must_use = "the messages stop when this is dropped"]
pub struct StartupExtender {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Keeps systemd's start-up timeout extended while the returned guard lives (nothing
/// without `NOTIFY_SOCKET`). `what` becomes the service status meanwhile.
pub fn extend_startup(what: &'static str) -> StartupExtender {
    let idle = StartupExtender {
        stop: None,
        thread: None,
    };
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return idle;
    }
    let period = std::env::var(EXTEND_EVERY_TEST_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(EXTEND_EVERY, Duration::from_millis);
    let usec = u32::try_from(period.as_micros() * 3).unwrap_or(u32::MAX);
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("holdfast-notify".into())
        .spawn(move || loop {
            send(&[
                NotifyState::ExtendTimeoutUsec(usec),
                NotifyState::Status(what),
            ]);
            debug!(usec, what, "start-up timeout extended");
            match stopped.recv_timeout(period) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        });
    match thread {
        Ok(t) => StartupExtender {
            stop: Some(stop),
            thread: Some(t),
        },
        Err(e) => {
            warn!(error = %e, "cannot start the start-up timeout thread");
            idle
        }
    }
}

impl Drop for StartupExtender {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
