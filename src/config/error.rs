//! Where a value came from (`Origin`) and what was wrong with it (`ConfigError`): every
//! error names the key and the file or environment variable.

use super::*;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "HOLDFAST_";

/// `HOLDFAST_*` variables that are not configuration keys (test switches), and are therefore
/// not passed to the configuration loader. Variables starting with `HOLDFAST_TEST_` are
/// skipped as well.
pub const NON_CONFIG_ENV_VARS: &[&str] = &["HOLDFAST_INTEROP"];

/// Where a configuration value (or error) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The TOML file at this path.
    File(PathBuf),
    /// This environment variable (full name, e.g. `HOLDFAST_MQTT__MAX_INFLIGHT`).
    Env(String),
    /// The environment as a whole (when no single variable can be blamed).
    Environment,
    /// The merged configuration, origin unknown (e.g. [`Config::validate`] called directly).
    Config,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Environment => write!(f, "environment"),
            Origin::Config => write!(f, "configuration"),
        }
    }
}

/// Why a configuration could not be loaded. Every message names the origin (file or
/// environment variable) and, where there is one, the dotted key (`mqtt.max_qos`,
/// `listener[0].bind`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given with `--config` could not be read (missing, permissions, ...).
    #[error("config file {}: cannot read: {cause}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    /// The file is not valid TOML (or an environment variable is not valid UTF-8).
    #[error("{origin}: {message}")]
    Syntax { origin: Origin, message: String },
    /// A key that Holdfast does not know (typo, or a setting from another version).
    #[error("{origin}: key `{key}`: unknown key{}", hint_suffix(expected))]
    UnknownKey {
        origin: Origin,
        key: String,
        /// The keys allowed at that level, as serde lists them (may be empty).
        expected: String,
    },
    /// A key whose value has the wrong type or is out of range.
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
}

pub(super) fn hint_suffix(expected: &str) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(" (expected {expected})")
    }
}

impl ConfigError {
    /// The dotted key this error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }

    /// Where the offending value came from.
    pub fn origin(&self) -> Origin {
        match self {
            ConfigError::Read { path, .. } => Origin::File(path.clone()),
            ConfigError::Syntax { origin, .. }
            | ConfigError::UnknownKey { origin, .. }
            | ConfigError::Invalid { origin, .. } => origin.clone(),
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            origin: Origin::Config,
            key: key.into(),
            message: message.into(),
        }
    }

    pub(super) fn with_origin(self, new: Origin) -> Self {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                origin: new,
                message,
            },
            ConfigError::UnknownKey { key, expected, .. } => ConfigError::UnknownKey {
                origin: new,
                key,
                expected,
            },
            ConfigError::Invalid { key, message, .. } => ConfigError::Invalid {
                origin: new,
                key,
                message,
            },
            read @ ConfigError::Read { .. } => read,
        }
    }

    /// Translates an error of the `config` crate, whose own messages bury the key
    /// (`... for key `mqtt` in ...`), into ours.
    pub(super) fn from_config_crate(err: config::ConfigError, origin: Origin) -> Self {
        let (key, message) = flatten(err);
        let key = key.map(normalize_key);
        // serde's derive reports unknown fields as "unknown field `x`, expected one of ..."
        // (or "..., there are no fields"); the config crate attaches the parent key.
        if let Some(rest) = message.strip_prefix("unknown field `") {
            if let Some((field, tail)) = rest.split_once('`') {
                let full = match key {
                    Some(parent) if !parent.is_empty() => format!("{parent}.{field}"),
                    _ => field.to_string(),
                };
                let expected = tail
                    .trim_start_matches(',')
                    .trim()
                    .trim_start_matches("expected ")
                    .to_string();
                return ConfigError::UnknownKey {
                    origin,
                    key: full,
                    expected,
                };
            }
        }
        match key {
            Some(key) => ConfigError::Invalid {
                origin,
                key,
                message,
            },
            None => ConfigError::Syntax { origin, message },
        }
    }
}

/// Splits a `config` crate error into (dotted key, message without key or origin).
pub(super) fn flatten(err: config::ConfigError) -> (Option<String>, String) {
    match err {
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (key, format!("expected {expected}, got {unexpected}")),
        config::ConfigError::At { error, key, .. } => {
            let (inner_key, message) = flatten(*error);
            let key = match (key, inner_key) {
                (Some(outer), Some(inner)) if inner.starts_with('[') => {
                    Some(format!("{outer}{inner}"))
                }
                (Some(outer), Some(inner)) => Some(format!("{outer}.{inner}")),
                (outer, inner) => outer.or(inner),
            };
            (key, message)
        }
        config::ConfigError::NotFound(key) => (Some(key), "required key is missing".to_string()),
        config::ConfigError::FileParse { cause, .. } => (None, format!("invalid TOML: {cause}")),
        other => (None, other.to_string()),
    }
}

/// The config crate joins an index and a following field without a dot
/// (`listener[0]bind`); make it `listener[0].bind`.
pub(super) fn normalize_key(key: String) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut prev = '\0';
    for c in key.chars() {
        if prev == ']' && c != '.' && c != '[' {
            out.push('.');
        }
        out.push(c);
        prev = c;
    }
    out
}

/// The configuration key an environment variable addresses (`HOLDFAST_MQTT__MAX_INFLIGHT`
/// → `mqtt.max_inflight`), exactly as the `config` crate maps it (lowercased).
pub(super) fn env_var_key(var: &str) -> Option<String> {
    let lower = var.to_lowercase();
    let rest = lower.strip_prefix(&ENV_PREFIX.to_lowercase())?;
    Some(rest.replace("__", "."))
}

/// The environment variable name for a dotted key (`mqtt.max_inflight` →
/// `HOLDFAST_MQTT__MAX_INFLIGHT`).
pub fn env_var_for_key(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

pub(super) fn is_config_env_var(name: &str) -> bool {
    let upper = name.to_uppercase();
    upper.starts_with(ENV_PREFIX)
        && !upper.starts_with("HOLDFAST_TEST_")
        && !NON_CONFIG_ENV_VARS.contains(&upper.as_str())
}

pub(super) fn env_source(env: &HashMap<String, String>) -> config::Environment {
    let map: config::Map<String, String> =
        env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
        .prefix_separator("_")
        .separator("__")
        .source(Some(map))
}

/// Which environment variable, if any, set `key` (or one of its parents, e.g. `mqtt` for
/// `mqtt.max_qos`).
pub(super) fn env_origin(env: &HashMap<String, String>, key: &str) -> Option<Origin> {
    let mut best: Option<(&String, usize)> = None;
    for var in env.keys() {
        let Some(var_key) = env_var_key(var) else {
            continue;
        };
        let matches = key == var_key
            || key.starts_with(&format!("{var_key}."))
            || key.starts_with(&format!("{var_key}["));
        if matches && best.is_none_or(|(_, len)| var_key.len() > len) {
            best = Some((var, var_key.len()));
        }
    }
    best.map(|(var, _)| Origin::Env(var.clone()))
}
