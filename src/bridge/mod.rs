//! The upstream bridge: one task per `[[bridge]]`, carrying local topics up and cloud
//! topics down through an MQTT 3.1.1 or 5 connection with a persistent upstream session.
//!
//! # Design
//! The outbox is an internal *durable session* of the router (client id
//! `$bridge/<name>`), subscribed (with No Local) to the local side of every `out` rule.
//! So everything the store guarantees for durable sessions holds for uplink data:
//! - a local QoS 1 publish matching an `out` rule is committed to the bridge's queue
//!   before the publisher's PUBACK;
//! - the bridge gets messages in order, with packet ids assigned by the router and stored
//!   with the row (compact ids 1..=window, so each outbox keeps to its own range of
//!   upstream ids: see `pump`); the same id is used upstream, so an acknowledgement names
//!   its message exactly;
//! - a row is deleted only when the upstream PUBACK for that packet id arrives and the
//!   bridge forwards it to the router as the session's PUBACK;
//! - when the link drops, the bridge detaches the internal session; on reconnect it
//!   re-attaches it, and the router resends what was in flight (DUP, same packet id) before
//!   anything newer, exactly as for a client; across a gateway restart the same happens from
//!   the rows on disk.
//!
//! Downlink: messages from upstream subscriptions (`in` rules) are published into the
//! router by the internal session; the router's PUBACK for them comes only after the local
//! commit, and only then is the upstream PUBACK sent. Messages that
//! came down are never sent back up: the internal session's subscriptions use No Local.
//!
//! QoS 2 (MQTT 5 upstreams): the router's PUBREL for an uplink message goes upstream only
//! after the PUBREC is stored (state 2), and downlink PUBREC/PUBCOMP follow the router's
//! commits, so exactly-once holds across gateway restarts while the upstream keeps the
//! session. An upstream whose Maximum QoS is lower gets the message at its maximum, and
//! its acknowledgement completes the local exchange.
//!
//! Parts: `link` is the upstream connection (MQTT 3.1.1 or 5 with our own codec,
//! stateless: see `upstream`); `pump` moves messages during one connected period
//! (in-flight bounds, the acknowledgement timeout that notices a dead link under traffic,
//! priorities, packet-id mapping, `linger_ms`, topic aliases); `status` reports (status,
//! `$SYS`, stalled, metrics); `failover` picks the address (an address list, failback to
//! the primary); this file connects, backs off and keeps what outlives a connection.
//!
//! Link state upstream (`notifications`): the CONNECT carries a will (retained `0` on the
//! state topic) and a retained `1` follows the CONNACK (`link`); a clean shutdown sets
//! `0`, a failback does not.
//!
//! Reconnecting: exponential backoff with full jitter, started over only after progress
//! (an acknowledgement or a downlink message, or a link that stayed up a keep-alive), so
//! an upstream that closes right after CONNACK is retried ever more slowly. 0x97 Quota
//! exceeded ends the connection without progress: the message stays queued and goes
//! again, in order, after the backoff. A message during which the upstream closes the
//! connection `reject_after_closes` times in a row is set aside (counted as rejected).

pub mod config;
mod error;
mod failover;
mod link;
#[cfg(test)]
mod outbox_model;
mod pacer;
mod pump;
mod status;
mod strikes;
mod tls;
mod upstream;

pub use status::{all_status, metrics, stalled, status_json, BridgeMetrics, BridgeStatus};
pub use tls::{client_config as tls_client_config, TlsSetupError};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
pub use config::{Addresses, BridgeConfig, BridgeProtocol, Direction, TopicRule};
use error::{LinkError, Lost};
use upstream::{Granted, UpEvent, Upstream};

use crate::broker::client::{
    BrokerHandle, ClientOptions, DeliveryPolicy, QueueLimits, Reserved, StandingSession,
};
use crate::protocol::{topic, ProtocolVersion, QoS, SubscribeFilter as Sf, SubscriptionOptions};

/// What the bridge tasks share with the rest of the gateway: the broker's client API and
/// every bridge's live status (`holdfast bridge status`, `/healthz`, `$SYS`).
pub struct BridgeShared {
    pub broker: BrokerHandle,
    /// Live status of each bridge, by name.
    pub bridges: Mutex<std::collections::BTreeMap<String, BridgeStatus>>,
}

impl BridgeShared {
    pub fn new(broker: BrokerHandle) -> Arc<BridgeShared> {
        Arc::new(BridgeShared {
            broker,
            bridges: Mutex::default(),
        })
    }

    /// Every bridge's live status (without outbox figures), by name.
    pub fn statuses(&self) -> Vec<BridgeStatus> {
        self.bridges
            .lock()
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// `host:port` → (host, port); 1883 if the port is missing (validated at start-up).
fn host_port(address: &str) -> (String, u16) {
    address
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .unwrap_or_else(|| (address.to_string(), 1883))
}

/// The drain priorities of a bridge's `out` rules, highest first (`[0]` without any): one
/// outbox (internal session) each.
pub fn priorities(cfg: &BridgeConfig) -> Vec<u8> {
    let mut p: Vec<u8> = cfg
        .topic
        .iter()
        .filter(|t| t.direction.is_out())
        .map(|t| t.priority)
        .collect();
    p.sort_unstable_by(|a, b| b.cmp(a));
    p.dedup();
    if p.is_empty() {
        p.push(0);
    }
    p
}

/// The client id of a bridge's outbox for one priority: `$bridge/<name>` for 0 (the only
/// one unless priorities are configured), `$bridge/<name>/p<N>` otherwise.
pub fn outbox_id(name: &str, priority: u8) -> String {
    if priority == 0 {
        Reserved::Bridge.client_id(name).to_string()
    } else {
        Reserved::Bridge
            .client_id(&format!("{name}/p{priority}"))
            .to_string()
    }
}

/// The outboxes of a bridge, one per priority (highest first): client id, the
/// subscriptions that make it an outbox (the local side of the `out` rules of that
/// priority, No Local so downlink never goes back up) and the relay delivery policy. The
/// router creates them at start-up, so messages are kept from the first moment, whether
/// or not the upstream is reachable.
pub fn internal_sessions(cfg: &BridgeConfig) -> Vec<StandingSession> {
    priorities(cfg)
        .into_iter()
        .map(|priority| {
            let filters = cfg
                .topic
                .iter()
                .filter(|t| t.direction.is_out() && t.priority == priority)
                .map(|t| Sf {
                    filter: format!("{}{}", t.local_prefix, t.pattern),
                    options: SubscriptionOptions {
                        qos: qos_of(t.qos),
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 1,
                    },
                })
                .collect();
            let queue_qos0 = cfg
                .topic
                .iter()
                .filter(|t| t.direction.is_out() && t.priority == priority && t.queue_qos0)
                .map(|t| format!("{}{}", t.local_prefix, t.pattern))
                .collect();
            StandingSession {
                client_id: outbox_id(&cfg.name, priority).into(),
                filters,
                policy: outbox_policy(cfg, queue_qos0),
            }
        })
        .collect()
}

/// How the router delivers to an outbox: a relay (see `DeliveryPolicy`), with compact
/// packet ids (each outbox keeps to its own range of upstream ids) and the bridge's queue
/// limits.
fn outbox_policy(cfg: &BridgeConfig, queue_qos0: Vec<String>) -> DeliveryPolicy {
    DeliveryPolicy {
        relay: true,
        compact_packet_ids: true,
        queue_qos0,
        limits: Some(QueueLimits {
            max_messages: cfg.max_queued_messages,
            max_bytes: cfg.max_queued_bytes,
            policy: cfg.queue_policy,
            max_age_secs: cfg.max_age_secs,
        }),
    }
}

/// Drain limits of a bridge that SIGHUP may change: (`max_rate`, `max_bytes_rate`).
pub type Rates = (u32, u64);

/// The bridge task: runs until `shutdown`. `rates` carries new drain limits (SIGHUP).
pub async fn run(
    cfg: BridgeConfig,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    shared: Arc<BridgeShared>,
    shutdown: CancellationToken,
    rates: tokio::sync::watch::Receiver<Rates>,
) {
    let mut b = Bridge::new(cfg, shared, shutdown, rates);
    b.tls = tls;
    b.run().await
}

struct Bridge {
    cfg: BridgeConfig,
    shared: Arc<BridgeShared>,
    shutdown: CancellationToken,
    /// The outboxes, highest priority first: (internal session id, local filters).
    classes: Vec<(Arc<str>, Vec<String>)>,
    /// `out` rules as (local filter, local prefix, remote prefix).
    out: Vec<(String, String, String)>,
    /// `in` rules as (remote filter, remote prefix, local prefix, qos).
    inbound: Vec<(String, String, String, u8)>,
    /// TLS client configuration when `tls = true` (built once; files read at start-up).
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Current drain limits (changed on SIGHUP).
    rates: tokio::sync::watch::Receiver<Rates>,
    /// Messages sent / acknowledged / received since the counts were last added to the
    /// status (once per pass of the pump, not a lock per message).
    counts: [AtomicU64; 3],
    /// When the upstream last acknowledged something (shared with the stall watch).
    progress: Arc<status::Progress>,
    /// Downlink QoS 2 messages awaiting their PUBREL: upstream packet id → the outbox
    /// (class index) that published it, which holds the id (kept across reconnects).
    qos2_down: Mutex<HashMap<u16, usize>>,
    /// Which message makes the upstream close the connection (see `strikes`).
    strikes: strikes::Strikes,
    /// The link's rate as measured by the last connection, bytes/s (`f64` bits).
    rate: AtomicU64,
    /// Which address is in use; the failback probe (see `failover`).
    failover: failover::Failover,
}

/// Indices into `Bridge::counts`.
const SENT: usize = 0;
const ACKED: usize = 1;
const RECEIVED: usize = 2;

/// Why a connected period ended.
enum End {
    Shutdown,
    Lost(Lost),
    /// The primary address answers again (see `failover`).
    Failback,
}

/// How one connection attempt went.
enum Attempt {
    Failed(LinkError),
    Ended(End),
}

impl Bridge {
    fn new(
        cfg: BridgeConfig,
        shared: Arc<BridgeShared>,
        shutdown: CancellationToken,
        rates: tokio::sync::watch::Receiver<Rates>,
    ) -> Self {
        let out = cfg
            .topic
            .iter()
            .filter(|t| t.direction.is_out())
            .map(|t| {
                (
                    format!("{}{}", t.local_prefix, t.pattern),
                    t.local_prefix.clone(),
                    t.remote_prefix.clone(),
                )
            })
            .collect();
        let inbound = cfg
            .topic
            .iter()
            .filter(|t| t.direction.is_in())
            .map(|t| {
                (
                    format!("{}{}", t.remote_prefix, t.pattern),
                    t.remote_prefix.clone(),
                    t.local_prefix.clone(),
                    t.qos,
                )
            })
            .collect();
        let classes = internal_sessions(&cfg)
            .into_iter()
            .map(|i| {
                let filters = i.filters.into_iter().map(|f| f.filter).collect();
                (i.client_id, filters)
            })
            .collect();
        let strikes = strikes::Strikes::new(cfg.reject_after_closes);
        let failover = failover::Failover::new(
            cfg.address.0.clone(),
            cfg.failback_secs,
            Duration::from_secs(cfg.connect_timeout_secs.max(1)),
        );
        Bridge {
            failover,
            classes,
            cfg,
            shared,
            shutdown,
            out,
            inbound,
            tls: None,
            rates,
            counts: Default::default(),
            progress: status::Progress::new(),
            qos2_down: Mutex::new(HashMap::new()),
            strikes,
            rate: AtomicU64::new(pump::INITIAL_RATE.to_bits()),
        }
    }

    fn count(&self, which: usize) {
        self.counts[which].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the pending counts to the status.
    fn publish_counts(&self) {
        let [sent, acked, received] = self.counts.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
        if sent + acked + received > 0 {
            if acked > 0 {
                self.progress.acked_now();
            }
            let now = crate::store::unix_ms();
            self.status(|st| {
                st.sent += sent;
                st.acked += acked;
                st.received += received;
                if acked > 0 {
                    st.last_ack_ms = now;
                }
            });
        }
    }

    fn status(&self, f: impl FnOnce(&mut BridgeStatus)) {
        if let Ok(mut all) = self.shared.bridges.lock() {
            match all.get_mut(&self.cfg.name) {
                Some(st) => f(st),
                None => f(all.entry(self.cfg.name.clone()).or_default()),
            }
        }
    }

    /// Records a change of link state: status, `$SYS` topic, log (by the caller).
    async fn set_connected(&self, connected: bool, error: Option<String>) {
        let now = crate::store::unix_ms();
        self.progress.connected.store(connected, Ordering::Relaxed);
        let mut stalled = false;
        self.status(|st| {
            if st.connected != connected {
                st.since_ms = now;
            }
            st.connected = connected;
            if connected {
                st.connects += 1;
            }
            if error.is_some() {
                st.last_error = error;
            }
            stalled = st.stalled;
        });
        let state = status::state_word(connected, stalled);
        status::sys(
            &self.shared,
            &self.cfg.name,
            "state",
            state.as_bytes().to_vec(),
        )
        .await;
    }

    async fn run(self) {
        self.status(|st| {
            st.name = self.cfg.name.clone();
            st.address = self.failover.current();
            st.addresses = self.cfg.address.0.clone();
            st.client_id = self.cfg.effective_client_id();
            st.since_ms = crate::store::unix_ms();
            st.outboxes = self.classes.iter().map(|(id, _)| id.to_string()).collect();
        });
        status::sys(
            &self.shared,
            &self.cfg.name,
            "state",
            b"disconnected".to_vec(),
        )
        .await;
        tokio::spawn(status::watch(
            self.shared.clone(),
            self.cfg.name.clone(),
            Duration::from_secs(self.cfg.stall_secs.max(1)),
            self.progress.clone(),
            self.shutdown.clone(),
        ));
        let mut backoff = Backoff::new(self.cfg.reconnect_min_ms, self.cfg.reconnect_max_ms);
        let mut last_error = String::new();
        let max_packet = self.shared.broker.mqtt().max_packet_size as usize + 1024;
        while !self.shutdown.is_cancelled() {
            let address = self.failover.current();
            self.status(|st| st.address = address.clone());
            let connect = link::connect(&self.cfg, &address, self.tls.clone(), max_packet);
            let (attempt, progress) = self.attempt(connect, &mut backoff).await;
            match attempt {
                Attempt::Failed(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        warn!(bridge = %self.cfg.name, address = %address, cause = %e, "bridge cannot connect upstream (retrying with backoff; logged once per distinct error)");
                        self.status(|st| st.last_error = Some(e.clone()));
                        last_error = e;
                    }
                }
                Attempt::Ended(End::Shutdown) => break,
                Attempt::Ended(End::Failback) => {
                    self.failover.to_primary();
                    continue;
                }
                Attempt::Ended(End::Lost(e)) => {
                    warn!(bridge = %self.cfg.name, address = %address, cause = %e, "bridge link lost; messages stay queued on disk");
                    last_error = e.to_string();
                }
            }
            if self.failover.next(progress) && self.pause(backoff.next_wait()).await {
                break;
            }
        }
        debug!(bridge = %self.cfg.name, "bridge stopped");
    }

    /// One connection attempt and, if it succeeds, the connected period. The backoff
    /// starts over only after progress (an acknowledgement or a downlink message, or a
    /// link that stayed up for a keep-alive period): an upstream that closes right after
    /// CONNACK (a duplicate client id, a refused message) is retried ever more slowly.
    async fn attempt<U: Upstream>(
        &self,
        connect: impl std::future::Future<Output = Result<(U, Granted), LinkError>>,
        backoff: &mut Backoff,
    ) -> (Attempt, bool) {
        // Never cancelled except by shutdown: a slow LTE TLS handshake that kept being
        // cancelled would never finish. `connect` is bounded by connect_timeout_secs.
        let (mut up, granted) = tokio::select! {
            r = connect => match r {
                Ok(c) => c,
                Err(e) => return (Attempt::Failed(e), false),
            },
            _ = self.shutdown.cancelled() => return (Attempt::Ended(End::Shutdown), false),
        };
        let since = Instant::now();
        let address = self.failover.current();
        info!(bridge = %self.cfg.name, address = %address, protocol = ?self.cfg.protocol, session_present = granted.session_present, "bridge connected upstream");
        self.failover.connected(&self.shutdown, &self.cfg.name);
        self.set_connected(true, None).await;
        let (end, progress) = match self.subscribe_upstream(&mut up).await {
            Err(e) => (End::Lost(e.into()), false),
            Ok(early) => self.connected(&mut up, granted, early).await,
        };
        self.failover.disconnected();
        let stayed = since.elapsed() >= Duration::from_secs(u64::from(self.cfg.keepalive_secs));
        if progress || stayed {
            backoff.reset();
        }
        match end {
            End::Shutdown => up.close(true).await,
            End::Failback => up.close(false).await,
            End::Lost(_) => {}
        }
        let error = match &end {
            End::Shutdown | End::Failback => None,
            End::Lost(e) => Some(e.to_string()),
        };
        self.set_connected(false, error).await;
        (Attempt::Ended(end), progress || stayed)
    }

    /// Sleeps for a backoff step; true if shutdown came first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    /// Subscribes the `in` rules upstream (before any publish is in flight, so packet ids
    /// cannot clash); refused filters are logged and shown as the last error. Returns the
    /// events that arrived before the SUBACK, to be handled first once the internal
    /// session is attached (dropping a message a resumed session delivered early would
    /// leave it unacknowledged upstream, holding the upstream's in-flight window).
    async fn subscribe_upstream<U: Upstream>(&self, up: &mut U) -> Result<Vec<UpEvent>, LinkError> {
        if self.inbound.is_empty() {
            return Ok(Vec::new());
        }
        let filters: Vec<Sf> = self
            .inbound
            .iter()
            .map(|(f, _, _, q)| Sf {
                filter: f.clone(),
                options: SubscriptionOptions {
                    qos: qos_of(*q),
                    // v5: what we publish upstream on a `both` rule does not come back down.
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 0,
                },
            })
            .collect();
        let timeout = Duration::from_secs(self.cfg.connect_timeout_secs.max(1));
        let (codes, early) = up.subscribe(filters, timeout).await?;
        for ((filter, ..), code) in self.inbound.iter().zip(codes) {
            if code >= 0x80 {
                let e = format!(
                    "upstream refused the subscription to `{filter}` (reason code {code:#04x})"
                );
                warn!(bridge = %self.cfg.name, "{e}; no downlink for that rule");
                self.status(|st| st.last_error = Some(e));
            }
        }
        Ok(early)
    }

    /// Attaches the outboxes (internal sessions) and moves messages both ways until the
    /// link drops. Returns how it ended and whether anything moved.
    async fn connected<U: Upstream>(
        &self,
        up: &mut U,
        granted: Granted,
        early: Vec<UpEvent>,
    ) -> (End, bool) {
        let n = self.classes.len() as u16;
        // The upstream's Receive Maximum is shared by the outboxes.
        let window = self
            .cfg
            .inflight
            .min(granted.receive_maximum / n)
            .min(self.shared.broker.mqtt().max_inflight)
            .max(1);
        let broker = &self.shared.broker;
        let mut classes = Vec::new();
        let mut receivers = Vec::new();
        for (id, filters) in &self.classes {
            let attach = ClientOptions {
                client_id: id.clone(),
                clean_start: false,
                expiry_interval: u32::MAX,
                protocol: match self.cfg.protocol {
                    BridgeProtocol::V311 => ProtocolVersion::V311,
                    BridgeProtocol::V5 => ProtocolVersion::V5,
                },
                window,
                compact_packet_ids: true,
            };
            let Ok((tx, rx)) = broker.connect(attach).await else {
                return (End::Shutdown, false);
            };
            classes.push(pump::Class {
                tx,
                filters: filters.clone(),
                in_flight: 0,
                last_message: None,
                held: VecDeque::new(),
            });
            receivers.push(rx);
        }
        let mut period = pump::Period::new(
            granted,
            classes,
            self.cfg.inflight_bytes,
            self.cfg.ack_timeout_secs,
        );
        period.isolate_left = self.strikes.isolating();
        period.rate = f64::from_bits(self.rate.load(Ordering::Relaxed));
        if period.isolate_left > 0 {
            warn!(bridge = %self.cfg.name, messages = period.isolate_left, "the upstream keeps closing the connection while the same message is in flight: sending one message at a time to find the one it refuses");
        }
        let end = self.pump(up, &mut period, &mut receivers, early).await;
        self.publish_counts();
        self.rate.store(period.rate.to_bits(), Ordering::Relaxed);
        let lost_qos0 = period
            .classes
            .iter()
            .flat_map(|c| c.held.iter())
            .filter(|p| p.qos == QoS::AtMostOnce)
            .count() as u64;
        if lost_qos0 > 0 {
            warn!(bridge = %self.cfg.name, count = lost_qos0, "QoS 0 messages held back when the link dropped are lost (counted as dropped_qos0)");
            self.status(|st| st.dropped_qos0 += lost_qos0);
        }
        if matches!(end, End::Lost(_)) {
            let isolated = period.isolate_left > 0;
            let in_flight = period.in_flight();
            self.strikes
                .lost(period.suspect, up.closed_by_peer(), isolated, in_flight);
        }
        for c in &period.classes {
            c.tx.disconnect().await;
        }
        (end, period.progress && !period.quota)
    }

    /// Local topic → remote topic through the first matching `out` rule.
    fn remote_topic(&self, local: &str) -> Option<String> {
        self.out
            .iter()
            .find(|(filter, _, _)| topic::matches(filter, local))
            .map(|(_, lp, rp)| format!("{rp}{}", &local[lp.len()..]))
    }

    /// Remote topic → local topic through the first matching `in` rule.
    fn local_topic(&self, remote: &str) -> Option<String> {
        self.inbound
            .iter()
            .find(|(filter, _, _, _)| topic::matches(filter, remote))
            .map(|(_, rp, lp, _)| format!("{lp}{}", &remote[rp.len()..]))
    }
}
