//! The upstream bridge: one task per `[[bridge]]`, carrying local topics up and cloud
//! topics down through an MQTT 3.1.1 (rumqttc) or MQTT 5 client with a persistent upstream session.
//!
//! # Design
//! The outbox is an internal *durable session* of the router (client id
//! `$bridge/<name>`), subscribed (with No Local) to the local side of every `out` rule.
//! So everything the store guarantees for durable sessions holds for uplink data:
//! - a local QoS 1 publish matching an `out` rule is committed to the bridge's queue
//!   before the publisher's PUBACK;
//! - the bridge gets messages in order, with packet ids assigned by the router and stored
//!   with the row (compact ids 1..=inflight, as rumqttc requires); the same id is used
//!   upstream, so nothing has to be guessed from rumqttc's event order;
//! - a row is deleted only when the upstream PUBACK for that packet id arrives and the
//!   bridge forwards it to the router as the session's PUBACK;
//! - when the link drops, the bridge detaches the internal session; on reconnect it
//!   re-attaches it, and the router resends what was in flight (DUP, same packet id) before
//!   anything newer, exactly as for a client; across a gateway restart the same happens from
//!   the rows on disk.
//!
//! Downlink: messages from upstream subscriptions (`in` rules) are published into the
//! router by the internal session; the router's PUBACK for them comes only after the local
//! commit, and only then is the upstream PUBACK sent (rumqttc manual acks). Messages that
//! came down are never sent back up: the internal session's subscriptions use No Local.
//!
//! QoS 2 (MQTT 5 upstreams): the router's PUBREL for an uplink message goes upstream only
//! after the PUBREC is stored (state 2), and downlink PUBREC/PUBCOMP follow the router's
//! commits, so exactly-once holds across gateway restarts while the upstream keeps the
//! session. An upstream whose Maximum QoS is lower gets the message at its maximum, and
//! its acknowledgement completes the local exchange.
//!
//! The upstream connection itself is version-specific and stateless ([`upstream`]):
//! MQTT 3.1.1 through rumqttc ([`v311`]), MQTT 5 with our own codec ([`v5`]).

pub mod config;
mod tls;
mod upstream;
mod v311;
mod v5;

pub use tls::client_config as tls_client_config;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::backoff::Backoff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use config::{BridgeConfig, BridgeProtocol, Direction, TopicRule};
use upstream::{AckKind, Granted, UpEvent, Upstream};

use crate::broker::connection::{ConnLink, Outgoing, Shared};
use crate::broker::router::{ConnectRequest, InternalSession, RouterEvent, WillAction};
use crate::broker::session::{ClientParams, QueueLimits};
use crate::protocol::{
    reason, topic, ConnAck, Packet, ProtocolVersion, PubAckLike, Publish, QoS,
    SubscribeFilter as Sf, SubscriptionOptions,
};

/// Prefix of the internal session ids; clients may not use it.
pub const INTERNAL_PREFIX: &str = "$bridge/";

/// Live status of one bridge (`holdfast bridge status`, `$SYS/holdfast/bridge/<name>/...`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BridgeStatus {
    pub name: String,
    pub address: String,
    pub client_id: String,
    pub connected: bool,
    /// Unix ms of the last change of `connected`.
    pub since_ms: i64,
    pub last_error: Option<String>,
    /// Messages handed to the upstream connection (resends included).
    pub sent: u64,
    /// Messages the upstream acknowledged (PUBACK, or PUBCOMP for QoS 2): each deletes
    /// one from the outbox.
    pub acked: u64,
    /// Messages the upstream refused (v5 reason code >= 0x80) or could never take (larger
    /// than its Maximum Packet Size): removed from the outbox, logged and counted here.
    pub rejected: u64,
    /// Messages received from upstream (downlink).
    pub received: u64,
    /// Successful connections since start.
    pub connects: u64,
    /// Client ids of its outboxes (internal sessions), highest priority first.
    pub outboxes: Vec<String>,
}

/// How often the bridge publishes its statistics under `$SYS`.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// Why a connected period ended.
enum End {
    Shutdown,
    Lost(String),
}

/// How one connection attempt went.
enum Attempt {
    Failed(String),
    Ended(End),
}

/// One connected period: the outboxes' connections and what the upstream granted.
struct Link {
    granted: Granted,
    /// One per outbox, highest priority first.
    classes: Vec<Class>,
    /// Upstream packet id = class index × `stride` + the outbox's own id (1..=window).
    stride: u16,
    /// Messages sent upstream below their local QoS (the upstream's Maximum QoS is
    /// lower), by upstream packet id, with the local QoS: the upstream's answer completes
    /// them.
    emulated: HashMap<u16, QoS>,
}

/// One outbox during a connected period.
struct Class {
    conn: u64,
    /// Its local filters (which outbox a downlink message is published through).
    filters: Vec<String>,
    /// QoS 1/2 messages sent upstream and not yet completed.
    in_flight: usize,
    /// When the router last handed this outbox a message.
    last_message: Option<Instant>,
    /// Messages held back while a higher priority has messages waiting or in flight.
    held: VecDeque<Publish>,
}

/// How long a priority counts as busy after its last message: the router hands over the
/// next one only after the previous acknowledgement reached it, so "nothing in flight"
/// alone would let lower priorities slip in between.
const PRIORITY_GRACE: Duration = Duration::from_millis(20);

impl Link {
    /// Upstream packet id of outbox `k`'s packet id `id`.
    fn upstream_id(&self, k: usize, id: u16) -> u16 {
        (k as u16) * self.stride + id
    }

    /// Outbox and its own packet id for an upstream packet id.
    fn local_id(&self, up: u16) -> Option<(usize, u16)> {
        let k = usize::from(up.checked_sub(1)? / self.stride);
        (k < self.classes.len()).then(|| (k, up - (k as u16) * self.stride))
    }

    /// Must outbox `k` wait (a higher priority has messages held or in flight, or had one
    /// within `PRIORITY_GRACE`)?
    fn gated(&self, k: usize) -> bool {
        let now = Instant::now();
        self.classes[..k].iter().any(|c| {
            c.in_flight > 0
                || !c.held.is_empty()
                || c.last_message.is_some_and(|t| now < t + PRIORITY_GRACE)
        })
    }

    /// When held messages should be looked at again (the latest grace period of a higher
    /// priority ends), if any are held.
    fn recheck_at(&self) -> Option<Instant> {
        if self.classes.iter().all(|c| c.held.is_empty()) {
            return None;
        }
        let latest = self.classes.iter().filter_map(|c| c.last_message).max()?;
        Some(latest + PRIORITY_GRACE)
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
        format!("{INTERNAL_PREFIX}{name}")
    } else {
        format!("{INTERNAL_PREFIX}{name}/p{priority}")
    }
}

/// The internal sessions of a bridge, one per priority (highest first): client id and the
/// subscriptions that make it an outbox (the local side of the `out` rules of that
/// priority, No Local so downlink never goes back up). The router creates them at
/// start-up, so messages are kept from the first moment, whether or not the upstream is
/// reachable.
pub fn internal_sessions(cfg: &BridgeConfig) -> Vec<InternalSession> {
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
            InternalSession {
                client_id: outbox_id(&cfg.name, priority).into(),
                filters,
                limits: QueueLimits {
                    max_messages: cfg.max_queued_messages,
                    max_bytes: cfg.max_queued_bytes,
                    policy: cfg.queue_policy,
                    max_age_secs: cfg.max_age_secs,
                },
            }
        })
        .collect()
}

/// Drain limits of a bridge that SIGHUP may change: (`max_rate`, `max_bytes_rate`).
pub type Rates = (u32, u64);

/// The bridge task: runs until `shutdown`. `rates` carries new drain limits (SIGHUP).
pub async fn run(
    cfg: BridgeConfig,
    tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    rates: tokio::sync::watch::Receiver<Rates>,
) {
    let mut b = Bridge::new(cfg, shared, shutdown, rates);
    b.tls = tls;
    b.run().await
}

struct Bridge {
    cfg: BridgeConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// The outboxes, highest priority first: (internal session id, local filters).
    classes: Vec<(Arc<str>, Vec<String>)>,
    /// `out` rules as (local filter, local prefix, remote prefix).
    out: Vec<(String, String, String)>,
    /// `in` rules as (remote filter, remote prefix, local prefix, qos).
    inbound: Vec<(String, String, String, u8)>,
    /// TLS client configuration when `tls = true` (built once; files read at start-up).
    tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
    /// Current drain limits (changed on SIGHUP).
    rates: tokio::sync::watch::Receiver<Rates>,
    /// Messages sent / acknowledged / received since the counts were last added to the
    /// status (once per pass of the pump, not a lock per message).
    counts: [std::sync::atomic::AtomicU64; 3],
}

/// Indices into `Bridge::counts`.
const SENT: usize = 0;
const ACKED: usize = 1;
const RECEIVED: usize = 2;

impl Bridge {
    fn new(
        cfg: BridgeConfig,
        shared: Arc<Shared>,
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
        Bridge {
            classes,
            cfg,
            shared,
            shutdown,
            out,
            inbound,
            tls: None,
            rates,
            counts: Default::default(),
        }
    }

    fn count(&self, which: usize) {
        self.counts[which].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the pending counts to the status.
    fn publish_counts(&self) {
        let [sent, acked, received] = self.counts.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
        if sent + acked + received > 0 {
            self.status(|st| {
                st.sent += sent;
                st.acked += acked;
                st.received += received;
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
        });
        let state = if connected {
            "connected"
        } else {
            "disconnected"
        };
        self.sys("state", state.as_bytes().to_vec()).await;
    }

    /// Publishes a retained `$SYS/holdfast/bridge/<name>/<leaf>` message locally.
    async fn sys(&self, leaf: &str, payload: Vec<u8>) {
        let topic = format!("$SYS/holdfast/bridge/{}/{leaf}", self.cfg.name);
        let _ = self
            .shared
            .router
            .send(RouterEvent::sys(topic, payload))
            .await;
    }

    /// Publishes the bridge's statistics (status + outbox figures) every `STATS_EVERY`.
    async fn stats_loop(shared: Arc<Shared>, name: String, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(STATS_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let Some(json) = status_json(&shared, &name).await else {
                continue;
            };
            let topic = format!("$SYS/holdfast/bridge/{name}/stats");
            if shared
                .router
                .send(RouterEvent::sys(topic, json.into_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn run(self) {
        self.status(|st| {
            st.name = self.cfg.name.clone();
            st.address = self.cfg.address.clone();
            st.client_id = self.cfg.effective_client_id();
            st.since_ms = crate::store::unix_ms();
            st.outboxes = self.classes.iter().map(|(id, _)| id.to_string()).collect();
        });
        self.sys("state", b"disconnected".to_vec()).await;
        tokio::spawn(Self::stats_loop(
            self.shared.clone(),
            self.cfg.name.clone(),
            self.shutdown.clone(),
        ));
        let mut backoff = Backoff::new(self.cfg.reconnect_min_ms, self.cfg.reconnect_max_ms);
        let mut last_error = String::new();
        let max_packet = self.shared.cfg.max_packet_size as usize + 1024;
        while !self.shutdown.is_cancelled() {
            let tls = self.tls.clone();
            let outcome = match self.cfg.protocol {
                BridgeProtocol::V311 => {
                    let max_id = self.cfg.inflight * self.classes.len() as u16;
                    let connect = v311::connect(&self.cfg, tls, max_packet, max_id);
                    self.attempt(connect, &mut backoff).await
                }
                BridgeProtocol::V5 => {
                    self.attempt(v5::connect(&self.cfg, tls, max_packet), &mut backoff)
                        .await
                }
            };
            match outcome {
                Attempt::Failed(e) => {
                    if e != last_error {
                        warn!(bridge = %self.cfg.name, address = %self.cfg.address, cause = %e, "bridge cannot connect upstream (retrying with backoff; logged once per distinct error)");
                        self.status(|st| st.last_error = Some(e.clone()));
                        last_error = e;
                    }
                }
                Attempt::Ended(End::Shutdown) => break,
                Attempt::Ended(End::Lost(e)) => {
                    warn!(bridge = %self.cfg.name, cause = %e, "bridge link lost; messages stay queued on disk");
                    last_error = e;
                }
            }
            if self.pause(backoff.next_wait()).await {
                break;
            }
        }
        debug!(bridge = %self.cfg.name, "bridge stopped");
    }

    /// One connection attempt and, if it succeeds, the connected period.
    async fn attempt<U: Upstream>(
        &self,
        connect: impl std::future::Future<Output = Result<(U, Granted), String>>,
        backoff: &mut Backoff,
    ) -> Attempt {
        // Never cancelled except by shutdown: a slow LTE TLS handshake that kept being
        // cancelled would never finish. `connect` is bounded by connect_timeout_secs.
        let (mut up, granted) = tokio::select! {
            r = connect => match r {
                Ok(c) => c,
                Err(e) => return Attempt::Failed(e),
            },
            _ = self.shutdown.cancelled() => return Attempt::Ended(End::Shutdown),
        };
        info!(bridge = %self.cfg.name, address = %self.cfg.address, protocol = ?self.cfg.protocol, session_present = granted.session_present, "bridge connected upstream");
        backoff.reset();
        self.set_connected(true, None).await;
        let end = match self.subscribe_upstream(&mut up).await {
            Err(e) => End::Lost(e),
            Ok(early) => self.connected(&mut up, granted, early).await,
        };
        if matches!(end, End::Shutdown) {
            up.close().await;
        }
        let error = match &end {
            End::Shutdown => None,
            End::Lost(e) => Some(e.clone()),
        };
        self.set_connected(false, error).await;
        Attempt::Ended(end)
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
    async fn subscribe_upstream<U: Upstream>(&self, up: &mut U) -> Result<Vec<UpEvent>, String> {
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
    /// link drops.
    async fn connected<U: Upstream>(
        &self,
        up: &mut U,
        granted: Granted,
        early: Vec<UpEvent>,
    ) -> End {
        let n = self.classes.len() as u16;
        // The upstream's Receive Maximum is shared by the outboxes; each keeps its own
        // packet ids 1..=window, sent upstream shifted by `stride` per class.
        let window = self
            .cfg
            .inflight
            .min(granted.receive_maximum / n)
            .min(self.shared.cfg.max_inflight)
            .max(1);
        let router = &self.shared.router;
        let mut classes = Vec::new();
        let mut receivers = Vec::new();
        for (id, filters) in &self.classes {
            let conn = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
            let (link, rx) = ConnLink::new(conn);
            let attach = RouterEvent::Connect(Box::new(ConnectRequest {
                link,
                client_id: id.clone(),
                clean_start: false,
                expiry_interval: u32::MAX,
                will: None,
                params: ClientParams {
                    protocol: match self.cfg.protocol {
                        BridgeProtocol::V311 => ProtocolVersion::V311,
                        BridgeProtocol::V5 => ProtocolVersion::V5,
                    },
                    window,
                    max_packet_size: u32::MAX,
                    compact_packet_ids: true,
                },
                connack: ConnAck::default(),
            }));
            if router.send(attach).await.is_err() {
                return End::Shutdown;
            }
            classes.push(Class {
                conn,
                filters: filters.clone(),
                in_flight: 0,
                last_message: None,
                held: VecDeque::new(),
            });
            receivers.push(rx);
        }
        let mut link = Link {
            granted,
            classes,
            stride: self.cfg.inflight,
            emulated: HashMap::new(),
        };
        let end = self.pump(up, &mut link, &mut receivers, early).await;
        self.publish_counts();
        for c in &link.classes {
            let _ = router
                .send(RouterEvent::Disconnected {
                    conn: c.conn,
                    will: WillAction::Discard,
                    session_expiry: None,
                })
                .await;
        }
        end
    }

    async fn pump<U: Upstream>(
        &self,
        up: &mut U,
        link: &mut Link,
        rxs: &mut [mpsc::UnboundedReceiver<Outgoing>],
        early: Vec<UpEvent>,
    ) -> End {
        for ev in early {
            if let Some(end) = self.incoming(up, link, ev).await {
                return end;
            }
        }
        let mut rates = self.rates.clone();
        let (rate, bytes_rate) = *rates.borrow_and_update();
        let mut pacer = Pacer::new(rate, bytes_rate);
        loop {
            // Highest priority first.
            for (k, rx) in rxs.iter_mut().enumerate() {
                while pacer.ready() {
                    let Ok(out) = rx.try_recv() else {
                        break;
                    };
                    match self.outgoing(up, link, k, out).await {
                        Err(end) => return end,
                        Ok(bytes) => pacer.sent(bytes),
                    }
                }
            }
            if let Err(end) = self.release_held(up, link, &mut pacer).await {
                return end;
            }
            if let Err(e) = up.flush().await {
                return End::Lost(e);
            }
            self.publish_counts();
            let recheck = link.recheck_at().filter(|t| *t > Instant::now());
            // Everything is written: `next` may be cancelled here.
            let ev = tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                _ = tokio::time::sleep_until(recheck.unwrap_or_else(Instant::now)), if recheck.is_some() => continue,
                out = recv_any(rxs), if pacer.ready() => match out {
                    None => return End::Shutdown,
                    Some((k, out)) => {
                        match self.outgoing(up, link, k, out).await {
                            Err(end) => return end,
                            Ok(bytes) => pacer.sent(bytes),
                        }
                        continue;
                    }
                },
                _ = tokio::time::sleep_until(pacer.next), if !pacer.ready() => continue,
                Ok(()) = rates.changed() => {
                    let (rate, bytes_rate) = *rates.borrow_and_update();
                    info!(bridge = %self.cfg.name, max_rate = rate, max_bytes_rate = bytes_rate, "bridge drain limits changed");
                    pacer = Pacer::new(rate, bytes_rate);
                    continue;
                }
                ev = up.next() => ev,
            };
            let mut ev = ev.map(Some);
            // The rest of a burst (acks arrive many per read) without another round.
            loop {
                match ev {
                    Err(e) => return End::Lost(e),
                    Ok(None) => break,
                    Ok(Some(ev)) => {
                        if let Some(end) = self.incoming(up, link, ev).await {
                            return end;
                        }
                    }
                }
                ev = up.try_next();
            }
        }
    }

    /// Sends held messages of the outboxes that no higher priority holds back any more.
    async fn release_held<U: Upstream>(
        &self,
        up: &mut U,
        link: &mut Link,
        pacer: &mut Pacer,
    ) -> Result<(), End> {
        for k in 1..link.classes.len() {
            while pacer.ready() && !link.gated(k) {
                let Some(p) = link.classes[k].held.pop_front() else {
                    break;
                };
                let bytes = self.uplink(up, link, k, p).await?;
                pacer.sent(bytes);
            }
        }
        Ok(())
    }

    /// Sends an event to the router; `Some(End::Shutdown)` if the router is gone.
    async fn to_router(&self, ev: RouterEvent) -> Option<End> {
        self.shared
            .router
            .send(ev)
            .await
            .err()
            .map(|_| End::Shutdown)
    }

    /// Handles one event from upstream. `Some` ends the connected period.
    async fn incoming<U: Upstream>(&self, up: &mut U, link: &mut Link, ev: UpEvent) -> Option<End> {
        match ev {
            UpEvent::Nothing => None,
            UpEvent::Disconnect(why) => Some(End::Lost(why)),
            UpEvent::Publish(p) => {
                self.count(RECEIVED);
                self.downlink(up, link, p).await
            }
            UpEvent::Release(packet_id) => {
                // Downlink ids are the upstream's, whichever outbox published the message.
                let conn = self.downlink_conn(link, None);
                self.to_router(RouterEvent::PubRel { conn, packet_id })
                    .await
            }
            UpEvent::Ack {
                kind,
                packet_id: upstream_id,
                reason,
            } => {
                let Some((k, packet_id)) = link.local_id(upstream_id) else {
                    warn!(bridge = %self.cfg.name, packet_id = upstream_id, "acknowledgement for a packet id we did not use; ignored");
                    return None;
                };
                let conn = link.classes[k].conn;
                let done = kind != AckKind::Rec || reason >= 0x80;
                if reason >= 0x80 {
                    warn!(bridge = %self.cfg.name, packet_id, reason = format!("{reason:#04x}"), "the upstream refused a message (v5 reason code); it is removed from the outbox and counted as rejected");
                    self.status(|st| st.rejected += 1);
                } else if done {
                    self.count(ACKED);
                }
                if done {
                    let c = &mut link.classes[k];
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                // A QoS 2 message the upstream only takes at QoS 1: its PUBACK is our PUBREC.
                let kind = match (kind, link.emulated.get(&upstream_id)) {
                    (AckKind::Ack, Some(QoS::ExactlyOnce)) => AckKind::Rec,
                    _ => kind,
                };
                if kind != AckKind::Rec || reason >= 0x80 {
                    link.emulated.remove(&upstream_id);
                }
                self.to_router(match kind {
                    // Accepted by the upstream (the next hop holds it now).
                    AckKind::Ack if reason < 0x80 => RouterEvent::UpstreamAck { conn, packet_id },
                    AckKind::Ack => RouterEvent::PubAck { conn, packet_id },
                    AckKind::Rec => RouterEvent::PubRec {
                        conn,
                        packet_id,
                        reason,
                    },
                    AckKind::Comp => RouterEvent::PubComp { conn, packet_id },
                })
                .await
            }
        }
    }

    /// Hands one message from upstream to the router; its upstream acknowledgement waits
    /// for the router's (after the local commit). `Some` ends the connected period.
    async fn downlink<U: Upstream>(&self, up: &mut U, link: &Link, mut p: Publish) -> Option<End> {
        let Some(local) = self.local_topic(&p.topic) else {
            warn!(bridge = %self.cfg.name, topic = %p.topic, "downlink message matches no `in` rule; acknowledged and dropped");
            let ack = PubAckLike::new(p.packet_id);
            let packet = match p.qos {
                QoS::AtMostOnce => return None,
                QoS::AtLeastOnce => Packet::PubAck(ack),
                QoS::ExactlyOnce => Packet::PubRec(ack),
            };
            return up.queue(packet).err().map(End::Lost);
        };
        let conn = self.downlink_conn(link, Some(&local));
        p.topic = local.into();
        p.dup = false;
        // Upstream-only properties: ours are assigned by the router for each subscriber.
        p.properties.subscription_identifiers.clear();
        p.properties.topic_alias = None;
        if p.qos == QoS::AtMostOnce {
            p.packet_id = 0;
        }
        self.to_router(RouterEvent::Publish {
            conn,
            publish: p,
            received: Instant::now(),
        })
        .await
    }

    /// The outbox a downlink message is published through: the one whose `out` filters
    /// match its local topic (No Local then keeps it from going back up), else the lowest
    /// priority (the default outbox).
    fn downlink_conn(&self, link: &Link, local: Option<&str>) -> u64 {
        local
            .and_then(|t| {
                link.classes
                    .iter()
                    .find(|c| c.filters.iter().any(|f| topic::matches(f, t)))
            })
            .or(link.classes.last())
            .map(|c| c.conn)
            .unwrap_or_default()
    }

    /// Handles one packet from outbox `k`: the payload bytes it puts on the link (for the
    /// drain pacer), or `Err` to end the connected period.
    async fn outgoing<U: Upstream>(
        &self,
        up: &mut U,
        link: &mut Link,
        k: usize,
        out: Outgoing,
    ) -> Result<usize, End> {
        let conn = link.classes[k].conn;
        let packet = match out {
            Outgoing::Disconnect(_) => {
                return Err(if self.shutdown.is_cancelled() {
                    End::Shutdown
                } else {
                    End::Lost("detached by the router".into())
                })
            }
            Outgoing::Packet(p) => *p,
        };
        let lost = End::Lost;
        if matches!(packet, Packet::Publish(_)) && link.classes.len() > 1 {
            link.classes[k].last_message = Some(Instant::now());
        }
        match packet {
            // Behind held messages of its own priority too, or it would overtake them.
            Packet::Publish(p) if link.gated(k) || !link.classes[k].held.is_empty() => {
                link.classes[k].held.push_back(p)
            }
            Packet::Publish(p) => return self.uplink(up, link, k, p).await,
            // The router released a QoS 2 message: upstream, unless it only took it at a
            // lower QoS (then it is complete already).
            Packet::PubRel(mut a) => {
                let upstream_id = link.upstream_id(k, a.packet_id);
                if link.emulated.remove(&upstream_id).is_some() {
                    let ev = RouterEvent::PubComp {
                        conn,
                        packet_id: a.packet_id,
                    };
                    if let Some(end) = self.to_router(ev).await {
                        return Err(end);
                    }
                } else {
                    a.packet_id = upstream_id;
                    up.queue(Packet::PubRel(a)).map_err(lost)?;
                }
            }
            // The router committed (or refused) a downlink message.
            Packet::PubAck(a) | Packet::PubRec(a) if a.reason_code >= 0x80 => {
                warn!(bridge = %self.cfg.name, packet_id = a.packet_id, code = a.reason_code, "downlink message refused locally; not acknowledged upstream (it will be redelivered)");
            }
            p @ (Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)) => {
                up.queue(p).map_err(lost)?;
            }
            _ => {}
        }
        Ok(0)
    }

    /// One outbox message upstream, within what the upstream granted.
    async fn uplink<U: Upstream>(
        &self,
        up: &mut U,
        link: &mut Link,
        k: usize,
        mut p: Publish,
    ) -> Result<usize, End> {
        let conn = link.classes[k].conn;
        let packet_id = p.packet_id;
        let upstream_id = link.upstream_id(k, packet_id);
        let local_qos = p.qos;
        let Some(remote) = self.remote_topic(&p.topic) else {
            // Cannot happen (the session only subscribes `out` rules); don't let it block
            // the queue.
            let refused = reason::IMPLEMENTATION_SPECIFIC_ERROR;
            return match self.complete(conn, local_qos, packet_id, refused).await {
                Some(end) => Err(end),
                None => Ok(0),
            };
        };
        p.topic = remote.into();
        p.qos = p.qos.min(link.granted.maximum_qos);
        p.retain &= link.granted.retain_available;
        p.properties.subscription_identifiers.clear();
        p.properties.topic_alias = None;
        if p.qos == QoS::AtMostOnce {
            p.packet_id = 0;
            p.dup = false;
        } else {
            p.packet_id = upstream_id;
        }
        let bytes = p.payload.len();
        let sent_qos = p.qos;
        if let Err(e) = up.queue(Packet::Publish(p)) {
            // It can never go: count it and remove it rather than block the outbox.
            warn!(bridge = %self.cfg.name, cause = %e, "message cannot be sent upstream; removed from the outbox and counted as rejected");
            self.status(|st| st.rejected += 1);
            let refused = reason::PACKET_TOO_LARGE;
            return match self.complete(conn, local_qos, packet_id, refused).await {
                Some(end) => Err(end),
                None => Ok(0),
            };
        }
        self.count(SENT);
        if sent_qos != QoS::AtMostOnce {
            link.classes[k].in_flight += 1;
        }
        if sent_qos < local_qos {
            // The upstream's Maximum QoS is lower: its acknowledgement (or none, at QoS 0)
            // completes the message.
            link.emulated.insert(upstream_id, local_qos);
            if sent_qos == QoS::AtMostOnce {
                if let Some(end) = self.complete(conn, local_qos, packet_id, 0).await {
                    return Err(end);
                }
            }
        }
        Ok(bytes)
    }

    /// Tells the router an outbox message is done without an upstream acknowledgement:
    /// PUBACK (QoS 1) or PUBREC (QoS 2): with a failure `reason` the router deletes it at
    /// once; with 0 its PUBREL follows, answered in `outgoing` (the message is in
    /// `emulated`).
    async fn complete(&self, conn: u64, qos: QoS, packet_id: u16, reason: u8) -> Option<End> {
        match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => {
                self.to_router(RouterEvent::PubAck { conn, packet_id })
                    .await
            }
            QoS::ExactlyOnce => {
                self.to_router(RouterEvent::PubRec {
                    conn,
                    packet_id,
                    reason,
                })
                .await
            }
        }
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

/// The next packet from any outbox, highest priority first; `None` once one is closed.
async fn recv_any(rxs: &mut [mpsc::UnboundedReceiver<Outgoing>]) -> Option<(usize, Outgoing)> {
    std::future::poll_fn(|cx| {
        for (k, rx) in rxs.iter_mut().enumerate() {
            match rx.poll_recv(cx) {
                std::task::Poll::Ready(Some(out)) => return std::task::Poll::Ready(Some((k, out))),
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// One bridge's status merged with its outbox figures from the router (summed over its
/// priorities), as JSON.
pub async fn status_json(shared: &Shared, name: &str) -> Option<String> {
    let status = shared.bridges.lock().ok()?.get(name).cloned()?;
    let mut outbox: Option<crate::broker::router::SessionStats> = None;
    for id in &status.outboxes {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let ask = RouterEvent::SessionStats {
            client_id: id.clone(),
            reply,
        };
        if shared.router.send(ask).await.is_err() {
            break;
        }
        if let Some(st) = rx.await.ok().flatten() {
            let sum = outbox.get_or_insert_with(Default::default);
            sum.online |= st.online;
            sum.queued += st.queued;
            sum.queued_bytes += st.queued_bytes;
            sum.inflight += st.inflight;
            sum.dropped += st.dropped;
        }
    }
    #[derive(serde::Serialize)]
    struct Full {
        #[serde(flatten)]
        status: BridgeStatus,
        outbox: Option<crate::broker::router::SessionStats>,
    }
    serde_json::to_string(&Full { status, outbox }).ok()
}

/// Every bridge's status as JSON objects (admin socket).
pub async fn all_status_json(shared: &Shared) -> Vec<String> {
    let names: Vec<String> = match shared.bridges.lock() {
        Ok(all) => all.keys().cloned().collect(),
        Err(_) => Vec::new(),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(j) = status_json(shared, &name).await {
            out.push(j);
        }
    }
    out
}

/// Paces the drain to `max_rate` messages/s and `max_bytes_rate` payload bytes/s (0 = no
/// limit), allowing a burst of one message.
struct Pacer {
    per_message: Option<Duration>,
    bytes_per_sec: u64,
    next: Instant,
}

impl Pacer {
    fn new(max_rate: u32, max_bytes_rate: u64) -> Self {
        Pacer {
            per_message: (max_rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(max_rate))),
            bytes_per_sec: max_bytes_rate,
            next: Instant::now(),
        }
    }

    fn ready(&self) -> bool {
        Instant::now() >= self.next
    }

    fn sent(&mut self, bytes: usize) {
        if bytes == 0 && self.per_message.is_none() {
            return;
        }
        let by_bytes = if self.bytes_per_sec > 0 {
            Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
        } else {
            Duration::ZERO
        };
        let cost = self.per_message.unwrap_or(Duration::ZERO).max(by_bytes);
        if cost.is_zero() {
            return;
        }
        let now = Instant::now();
        self.next = self.next.max(now.checked_sub(cost).unwrap_or(now)) + cost;
    }
}
