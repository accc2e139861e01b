//! `[log]`: level and format.

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a full `tracing` filter directive.
    /// `RUST_LOG`, when set, wins.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Human,
        }
    }
}

/// Level names accepted as a bare directive in `log.level`.
pub(super) const LEVEL_NAMES: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let level = self.level.trim();
        if level.is_empty() {
            return Err(ConfigError::invalid("log.level", "must not be empty"));
        }
        // A bare word like `verbose` parses as "target `verbose` at TRACE", which is
        // almost always a typo for a level; insist on `target=level` for targets.
        for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let bare = !directive.contains('=') && !directive.contains('[');
            if bare && !LEVEL_NAMES.contains(&directive.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::invalid(
                    "log.level",
                    format!(
                        "`{directive}` is not a level: use error, warn, info, debug, trace, \
                         off, or a filter such as `info,holdfast=debug`"
                    ),
                ));
            }
        }
        tracing_subscriber::EnvFilter::builder()
            .parse(level)
            .map_err(|e| {
                ConfigError::invalid(
                    "log.level",
                    format!("`{level}` is not a valid tracing filter: {e}"),
                )
            })?;
        Ok(())
    }
}
