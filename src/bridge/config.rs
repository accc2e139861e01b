//! `[[bridge]]` settings: one upstream broker each, with `[[bridge.topic]]` rules in the
//! form Mosquitto users know (`pattern`, `direction`, `qos`, `local_prefix`, `remote_prefix`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local → upstream.
    Out,
    /// Upstream → local.
    In,
    Both,
}

impl Direction {
    pub fn is_out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
    pub fn is_in(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    /// Topic filter (wildcards allowed) relative to the prefixes.
    pub pattern: String,
    #[serde(default = "default_direction")]
    pub direction: Direction,
    /// QoS on the upstream side (0 or 1; 2 needs `protocol = "5"`).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Local topic = local_prefix + X.
    #[serde(default)]
    pub local_prefix: String,
    /// Remote topic = remote_prefix + X.
    #[serde(default)]
    pub remote_prefix: String,
    /// Drain priority of the `out` side (0 = default): while messages of a higher priority
    /// wait or are in flight upstream, lower ones are held back (e.g. `alarms/#` before
    /// `telemetry/#` after an outage). Order is kept within a priority.
    #[serde(default)]
    pub priority: u8,
    /// Keep QoS 0 messages of the `out` side in the outbox like QoS 1 (stored, sent
    /// upstream at QoS 1, deleted on its PUBACK) instead of dropping (and counting) those
    /// that arrive while the upstream is unreachable.
    #[serde(default)]
    pub queue_qos0: bool,
}

/// One `host:port` or a list of them (TOML: a string or an array of strings), tried in
/// order: the first is the primary. A host name is resolved at each attempt and tried on
/// every address it resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OneOrMany", into = "OneOrMany")]
pub struct Addresses(pub Vec<String>);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for Addresses {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(a) => Addresses(vec![a]),
            OneOrMany::Many(v) => Addresses(v),
        }
    }
}

impl From<Addresses> for OneOrMany {
    fn from(a: Addresses) -> Self {
        match <[String; 1]>::try_from(a.0) {
            Ok([one]) => OneOrMany::One(one),
            Err(v) => OneOrMany::Many(v),
        }
    }
}

impl From<String> for Addresses {
    fn from(a: String) -> Self {
        Addresses(vec![a])
    }
}

impl From<&str> for Addresses {
    fn from(a: &str) -> Self {
        Addresses(vec![a.to_string()])
    }
}

impl From<Vec<String>> for Addresses {
    fn from(v: Vec<String>) -> Self {
        Addresses(v)
    }
}

impl Addresses {
    /// The primary (first) address.
    pub fn primary(&self) -> &str {
        self.0.first().map(String::as_str).unwrap_or_default()
    }
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

fn default_direction() -> Direction {
    Direction::Out
}
fn default_qos() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BridgeProtocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5", alias = "5.0")]
    V5,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Short name: used in logs, in the internal session id (`$bridge/<name>`) and status.
    pub name: String,
    /// Upstream broker(s): one `host:port` or a list tried in order, primary first (see
    /// [`Addresses`]).
    pub address: Addresses,
    /// While connected to any address but the first, how often the primary is probed
    /// (a TCP connect), seconds; once it answers the bridge goes back to it. 0 = stay on
    /// whichever address works until that link fails.
    #[serde(default = "default_failback")]
    pub failback_secs: u64,
    /// Publish the link state upstream: a retained `1` (QoS 1) on `notification_topic`
    /// after each connect, and the same topic with a retained `0` as the will (and on a
    /// clean shutdown), as Mosquitto's `notifications` does.
    #[serde(default = "default_true")]
    pub notifications: bool,
    /// The upstream topic of the link state; default `holdfast/<client_id>/state`.
    #[serde(default)]
    pub notification_topic: Option<String>,
    /// Longest time an outgoing publish may wait for others to share its TCP segment
    /// (and TLS record), milliseconds; 0 = written at once. The local PUBACK never waits
    /// for it (it follows the commit).
    #[serde(default)]
    pub linger_ms: u64,
    /// MQTT version spoken upstream.
    #[serde(default = "default_protocol")]
    pub protocol: BridgeProtocol,
    /// Client id upstream; stable across restarts so the upstream session persists.
    /// Default: `holdfast-<device>-<name>`, `<device>` being the top-level `device_id` or
    /// else derived from `/etc/machine-id` (see [`BridgeConfig::resolve_client_id`]).
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// v5: Session Expiry Interval asked of the upstream, seconds (never 0, so the cloud
    /// keeps downlink messages for the gateway during an outage). Default one day.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// Keep-alive upstream, seconds (min 5). Bounds half-open detection on an idle link:
    /// up to 2× (a ping every keep-alive whatever the traffic; the second unanswered one
    /// ends the connection). Under traffic `ack_timeout_secs` is much quicker.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u16,
    /// With messages in flight, no acknowledgement for this long (plus the time the head
    /// of the line needs on the wire at the measured rate) means the link is dead
    /// (reconnect, resend in order); also the longest a write may make no progress.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// QoS 1/2 messages in flight upstream (v5: at most the upstream's Receive Maximum).
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// QoS 1/2 payload bytes in flight upstream (at least one message, however large).
    #[serde(default = "default_inflight_bytes")]
    pub inflight_bytes: u64,
    /// After this many connections in a row that the upstream closed with the same message
    /// first in flight (nothing acknowledged meanwhile), the messages go one at a time; the
    /// one in flight alone at the next close is removed from the outbox and counted as
    /// rejected (`super::strikes`). 0 = retried for ever.
    #[serde(default = "default_reject_after_closes")]
    pub reject_after_closes: u32,
    /// Seconds with messages waiting and none acknowledged before the bridge reports
    /// itself stalled (status, `$SYS`, `/healthz`).
    #[serde(default = "default_stall")]
    pub stall_secs: u64,
    /// Reconnect backoff bounds, milliseconds (exponential with full jitter).
    #[serde(default = "default_backoff_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub reconnect_max_ms: u64,
    /// Seconds to establish TCP + TLS + MQTT upstream before giving up on an attempt.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Drain limit after a reconnect, messages per second (0 = full speed).
    #[serde(default)]
    pub max_rate: u32,
    /// Drain limit in payload bytes per second (0 = full speed), so a backlog does not
    /// saturate the LTE uplink.
    #[serde(default)]
    pub max_bytes_rate: u64,
    /// Outbox budget: most messages waiting for the upstream (0 = limited only by the
    /// store's disk budget).
    #[serde(default)]
    pub max_queued_messages: u64,
    /// Outbox budget in payload bytes (0 = limited only by the store's disk budget).
    #[serde(default)]
    pub max_queued_bytes: u64,
    /// Messages waiting longer than this are dropped (counted as expired), seconds;
    /// 0 = kept until delivered.
    #[serde(default)]
    pub max_age_secs: u32,
    /// When the outbox budget is reached: `reject-new` (local v5 publishers get 0x97, 3.x
    /// publishers no ack) or `drop-oldest` (counted).
    #[serde(default = "default_policy")]
    pub queue_policy: crate::config::QueuePolicy,
    /// Connect to the upstream with TLS.
    #[serde(default)]
    pub tls: bool,
    /// PEM file of CA certificates that may sign the upstream's certificate.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Also trust the operating system's CA store (default when no `ca_file` is given).
    #[serde(default)]
    pub system_roots: Option<bool>,
    /// PEM client certificate (chain) and key, for upstreams that authenticate clients
    /// by certificate (e.g. AWS IoT).
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// Name to verify the upstream's certificate against, when it differs from the host in
    /// `address` (e.g. connecting by IP address or through a tunnel).
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub topic: Vec<TopicRule>,
}

fn default_failback() -> u64 {
    60
}
fn default_true() -> bool {
    true
}
fn default_policy() -> crate::config::QueuePolicy {
    crate::config::QueuePolicy::RejectNew
}
fn default_protocol() -> BridgeProtocol {
    BridgeProtocol::V311
}
fn default_session_expiry() -> u32 {
    86_400
}
fn default_keepalive() -> u16 {
    30
}
fn default_inflight() -> u16 {
    32
}
fn default_ack_timeout() -> u64 {
    5
}
fn default_inflight_bytes() -> u64 {
    512 * 1024
}
fn default_reject_after_closes() -> u32 {
    5
}
fn default_stall() -> u64 {
    120
}
fn default_backoff_min() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    60_000
}
fn default_connect_timeout() -> u64 {
    15
}

impl BridgeConfig {
    /// A filled-in example without TLS (documentation and tests; `with_example_tls` adds
    /// the TLS keys).
    pub fn example() -> Self {
        BridgeConfig {
            name: "cloud".into(),
            address: "broker.example.com:1883".into(),
            failback_secs: default_failback(),
            notifications: true,
            notification_topic: None,
            linger_ms: 0,
            protocol: BridgeProtocol::V311,
            client_id: Some("gateway-17".into()),
            username: Some("gateway-17".into()),
            password: Some("secret".into()),
            session_expiry_secs: default_session_expiry(),
            keepalive_secs: default_keepalive(),
            ack_timeout_secs: default_ack_timeout(),
            inflight: default_inflight(),
            inflight_bytes: default_inflight_bytes(),
            reject_after_closes: default_reject_after_closes(),
            stall_secs: default_stall(),
            reconnect_min_ms: default_backoff_min(),
            reconnect_max_ms: default_backoff_max(),
            connect_timeout_secs: default_connect_timeout(),
            max_rate: 0,
            max_bytes_rate: 0,
            max_queued_messages: 0,
            max_queued_bytes: 0,
            max_age_secs: 0,
            queue_policy: default_policy(),
            tls: false,
            ca_file: None,
            system_roots: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            topic: vec![TopicRule {
                pattern: "sensors/#".into(),
                direction: Direction::Out,
                qos: 1,
                local_prefix: String::new(),
                remote_prefix: "site-17/".into(),
                priority: 0,
                queue_qos0: false,
            }],
        }
    }

    /// The example with every TLS key set (documentation).
    pub fn with_example_tls(mut self) -> Self {
        self.tls = true;
        self.ca_file = Some("/etc/holdfast/cloud-ca.pem".into());
        self.system_roots = Some(false);
        self.cert_file = Some("/etc/holdfast/gateway.crt".into());
        self.key_file = Some("/etc/holdfast/gateway.key".into());
        self.server_name = Some("broker.example.com".into());
        self
    }

    /// The upstream topic of the link state (`notification_topic` or its default).
    pub fn state_topic(&self) -> String {
        match &self.notification_topic {
            Some(t) => t.clone(),
            None => format!("holdfast/{}/state", self.effective_client_id()),
        }
    }

    /// The client id used upstream (after [`BridgeConfig::resolve_client_id`]).
    pub fn effective_client_id(&self) -> String {
        match &self.client_id {
            Some(id) => id.clone(),
            None => format!("holdfast-gateway-{}", self.name),
        }
    }

    /// Fills in the default client id, `holdfast-<device>-<name>`, and says where it came
    /// from: `<device>` is `device_id` if set, else 16 hex digits hashed from the machine
    /// id (`machine_id_file`, normally `/etc/machine-id`: unique per installation, where the
    /// hostname is `raspberrypi` on every board flashed from one image; hashed because
    /// systemd asks that the id itself not be shown to the network), else the hostname.
    pub fn resolve_client_id(&mut self, device_id: Option<&str>, machine_id_file: &Path) -> &str {
        let source = if self.client_id.is_some() {
            "client_id"
        } else if let Some(d) = device_id {
            self.client_id = Some(format!("holdfast-{d}-{}", self.name));
            "device_id"
        } else if let Some(m) = read_machine_id(machine_id_file) {
            let h = fnv1a64(format!("holdfast-bridge:{m}").as_bytes());
            self.client_id = Some(format!("holdfast-{h:016x}-{}", self.name));
            "machine id"
        } else {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "gateway".into());
            tracing::warn!(bridge = %self.name, file = %machine_id_file.display(), "no machine id: the default upstream client id falls back to the hostname, which boards flashed from one image share; set device_id or client_id");
            self.client_id = Some(format!("holdfast-{host}-{}", self.name));
            "hostname"
        };
        let id = self.client_id.as_deref().unwrap_or_default();
        tracing::info!(bridge = %self.name, client_id = id, source, "bridge client id");
        id
    }

    pub fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("bridge[{i}].{k}");
        if self.name.is_empty() || self.name.contains(['/', '+', '#']) {
            return Err(ConfigError::invalid(
                key("name"),
                "must be non-empty without '/', '+' or '#'",
            ));
        }
        if self.address.0.is_empty() {
            return Err(ConfigError::invalid(
                key("address"),
                "needs at least one HOST:PORT",
            ));
        }
        for a in &self.address.0 {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => {
                    return Err(ConfigError::invalid(
                        key("address"),
                        format!("`{a}` is not HOST:PORT"),
                    ))
                }
            }
        }
        if self.linger_ms > 10_000 || self.linger_ms >= self.ack_timeout_secs.saturating_mul(1000) {
            return Err(ConfigError::invalid(
                key("linger_ms"),
                format!(
                    "must be at most 10000 and below ack_timeout_secs × 1000 (got {})",
                    self.linger_ms
                ),
            ));
        }
        if let Some(t) = &self.notification_topic {
            if !crate::protocol::topic::valid_topic_name(t) {
                return Err(ConfigError::invalid(
                    key("notification_topic"),
                    format!("`{t}` is not a valid topic name"),
                ));
            }
        }
        if self.inflight == 0 {
            return Err(ConfigError::invalid(key("inflight"), "must be at least 1"));
        }
        for (k, v) in [
            ("ack_timeout_secs", self.ack_timeout_secs),
            ("inflight_bytes", self.inflight_bytes),
            ("stall_secs", self.stall_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key(k), "must be at least 1"));
            }
        }
        let classes = super::priorities(self).len();
        // Packet id 65535 is kept for the state notification (`notifications`).
        if usize::from(self.inflight) * classes >= usize::from(u16::MAX) {
            return Err(ConfigError::invalid(
                key("inflight"),
                format!(
                    "{} × {classes} priorities exceeds the 65534 packet ids",
                    self.inflight
                ),
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(ConfigError::invalid(
                key("reconnect_max_ms"),
                "needs 0 < reconnect_min_ms <= reconnect_max_ms",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::invalid(
                key("key_file"),
                "cert_file and key_file go together",
            ));
        }
        if self.session_expiry_secs == 0 {
            return Err(ConfigError::invalid(
                key("session_expiry_secs"),
                "must be at least 1: with 0 the upstream would discard the gateway's session (and its downlink messages) on every disconnect",
            ));
        }
        if let Some(name) = &self.server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(ConfigError::invalid(
                    key("server_name"),
                    format!("`{name}` is not a DNS name or IP address"),
                ));
            }
        }
        if !self.tls
            && (self.ca_file.is_some()
                || self.cert_file.is_some()
                || self.system_roots.is_some()
                || self.server_name.is_some())
        {
            return Err(ConfigError::invalid(
                key("tls"),
                "TLS files are set but tls = false",
            ));
        }
        if self.topic.is_empty() {
            return Err(ConfigError::invalid(
                key("topic"),
                "a bridge needs at least one [[bridge.topic]] rule",
            ));
        }
        for (j, t) in self.topic.iter().enumerate() {
            let tk = |k: &str| format!("bridge[{i}].topic[{j}].{k}");
            let max_qos = match self.protocol {
                BridgeProtocol::V311 => 1,
                BridgeProtocol::V5 => 2,
            };
            if t.qos > max_qos {
                return Err(ConfigError::invalid(
                    tk("qos"),
                    if max_qos == 1 {
                        format!(
                            "must be 0 or 1 with protocol = \"3.1.1\" (got {}; QoS 2 needs protocol = \"5\")",
                            t.qos
                        )
                    } else {
                        format!("must be 0, 1 or 2 (got {})", t.qos)
                    },
                ));
            }
            let local = format!("{}{}", t.local_prefix, t.pattern);
            let remote = format!("{}{}", t.remote_prefix, t.pattern);
            for (what, filter) in [("local_prefix", &local), ("remote_prefix", &remote)] {
                if !crate::protocol::topic::valid_topic_filter(filter) {
                    return Err(ConfigError::invalid(
                        tk(if filter == &local && what == "local_prefix" {
                            "pattern"
                        } else {
                            what
                        }),
                        format!("`{filter}` is not a valid topic filter"),
                    ));
                }
            }
            if t.local_prefix.contains(['+', '#']) || t.remote_prefix.contains(['+', '#']) {
                return Err(ConfigError::invalid(
                    tk("local_prefix"),
                    "prefixes must not contain wildcards",
                ));
            }
            // 3.1.1 has no No Local: the upstream would send every uplink message the `in`
            // side matches straight back down (local subscribers would get it twice).
            if self.protocol == BridgeProtocol::V311 && t.direction.is_in() {
                let echo = self.topic.iter().find(|o| {
                    o.direction.is_out()
                        && crate::auth::acl::overlaps(
                            &format!("{}{}", o.remote_prefix, o.pattern),
                            &remote,
                        )
                });
                if let Some(o) = echo {
                    return Err(ConfigError::invalid(
                        tk("direction"),
                        format!(
                            "over MQTT 3.1.1 the upstream would echo every uplink message on `{}{}` back down (3.1.1 has no No Local): use protocol = \"5\", or give the `in` and `out` sides remote prefixes that do not overlap",
                            o.remote_prefix, o.pattern
                        ),
                    ));
                }
            }
            // Each priority is its own outbox: a message matching out rules of two
            // priorities would be sent twice.
            if t.direction.is_out() {
                for (k, o) in self.topic[..j].iter().enumerate() {
                    let other = format!("{}{}", o.local_prefix, o.pattern);
                    if o.direction.is_out()
                        && o.priority != t.priority
                        && crate::auth::acl::overlaps(&other, &local)
                    {
                        return Err(ConfigError::invalid(
                            tk("priority"),
                            format!(
                                "`{local}` overlaps `{other}` of bridge[{i}].topic[{k}], which has priority {}: out rules of different priorities must not match the same topics",
                                o.priority
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The machine id (trimmed), if the file holds one.
fn read_machine_id(path: &Path) -> Option<String> {
    let id = std::fs::read_to_string(path).ok()?.trim().to_string();
    (!id.is_empty()).then_some(id)
}

/// FNV-1a, 64 bits: stable across Rust releases (unlike `DefaultHasher`), as a client id
/// derived from it must be.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<crate::config::Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(
            &path,
            format!("[[bridge]]\nname = \"c\"\n{extra}\n[[bridge.topic]]\npattern = \"a/#\"\n"),
        )
        .unwrap();
        crate::config::Config::load_from(Some(&path), Default::default())
    }

    #[test]
    fn address_is_one_host_port_or_a_list_and_fleet_keys_validate() {
        let one = load("address = \"h:1883\"").expect("one address");
        assert_eq!(one.bridge[0].address.0, ["h:1883"]);
        assert_eq!(one.bridge[0].failback_secs, 60);
        assert!(one.bridge[0].notifications);
        assert_eq!(one.bridge[0].linger_ms, 0);
        let two = load("address = [\"a:1\", \"b:2\"]\nlinger_ms = 1000").expect("a list");
        assert_eq!(two.bridge[0].address.0, ["a:1", "b:2"]);
        assert_eq!(two.bridge[0].address.to_string(), "a:1, b:2");
        for (extra, key) in [
            ("address = []", "bridge[0].address"),
            ("address = [\"a:1\", \"b\"]", "bridge[0].address"),
            ("address = \"a:1\"\nlinger_ms = 5000", "bridge[0].linger_ms"),
            (
                "address = \"a:1\"\nnotification_topic = \"s/#\"",
                "bridge[0].notification_topic",
            ),
        ] {
            let e = load(extra).expect_err(extra).to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let mut b = BridgeConfig::example();
        assert_eq!(b.state_topic(), "holdfast/gateway-17/state");
        b.notification_topic = Some("fleet/17".into());
        assert_eq!(b.state_topic(), "fleet/17");
    }

    #[test]
    fn default_client_id_from_device_id_machine_id_or_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let mid = dir.path().join("machine-id");
        std::fs::write(&mid, "0123456789abcdef0123456789abcdef\n").unwrap();
        let mut b = BridgeConfig {
            client_id: None,
            ..BridgeConfig::example()
        };
        let derived = b.clone().resolve_client_id(None, &mid).to_string();
        assert!(derived.starts_with("holdfast-") && derived.ends_with("-cloud"));
        assert!(!derived.contains("0123456789abcdef"), "{derived}");
        // Stable (same file, same id) and different for another machine.
        assert_eq!(b.clone().resolve_client_id(None, &mid), derived);
        std::fs::write(&mid, "fedcba9876543210fedcba9876543210").unwrap();
        assert_ne!(b.clone().resolve_client_id(None, &mid), derived);
        assert_eq!(
            b.clone().resolve_client_id(Some("pump-7"), &mid),
            "holdfast-pump-7-cloud"
        );
        let host = b
            .clone()
            .resolve_client_id(None, &dir.path().join("missing"))
            .to_string();
        assert!(
            host.starts_with("holdfast-") && host.ends_with("-cloud"),
            "{host}"
        );
        b.client_id = Some("fixed".into());
        assert_eq!(b.resolve_client_id(Some("pump-7"), &mid), "fixed");
        // FNV-1a reference value: the derivation must never change under a gateway.
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
