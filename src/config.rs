//! Typed settings: the one place that turns files and environment variables into a
//! [`Config`].
//!
//! Layering (later wins): built-in defaults < TOML file < `HOLDFAST_*` environment variables
//! (`__` separates nesting levels, e.g. `HOLDFAST_MQTT__MAX_INFLIGHT=32`,
//! `HOLDFAST_LOG__LEVEL=debug`). Loading uses the `config` crate; each source is first
//! deserialized on its own so that every error can say where the bad value came from.
//!
//! Invariants kept here:
//! - Unknown keys and badly typed values are errors naming the key and its origin (the file
//!   path, or the environment variable); nothing is silently ignored.
//! - [`Config::load`] / [`Config::load_from`] only return configurations that pass
//!   [`Config::validate`], so the rest of the program may rely on its ranges.
//!
//! Every key is documented in `docs/configuration.md` and `examples/holdfast.toml`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite store and other state live.
    pub data_dir: PathBuf,
    /// The admin socket (`holdfast sessions drop`, `status`, `bridge status`). Default
    /// `<data_dir>/holdfast.sock`; the packaged configuration uses
    /// `/run/holdfast/holdfast.sock` (systemd `RuntimeDirectory=`), so a data directory on
    /// a filesystem without Unix sockets (FAT/exFAT, some FUSE) works. Failing to create
    /// it is a warning, not fatal.
    pub admin_socket: Option<PathBuf>,
    /// Threads of the async runtime (connections, router, bridges, serial ports); the
    /// store writer always has its own. 0 = one per CPU core.
    pub worker_threads: usize,
    /// TCP listeners, `[[listener]]` tables. At least one.
    pub listener: Vec<ListenerConfig>,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub store: StoreConfig,
    /// Password and ACL files (`docs/security.md`).
    pub auth: crate::auth::AuthConfig,
    /// `$SYS/holdfast/...` status topics.
    pub sys: crate::observe::SysConfig,
    /// Prometheus `/metrics` and `/healthz` over HTTP (off unless `bind` is set).
    pub metrics: crate::observe::MetricsConfig,
    /// Upstream bridges, `[[bridge]]` tables (none by default).
    pub bridge: Vec<crate::bridge::BridgeConfig>,
    /// Serial sensor ports, `[[serial]]` tables (none by default).
    pub serial: Vec<crate::serial::SerialConfig>,
    /// This gateway's name in default identifiers (a bridge's upstream client id is
    /// `holdfast-<device_id>-<bridge name>`); unset = derived from `/etc/machine-id`.
    pub device_id: Option<String>,
    /// Where the machine id is read (not a configuration key: a seam for tests).
    #[serde(skip)]
    pub machine_id_file: PathBuf,
}

/// The durable store (SQLite file `<data_dir>/holdfast.db`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `full`: every commit is fsynced (survives power loss). `normal`: survives a process
    /// crash, but a power cut loses everything committed since the last WAL checkpoint.
    pub synchronous: crate::store::Synchronous,
    /// Largest database file in bytes (0 = no fixed size; `min_free_percent` still applies).
    pub max_bytes: u64,
    /// The store never grows the database while less than this share (percent) of its
    /// filesystem would stay free, so queued messages cannot fill the SD card the OS and
    /// its logs live on. 0 = off (only `max_bytes`, or the disk, limit the store).
    pub min_free_percent: u8,
    /// When the budget (or the disk) is full: `drop-oldest` drops the oldest queued messages
    /// of the longest queue (counted); `reject-new` refuses new QoS 1/2 messages (0x97).
    pub budget_policy: crate::store::BudgetPolicy,
    /// A database file found corrupt at start-up: `quarantine` moves it aside and starts
    /// empty (loudly); `refuse` stops with an error.
    pub on_corrupt: crate::store::OnCorrupt,
    /// Run SQLite's `quick_check` over the whole file at start-up (reads every page once:
    /// seconds per GB on an SD card), so damage is found before anything is served.
    pub integrity_check: bool,
    /// Seconds between sweeps that delete expired queued messages.
    pub sweep_interval_secs: u64,
    /// Opt-in flash-wear trade: the store writer waits up to this many milliseconds after
    /// a batch arrives for more to share its commit (one fsync, fewer bytes written per
    /// message at low rates). Acknowledgements still wait for their commit, so they are
    /// delayed by up to this much. 0 (default) = commit at once.
    pub commit_delay_ms: u64,
    /// SQLite page size (bytes, a power of two from 512 to 65536) of a database Holdfast
    /// creates; an existing file keeps its own. 1024 writes about half the bytes per
    /// message at low rates (flash wear), but rows of messages larger than ~1 KiB spill
    /// into overflow pages (see `store::DEFAULT_PAGE_SIZE`).
    pub page_size: u32,
}

/// Largest `store.commit_delay_ms`: beyond a second, publishers' acknowledgement timers
/// (and the MQTT keepalive of slow clients) start to matter, and the wear saved is small.
pub const MAX_COMMIT_DELAY_MS: u64 = 1000;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            synchronous: crate::store::Synchronous::Full,
            max_bytes: 0,
            min_free_percent: 5,
            budget_policy: crate::store::BudgetPolicy::RejectNew,
            on_corrupt: crate::store::OnCorrupt::Quarantine,
            integrity_check: true,
            sweep_interval_secs: 60,
            commit_delay_ms: 0,
            page_size: crate::store::DEFAULT_PAGE_SIZE,
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_bytes != 0 && self.max_bytes < 64 * 1024 {
            return Err(ConfigError::invalid(
                "store.max_bytes",
                format!(
                    "must be 0 (no limit) or at least 65536 (got {})",
                    self.max_bytes
                ),
            ));
        }
        if self.min_free_percent > 99 {
            return Err(ConfigError::invalid(
                "store.min_free_percent",
                format!("must be 0 (off) to 99 (got {})", self.min_free_percent),
            ));
        }
        if self.sweep_interval_secs == 0 {
            return Err(ConfigError::invalid(
                "store.sweep_interval_secs",
                "must be at least 1",
            ));
        }
        if !(512..=65536).contains(&self.page_size) || !self.page_size.is_power_of_two() {
            return Err(ConfigError::invalid(
                "store.page_size",
                format!(
                    "must be a power of two from 512 to 65536 (got {})",
                    self.page_size
                ),
            ));
        }
        if self.commit_delay_ms > MAX_COMMIT_DELAY_MS {
            return Err(ConfigError::invalid(
                "store.commit_delay_ms",
                format!(
                    "must be 0 (commit at once) to {MAX_COMMIT_DELAY_MS} (got {}): every \
                     acknowledgement waits up to this long",
                    self.commit_delay_ms
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `HOST:PORT`, e.g. `127.0.0.1:1883` or `0.0.0.0:1883`. Port 0 picks a free port.
    pub bind: String,
    /// Overrides `mqtt.allow_anonymous` for this listener. A listener on a non-loopback
    /// address that would accept unauthenticated clients is refused unless this is
    /// explicitly `true` (see `docs/security.md`).
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// PEM certificate chain: makes this a TLS listener (with `tls_key`). Reloaded on SIGHUP.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`. Reloaded on SIGHUP.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for client certificates; a verified client certificate's CN
    /// (or first DNS/e-mail SAN) becomes the client's user name.
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse TLS clients without a valid certificate (needs `tls_client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`) instead of bare MQTT; with
    /// `tls_cert` / `tls_key` it is `wss://`.
    #[serde(default)]
    pub websocket: bool,
    /// Request path of the WebSocket upgrade (needs `websocket = true`); `/mqtt` when unset.
    #[serde(default)]
    pub websocket_path: Option<String>,
}

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

/// What happens when a client's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueuePolicy {
    /// Drop the oldest queued message to make room (counted and logged).
    DropOldest,
    /// Refuse the new message: v5 publishers get PUBACK/PUBREC 0x97 Quota exceeded.
    RejectNew,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Allow clients without a username.
    pub allow_anonymous: bool,
    /// Maximum simultaneous client connections over all listeners; further CONNECTs get
    /// CONNACK 0x97 (v5) / 0x03 Server unavailable (3.x).
    pub max_connections: usize,
    /// Largest packet accepted or sent, in bytes (whole packet). Advertised as v5 Maximum
    /// Packet Size.
    pub max_packet_size: u32,
    /// QoS 1/2 messages in flight towards one client, and the Receive Maximum advertised
    /// to v5 clients for their publishes.
    pub max_inflight: u16,
    /// Messages queued in memory for one clean (non-persistent) session beyond its
    /// in-flight window (0 = unlimited). Durable sessions queue on disk: see
    /// `durable_max_queued_messages`.
    pub max_queued_messages: usize,
    /// Payload bytes queued in memory for one clean session (0 = unlimited).
    pub max_queued_bytes: u64,
    /// Messages queued (on disk) for one durable session (0 = bounded only by the store's
    /// disk budget, the default: a dashboard closed over a weekend loses nothing).
    pub durable_max_queued_messages: u64,
    /// Payload bytes queued (on disk) for one durable session (0 = only the disk budget).
    pub durable_max_queued_bytes: u64,
    /// Memory, in bytes, that the bodies of durable sessions' queued and in-flight messages
    /// may take over the whole gateway (read back from disk, or kept from a live publish).
    /// Sessions beyond it wait their turn, first come first served; their messages stay on
    /// disk meanwhile. Each message counts its payload, topic and ~320 bytes of bookkeeping.
    pub read_back_budget_bytes: u64,
    /// What to do when a session's queue limit is reached (clean or durable).
    pub queue_policy: QueuePolicy,
    /// Queue QoS 0 messages for offline persistent sessions.
    pub queue_qos0_offline: bool,
    /// Longest topic name or filter in bytes.
    pub max_topic_length: usize,
    /// Most `/`-separated levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions one client may hold (0 = unlimited).
    pub max_subscriptions_per_client: usize,
    /// Highest QoS granted or accepted (0, 1 or 2).
    pub max_qos: u8,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Topic Alias Maximum advertised to v5 clients (0 disables aliases from clients).
    pub topic_alias_maximum: u16,
    /// If set, overrides the client's keep-alive (v5 Server Keep Alive; 3.x clients are
    /// held to it too).
    pub server_keep_alive: Option<u16>,
    /// Longest keep-alive a client may use, seconds (Mosquitto's `max_keepalive`); 0 = no
    /// cap. A v5 client asking for more (or 0) is lowered to it and told with Server Keep
    /// Alive; a 3.x client cannot be told and is refused (return code 2). Shorter
    /// keep-alives are kept as asked. `server_keep_alive`, when set, wins.
    pub max_keep_alive: u16,
    /// Seconds a new socket may take for the whole handshake: TLS, WebSocket upgrade and
    /// CONNECT.
    pub connect_timeout_secs: u64,
    /// Sockets accepted but not past CONNECT yet, over all listeners; more are closed right
    /// after accept (counted, logged once per episode).
    pub max_handshaking: usize,
    /// Largest CONNECT accepted (whole packet, bytes): the only packet read before the
    /// client is authenticated. Larger ones close the socket before their body is read.
    pub max_connect_packet_size: u32,
    /// Upper bound on a v5 Session Expiry Interval, seconds.
    pub max_session_expiry_secs: u32,
    /// Session expiry applied to 3.1.1 persistent (clean session = 0) sessions, seconds.
    pub v3_session_expiry_secs: u32,
    /// Seconds graceful shutdown may take before remaining connections are dropped.
    pub shutdown_timeout_secs: u64,
    /// New TCP connections per second allowed from one source address (IPv6: one /64),
    /// over all listeners; more are closed right after accept (counted, logged once per
    /// episode). 0 = no limit. Reloaded on SIGHUP, like the next two.
    pub max_connection_rate: f64,
    /// Connections one source address may open at once before `max_connection_rate`
    /// applies (the token bucket's size).
    pub max_connection_burst: u32,
    /// Addresses or networks (`127.0.0.1`, `10.0.0.0/8`, `fd00::/8`) never rate limited. A
    /// list, or one comma-separated string (how an environment variable gives it).
    #[serde(deserialize_with = "list_or_commas")]
    pub connection_rate_exempt: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("holdfast-data"),
            admin_socket: None,
            worker_threads: 1,
            listener: vec![ListenerConfig::new("127.0.0.1:1883")],
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
            store: StoreConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            sys: Default::default(),
            metrics: Default::default(),
            bridge: Vec::new(),
            serial: Vec::new(),
            device_id: None,
            machine_id_file: PathBuf::from("/etc/machine-id"),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Human,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            allow_anonymous: true,
            max_connections: 20_000,
            max_packet_size: 1024 * 1024,
            max_inflight: 64,
            max_queued_messages: 1000,
            max_queued_bytes: 0,
            durable_max_queued_messages: 0,
            durable_max_queued_bytes: 0,
            read_back_budget_bytes: 8 * 1024 * 1024,
            queue_policy: QueuePolicy::DropOldest,
            queue_qos0_offline: false,
            max_topic_length: 1024,
            max_topic_levels: 32,
            max_subscriptions_per_client: 1000,
            max_qos: 2,
            retain_available: true,
            topic_alias_maximum: 64,
            server_keep_alive: None,
            max_keep_alive: 0,
            connect_timeout_secs: 10,
            max_handshaking: 256,
            max_connect_packet_size: 16 * 1024,
            max_session_expiry_secs: 7 * 24 * 3600,
            v3_session_expiry_secs: 7 * 24 * 3600,
            shutdown_timeout_secs: 5,
            max_connection_rate: 0.0,
            max_connection_burst: 10,
            connection_rate_exempt: Vec::new(),
        }
    }
}

/// A list of strings, or one string of comma-separated items (environment variables).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    Ok(match ListOrString::deserialize(d)? {
        ListOrString::List(v) => v,
        ListOrString::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

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

fn hint_suffix(expected: &str) -> String {
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

    fn with_origin(self, new: Origin) -> Self {
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
    fn from_config_crate(err: config::ConfigError, origin: Origin) -> Self {
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
fn flatten(err: config::ConfigError) -> (Option<String>, String) {
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
fn normalize_key(key: String) -> String {
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
fn env_var_key(var: &str) -> Option<String> {
    let lower = var.to_lowercase();
    let rest = lower.strip_prefix(&ENV_PREFIX.to_lowercase())?;
    Some(rest.replace("__", "."))
}

/// The environment variable name for a dotted key (`mqtt.max_inflight` →
/// `HOLDFAST_MQTT__MAX_INFLIGHT`).
pub fn env_var_for_key(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase())
}

fn is_config_env_var(name: &str) -> bool {
    let upper = name.to_uppercase();
    upper.starts_with(ENV_PREFIX)
        && !upper.starts_with("HOLDFAST_TEST_")
        && !NON_CONFIG_ENV_VARS.contains(&upper.as_str())
}

fn env_source(env: &HashMap<String, String>) -> config::Environment {
    let map: config::Map<String, String> =
        env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
        .prefix_separator("_")
        .separator("__")
        .source(Some(map))
}

/// Which environment variable, if any, set `key` (or one of its parents, e.g. `mqtt` for
/// `mqtt.max_qos`).
fn env_origin(env: &HashMap<String, String>, key: &str) -> Option<Origin> {
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

impl Config {
    /// Loads the configuration: built-in defaults < TOML file (if given; it must exist) <
    /// `HOLDFAST_*` environment variables (`__` separates levels:
    /// `HOLDFAST_MQTT__MAX_INFLIGHT=32`, `HOLDFAST_DATA_DIR=/var/lib/holdfast`,
    /// `HOLDFAST_LOG__LEVEL=debug`). The result has passed [`Config::validate`].
    ///
    /// `HOLDFAST_INTEROP` and `HOLDFAST_TEST_*` are test switches, not configuration keys,
    /// and are ignored here.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = HashMap::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().map(str::to_string) else {
                continue;
            };
            if !is_config_env_var(&name) {
                continue;
            }
            let value = value.into_string().map_err(|_| ConfigError::Syntax {
                origin: Origin::Env(name.clone()),
                message: "value is not valid UTF-8".to_string(),
            })?;
            env.insert(name, value);
        }
        Config::load_from(file, env)
    }

    /// Like [`Config::load`], but takes the environment as a map (tests pass their own).
    /// Every entry whose name starts with `HOLDFAST_` (any case) is treated as a key.
    pub fn load_from(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let file_source = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
                    path: path.to_path_buf(),
                    cause,
                })?;
                let origin = Origin::File(path.to_path_buf());
                let source = config::File::from_str(&text, config::FileFormat::Toml);
                // The file on its own: errors here are the file's.
                config::Config::builder()
                    .add_source(source.clone())
                    .build()
                    .and_then(|c| c.try_deserialize::<Config>())
                    .map_err(|e| ConfigError::from_config_crate(e, origin.clone()))?;
                Some((source, origin))
            }
            None => None,
        };

        // The environment on its own: errors here name the variable.
        config::Config::builder()
            .add_source(env_source(&env))
            .build()
            .and_then(|c| c.try_deserialize::<Config>())
            .map_err(|e| {
                let mut err = ConfigError::from_config_crate(e, Origin::Environment);
                if let ConfigError::Invalid { key, message, .. } = &mut err {
                    if key == "listener" {
                        *message = "listeners cannot be set from the environment; \
                                    use [[listener]] tables in the config file"
                            .to_string();
                    }
                }
                let origin = err
                    .key()
                    .and_then(|key| env_origin(&env, key))
                    .unwrap_or(Origin::Environment);
                err.with_origin(origin)
            })?;

        // Both layered. Defaults come from the `#[serde(default)]` impls above.
        let mut builder = config::Config::builder();
        if let Some((source, _)) = &file_source {
            builder = builder.add_source(source.clone());
        }
        let merged_origin = |key: Option<&str>| {
            key.and_then(|k| env_origin(&env, k))
                .or_else(|| file_source.as_ref().map(|(_, o)| o.clone()))
                .unwrap_or(Origin::Config)
        };
        let cfg: Config = builder
            .add_source(env_source(&env))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                let err = ConfigError::from_config_crate(e, Origin::Config);
                let origin = merged_origin(err.key());
                err.with_origin(origin)
            })?;

        cfg.validate().map_err(|err| {
            let origin = merged_origin(err.key());
            err.with_origin(origin)
        })?;
        Ok(cfg)
    }

    /// Checks value ranges and formats. Errors name the key; their origin is
    /// [`Origin::Config`] (the loaders replace it with the file or variable).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "must not be empty"));
        }
        if let Some(d) = &self.device_id {
            if d.is_empty()
                || d.len() > 64
                || d.chars().any(|c| c.is_whitespace() || "/+#".contains(c))
            {
                return Err(ConfigError::invalid(
                    "device_id",
                    "must be 1 to 64 characters without spaces, '/', '+' or '#'",
                ));
            }
        }
        if self.worker_threads > 256 {
            return Err(ConfigError::invalid(
                "worker_threads",
                format!(
                    "must be 0 (one per CPU core) to 256 (got {})",
                    self.worker_threads
                ),
            ));
        }
        if self.listener.is_empty() {
            return Err(ConfigError::invalid(
                "listener",
                "at least one [[listener]] is required",
            ));
        }
        let mut seen: Vec<SocketAddr> = Vec::with_capacity(self.listener.len());
        for (i, listener) in self.listener.iter().enumerate() {
            let key = format!("listener[{i}].bind");
            let addr = listener
                .socket_addr()
                .map_err(|message| ConfigError::invalid(&key, message))?;
            if addr.port() != 0 && seen.contains(&addr) {
                return Err(ConfigError::invalid(
                    key,
                    format!("`{}` is already used by another listener", listener.bind),
                ));
            }
            seen.push(addr);
        }
        for (i, listener) in self.listener.iter().enumerate() {
            listener.validate(i, self)?;
        }
        self.log.validate()?;
        self.mqtt.validate()?;
        self.auth.validate()?;
        self.store.validate()?;
        self.sys.validate()?;
        self.metrics.validate()?;
        for (i, b) in self.bridge.iter().enumerate() {
            b.validate(i)?;
            if self.bridge[..i].iter().any(|o| o.name == b.name) {
                return Err(ConfigError::invalid(
                    format!("bridge[{i}].name"),
                    format!("`{}` is used by another bridge", b.name),
                ));
            }
        }
        for (i, s) in self.serial.iter().enumerate() {
            s.validate(i)?;
            if self.serial[..i].iter().any(|o| o.name == s.name) {
                return Err(ConfigError::invalid(
                    format!("serial[{i}].name"),
                    format!("`{}` is used by another serial port", s.name),
                ));
            }
        }
        Ok(())
    }

    /// Where the admin socket is: `admin_socket`, or `<data_dir>/holdfast.sock`.
    pub fn admin_socket_path(&self) -> PathBuf {
        match &self.admin_socket {
            Some(p) => p.clone(),
            None => crate::admin::socket_path(&self.data_dir),
        }
    }

    /// Every file the configuration refers to, with its key: password and ACL files,
    /// listener certificates, bridge certificates.
    pub fn referenced_files(&self) -> Vec<(String, &Path)> {
        let mut all: Vec<(String, &Option<PathBuf>)> = vec![
            ("auth.password_file".into(), &self.auth.password_file),
            ("auth.acl_file".into(), &self.auth.acl_file),
        ];
        for (i, l) in self.listener.iter().enumerate() {
            all.push((format!("listener[{i}].tls_cert"), &l.tls_cert));
            all.push((format!("listener[{i}].tls_key"), &l.tls_key));
            all.push((format!("listener[{i}].tls_client_ca"), &l.tls_client_ca));
        }
        for (i, b) in self.bridge.iter().enumerate() {
            all.push((format!("bridge[{i}].ca_file"), &b.ca_file));
            all.push((format!("bridge[{i}].cert_file"), &b.cert_file));
            all.push((format!("bridge[{i}].key_file"), &b.key_file));
        }
        all.into_iter()
            .filter_map(|(k, p)| p.as_deref().map(|p| (k, p)))
            .collect()
    }

    /// `holdfast check-config`: every referenced file can be opened for reading. The error
    /// names the key, the file it refers to and `config_file` (where the key was set).
    pub fn check_files(&self, config_file: Option<&Path>) -> Result<(), ConfigError> {
        for (key, path) in self.referenced_files() {
            if let Err(e) = std::fs::File::open(path) {
                let err =
                    ConfigError::invalid(key, format!("cannot read `{}`: {e}", path.display()));
                return Err(match config_file {
                    Some(f) => err.with_origin(Origin::File(f.to_path_buf())),
                    None => err,
                });
            }
        }
        Ok(())
    }

    /// [`Config::to_toml`] with secrets (bridge passwords) replaced by `"<redacted>"`, for
    /// printing.
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        for b in &mut shown.bridge {
            if b.password.is_some() {
                b.password = Some("<redacted>".to_string());
            }
        }
        shown.to_toml()
    }

    /// The effective configuration as TOML (for `holdfast check-config`). Loading the
    /// output again gives the same `Config`.
    pub fn to_toml(&self) -> String {
        match toml::to_string(self) {
            Ok(text) => text,
            // Only a non-UTF-8 `data_dir` set programmatically can get here; loaded
            // configurations always come from strings.
            Err(e) => format!("# cannot render the configuration as TOML: {e}\n"),
        }
    }
}

impl ListenerConfig {
    /// A plain TCP listener on `bind` with every other setting at its default.
    pub fn new(bind: impl Into<String>) -> ListenerConfig {
        ListenerConfig {
            bind: bind.into(),
            allow_anonymous: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            require_client_cert: false,
            websocket: false,
            websocket_path: None,
        }
    }

    /// The upgrade path of a WebSocket listener (`websocket_path`, default `/mqtt`).
    pub fn websocket_path(&self) -> &str {
        self.websocket_path
            .as_deref()
            .unwrap_or(DEFAULT_WEBSOCKET_PATH)
    }

    /// Whether clients without a user name (or client certificate) may connect here.
    pub fn allows_anonymous(&self, mqtt: &MqttConfig) -> bool {
        self.allow_anonymous.unwrap_or(mqtt.allow_anonymous) && !self.require_client_cert
    }

    /// TLS settings and the network-exposure rule: a listener on a non-loopback address
    /// must verify its clients (password file or required client certificate) and refuse
    /// anonymous ones, unless `allow_anonymous = true` is set on it explicitly.
    fn validate(&self, i: usize, cfg: &Config) -> Result<(), ConfigError> {
        let key = |k: &str| format!("listener[{i}].{k}");
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    key("tls_key"),
                    "`tls_cert` is set, so `tls_key` is required",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("tls_cert"),
                    "`tls_key` is set, so `tls_cert` is required",
                ))
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::invalid(
                key("tls_client_ca"),
                "client certificates need a TLS listener (`tls_cert` and `tls_key`)",
            ));
        }
        if self.require_client_cert && self.tls_client_ca.is_none() {
            return Err(ConfigError::invalid(
                key("require_client_cert"),
                "needs `tls_client_ca` (the CA that signs client certificates)",
            ));
        }
        if let Some(path) = &self.websocket_path {
            if !self.websocket {
                return Err(ConfigError::invalid(
                    key("websocket_path"),
                    "only applies to WebSocket listeners; set `websocket = true` as well",
                ));
            }
            check_websocket_path(path)
                .map_err(|m| ConfigError::invalid(key("websocket_path"), m))?;
        }
        let loopback = self.socket_addr().is_ok_and(|a| a.ip().is_loopback());
        if loopback || self.allow_anonymous == Some(true) {
            return Ok(());
        }
        if self.allows_anonymous(&cfg.mqtt) {
            return Err(ConfigError::invalid(
                key("allow_anonymous"),
                format!(
                    "listener `{}` is on a non-loopback address and would accept anonymous \
                     clients (mqtt.allow_anonymous); set `allow_anonymous = false` on it and \
                     configure `[auth] password_file` or client certificates, or set \
                     `allow_anonymous = true` on this listener to allow it explicitly",
                    self.bind
                ),
            ));
        }
        if cfg.auth.password_file.is_none() && !self.require_client_cert {
            return Err(ConfigError::invalid(
                key("allow_anonymous"),
                format!(
                    "listener `{}` is on a non-loopback address but cannot verify clients: \
                     user names are not checked without `[auth] password_file`; configure \
                     it (or `require_client_cert = true`), or set `allow_anonymous = true` \
                     on this listener to allow unverified clients explicitly",
                    self.bind
                ),
            ));
        }
        Ok(())
    }

    /// The address to bind: `bind` parsed as `IP:PORT` (IPv6 in brackets, `[::]:1883`);
    /// `localhost:PORT` means `127.0.0.1:PORT`. No DNS lookups.
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        if let Ok(addr) = self.bind.parse::<SocketAddr>() {
            return Ok(addr);
        }
        if let Some(port) = self.bind.strip_prefix("localhost:") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
            }
        }
        Err(format!(
            "`{}` is not an address: expected IP:PORT such as `0.0.0.0:1883`, \
             `127.0.0.1:1883`, `[::]:1883` or `localhost:1883`",
            self.bind
        ))
    }
}

/// Upgrade path of a WebSocket listener without `websocket_path`.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// A WebSocket path is compared byte for byte with the request's path (query removed), so
/// it must look like one: `/`, then visible ASCII without `?` or `#`.
fn check_websocket_path(path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() <= 256
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{path}` is not a request path: expected `/` followed by up to 255 visible ASCII \
             characters without `?` or `#`, e.g. `/mqtt`"
        ))
    }
}

/// Level names accepted as a bare directive in `log.level`.
const LEVEL_NAMES: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
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

impl MqttConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "mqtt.max_connections",
                "must be at least 1 (got 0)",
            ));
        }
        if !(16..=268_435_455).contains(&self.max_packet_size) {
            return Err(ConfigError::invalid(
                "mqtt.max_packet_size",
                format!(
                    "must be between 16 and 268435455 bytes (got {})",
                    self.max_packet_size
                ),
            ));
        }
        if self.read_back_budget_bytes < 4096 {
            return Err(ConfigError::invalid(
                "mqtt.read_back_budget_bytes",
                format!(
                    "must be at least 4096 bytes (got {}); the default is 8388608 (8 MiB)",
                    self.read_back_budget_bytes
                ),
            ));
        }
        if self.max_inflight == 0 {
            return Err(ConfigError::invalid(
                "mqtt.max_inflight",
                "must be between 1 and 65535 (got 0)",
            ));
        }
        if !(1..=65_535).contains(&self.max_topic_length) {
            return Err(ConfigError::invalid(
                "mqtt.max_topic_length",
                format!(
                    "must be between 1 and 65535 bytes (got {})",
                    self.max_topic_length
                ),
            ));
        }
        if self.max_topic_levels == 0 {
            return Err(ConfigError::invalid(
                "mqtt.max_topic_levels",
                "must be at least 1 (got 0)",
            ));
        }
        if self.max_qos > 2 {
            return Err(ConfigError::invalid(
                "mqtt.max_qos",
                format!("must be 0, 1 or 2 (got {})", self.max_qos),
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "mqtt.connect_timeout_secs",
                "must be at least 1 second (got 0)",
            ));
        }
        if self.max_handshaking == 0 {
            return Err(ConfigError::invalid(
                "mqtt.max_handshaking",
                "must be at least 1 (got 0)",
            ));
        }
        if self.max_connect_packet_size < 16 {
            return Err(ConfigError::invalid(
                "mqtt.max_connect_packet_size",
                format!(
                    "must be at least 16 bytes (got {})",
                    self.max_connect_packet_size
                ),
            ));
        }
        if !(0.0..=1_000_000.0).contains(&self.max_connection_rate) {
            return Err(ConfigError::invalid(
                "mqtt.max_connection_rate",
                format!(
                    "must be between 0 (no limit) and 1000000 connections per second (got {})",
                    self.max_connection_rate
                ),
            ));
        }
        if self.max_connection_burst == 0 {
            return Err(ConfigError::invalid(
                "mqtt.max_connection_burst",
                "must be at least 1 (got 0)",
            ));
        }
        self.rate_exempt_networks()?;
        Ok(())
    }

    /// `connection_rate_exempt`, parsed.
    pub fn rate_exempt_networks(
        &self,
    ) -> Result<Vec<crate::broker::ratelimit::IpNet>, ConfigError> {
        self.connection_rate_exempt
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse().map_err(|m| {
                    ConfigError::invalid(format!("mqtt.connection_rate_exempt[{i}]"), m)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        file.write_all(text.as_bytes()).expect("write temp file");
        file
    }

    fn load_err(file: Option<&Path>, pairs: &[(&str, &str)]) -> ConfigError {
        Config::load_from(file, env(pairs)).expect_err("configuration should be rejected")
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().expect("defaults are valid");
        let loaded = Config::load_from(None, HashMap::new()).expect("defaults load");
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let file = toml_file("");
        let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn file_overrides_defaults_and_replaces_the_listener_list() {
        let file = toml_file(
            r#"
            data_dir = "/var/lib/holdfast"
            [[listener]]
            bind = "0.0.0.0:1883"
            allow_anonymous = true
            [[listener]]
            bind = "[::1]:1884"
            [log]
            format = "json"
            [mqtt]
            max_inflight = 16
            queue_policy = "reject-new"
            server_keep_alive = 30
            "#,
        );
        let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/holdfast"));
        let binds: Vec<_> = cfg.listener.iter().map(|l| l.bind.as_str()).collect();
        assert_eq!(binds, ["0.0.0.0:1883", "[::1]:1884"]);
        assert_eq!(cfg.log.format, LogFormat::Json);
        assert_eq!(cfg.mqtt.max_inflight, 16);
        assert_eq!(cfg.mqtt.queue_policy, QueuePolicy::RejectNew);
        assert_eq!(cfg.mqtt.server_keep_alive, Some(30));
        // Untouched keys keep their defaults.
        assert_eq!(cfg.mqtt.max_qos, 2);
        assert_eq!(cfg.log.level, "info");
    }

    #[test]
    fn env_overrides_file() {
        let file = toml_file("data_dir = \"/from/file\"\n[mqtt]\nmax_inflight = 16\n");
        let cfg = Config::load_from(
            Some(file.path()),
            env(&[
                ("HOLDFAST_MQTT__MAX_INFLIGHT", "32"),
                ("HOLDFAST_DATA_DIR", "/var/lib/holdfast"),
                ("HOLDFAST_LOG__LEVEL", "debug"),
                ("HOLDFAST_LOG__FORMAT", "json"),
                ("HOLDFAST_MQTT__ALLOW_ANONYMOUS", "false"),
                ("HOLDFAST_MQTT__RETAIN_AVAILABLE", "true"),
                ("HOLDFAST_MQTT__SERVER_KEEP_ALIVE", "60"),
                ("HOLDFAST_MQTT__QUEUE_POLICY", "reject-new"),
                ("HOLDFAST_MQTT__MAX_QUEUED_BYTES", "1048576"),
            ]),
        )
        .expect("loads");
        assert_eq!(cfg.mqtt.max_inflight, 32);
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/holdfast"));
        assert_eq!(cfg.log.level, "debug");
        assert_eq!(cfg.log.format, LogFormat::Json);
        assert!(!cfg.mqtt.allow_anonymous);
        assert!(cfg.mqtt.retain_available);
        assert_eq!(cfg.mqtt.server_keep_alive, Some(60));
        assert_eq!(cfg.mqtt.queue_policy, QueuePolicy::RejectNew);
        assert_eq!(cfg.mqtt.max_queued_bytes, 1_048_576);
    }

    #[test]
    fn unknown_key_in_file_names_key_and_file() {
        for (text, key) in [
            ("colour = \"blue\"\n", "colour"),
            ("[mqtt]\nmax_qso = 1\n", "mqtt.max_qso"),
            ("[log]\nlevle = \"debug\"\n", "log.levle"),
            (
                "[[listener]]\nbind = \"0.0.0.0:1883\"\nport = 1\n",
                "listener[0].port",
            ),
        ] {
            let file = toml_file(text);
            let err = load_err(Some(file.path()), &[]);
            assert!(
                matches!(&err, ConfigError::UnknownKey { key: k, .. } if k == key),
                "{err:?}"
            );
            let msg = err.to_string();
            let prefix = format!(
                "config file {}: key `{key}`: unknown key",
                file.path().display()
            );
            assert!(msg.starts_with(&prefix), "{msg}");
        }
    }

    #[test]
    fn unknown_key_in_env_names_key_and_variable() {
        let err = load_err(None, &[("HOLDFAST_MQTT__NOPE", "1")]);
        assert_eq!(err.key(), Some("mqtt.nope"));
        assert_eq!(err.origin(), Origin::Env("HOLDFAST_MQTT__NOPE".to_string()));
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "environment variable HOLDFAST_MQTT__NOPE: key `mqtt.nope`: unknown key"
            ),
            "{msg}"
        );
    }

    #[test]
    fn test_switches_are_not_configuration_keys() {
        assert!(!is_config_env_var("HOLDFAST_INTEROP"));
        assert!(!is_config_env_var("HOLDFAST_TEST_SLOW"));
        assert!(is_config_env_var("HOLDFAST_MQTT__MAX_QOS"));
        assert!(!is_config_env_var("PATH"));
        assert_eq!(
            env_var_for_key("mqtt.max_inflight"),
            "HOLDFAST_MQTT__MAX_INFLIGHT"
        );
        assert_eq!(
            env_var_key("HOLDFAST_DATA_DIR").as_deref(),
            Some("data_dir")
        );
    }

    #[test]
    fn bad_type_names_key_and_origin() {
        let file = toml_file("[mqtt]\nmax_inflight = \"lots\"\n");
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(err.key(), Some("mqtt.max_inflight"));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "config file {}: key `mqtt.max_inflight`: ",
                file.path().display()
            )),
            "{msg}"
        );
        assert!(msg.contains("lots"), "{msg}");

        let err = load_err(None, &[("HOLDFAST_MQTT__RETAIN_AVAILABLE", "maybe")]);
        assert_eq!(err.key(), Some("mqtt.retain_available"));
        assert_eq!(
            err.origin(),
            Origin::Env("HOLDFAST_MQTT__RETAIN_AVAILABLE".to_string())
        );

        let err = load_err(None, &[("HOLDFAST_MQTT__MAX_INFLIGHT", "70000")]);
        assert_eq!(err.key(), Some("mqtt.max_inflight"), "{err}");

        let err = load_err(None, &[("HOLDFAST_LOG__FORMAT", "xml")]);
        assert_eq!(err.key(), Some("log.format"), "{err}");
    }

    #[test]
    fn bad_toml_syntax_names_the_file() {
        let file = toml_file("[mqtt\nmax_qos = 1\n");
        let err = load_err(Some(file.path()), &[]);
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "config file {}: invalid TOML",
                file.path().display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn overlapping_out_rules_of_different_priorities_are_refused() {
        let file = toml_file(
            "[[bridge]]\nname = \"c\"\naddress = \"h:1883\"\n\
             [[bridge.topic]]\npattern = \"sensors/#\"\n\
             [[bridge.topic]]\npattern = \"sensors/alarm/+\"\npriority = 2\n",
        );
        let msg = load_err(Some(file.path()), &[]).to_string();
        assert!(msg.contains("bridge[0].topic[1].priority"), "{msg}");
        let file = toml_file(
            "[[bridge]]\nname = \"c\"\naddress = \"h:1883\"\n\
             [[bridge.topic]]\npattern = \"telemetry/#\"\n\
             [[bridge.topic]]\npattern = \"alarms/#\"\npriority = 2\n\
             [[bridge.topic]]\npattern = \"cmd/#\"\ndirection = \"in\"\npriority = 5\n",
        );
        let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
        assert_eq!(crate::bridge::priorities(&cfg.bridge[0]), vec![2, 0]);
        let ids: Vec<String> = crate::bridge::internal_sessions(&cfg.bridge[0])
            .iter()
            .map(|i| i.client_id.to_string())
            .collect();
        assert_eq!(ids, vec!["$bridge/c/p2", "$bridge/c"]);
    }

    #[test]
    fn bridge_protocol_5_keys_are_checked_naming_the_key() {
        let bridge = |extra: &str, qos: u8| {
            toml_file(&format!(
                "[[bridge]]\nname = \"c\"\naddress = \"h:1883\"\n{extra}\n\
                 [[bridge.topic]]\npattern = \"a/#\"\nqos = {qos}\n"
            ))
        };
        let file = bridge("protocol = \"5\"\nsession_expiry_secs = 600", 2);
        let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("loads");
        assert_eq!(cfg.bridge[0].protocol, crate::bridge::BridgeProtocol::V5);
        assert_eq!(cfg.bridge[0].session_expiry_secs, 600);
        for (extra, qos, key) in [
            ("", 2, "bridge[0].topic[0].qos"),
            ("protocol = \"5\"", 3, "bridge[0].topic[0].qos"),
            (
                "protocol = \"5\"\nsession_expiry_secs = 0",
                1,
                "bridge[0].session_expiry_secs",
            ),
            (
                "tls = true\nserver_name = \"not a name\"",
                1,
                "bridge[0].server_name",
            ),
            ("server_name = \"cloud.example\"", 1, "bridge[0].tls"),
        ] {
            let file = bridge(extra, qos);
            let msg = load_err(Some(file.path()), &[]).to_string();
            assert!(msg.contains(key), "{extra} / qos {qos}: {msg}");
        }
    }

    #[test]
    fn bad_bind_is_rejected() {
        let file = toml_file("[[listener]]\nbind = \"0.0.0.0\"\n");
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(err.key(), Some("listener[0].bind"));
        assert_eq!(err.origin(), Origin::File(file.path().to_path_buf()));
        assert!(
            err.to_string().contains("`0.0.0.0` is not an address"),
            "{err}"
        );

        let err = load_err(None, &[("HOLDFAST_LISTENER", "0.0.0.0:1883")]);
        assert_eq!(err.origin(), Origin::Env("HOLDFAST_LISTENER".to_string()));
        assert!(err.to_string().contains("[[listener]] tables"), "{err}");

        let file = toml_file("listener = []\n");
        assert_eq!(load_err(Some(file.path()), &[]).key(), Some("listener"));

        let file = toml_file(
            "[[listener]]\nbind = \"1.2.3.4:1883\"\n[[listener]]\nbind = \"1.2.3.4:1883\"\n",
        );
        assert_eq!(
            load_err(Some(file.path()), &[]).key(),
            Some("listener[1].bind")
        );
    }

    #[test]
    fn bind_accepts_ip_literals_and_localhost() {
        for (bind, expected) in [
            ("0.0.0.0:1883", "0.0.0.0:1883"),
            ("[::]:1883", "[::]:1883"),
            ("localhost:1884", "127.0.0.1:1884"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            let listener = ListenerConfig::new(bind);
            let addr = listener.socket_addr().expect("valid bind");
            assert_eq!(addr.to_string(), expected);
        }
        for bad in ["example.com:1883", "127.0.0.1:99999", ":1883", "localhost"] {
            let listener = ListenerConfig::new(bad);
            assert!(listener.socket_addr().is_err(), "{bad}");
        }
    }

    #[test]
    fn max_qos_above_two_is_rejected_naming_the_origin() {
        let file = toml_file("[mqtt]\nmax_qos = 3\n");
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(
            err.to_string(),
            format!(
                "config file {}: key `mqtt.max_qos`: must be 0, 1 or 2 (got 3)",
                file.path().display()
            )
        );
        let err = load_err(Some(file.path()), &[("HOLDFAST_MQTT__MAX_QOS", "5")]);
        assert_eq!(
            err.to_string(),
            "environment variable HOLDFAST_MQTT__MAX_QOS: key `mqtt.max_qos`: must be 0, 1 or 2 (got 5)"
        );
    }

    #[test]
    fn range_checks_name_their_keys() {
        let cases: [(&str, &str); 7] = [
            ("HOLDFAST_MQTT__MAX_INFLIGHT", "mqtt.max_inflight"),
            ("HOLDFAST_MQTT__MAX_PACKET_SIZE", "mqtt.max_packet_size"),
            ("HOLDFAST_MQTT__MAX_TOPIC_LENGTH", "mqtt.max_topic_length"),
            ("HOLDFAST_MQTT__MAX_TOPIC_LEVELS", "mqtt.max_topic_levels"),
            (
                "HOLDFAST_MQTT__CONNECT_TIMEOUT_SECS",
                "mqtt.connect_timeout_secs",
            ),
            ("HOLDFAST_MQTT__MAX_CONNECTIONS", "mqtt.max_connections"),
            ("HOLDFAST_DATA_DIR", "data_dir"),
        ];
        for (var, key) in cases {
            let value = if key == "data_dir" { "" } else { "0" };
            let err = load_err(None, &[(var, value)]);
            assert_eq!(err.key(), Some(key), "{err}");
            assert_eq!(err.origin(), Origin::Env(var.to_string()));
        }
        let mut cfg = Config::default();
        cfg.mqtt.max_packet_size = 268_435_456;
        assert_eq!(
            cfg.validate().expect_err("too big").key(),
            Some("mqtt.max_packet_size")
        );
        cfg.mqtt.max_packet_size = 16;
        cfg.mqtt.max_topic_length = 65_536;
        assert_eq!(
            cfg.validate().expect_err("too long").key(),
            Some("mqtt.max_topic_length")
        );
    }

    #[test]
    fn commit_delay_is_bounded_and_read_from_the_environment() {
        let err = load_err(None, &[("HOLDFAST_STORE__COMMIT_DELAY_MS", "5000")]);
        assert_eq!(err.key(), Some("store.commit_delay_ms"), "{err}");
        let cfg = Config::load_from(None, env(&[("HOLDFAST_STORE__COMMIT_DELAY_MS", "250")]))
            .expect("a delay within the bound loads");
        assert_eq!(cfg.store.commit_delay_ms, 250);
        assert_eq!(Config::default().store.commit_delay_ms, 0, "off by default");
    }

    #[test]
    fn page_size_must_be_a_power_of_two_sqlite_accepts() {
        for bad in ["1000", "256", "131072"] {
            let err = load_err(None, &[("HOLDFAST_STORE__PAGE_SIZE", bad)]);
            assert_eq!(err.key(), Some("store.page_size"), "{bad}: {err}");
        }
        let cfg = Config::load_from(None, env(&[("HOLDFAST_STORE__PAGE_SIZE", "1024")]))
            .expect("1024 loads");
        assert_eq!(cfg.store.page_size, 1024);
    }

    #[test]
    fn log_level_must_be_a_filter() {
        for good in [
            "debug",
            "WARN",
            "info,holdfast=trace",
            "holdfast::broker=debug",
            "off",
        ] {
            let mut cfg = Config::default();
            cfg.log.level = good.to_string();
            cfg.validate().expect(good);
        }
        for bad in ["verbose", "holdfast=loud", "", "info,chatty"] {
            let mut cfg = Config::default();
            cfg.log.level = bad.to_string();
            let err = cfg.validate().expect_err(bad);
            assert_eq!(err.key(), Some("log.level"), "{bad}");
            assert!(
                err.to_string()
                    .starts_with("configuration: key `log.level`"),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nope.toml");
        let err = load_err(Some(&path), &[]);
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("config file {}: cannot read:", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let mut cfg = Config {
            data_dir: PathBuf::from("/var/lib/holdfast"),
            ..Config::default()
        };
        cfg.listener.push(ListenerConfig {
            allow_anonymous: Some(false),
            tls_cert: Some(PathBuf::from("/etc/holdfast/cert.pem")),
            tls_key: Some(PathBuf::from("/etc/holdfast/key.pem")),
            tls_client_ca: Some(PathBuf::from("/etc/holdfast/ca.pem")),
            require_client_cert: true,
            websocket: true,
            websocket_path: Some("/ws/mqtt".to_string()),
            ..ListenerConfig::new("[::]:1884")
        });
        cfg.log.format = LogFormat::Json;
        cfg.mqtt.server_keep_alive = Some(120);
        cfg.mqtt.queue_policy = QueuePolicy::RejectNew;
        for cfg in [Config::default(), cfg] {
            let file = toml_file(&cfg.to_toml());
            let loaded = Config::load_from(Some(file.path()), HashMap::new())
                .unwrap_or_else(|e| panic!("{e}\n{}", cfg.to_toml()));
            assert_eq!(loaded, cfg);
        }
    }

    /// Every key of the default configuration (plus the optional ones, which serialize to
    /// nothing when unset) as dotted paths.
    fn all_keys() -> Vec<String> {
        let mut cfg = Config::default();
        cfg.mqtt.server_keep_alive = Some(0);
        cfg.auth.password_file = Some(PathBuf::from("passwd"));
        cfg.auth.acl_file = Some(PathBuf::from("acl"));
        cfg.listener[0] = ListenerConfig {
            allow_anonymous: Some(true),
            tls_cert: Some(PathBuf::from("c")),
            tls_key: Some(PathBuf::from("k")),
            tls_client_ca: Some(PathBuf::from("ca")),
            require_client_cert: true,
            websocket: true,
            websocket_path: Some("/mqtt".to_string()),
            ..ListenerConfig::new("127.0.0.1:1883")
        };
        cfg.bridge = vec![crate::bridge::BridgeConfig::example().with_example_tls()];
        cfg.serial = vec![crate::serial::SerialConfig::example()];
        cfg.metrics.bind = Some("127.0.0.1:9100".to_string());
        let mut keys = Vec::new();
        let table: toml::Table = toml::from_str(&cfg.to_toml()).expect("to_toml is TOML");
        for (name, value) in table {
            match value {
                toml::Value::Table(inner) => {
                    keys.extend(inner.keys().map(|k| format!("{name}.{k}")));
                }
                toml::Value::Array(items) => {
                    for item in items.iter().filter_map(toml::Value::as_table) {
                        for (k, v) in item {
                            match v {
                                toml::Value::Array(inner)
                                    if inner.iter().any(toml::Value::is_table) =>
                                {
                                    for t in inner.iter().filter_map(toml::Value::as_table) {
                                        keys.extend(t.keys().map(|l| format!("{name}.{k}.{l}")));
                                    }
                                }
                                _ => keys.push(format!("{name}.{k}")),
                            }
                        }
                    }
                }
                _ => keys.push(name),
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    #[test]
    fn every_key_is_documented() {
        let example = include_str!("../examples/holdfast.toml");
        let reference = include_str!("../docs/configuration.md");
        let readme = include_str!("../README.md");
        let keys = all_keys();
        for expected in [
            "data_dir",
            "listener.bind",
            "log.level",
            "mqtt.server_keep_alive",
        ] {
            assert!(keys.iter().any(|k| k == expected), "{keys:?}");
        }
        for key in keys {
            let leaf = key.rsplit('.').next().unwrap_or(&key);
            assert!(
                example.contains(&format!("\n{leaf} = "))
                    || example.contains(&format!("# {leaf} = ")),
                "examples/holdfast.toml lacks `{key}`"
            );
            let documented = if key.starts_with("listener.") {
                reference.contains(&format!("`[[listener]]` `{leaf}`"))
            } else {
                reference.contains(&format!("| `{key}` |"))
                    && (key.starts_with("bridge.")
                        || key.starts_with("serial.")
                        || reference.contains(&format!("`{}`", env_var_for_key(&key))))
            };
            assert!(documented, "docs/configuration.md lacks `{key}`");
            let in_readme =
                key.starts_with("listener.") || readme.contains(&format!("| `{key}` |"));
            assert!(
                in_readme,
                "README.md's configuration reference lacks `{key}`"
            );
        }
    }

    #[test]
    fn connection_limits_validate_and_name_their_keys() {
        let file = toml_file(
            "[mqtt]\nmax_connection_rate = 2.5\nconnection_rate_exempt = [\"10.0.0.0/8\"]\n\
             [auth]\nmax_connections_per_user = 3\n",
        );
        let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("valid");
        assert_eq!(cfg.mqtt.max_connection_rate, 2.5);
        assert_eq!(cfg.auth.max_connections_per_user, 3);
        let cfg = Config::load_from(
            None,
            env(&[(
                "HOLDFAST_MQTT__CONNECTION_RATE_EXEMPT",
                "127.0.0.1, fd00::/8",
            )]),
        )
        .expect("a comma-separated variable");
        assert_eq!(cfg.mqtt.connection_rate_exempt, ["127.0.0.1", "fd00::/8"]);

        for (text, key) in [
            (
                "[mqtt]\nmax_connection_rate = -1\n",
                "mqtt.max_connection_rate",
            ),
            (
                "[mqtt]\nmax_connection_burst = 0\n",
                "mqtt.max_connection_burst",
            ),
            (
                "[mqtt]\nconnection_rate_exempt = [\"::1\", \"10.0.0.0/40\"]\n",
                "mqtt.connection_rate_exempt[1]",
            ),
            (
                "[auth]\nmax_connections_per_user = -1\n",
                "auth.max_connections_per_user",
            ),
        ] {
            let file = toml_file(text);
            let err = load_err(Some(file.path()), &[]);
            assert_eq!(err.key(), Some(key), "{err}");
            assert!(
                err.to_string().contains(&file.path().display().to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn network_listeners_must_authenticate_unless_explicit() {
        let file = toml_file(
            "[[listener]]\nbind = \"127.0.0.1:1883\"\n[[listener]]\nbind = \"0.0.0.0:1883\"\n",
        );
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(err.key(), Some("listener[1].allow_anonymous"));
        assert!(err.to_string().contains("listener `0.0.0.0:1883`"), "{err}");
        assert!(err.to_string().contains("anonymous"), "{err}");

        // Anonymous off, but nothing verifies user names.
        let file = toml_file("[[listener]]\nbind = \"[::]:1883\"\nallow_anonymous = false\n");
        let err = load_err(Some(file.path()), &[]);
        assert_eq!(err.key(), Some("listener[0].allow_anonymous"));
        assert!(err.to_string().contains("password_file"), "{err}");

        // With a password file (the file is only read when the broker starts).
        let file = toml_file(
            "[auth]\npassword_file = \"/x\"\n[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_anonymous = false\n",
        );
        Config::load_from(Some(file.path()), HashMap::new()).expect("authenticated");
        // Global switch off is enough too.
        let file = toml_file(
            "[auth]\npassword_file = \"/x\"\n[mqtt]\nallow_anonymous = false\n[[listener]]\nbind = \"0.0.0.0:1883\"\n",
        );
        Config::load_from(Some(file.path()), HashMap::new()).expect("authenticated");
        // Explicit opt-in.
        let file = toml_file("[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_anonymous = true\n");
        Config::load_from(Some(file.path()), HashMap::new()).expect("explicit");
        // Client certificates required.
        let file = toml_file(
            "[[listener]]\nbind = \"0.0.0.0:8883\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_client_ca = \"ca\"\nrequire_client_cert = true\n",
        );
        Config::load_from(Some(file.path()), HashMap::new()).expect("mutual TLS");
        // The embedded default stays valid.
        Config::default().validate().expect("default");
    }

    #[test]
    fn tls_keys_come_in_pairs() {
        for (text, key) in [
            ("tls_cert = \"c\"\n", "listener[0].tls_key"),
            ("tls_key = \"k\"\n", "listener[0].tls_cert"),
            ("tls_client_ca = \"ca\"\n", "listener[0].tls_client_ca"),
            (
                "tls_cert = \"c\"\ntls_key = \"k\"\nrequire_client_cert = true\n",
                "listener[0].require_client_cert",
            ),
        ] {
            let file = toml_file(&format!("[[listener]]\nbind = \"127.0.0.1:8883\"\n{text}"));
            assert_eq!(load_err(Some(file.path()), &[]).key(), Some(key), "{text}");
        }
    }

    #[test]
    fn websocket_path_is_checked() {
        for (text, key) in [
            ("websocket_path = \"/mqtt\"\n", "listener[0].websocket_path"),
            (
                "websocket = true\nwebsocket_path = \"mqtt\"\n",
                "listener[0].websocket_path",
            ),
            (
                "websocket = true\nwebsocket_path = \"/a b\"\n",
                "listener[0].websocket_path",
            ),
            (
                "websocket = true\nwebsocket_path = \"/mqtt?x=1\"\n",
                "listener[0].websocket_path",
            ),
            ("websocket = \"maybe\"\n", "listener[0].websocket"),
        ] {
            let file = toml_file(&format!("[[listener]]\nbind = \"127.0.0.1:8080\"\n{text}"));
            let err = load_err(Some(file.path()), &[]);
            assert_eq!(err.key(), Some(key), "{text}");
            let msg = err.to_string();
            assert!(msg.contains(&file.path().display().to_string()), "{msg}");
        }
        let file = toml_file(
            "[[listener]]\nbind = \"127.0.0.1:8080\"\nwebsocket = true\nwebsocket_path = \"/ws/mqtt\"\n",
        );
        let cfg = Config::load_from(Some(file.path()), HashMap::new()).expect("valid");
        assert_eq!(cfg.listener[0].websocket_path(), "/ws/mqtt");
        assert_eq!(ListenerConfig::new("127.0.0.1:1").websocket_path(), "/mqtt");
        // The exposure rule applies to WebSocket listeners as to any other.
        let file = toml_file("[[listener]]\nbind = \"0.0.0.0:8080\"\nwebsocket = true\n");
        assert_eq!(
            load_err(Some(file.path()), &[]).key(),
            Some("listener[0].allow_anonymous")
        );
    }

    #[test]
    fn example_file_loads_and_validates() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/holdfast.toml"
        ));
        let cfg = Config::load_from(Some(path), HashMap::new()).expect("example loads");
        cfg.validate().expect("example validates");
    }
}
