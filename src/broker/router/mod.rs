//! The router: the one task that owns all sessions, the subscription tree and the retained
//! messages. Connections send it `RouterEvent`s over one bounded channel; it answers by
//! pushing packets onto each connection's outgoing channel. Because a single task sees every
//! event in order, per-session ordering, packet-id bookkeeping and session takeover need no
//! locks.
//!
//! # Durability (see also `store`)
//! While handling events the router collects store `Op`s; at the end of each batch of
//! events they go to the store writer as one token. Output that acknowledges or exposes
//! something durable is *held* in the session (`Session::held`) with that token and
//! released only when the store reports the token committed:
//! - PUBACK / PUBREC to a publisher whose message matched a durable session or set a
//!   retained message (a failed commit turns them into 0x97 for v5, no ack for 3.x);
//! - PUBLISH to a durable session (its row, marked sent, is on disk first), PUBREL after
//!   PUBREC (state 2 on disk first), PUBCOMP after the incoming QoS 2 id is released;
//! - CONNACK, SUBACK, UNSUBACK of durable sessions.
//!
//! Output that depends on nothing goes out at once unless held output is ahead of it in
//! the same session, so each connection still sees packets in order. Clean sessions never
//! touch the disk.
//!
//! # Parts
//! This file holds the events, the `Router` state, recovery and the event loop; the
//! handlers live beside it: `lifecycle` (CONNECT, disconnect, will and expiry timers,
//! shutdown), `publish` (publish and acknowledgement flows, routing, delivery, pumping
//! queues), `subscribe`, `store_io` (tokens to the writer and what it reports back),
//! `output` (held output and its release), `persist` (store encodings), `security`
//! (session ownership, the ACL in force per session, filtered deliveries, wills), `table`
//! (the sessions by id, client id and connection, in tables of small slots), `ids`
//! (session ids and generations).

mod commits;
#[cfg(test)]
mod harness;
use commits::{DropUndo, Pending};
mod ids;
mod lifecycle;
#[cfg(test)]
mod memory_tests;
mod output;
mod persist;
mod publish;
mod reads;
mod recovery;
mod security;
mod store_io;
mod subscribe;
mod table;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::client::StandingSession;
use super::connection::{ConnId, ConnLink, Outgoing};
use super::retained::RetainedStore;
use super::session::{
    ClientParams, Held, Inflight, InflightState, Message, QueueLimits, Queued, RowPlace, Session,
};
use super::topic_tree::{Match, SessionId, SubscriptionData, SubscriptionTree};
use crate::clock::Clock;
use crate::config::{MqttConfig, QueuePolicy};
use crate::protocol::reason;
use crate::protocol::topic;
use crate::protocol::{
    AckProperties, ConnAck, Packet, PubAckLike, Publish, QoS, SubAck, Subscribe, UnsubAck,
    Unsubscribe, Will,
};
use crate::store::{Command, Op, QueueRow, Recovered, Store, StoreEvent};
use output::*;
use persist::*;
pub use security::will_allowed;

/// Stale timers tolerated beyond two per session before they are swept (`push_timer`).
const TIMER_SLACK: usize = 1024;
/// How many events the router takes from its channel per wake-up.
const BATCH: usize = 256;
/// Rows read back from disk at a time when a durable session's queue is spilled.
const READ_BATCH: u32 = 128;
/// Held output marked with this bit also waits for a subscriber's queue to shrink
/// (backpressure on QoS 1/2 publishers).
const GATE_BIT: u64 = 1 << 63;
/// Held output marked with this bit waits for a token whose commit failed: it is released
/// as refused (the mark replaces a set of failed tokens that would only grow).
const FAILED_BIT: u64 = 1 << 62;
/// A clean, online subscriber queue this long gates its publishers' acknowledgements...
const GATE_HIGH: u64 = 256;
/// ...until it is down to this length.
const GATE_LOW: u64 = 64;

/// What the connection asks of the router when its CONNECT has been accepted.
pub struct ConnectRequest {
    pub link: ConnLink,
    pub client_id: Arc<str>,
    pub clean_start: bool,
    /// Session Expiry Interval in seconds (already clamped to the configured maximum).
    pub expiry_interval: u32,
    pub will: Option<Will>,
    pub params: ClientParams,
    /// The CONNACK to send; the router fills in Session Present.
    pub connack: ConnAck,
}

/// Why a connection ended, as far as the will is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAction {
    /// Normal DISCONNECT (reason 0x00): the will is discarded.
    Discard,
    /// Anything else: keep-alive timeout, socket error, protocol error, DISCONNECT 0x04,
    /// server-initiated close.
    Publish,
}

pub enum RouterEvent {
    /// An internal client (bridge, serial port) attaches to its session.
    Connect(Box<ConnectRequest>),
    /// A network client attaches: as `Connect`, refused if the session belongs to another
    /// identity, and the session takes on the client's ACL (`security`).
    ClientConnect {
        request: Box<ConnectRequest>,
        identity: crate::auth::Identity,
    },
    /// The ACL file was (re)loaded: every session takes on its owner's current rules and
    /// its subscriptions are re-checked (sent at start-up and after each SIGHUP).
    Reauthorize {
        auth: Arc<crate::auth::Auth>,
    },
    Publish {
        conn: ConnId,
        publish: Publish,
        received: Instant,
    },
    PubAck {
        conn: ConnId,
        packet_id: u16,
    },
    /// A bridge outbox's QoS 1 message that the upstream broker accepted (PUBACK with a
    /// success code, at QoS 1): as `PubAck`, and the next hop now holds the message, so a
    /// publisher acknowledgement waiting only for the outbox's copy to be stored may go
    /// (see `Router::early`).
    UpstreamAck {
        conn: ConnId,
        packet_id: u16,
    },
    PubRec {
        conn: ConnId,
        packet_id: u16,
        reason: u8,
    },
    PubRel {
        conn: ConnId,
        packet_id: u16,
    },
    PubComp {
        conn: ConnId,
        packet_id: u16,
    },
    Subscribe {
        conn: ConnId,
        subscribe: Subscribe,
    },
    Unsubscribe {
        conn: ConnId,
        unsubscribe: Unsubscribe,
    },
    Disconnected {
        conn: ConnId,
        will: WillAction,
        /// A new Session Expiry Interval from the client's v5 DISCONNECT.
        session_expiry: Option<u32>,
    },
    /// Administrative removal of a session (`holdfast sessions drop`): an online client is
    /// disconnected with 0x98 Administrative action, its will published, the session and
    /// its queue deleted. Answers whether the session existed.
    DropSession {
        client_id: String,
        reply: oneshot::Sender<bool>,
    },
    /// Queue figures of a session, by client id.
    SessionStats {
        client_id: String,
        reply: oneshot::Sender<Option<SessionStats>>,
    },
    /// Counters and session figures (`observe`: `$SYS`, metrics, health checks).
    Stats {
        reply: oneshot::Sender<RouterSnapshot>,
    },
    /// A status message from inside the gateway (`$SYS/holdfast/...`: broker figures,
    /// bridge and serial states): routed like a publish from nobody and kept as the
    /// retained message in memory only, so an idle gateway does not write to its disk for
    /// status. Non-empty payloads only.
    SysPublish {
        publish: Publish,
    },
    /// Graceful shutdown: publish wills, tell every client, commit, then answer.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

impl RouterEvent {
    /// A retained QoS 0 status message for `topic` (`$SYS/...`), kept in memory only.
    pub fn sys(topic: String, payload: impl Into<bytes::Bytes>) -> RouterEvent {
        RouterEvent::SysPublish {
            publish: Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: topic.into(),
                packet_id: 0,
                properties: Default::default(),
                payload: payload.into(),
            },
        }
    }
}

/// Queue figures of one session.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct SessionStats {
    pub online: bool,
    /// Messages waiting (in memory or on disk), not counting in-flight ones.
    pub queued: u64,
    pub queued_bytes: u64,
    pub inflight: u64,
    pub dropped: u64,
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouterStats {
    pub publishes_in: u64,
    pub publishes_out: u64,
    pub dropped_queue_full: u64,
    pub dropped_qos0_backlog: u64,
    /// QoS 0 messages for a bridge outbox while its upstream is unreachable (rules
    /// without `queue_qos0`).
    pub dropped_qos0_bridge_offline: u64,
    pub dropped_too_large: u64,
    pub dropped_disk_budget: u64,
    pub refused_store_failure: u64,
    pub expired: u64,
    pub sessions_expired: u64,
    /// Publisher PUBACKs sent when a bridge's upstream accepted the message, before its
    /// outbox row was committed (the message's only durable copy would have been that row).
    pub acked_by_upstream: u64,
}

/// The router's figures at one moment (`RouterEvent::Stats`).
#[derive(Debug, Default, Clone, Copy)]
pub struct RouterSnapshot {
    pub stats: RouterStats,
    /// Sessions in memory: online clients plus persistent offline sessions (bridge outboxes
    /// included).
    pub sessions: u64,
    /// Of those, the ones kept on disk.
    pub durable_sessions: u64,
    /// Sessions with a connection attached.
    pub online_sessions: u64,
    pub retained: u64,
}

/// A retained message and when it expires.
#[derive(Debug, Clone)]
struct Retained {
    publish: Publish,
    expires_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    WillDelay,
    SessionExpiry,
}

/// A will-delay or session-expiry deadline, in the router's heap: 24 bytes (issue 17: one
/// per offline session, in a heap of up to twice as many slots), so the deadline is kept
/// as nanoseconds since the router's `epoch` and the session id in 32 bits (ids are at most
/// `store::MAX_SID`, < 2^23). Ordered by deadline first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at_ns: u64,
    session: u32,
    generation: u64,
    kind: TimerKind,
}

impl Timer {
    /// A deadline before `epoch` is kept as `epoch` (both are past when it is armed:
    /// `epoch` is the router's start).
    fn new(
        epoch: Instant,
        at: Instant,
        session: SessionId,
        generation: u64,
        kind: TimerKind,
    ) -> Timer {
        let at_ns = at.saturating_duration_since(epoch).as_nanos();
        Timer {
            at_ns: u64::try_from(at_ns).unwrap_or(u64::MAX),
            // Ids fit (see above); an id that did not would only make a timer that never
            // matches its session.
            session: u32::try_from(session).unwrap_or(u32::MAX),
            generation,
            kind,
        }
    }

    fn at(&self, epoch: Instant) -> Instant {
        epoch + Duration::from_nanos(self.at_ns)
    }

    fn session(&self) -> SessionId {
        SessionId::from(self.session)
    }
}

pub struct Router {
    cfg: Arc<MqttConfig>,
    rx: mpsc::Receiver<RouterEvent>,
    store: Option<Store>,
    store_rx: mpsc::UnboundedReceiver<StoreEvent>,
    sweep_every: Duration,
    /// The store's time line: what every deadline kept on disk is measured on.
    clock: Clock,
    /// Sessions by id and by client id (`table`: a few bytes per session).
    sessions: table::Sessions,
    /// Session ids by connection (`table`).
    by_conn: table::ByConn,
    tree: SubscriptionTree,
    retained: RetainedStore<Retained>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// What timers' deadlines count from (`Timer`): when the router was made.
    epoch: Instant,
    /// Session ids (slots, reused; never wrap) and timer generations.
    ids: ids::SessionIds,
    /// Scratch buffer for subscription matches, reused across publishes.
    matches: Vec<Match>,
    /// Set by `route` when the publisher's acknowledgement must wait for a slow queue.
    route_gated: bool,
    /// Sessions whose queue read-back failed, asked again at `read_retry_at`.
    read_retry: Vec<SessionId>,
    read_retry_at: Option<Instant>,
    /// The gateway-wide read-back budget (`mqtt.read_back_budget_bytes`, `reads`).
    pool: Arc<crate::broker::readback::ReadPool>,
    /// Sessions waiting for budget to read their queue back, first come first served.
    read_wait: std::collections::VecDeque<SessionId>,
    /// Budget reserved for the read-backs on their way, per session in the order asked.
    read_reserved: HashMap<SessionId, std::collections::VecDeque<u64>>,
    /// Store ops, tokens and what waits for each token (`commits`).
    commits: commits::Commits,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(
        cfg: Arc<MqttConfig>,
        rx: mpsc::Receiver<RouterEvent>,
        store: Store,
        store_rx: mpsc::UnboundedReceiver<StoreEvent>,
        recovered: Recovered,
        sweep_every: Duration,
        standing: Vec<StandingSession>,
    ) -> Self {
        let pool = crate::broker::readback::ReadPool::new(cfg.read_back_budget_bytes);
        let mut r = Router {
            cfg,
            rx,
            store: Some(store),
            store_rx,
            sweep_every,
            clock: recovered.clock,
            sessions: Default::default(),
            by_conn: Default::default(),
            tree: SubscriptionTree::new(),
            retained: RetainedStore::new(),
            timers: BinaryHeap::new(),
            epoch: Instant::now(),
            ids: ids::SessionIds::new(recovered.sessions.iter().map(|s| s.sid)),
            matches: Vec::new(),
            route_gated: false,
            read_retry: Vec::new(),
            read_retry_at: None,
            pool,
            read_wait: Default::default(),
            read_reserved: HashMap::new(),
            commits: commits::Commits::new(),
            stats: RouterStats::default(),
        };
        r.recover(recovered);
        for s in standing {
            r.ensure_standing(s);
        }
        r.submit();
        r
    }

    /// Runs until a `Shutdown` event is handled or every sender is gone.
    pub async fn run(mut self) {
        let mut events = Vec::with_capacity(BATCH);
        let mut sweep = tokio::time::interval(self.sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse(t)| t.at(self.epoch));
            tokio::select! {
                n = self.rx.recv_many(&mut events, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for ev in events.drain(..) {
                        if let RouterEvent::Shutdown { done } = ev {
                            self.shutdown().await;
                            let _ = done.send(());
                            return;
                        }
                        self.commits.event_ops_start = self.commits.ops.len();
                        self.handle(ev);
                    }
                    // Budget given back by this batch (acks, disconnects) serves who waits.
                    self.serve_reads();
                    self.submit_unless_lazy();
                }
                ev = self.store_rx.recv() => {
                    let Some(ev) = ev else {
                        error!("store writer stopped; stopping the router");
                        break;
                    };
                    self.commits.event_ops_start = self.commits.ops.len();
                    self.on_store_event(ev);
                    while let Ok(ev) = self.store_rx.try_recv() {
                        self.commits.event_ops_start = self.commits.ops.len();
                        self.on_store_event(ev);
                    }
                    self.serve_reads();
                    self.submit_unless_lazy();
                }
                _ = sleep_until_opt(next_timer) => {
                    self.commits.event_ops_start = self.commits.ops.len();
                    self.fire_timers();
                    self.submit();
                }
                _ = sleep_until_opt(self.commits.lazy_until) => self.submit(),
                _ = sleep_until_opt(self.read_retry_at) => {
                    self.commits.event_ops_start = self.commits.ops.len();
                    self.retry_reads();
                    self.submit();
                }
                _ = sweep.tick() => self.sweep(),
            }
        }
        self.close_store().await;
    }

    async fn close_store(&mut self) {
        self.submit();
        if let Some(store) = self.store.take() {
            store.close().await;
        }
    }

    fn handle(&mut self, ev: RouterEvent) {
        match ev {
            RouterEvent::Connect(req) => self.on_connect(*req, None),
            RouterEvent::ClientConnect { request, identity } => {
                self.on_connect(*request, Some(identity))
            }
            RouterEvent::Reauthorize { auth } => self.reauthorize(&auth),
            RouterEvent::Publish {
                conn,
                publish,
                received,
            } => self.on_publish(conn, publish, received),
            RouterEvent::PubAck { conn, packet_id } => {
                self.on_ack(conn, packet_id, InflightState::AwaitingAck)
            }
            RouterEvent::UpstreamAck { conn, packet_id } => self.on_upstream_ack(conn, packet_id),
            RouterEvent::PubRec {
                conn,
                packet_id,
                reason,
            } => self.on_pubrec(conn, packet_id, reason),
            RouterEvent::PubRel { conn, packet_id } => self.on_pubrel(conn, packet_id),
            RouterEvent::PubComp { conn, packet_id } => {
                self.on_ack(conn, packet_id, InflightState::AwaitingComp)
            }
            RouterEvent::Subscribe { conn, subscribe } => {
                self.note_subscribe(conn, &subscribe);
                self.on_subscribe(conn, subscribe)
            }
            RouterEvent::Unsubscribe { conn, unsubscribe } => {
                self.on_unsubscribe(conn, unsubscribe)
            }
            RouterEvent::Disconnected {
                conn,
                will,
                session_expiry,
            } => self.on_disconnected(conn, will, session_expiry),
            RouterEvent::SessionStats { client_id, reply } => {
                let stats = self
                    .sessions
                    .sid_of(&client_id)
                    .and_then(|sid| self.sessions.get(&sid))
                    .map(|s| SessionStats {
                        online: s.is_online(),
                        queued: s.queue_len,
                        queued_bytes: s.queued_bytes,
                        inflight: s.inflight.len() as u64,
                        dropped: s.dropped,
                    });
                let _ = reply.send(stats);
            }
            RouterEvent::DropSession { client_id, reply } => {
                let _ = reply.send(self.drop_session(&client_id));
            }
            RouterEvent::Stats { reply } => {
                let mut snap = RouterSnapshot {
                    stats: self.stats,
                    sessions: self.sessions.len() as u64,
                    retained: self.retained.len() as u64,
                    ..Default::default()
                };
                for s in self.sessions.values() {
                    snap.durable_sessions += u64::from(s.durable);
                    snap.online_sessions += u64::from(s.is_online());
                }
                let _ = reply.send(snap);
            }
            RouterEvent::SysPublish { mut publish } => {
                publish.retain = true;
                publish.dup = false;
                publish.packet_id = 0;
                let topic = publish.topic.clone();
                let kept = Retained {
                    publish: publish.clone(),
                    expires_at: None,
                };
                // Live copies as for a non-retained publish (Retain As Published aside).
                publish.retain = false;
                self.route(None, publish, None);
                self.retained.set(&topic, Some(kept));
            }
            RouterEvent::Shutdown { .. } => {}
        }
    }

    fn drop_session(&mut self, client_id: &str) -> bool {
        let Some(sid) = self.sessions.sid_of(client_id) else {
            return false;
        };
        let mut will = None;
        if let Some(s) = self.sessions.get_mut(&sid) {
            if let Some(c) = s.conn.take() {
                self.by_conn.remove(c.id, sid);
                c.send(Outgoing::Disconnect(reason::ADMINISTRATIVE_ACTION));
            }
            will = s.will.take().and_then(|w| security::permitted_will(s, *w));
        }
        if let Some(w) = will {
            self.publish_will(w);
        }
        warn!(client_id, "session dropped by an administrator");
        self.end_session(sid, "dropped by an administrator");
        true
    }
}

enum RouteOutcome {
    Delivered,
    NoSubscribers,
    QuotaExceeded,
}

fn row_message(clock: &Clock, row: &QueueRow) -> Option<Message> {
    let publish = decode_publish(&row.packet)?;
    Some(Message {
        publish,
        expires_at: store_to_instant(clock, row.expires_at),
        charge: None,
    })
}

fn valid_filter(filter: &str, cfg: &MqttConfig) -> bool {
    topic::valid_topic_filter(filter)
        && filter.len() <= cfg.max_topic_length
        && topic::level_count(filter) <= cfg.max_topic_levels
}

fn max_qos(cfg: &MqttConfig) -> QoS {
    QoS::from_u8(cfg.max_qos).unwrap_or(QoS::ExactlyOnce)
}

fn will_delay(w: &Will) -> u32 {
    w.properties.will_delay_interval.unwrap_or(0)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a PUBLISH fits the client's Maximum Packet Size (MQTT-3.1.2-25: larger ones
/// are dropped as if delivered).
fn fits(s: &Session, p: &Publish) -> bool {
    if s.params.max_packet_size == u32::MAX {
        return true;
    }
    // Cheap bound first: topic + payload + generous header/property allowance.
    let rough = p.topic.len() + p.payload.len() + 16;
    if rough + 256 < s.params.max_packet_size as usize && p.properties.user_properties.is_empty() {
        return true;
    }
    let len = crate::protocol::encoded_len(&Packet::Publish(p.clone()), s.params.protocol);
    len <= s.params.max_packet_size as usize
}

fn note_drop(s: &mut Session, stats: &mut RouterStats, policy: &'static str) {
    s.dropped += 1;
    stats.dropped_queue_full += 1;
    if !s.drop_episode {
        s.drop_episode = true;
        warn!(client_id = %s.client_id, policy, queued = s.queue_len, "client queue full: dropping messages (logged once until the queue drains)");
    }
}
