//! Observability: installing the process-wide `tracing` subscriber.
//!
//! The filter is `RUST_LOG` when that is set (the usual override while debugging), otherwise
//! `log.level` from the configuration. Output goes to stderr, where systemd's journal picks it
//! up: a human-readable format with targets, or one JSON object per line for log shippers.
//! `$SYS/` topics and metrics will live here too.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

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

/// Installs the global subscriber described by `cfg` (see the module doc for the filter
/// rules). Calling it again is harmless: if a global subscriber is already set (by an
/// earlier call or by a test harness), the new one is dropped and `Ok(())` is returned.
pub fn init_tracing(cfg: &LogConfig) -> Result<(), ObserveError> {
    let filter = build_filter(std::env::var("RUST_LOG").ok().as_deref(), &cfg.level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr);
    // `try_init` fails only when a global subscriber already exists; that is the
    // "called twice" case, which we treat as success.
    let _already_set = match cfg.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
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
