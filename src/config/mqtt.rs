//! `[mqtt]`: protocol limits, queues, keep-alive, connection limits.

use super::*;

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
    /// Milliseconds a plain-TCP client may be quiet (nothing read, written or queued for
    /// it) before its connection gives up its task and waits in the shared idle set
    /// (`broker::connection::park`); 0 = never.
    pub park_idle_ms: u64,
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
            park_idle_ms: 20,
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
pub(super) fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
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

impl MqttConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if self.park_idle_ms > 3_600_000 {
            return Err(ConfigError::invalid(
                "mqtt.park_idle_ms",
                format!(
                    "must be at most 3600000 (one hour; 0 = never) (got {})",
                    self.park_idle_ms
                ),
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
