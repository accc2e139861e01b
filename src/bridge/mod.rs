//! The upstream bridge: one task per `[[bridge]]`, carrying local topics up and cloud
//! topics down through a rumqttc client with a persistent upstream session.
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
//! rumqttc 0.25.1 is driven through its public `EventLoop` fields (see
//! `../shared/research/crates.md` §2): requests go into `pending` and are written by
//! `write_pending` through rumqttc's own state machine (`state.handle_outgoing_packet`) and
//! framed network, one flush per batch; the request channel is never used; `pending` and
//! `state` are reset after every connection error (dropping rumqttc's own replay, which
//! would go out without DUP); `poll()` only reads (acks, downlink, pings) and is raced
//! against other futures only while `pending` is empty, when it can only be waiting in
//! cancel-safe places.

pub mod config;
mod tls;

pub use tls::client_config as tls_client_config;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, MqttState, Packet as RPacket, Request,
    SubscribeFilter,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use config::{BridgeConfig, Direction, TopicRule};

use crate::broker::connection::{ConnLink, Outgoing, Shared};
use crate::broker::router::{ConnectRequest, InternalSession, RouterEvent, WillAction};
use crate::broker::session::{ClientParams, QueueLimits};
use crate::protocol::{
    topic, ConnAck, Packet, ProtocolVersion, Publish, QoS, SubscribeFilter as Sf,
    SubscriptionOptions,
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
    /// Upstream PUBACKs received (each deletes a message from the outbox).
    pub acked: u64,
    /// Messages received from upstream (downlink).
    pub received: u64,
    /// Successful connections since start.
    pub connects: u64,
}

/// How often the bridge publishes its statistics under `$SYS`.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// Why a connected period ended.
enum End {
    Shutdown,
    Lost(String),
}

/// The internal session of a bridge: its client id and the subscriptions that make it the
/// outbox (the local side of every `out` rule, No Local so downlink never goes back up).
/// The router creates it at start-up, so messages are kept from the first moment, whether
/// or not the upstream is reachable.
pub fn internal_session(cfg: &BridgeConfig) -> InternalSession {
    let filters = cfg
        .topic
        .iter()
        .filter(|t| t.direction.is_out())
        .map(|t| Sf {
            filter: format!("{}{}", t.local_prefix, t.pattern),
            options: SubscriptionOptions {
                qos: if t.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
                no_local: true,
                retain_as_published: true,
                retain_handling: 1,
            },
        })
        .collect();
    InternalSession {
        client_id: format!("{INTERNAL_PREFIX}{}", cfg.name).into(),
        filters,
        limits: QueueLimits {
            max_messages: cfg.max_queued_messages,
            max_bytes: cfg.max_queued_bytes,
            policy: cfg.queue_policy,
            max_age_secs: cfg.max_age_secs,
        },
    }
}

/// The bridge task: runs until `shutdown`.
pub async fn run(
    cfg: BridgeConfig,
    tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut b = Bridge::new(cfg, shared, shutdown);
    b.tls = tls;
    b.run().await
}

struct Bridge {
    cfg: BridgeConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    internal_id: Arc<str>,
    /// `out` rules as (local filter, local prefix, remote prefix).
    out: Vec<(String, String, String)>,
    /// `in` rules as (remote filter, remote prefix, local prefix, qos).
    inbound: Vec<(String, String, String, u8)>,
    /// TLS client configuration when `tls = true` (built once; files read at start-up).
    tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
}

impl Bridge {
    fn new(cfg: BridgeConfig, shared: Arc<Shared>, shutdown: CancellationToken) -> Self {
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
        Bridge {
            internal_id: format!("{INTERNAL_PREFIX}{}", cfg.name).into(),
            cfg,
            shared,
            shutdown,
            out,
            inbound,
            tls: None,
        }
    }

    fn status(&self, f: impl FnOnce(&mut BridgeStatus)) {
        if let Ok(mut all) = self.shared.bridges.lock() {
            let st = all.entry(self.cfg.name.clone()).or_default();
            f(st);
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
    async fn stats_loop(
        shared: Arc<Shared>,
        name: String,
        internal_id: Arc<str>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(STATS_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let Some(json) = status_json(&shared, &name, &internal_id).await else {
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
        });
        self.sys("state", b"disconnected".to_vec()).await;
        tokio::spawn(Self::stats_loop(
            self.shared.clone(),
            self.cfg.name.clone(),
            self.internal_id.clone(),
            self.shutdown.clone(),
        ));
        let mut backoff = Backoff::new(self.cfg.reconnect_min_ms, self.cfg.reconnect_max_ms);
        let mut last_error = String::new();
        while !self.shutdown.is_cancelled() {
            let (client, mut el) = self.client();
            let connected = tokio::select! {
                r = el.poll() => r,
                _ = self.shutdown.cancelled() => break,
            };
            match connected {
                Ok(Event::Incoming(RPacket::ConnAck(ack)))
                    if ack.code == rumqttc::ConnectReturnCode::Success =>
                {
                    info!(bridge = %self.cfg.name, address = %self.cfg.address, session_present = ack.session_present, "bridge connected upstream");
                    last_error.clear();
                    backoff.reset();
                    self.set_connected(true, None).await;
                }
                other => {
                    let e = match other {
                        Ok(ev) => format!("unexpected first event {ev:?}"),
                        Err(e) => e.to_string(),
                    };
                    if e != last_error {
                        warn!(bridge = %self.cfg.name, address = %self.cfg.address, cause = %e, "bridge cannot connect upstream (retrying with backoff; logged once per distinct error)");
                        self.status(|st| st.last_error = Some(e.clone()));
                        last_error = e;
                    }
                    if self.pause(backoff.next()).await {
                        break;
                    }
                    continue;
                }
            }
            // Start from a clean rumqttc state: the router resends what is in flight.
            el.pending.clear();
            el.state = MqttState::new(self.cfg.inflight, true);
            let end = match self.subscribe_upstream(&mut el).await {
                Err(e) => End::Lost(e),
                Ok(early) => self.connected(&mut el, early).await,
            };
            drop(client);
            let error = match &end {
                End::Shutdown => None,
                End::Lost(e) => Some(e.clone()),
            };
            self.set_connected(false, error).await;
            match end {
                End::Shutdown => break,
                End::Lost(e) => {
                    warn!(bridge = %self.cfg.name, cause = %e, "bridge link lost; messages stay queued on disk");
                    last_error = e;
                    if self.pause(backoff.next()).await {
                        break;
                    }
                }
            }
        }
        debug!(bridge = %self.cfg.name, "bridge stopped");
    }

    /// Sleeps for a backoff step; true if shutdown came first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    fn client(&self) -> (AsyncClient, EventLoop) {
        let (host, port) = self
            .cfg
            .address
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
            .unwrap_or_else(|| (self.cfg.address.clone(), 1883));
        let mut opts = MqttOptions::new(self.cfg.effective_client_id(), host, port);
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        opts.set_inflight(self.cfg.inflight);
        opts.set_keep_alive(Duration::from_secs(u64::from(
            self.cfg.keepalive_secs.max(5),
        )));
        opts.set_max_packet_size(
            self.shared.cfg.max_packet_size as usize + 1024,
            self.shared.cfg.max_packet_size as usize + 1024,
        );
        if let Some(u) = &self.cfg.username {
            opts.set_credentials(u.clone(), self.cfg.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut el) = AsyncClient::new(opts, 1);
        el.network_options
            .set_connection_timeout(self.cfg.connect_timeout_secs.max(1));
        (client, el)
    }

    /// Subscribes the `in` rules upstream and waits for the SUBACK (before any publish is
    /// in flight, so packet ids cannot clash).
    ///
    /// An upstream that kept our session sends what it queued for us right after CONNACK,
    /// before it even reads the SUBSCRIBE; those PUBLISHes are returned, to be handled first
    /// once the internal session is attached. (Dropping them would leave them unacknowledged
    /// upstream: a 3.1.1 broker resends only on the next reconnect, and meanwhile they hold
    /// its in-flight window, so the downlink would stall.)
    async fn subscribe_upstream(
        &self,
        el: &mut EventLoop,
    ) -> Result<Vec<rumqttc::Publish>, String> {
        let mut early = Vec::new();
        if self.inbound.is_empty() {
            return Ok(early);
        }
        let filters = self.inbound.iter().map(|(f, _, _, q)| {
            SubscribeFilter::new(
                f.clone(),
                if *q == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                },
            )
        });
        el.pending
            .push_back(Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
        let deadline = Instant::now() + Duration::from_secs(self.cfg.connect_timeout_secs.max(1));
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Err(_) => return Err("no SUBACK from upstream".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(Event::Incoming(RPacket::SubAck(_)))) => return Ok(early),
                Ok(Ok(Event::Incoming(RPacket::Publish(p)))) => early.push(p),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Attaches the internal session and moves messages both ways until the link drops.
    async fn connected(&self, el: &mut EventLoop, early: Vec<rumqttc::Publish>) -> End {
        let conn = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (link, mut rx) = ConnLink::new(conn);
        let router = &self.shared.router;
        let attach = RouterEvent::Connect(Box::new(ConnectRequest {
            link,
            client_id: self.internal_id.clone(),
            clean_start: false,
            expiry_interval: u32::MAX,
            will: None,
            params: ClientParams {
                protocol: ProtocolVersion::V311,
                window: self.cfg.inflight.min(self.shared.cfg.max_inflight).max(1),
                max_packet_size: u32::MAX,
                compact_packet_ids: true,
            },
            connack: ConnAck::default(),
        }));
        if router.send(attach).await.is_err() {
            return End::Shutdown;
        }
        let end = self.pump(el, conn, &mut rx, early).await;
        let _ = router
            .send(RouterEvent::Disconnected {
                conn,
                will: WillAction::Discard,
                session_expiry: None,
            })
            .await;
        end
    }

    async fn pump(
        &self,
        el: &mut EventLoop,
        conn: u64,
        rx: &mut mpsc::UnboundedReceiver<Outgoing>,
        early: Vec<rumqttc::Publish>,
    ) -> End {
        let router = &self.shared.router;
        // Downlink messages waiting for the local commit, by upstream packet id.
        let mut downlink: HashMap<u16, rumqttc::Publish> = HashMap::new();
        for p in early {
            if let Some(end) = self.downlink(el, p, &mut downlink, conn).await {
                return end;
            }
        }
        let mut pacer = Pacer::new(self.cfg.max_rate, self.cfg.max_bytes_rate);
        loop {
            if pacer.ready() {
                while let Ok(out) = rx.try_recv() {
                    match self.outgoing(el, out, &mut downlink, conn).await {
                        Err(end) => return end,
                        Ok(bytes) => pacer.sent(bytes),
                    }
                    if !pacer.ready() {
                        break;
                    }
                }
            }
            if let Err(e) = self.write_pending(el).await {
                return End::Lost(e);
            }
            let ev = if el.pending.is_empty() {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return End::Shutdown,
                    out = rx.recv(), if pacer.ready() => match out {
                        None => return End::Shutdown,
                        Some(out) => {
                            match self.outgoing(el, out, &mut downlink, conn).await {
                                Err(end) => return end,
                                Ok(bytes) => pacer.sent(bytes),
                            }
                            continue;
                        }
                    },
                    _ = tokio::time::sleep_until(pacer.next), if !pacer.ready() => continue,
                    ev = el.poll() => ev,
                }
            } else {
                // rumqttc may be writing: never cancel it here.
                el.poll().await
            };
            match ev {
                Err(e) => return End::Lost(e.to_string()),
                Ok(Event::Incoming(RPacket::PubAck(a))) => {
                    self.status(|st| st.acked += 1);
                    let ev = RouterEvent::PubAck {
                        conn,
                        packet_id: a.pkid,
                    };
                    if router.send(ev).await.is_err() {
                        return End::Shutdown;
                    }
                }
                Ok(Event::Incoming(RPacket::Publish(p))) => {
                    self.status(|st| st.received += 1);
                    if let Some(end) = self.downlink(el, p, &mut downlink, conn).await {
                        return end;
                    }
                }
                Ok(Event::Incoming(RPacket::Disconnect)) => {
                    return End::Lost("upstream sent DISCONNECT".into())
                }
                Ok(_) => {}
            }
        }
    }

    /// Hands one message from upstream to the router (its upstream PUBACK waits for the
    /// router's). `Some` ends the connected period.
    async fn downlink(
        &self,
        el: &mut EventLoop,
        p: rumqttc::Publish,
        downlink: &mut HashMap<u16, rumqttc::Publish>,
        conn: u64,
    ) -> Option<End> {
        let Some(local) = self.local_topic(&p.topic) else {
            warn!(bridge = %self.cfg.name, topic = %p.topic, "downlink message matches no `in` rule; acknowledged and dropped");
            if p.qos != rumqttc::QoS::AtMostOnce {
                el.pending
                    .push_back(Request::PubAck(rumqttc::PubAck::new(p.pkid)));
            }
            return None;
        };
        let qos = match p.qos {
            rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        let publish = Publish {
            dup: false,
            qos,
            retain: p.retain,
            topic: local.into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { p.pkid },
            properties: Default::default(),
            payload: p.payload.clone(),
        };
        if qos != QoS::AtMostOnce {
            downlink.insert(p.pkid, p);
        }
        let ev = RouterEvent::Publish {
            conn,
            publish,
            received: Instant::now(),
        };
        if self.shared.router.send(ev).await.is_err() {
            return Some(End::Shutdown);
        }
        None
    }

    /// Handles one packet from the router: the payload bytes it puts on the link (for the
    /// drain pacer), or `Err` to end the connected period.
    async fn outgoing(
        &self,
        el: &mut EventLoop,
        out: Outgoing,
        downlink: &mut HashMap<u16, rumqttc::Publish>,
        conn: u64,
    ) -> Result<usize, End> {
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
        let mut bytes = 0;
        match packet {
            Packet::Publish(p) => match self.remote_topic(&p.topic) {
                Some(remote) => {
                    let rp = rumqttc::Publish {
                        dup: p.dup,
                        qos: if p.qos == QoS::AtMostOnce {
                            rumqttc::QoS::AtMostOnce
                        } else {
                            rumqttc::QoS::AtLeastOnce
                        },
                        retain: p.retain,
                        topic: remote,
                        pkid: p.packet_id,
                        payload: p.payload,
                    };
                    bytes = rp.payload.len();
                    el.pending.push_back(Request::Publish(rp));
                    self.status(|st| st.sent += 1);
                }
                None => {
                    // Cannot happen (the session only subscribes `out` rules); don't let
                    // it block the queue.
                    if p.qos != QoS::AtMostOnce {
                        let ev = RouterEvent::PubAck {
                            conn,
                            packet_id: p.packet_id,
                        };
                        let _ = self.shared.router.send(ev).await;
                    }
                }
            },
            Packet::PubAck(a) => {
                // The router committed (or refused) a downlink message.
                if let Some(p) = downlink.remove(&a.packet_id) {
                    if a.reason_code < 0x80 {
                        el.pending
                            .push_back(Request::PubAck(rumqttc::PubAck::new(p.pkid)));
                    } else {
                        warn!(bridge = %self.cfg.name, topic = %p.topic, code = a.reason_code, "downlink message refused locally; not acknowledged upstream (it will be redelivered)");
                    }
                }
            }
            _ => {}
        }
        Ok(bytes)
    }

    /// Writes everything queued in `el.pending` straight to the socket, with one flush,
    /// bounded by the connect timeout (a black-holed link cannot stall it forever).
    /// rumqttc's own path sleeps `pending_throttle` before each pending request, which
    /// costs a timer tick (~1 ms) even at zero and would cap the backlog drain at about
    /// 1,000 messages per second. The state bookkeeping is rumqttc's own
    /// (`handle_outgoing_packet`), so its acks, in-flight count and pings stay consistent.
    async fn write_pending(&self, el: &mut EventLoop) -> Result<(), String> {
        if el.pending.is_empty() {
            return Ok(());
        }
        let limit = Duration::from_secs(self.cfg.connect_timeout_secs.max(1));
        let requests: Vec<Request> = el.pending.drain(..).collect();
        let work = async {
            let Some(net) = el.network.as_mut() else {
                return Err("not connected".to_string());
            };
            for r in requests {
                match el.state.handle_outgoing_packet(r) {
                    Ok(Some(packet)) => net.write(packet).await.map_err(|e| e.to_string())?,
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            net.flush().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err("writing to the upstream timed out".into()),
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

/// One bridge's status merged with its outbox figures from the router, as JSON.
pub async fn status_json(shared: &Shared, name: &str, internal_id: &str) -> Option<String> {
    let status = shared.bridges.lock().ok()?.get(name).cloned()?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    let ask = RouterEvent::SessionStats {
        client_id: internal_id.to_string(),
        reply,
    };
    let outbox = if shared.router.send(ask).await.is_ok() {
        rx.await.ok().flatten()
    } else {
        None
    };
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
        let id = format!("{INTERNAL_PREFIX}{name}");
        if let Some(j) = status_json(shared, &name, &id).await {
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

/// Exponential backoff with full jitter.
struct Backoff {
    min: u64,
    max: u64,
    current: u64,
    seed: u64,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Backoff {
            min: min_ms.max(1),
            max: max_ms.max(min_ms.max(1)),
            current: min_ms.max(1),
            seed,
        }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    fn next(&mut self) -> Duration {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let span = self.current.max(self.min);
        let wait = self.min + self.seed % span.max(1);
        self.current = (self.current.saturating_mul(2)).min(self.max);
        Duration::from_millis(wait.min(self.max))
    }
}
