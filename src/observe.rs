//! Observability: logs, `$SYS/` topics, Prometheus metrics, health, systemd notification.
//!
//! # Logs
//! The filter is `RUST_LOG` when that is set (the usual override while debugging), otherwise
//! `log.level` from the configuration. Output goes to stderr, where systemd's journal picks it
//! up: a human-readable format with targets, or one JSON object per line for log shippers.
//! The filter sits behind a reload layer: [`LogControl::set_level`] changes it in place
//! (SIGHUP with a new `log.level`, see `crate::reload`); the format needs a restart.
//!
//! # Figures
//! [`Observer`] gathers one [`Snapshot`]: the router's counters and session figures (asked
//! with `RouterEvent::Stats`, under a deadline), the connection count, the store's size on
//! disk and the writer's commit statistics (`store::metrics`). Every interval it drains the
//! commit-latency samples into p50/p99 figures ([`Observer::roll_interval`]). From there:
//! - `sys`: retained QoS 0 messages under `$SYS/holdfast/` every `sys.interval_secs`;
//! - `http`: `GET /metrics` (Prometheus text format) and `GET /healthz` on `metrics.bind`;
//! - the admin socket's `status` command (`holdfast status`);
//! - `notify`: `READY=1`, `STOPPING=1` and `WATCHDOG=1` for systemd (`Type=notify`).
//!
//! Health: the router and the store writer each answer a request within a deadline (the
//! writer answers once everything submitted before the request is committed). A wedged
//! router or writer fails `/healthz` and stops the watchdog pings, so systemd restarts us.

pub mod http;
pub mod notify;
mod observer;
pub mod status;
pub mod sys;

pub use observer::{Health, Observer, Snapshot};

use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::{ConfigError, LogConfig, LogFormat};

/// `[sys]`: the `$SYS/holdfast/...` status topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SysConfig {
    /// Seconds between two publications of the status topics; 0 = none.
    pub interval_secs: u64,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval_secs: 10 }
    }
}

impl SysConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval_secs > 86_400 {
            return Err(ConfigError::invalid(
                "sys.interval_secs",
                format!(
                    "must be between 0 (off) and 86400 seconds (got {})",
                    self.interval_secs
                ),
            ));
        }
        Ok(())
    }
}

/// `[metrics]`: the HTTP endpoint for Prometheus and health checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:PORT` to serve `/metrics` and `/healthz` on; unset = no HTTP endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
}

impl MetricsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.socket_addr().map(|_| ())
    }

    /// The address to bind, parsed like a listener's (`localhost:PORT` = `127.0.0.1`).
    pub fn socket_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(bind) = &self.bind else {
            return Ok(None);
        };
        crate::config::ListenerConfig::new(bind.clone())
            .socket_addr()
            .map(Some)
            .map_err(|m| ConfigError::invalid("metrics.bind", m))
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The filter (from `RUST_LOG` or `log.level`) does not parse.
    #[error("{origin}: invalid log filter `{filter}`: {cause}")]
    Filter {
        /// `RUST_LOG` or `log.level`.
        origin: &'static str,
        filter: String,
        #[source]
        cause: tracing_subscriber::filter::ParseError,
    },
}

/// Changes the log filter of the running process (see [`init_tracing`]).
#[derive(Debug, Clone)]
pub struct LogControl {
    /// None when another global subscriber was installed first (tests): nothing to change.
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    /// `RUST_LOG` was set at start: it keeps winning over `log.level`.
    rust_log: bool,
}

/// What [`LogControl::set_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    Applied,
    /// `RUST_LOG` is set and wins; `log.level` is not used.
    OverriddenByRustLog,
    /// This process does not own the global subscriber.
    NotInstalled,
}

impl LogControl {
    /// Replaces the filter with `level` (a `log.level` value, already validated).
    pub fn set_level(&self, level: &str) -> Result<LevelChange, ObserveError> {
        if self.rust_log {
            return Ok(LevelChange::OverriddenByRustLog);
        }
        let Some(handle) = &self.handle else {
            return Ok(LevelChange::NotInstalled);
        };
        let filter = build_filter(None, level)?;
        match handle.reload(filter) {
            Ok(()) => Ok(LevelChange::Applied),
            // The subscriber is gone (process exiting): nothing left to filter.
            Err(_) => Ok(LevelChange::NotInstalled),
        }
    }
}

/// Installs the global subscriber described by `cfg` (see the module doc for the filter
/// rules) and returns the handle that changes its level later. Calling it again is
/// harmless: if a global subscriber is already set (by an earlier call or by a test
/// harness), the new one is dropped and the returned control changes nothing.
pub fn init_tracing(cfg: &LogConfig) -> Result<LogControl, ObserveError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = build_filter(rust_log.as_deref(), &cfg.level)?;
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: the journal and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let human = (cfg.format == LogFormat::Human).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_target(true)
            .with_writer(std::io::stderr)
    });
    let json = (cfg.format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_target(true)
            .with_writer(std::io::stderr)
    });
    // `try_init` fails only when a global subscriber already exists; that is the
    // "called twice" case, which we treat as success.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(human)
        .with(json)
        .try_init()
        .is_ok();
    Ok(LogControl {
        handle: installed.then_some(handle),
        rust_log: rust_log.is_some_and(|s| !s.trim().is_empty()),
    })
}

/// The filter: `rust_log` if set and non-empty, else `level`.
fn build_filter(rust_log: Option<&str>, level: &str) -> Result<EnvFilter, ObserveError> {
    let (origin, filter) = match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => ("RUST_LOG", s),
        None => ("log.level", level.trim()),
    };
    EnvFilter::builder()
        .parse(filter)
        .map_err(|cause| ObserveError::Filter {
            origin,
            filter: filter.to_string(),
            cause,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_over_the_configured_level() {
        let filter = build_filter(Some("warn"), "debug").expect("valid filter");
        assert_eq!(filter.to_string(), "warn");
    }

    #[test]
    fn configured_level_is_used_without_rust_log() {
        let filter = build_filter(None, "info,holdfast=debug").expect("valid filter");
        assert!(filter.to_string().contains("holdfast=debug"));
        let filter = build_filter(Some("  "), "error").expect("valid filter");
        assert_eq!(filter.to_string(), "error");
    }

    #[test]
    fn bad_filter_names_its_origin() {
        let err = build_filter(Some("holdfast=loud"), "info").expect_err("invalid filter");
        assert!(err.to_string().starts_with("RUST_LOG: invalid log filter"));
    }

    #[test]
    fn init_twice_does_not_panic() {
        let cfg = LogConfig {
            level: "info".to_string(),
            format: LogFormat::Json,
        };
        // RUST_LOG may be set by whoever runs the tests; only a bad one could fail here.
        if std::env::var("RUST_LOG").is_err() {
            init_tracing(&cfg).expect("first init");
            init_tracing(&LogConfig::default()).expect("second init is a no-op");
        }
    }
}
