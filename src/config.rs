//! Typed settings. Loaded with the `config` crate: built-in defaults < TOML file <
//! `HOLDFAST_*` environment variables (`__` separates nesting levels, e.g.
//! `HOLDFAST_MQTT__MAX_INFLIGHT=32`). Unknown keys and bad values are errors naming the key
//! and the file. Every key is documented in README.md and `examples/holdfast.toml`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite store and other state live.
    pub data_dir: PathBuf,
    /// TCP listeners, `[[listener]]` tables. At least one.
    pub listener: Vec<ListenerConfig>,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `HOST:PORT`, e.g. `127.0.0.1:1883` or `0.0.0.0:1883`. Port 0 picks a free port.
    pub bind: String,
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
    /// Messages queued for one client beyond its in-flight window (0 = unlimited).
    pub max_queued_messages: usize,
    /// Payload bytes queued for one client (0 = unlimited).
    pub max_queued_bytes: u64,
    /// What to do when a client's queue is full.
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
    /// Seconds a new socket may take to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Upper bound on a v5 Session Expiry Interval, seconds.
    pub max_session_expiry_secs: u32,
    /// Session expiry applied to 3.1.1 persistent (clean session = 0) sessions, seconds.
    pub v3_session_expiry_secs: u32,
    /// Seconds graceful shutdown may take before remaining connections are dropped.
    pub shutdown_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("holdfast-data"),
            listener: vec![ListenerConfig {
                bind: "127.0.0.1:1883".to_string(),
            }],
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
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
            queue_policy: QueuePolicy::DropOldest,
            queue_qos0_offline: false,
            max_topic_length: 1024,
            max_topic_levels: 32,
            max_subscriptions_per_client: 1000,
            max_qos: 2,
            retain_available: true,
            topic_alias_maximum: 64,
            server_keep_alive: None,
            connect_timeout_secs: 10,
            max_session_expiry_secs: 7 * 24 * 3600,
            v3_session_expiry_secs: 7 * 24 * 3600,
            shutdown_timeout_secs: 5,
        }
    }
}
