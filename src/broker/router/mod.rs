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

mod persist;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::connection::{ConnId, ConnLink, Outgoing};
use super::retained::RetainedStore;
use super::session::{
    ClientParams, Held, Inflight, InflightState, Message, QueueLimits, Queued, Session,
};
use super::topic_tree::{Match, SessionId, SubscriptionData, SubscriptionTree};
use crate::config::{MqttConfig, QueuePolicy};
use crate::protocol::reason;
use crate::protocol::topic;
use crate::protocol::{
    AckProperties, ConnAck, Packet, PubAckLike, Publish, QoS, SubAck, Subscribe, UnsubAck,
    Unsubscribe, Will,
};
use crate::store::{unix_ms, Command, Op, QueueRow, Recovered, Store, StoreEvent};
use persist::*;

/// How many events the router takes from its channel per wake-up.
const BATCH: usize = 256;
/// Rows read back from disk at a time when a durable session's queue is spilled.
const READ_BATCH: u32 = 128;
/// Held output marked with this bit also waits for a subscriber's queue to shrink
/// (backpressure on QoS 1/2 publishers).
const GATE_BIT: u64 = 1 << 63;
/// A clean, online subscriber queue this long gates its publishers' acknowledgements...
const GATE_HIGH: u64 = 256;
/// ...until it is down to this length.
const GATE_LOW: u64 = 64;

/// An internal durable session the router keeps from start-up (a bridge's outbox).
pub struct InternalSession {
    pub client_id: Arc<str>,
    /// Exactly these subscriptions (others left from an earlier configuration are removed).
    pub filters: Vec<crate::protocol::SubscribeFilter>,
    pub limits: QueueLimits,
}

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
    Connect(Box<ConnectRequest>),
    Publish {
        conn: ConnId,
        publish: Publish,
        received: Instant,
    },
    PubAck {
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
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
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
    pub dropped_too_large: u64,
    pub dropped_disk_budget: u64,
    pub refused_store_failure: u64,
    pub expired: u64,
    pub sessions_expired: u64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    session: SessionId,
    generation: u64,
    kind: TimerKind,
}

/// What waits for one store token.
#[derive(Default)]
struct Pending {
    /// Sessions with held output carrying this token.
    sids: Vec<SessionId>,
    /// Messages queued (not in flight) under this token: undone if the commit fails.
    /// (session, seq, payload bytes).
    enqueued: Vec<(SessionId, u64, u64)>,
}

pub struct Router {
    cfg: Arc<MqttConfig>,
    rx: mpsc::Receiver<RouterEvent>,
    store: Option<Store>,
    store_rx: mpsc::UnboundedReceiver<StoreEvent>,
    sweep_every: Duration,
    sessions: HashMap<SessionId, Session>,
    by_client: HashMap<Arc<str>, SessionId>,
    by_conn: HashMap<ConnId, SessionId>,
    tree: SubscriptionTree,
    retained: RetainedStore<Retained>,
    timers: BinaryHeap<Reverse<Timer>>,
    next_session: SessionId,
    /// Scratch buffer for subscription matches, reused across publishes.
    matches: Vec<Match>,
    /// Store ops collected for the token `next_token`, not yet submitted.
    ops: Vec<Op>,
    /// `ops.len()` when the current event started: output of this event is held only if
    /// the event itself added ops.
    event_ops_start: usize,
    next_token: u64,
    cur: Pending,
    pending: HashMap<u64, Pending>,
    /// Highest token the store has reported (tokens complete in order).
    completed: u64,
    /// Tokens whose commit failed (rare; consulted when gated output is released later).
    failed: std::collections::HashSet<u64>,
    /// Set by `route` when the publisher's acknowledgement must wait for a slow queue.
    route_gated: bool,
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
        internal: Vec<InternalSession>,
    ) -> Self {
        let mut r = Router {
            cfg,
            rx,
            store: Some(store),
            store_rx,
            sweep_every,
            sessions: HashMap::new(),
            by_client: HashMap::new(),
            by_conn: HashMap::new(),
            tree: SubscriptionTree::new(),
            retained: RetainedStore::new(),
            timers: BinaryHeap::new(),
            next_session: 1,
            matches: Vec::new(),
            ops: Vec::new(),
            event_ops_start: 0,
            next_token: 1,
            cur: Pending::default(),
            pending: HashMap::new(),
            completed: 0,
            failed: std::collections::HashSet::new(),
            route_gated: false,
            stats: RouterStats::default(),
        };
        r.recover(recovered);
        for i in internal {
            r.ensure_internal(i);
        }
        r.submit();
        r
    }

    /// Creates (or updates) an internal durable session, such as a bridge's outbox, with
    /// exactly the given subscriptions. It exists from start-up, so messages are kept
    /// whether or not its owner is attached.
    fn ensure_internal(&mut self, internal: InternalSession) {
        let InternalSession {
            client_id,
            filters,
            limits,
        } = internal;
        let params = ClientParams {
            protocol: crate::protocol::ProtocolVersion::V311,
            window: self.cfg.max_inflight,
            max_packet_size: u32::MAX,
            compact_packet_ids: true,
        };
        let sid = match self.by_client.get(&client_id) {
            Some(&sid) => sid,
            None => {
                let sid = self.next_session;
                self.next_session += 1;
                let mut s = Session::new(sid, client_id.clone(), params, true);
                s.expiry_interval = u32::MAX;
                s.offline_since_ms = unix_ms();
                self.ops.push(Op::UpsertSession {
                    sid,
                    client_id: client_id.clone(),
                    protocol: 4,
                    expiry: u32::MAX,
                    will: None,
                });
                self.ops.push(Op::SessionOffline {
                    sid,
                    at_ms: s.offline_since_ms,
                    expiry: u32::MAX,
                    will: None,
                });
                self.sessions.insert(sid, s);
                self.by_client.insert(client_id.clone(), sid);
                sid
            }
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.params = params;
        s.limits = Some(limits);
        s.internal = true;
        let wanted: HashMap<String, SubscriptionData> = filters
            .into_iter()
            .map(|f| {
                (
                    f.filter,
                    SubscriptionData {
                        options: f.options,
                        identifier: None,
                    },
                )
            })
            .collect();
        let stale: Vec<String> = s
            .subscriptions
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for full in stale {
            s.subscriptions.remove(&full);
            let (filter, group) = super::session::split_share(&full);
            self.tree.unsubscribe(&filter, group.as_deref(), sid);
            self.ops.push(Op::Unsubscribe { sid, filter: full });
        }
        for (full, data) in wanted {
            if s.subscriptions.get(&full) == Some(&data) {
                continue;
            }
            let (filter, group) = super::session::split_share(&full);
            self.tree
                .subscribe(&filter, group.as_deref(), sid, data.clone());
            self.ops.push(Op::Subscribe {
                sid,
                filter: full.clone(),
                options: options_to_byte(&data.options),
                identifier: None,
            });
            s.subscriptions.insert(full, data);
        }
        info!(client_id = %client_id, subscriptions = s.subscriptions.len(), queued = s.queue_len, "internal session ready");
    }

    /// Rebuilds sessions, subscriptions, in-flight state and retained messages from the
    /// store. Queued messages stay on disk; they are read back when their client returns.
    fn recover(&mut self, rec: Recovered) {
        let now = Instant::now();
        let now_ms = unix_ms();
        for (topic, expires, packet) in rec.retained {
            if let Some(p) = decode_publish(&packet) {
                self.retained.set(
                    &topic,
                    Some(Retained {
                        publish: p,
                        expires_at: unix_to_instant(expires),
                    }),
                );
            }
        }
        let mut queued_total = 0;
        let count = rec.sessions.len();
        for rs in rec.sessions {
            let sid = rs.sid;
            self.next_session = self.next_session.max(sid + 1);
            let params = ClientParams {
                protocol: protocol_from_level(rs.protocol),
                window: self.cfg.max_inflight,
                max_packet_size: u32::MAX,
                compact_packet_ids: false,
            };
            let client_id: Arc<str> = rs.client_id.as_str().into();
            let mut s = Session::new(sid, client_id.clone(), params, true);
            s.expiry_interval = rs.expiry;
            s.offline_since_ms = rs.disconnected_at.unwrap_or(now_ms);
            s.next_seq = rs.next_seq;
            s.dropped = rs.dropped;
            for sub in rs.subscriptions {
                let data = SubscriptionData {
                    options: options_from_byte(sub.options),
                    identifier: sub.identifier,
                };
                let (filter, group) = super::session::split_share(&sub.filter);
                self.tree
                    .subscribe(&filter, group.as_deref(), sid, data.clone());
                s.subscriptions.insert(sub.filter, data);
            }
            s.incoming_qos2 = rs.incoming_qos2.into_iter().collect();
            let mut last_inflight_seq = None;
            for row in rs.inflight {
                let Some(message) = row_message(&row) else {
                    continue;
                };
                last_inflight_seq = Some(row.seq);
                s.inflight.push_back(Inflight {
                    packet_id: row.packet_id.unwrap_or(0),
                    seq: row.seq,
                    state: if row.state >= 2 {
                        InflightState::AwaitingComp
                    } else {
                        InflightState::AwaitingAck
                    },
                    message,
                });
            }
            let waiting = rs.queued.saturating_sub(s.inflight.len() as u64);
            s.queue_len = waiting;
            s.queued_bytes = rs.queued_bytes;
            queued_total += rs.queued;
            if waiting > 0 {
                s.spilled_from = Some(last_inflight_seq.map(|q| q + 1).unwrap_or(0));
            }
            s.will = rs.will.as_ref().and_then(will_from_stored);
            // Timers: wills of sessions that were connected when the broker stopped are
            // due now (plus their delay); expiry counts from the disconnect.
            let offline_for = Duration::from_millis((now_ms - s.offline_since_ms).max(0) as u64);
            if let Some(w) = &s.will {
                let delay = Duration::from_secs(u64::from(
                    w.properties
                        .will_delay_interval
                        .unwrap_or(0)
                        .min(s.expiry_interval),
                ));
                let at = if rs.disconnected_at.is_some() {
                    (now + delay).checked_sub(offline_for).unwrap_or(now)
                } else {
                    now + delay
                };
                self.timers.push(Reverse(Timer {
                    at,
                    session: sid,
                    generation: 0,
                    kind: TimerKind::WillDelay,
                }));
            }
            if s.expiry_interval != u32::MAX {
                let at = (now + Duration::from_secs(u64::from(s.expiry_interval)))
                    .checked_sub(offline_for)
                    .unwrap_or(now);
                self.timers.push(Reverse(Timer {
                    at,
                    session: sid,
                    generation: 0,
                    kind: TimerKind::SessionExpiry,
                }));
            }
            if rs.disconnected_at.is_none() {
                self.ops.push(Op::SessionOffline {
                    sid,
                    at_ms: now_ms,
                    expiry: s.expiry_interval,
                    will: rs.will.clone(),
                });
            }
            self.by_client.insert(client_id, sid);
            self.sessions.insert(sid, s);
        }
        if count > 0 {
            info!(
                sessions = count,
                queued = queued_total,
                retained = self.retained.len(),
                "durable state recovered"
            );
        }
        self.submit();
    }

    /// Runs until a `Shutdown` event is handled or every sender is gone.
    pub async fn run(mut self) {
        let mut events = Vec::with_capacity(BATCH);
        let mut sweep = tokio::time::interval(self.sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse(t)| t.at);
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
                        self.event_ops_start = self.ops.len();
                        self.handle(ev);
                    }
                    self.submit();
                }
                ev = self.store_rx.recv() => {
                    let Some(ev) = ev else {
                        error!("store writer stopped; stopping the router");
                        break;
                    };
                    self.event_ops_start = self.ops.len();
                    self.on_store_event(ev);
                    while let Ok(ev) = self.store_rx.try_recv() {
                        self.event_ops_start = self.ops.len();
                        self.on_store_event(ev);
                    }
                    self.submit();
                }
                _ = sleep_until_opt(next_timer) => {
                    self.event_ops_start = self.ops.len();
                    self.fire_timers();
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
            RouterEvent::Connect(req) => self.on_connect(*req),
            RouterEvent::Publish {
                conn,
                publish,
                received,
            } => self.on_publish(conn, publish, received),
            RouterEvent::PubAck { conn, packet_id } => {
                self.on_ack(conn, packet_id, InflightState::AwaitingAck)
            }
            RouterEvent::PubRec {
                conn,
                packet_id,
                reason,
            } => self.on_pubrec(conn, packet_id, reason),
            RouterEvent::PubRel { conn, packet_id } => self.on_pubrel(conn, packet_id),
            RouterEvent::PubComp { conn, packet_id } => {
                self.on_ack(conn, packet_id, InflightState::AwaitingComp)
            }
            RouterEvent::Subscribe { conn, subscribe } => self.on_subscribe(conn, subscribe),
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
                    .by_client
                    .get(client_id.as_str())
                    .and_then(|sid| self.sessions.get(sid))
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
        let Some(&sid) = self.by_client.get(client_id) else {
            return false;
        };
        let mut will = None;
        if let Some(s) = self.sessions.get_mut(&sid) {
            if let Some(c) = s.conn.take() {
                self.by_conn.remove(&c.id);
                c.send(Outgoing::Disconnect(reason::ADMINISTRATIVE_ACTION));
            }
            will = s.will.take();
        }
        if let Some(w) = will {
            self.publish_will(w);
        }
        warn!(client_id, "session dropped by an administrator");
        self.end_session(sid, "dropped by an administrator");
        true
    }

    // ----- store plumbing ----------------------------------------------------------------

    /// Sends the collected ops to the writer as one token.
    fn submit(&mut self) {
        if self.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.ops);
        let token = self.next_token;
        self.next_token += 1;
        self.event_ops_start = 0;
        self.pending.insert(token, std::mem::take(&mut self.cur));
        let sent = self
            .store
            .as_ref()
            .map(|s| s.send(Command::Batch { token, ops }).is_ok())
            .unwrap_or(false);
        if !sent {
            error!("store writer is gone: durable operations fail");
            self.on_committed(token, false);
        }
    }

    fn store_command(&mut self, cmd: Command) {
        // Commands must see every op collected so far.
        self.submit();
        if let Some(s) = &self.store {
            if s.send(cmd).is_err() {
                error!("store writer is gone");
            }
        }
    }

    fn on_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Committed { token, ok } => self.on_committed(token, ok),
            StoreEvent::QueueRows {
                sid,
                rows,
                from_seq,
                limit,
                next_seq_at_request,
            } => self.on_queue_rows(sid, rows, from_seq, limit, next_seq_at_request),
            StoreEvent::Removed { rows, why } => {
                for (sid, seq, size) in rows {
                    if why == "disk budget" {
                        self.stats.dropped_disk_budget += 1;
                    } else {
                        self.stats.expired += 1;
                    }
                    let Some(s) = self.sessions.get_mut(&sid) else {
                        continue;
                    };
                    if let Some(i) = s.queue.iter().position(|q| q.seq == seq) {
                        s.queue.remove(i);
                    }
                    s.forget_queued(u64::from(size));
                    if why == "disk budget" {
                        s.dropped += 1;
                    }
                }
            }
        }
    }

    fn on_committed(&mut self, token: u64, ok: bool) {
        self.completed = self.completed.max(token);
        if !ok {
            self.failed.insert(token);
        }
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        if !ok {
            self.stats.refused_store_failure += 1;
            for (sid, seq, size) in p.enqueued {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if let Some(i) = s.queue.iter().position(|q| q.seq == seq) {
                        if let Some(q) = s.queue.remove(i) {
                            s.forget_queued(q.message.publish.payload.len() as u64);
                        }
                    } else if s.spilled_from.is_some() {
                        s.forget_queued(size);
                    }
                }
            }
        }
        let mut sids = p.sids;
        sids.sort_unstable();
        sids.dedup();
        for sid in sids {
            if let Some(s) = self.sessions.get_mut(&sid) {
                flush_held(s, self.completed, &self.failed, &mut self.stats);
            }
        }
    }

    /// Releases the acknowledgements of publishers that waited for `sid`'s queue.
    fn ungate_waiters(&mut self, sid: SessionId) {
        let waiters = match self.sessions.get_mut(&sid) {
            Some(s) if !s.gated.is_empty() => std::mem::take(&mut s.gated),
            _ => return,
        };
        for p in waiters {
            if let Some(s) = self.sessions.get_mut(&p) {
                for (t, _) in s.held.iter_mut() {
                    *t &= !GATE_BIT;
                }
                flush_held(s, self.completed, &self.failed, &mut self.stats);
            }
        }
    }

    fn on_queue_rows(
        &mut self,
        sid: SessionId,
        rows: Vec<QueueRow>,
        from_seq: u64,
        limit: u32,
        next_seq_at_request: u64,
    ) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        debug!(client_id = %s.client_id, rows = rows.len(), from_seq, "queue read back from disk");
        s.reading = false;
        if !s.is_online() {
            return; // read again when the client is back
        }
        let now = Instant::now();
        let full = rows.len() as u32 >= limit;
        let mut last = None;
        for row in rows {
            last = Some(row.seq);
            match row_message(&row) {
                Some(m) if !m.is_expired(now) => s.queue.push_back(Queued {
                    seq: row.seq,
                    message: m,
                }),
                _ => {
                    self.stats.expired += 1;
                    s.forget_queued(row.packet.len() as u64);
                    self.ops.push(Op::Delete { sid, seq: row.seq });
                }
            }
        }
        s.spilled_from = if !full && s.next_seq == next_seq_at_request {
            None
        } else {
            Some(last.map(|l| l + 1).unwrap_or(from_seq).max(from_seq))
        };
        self.pump(sid);
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let before = self.retained.len();
        self.retained
            .retain(|_, r| r.expires_at.is_none_or(|t| t > now));
        self.stats.expired += (before - self.retained.len()) as u64;
        self.store_command(Command::SweepExpired { now_ms: unix_ms() });
    }

    // ----- connect / disconnect / expiry -------------------------------------------------

    fn on_connect(&mut self, req: ConnectRequest) {
        let ConnectRequest {
            link,
            client_id,
            clean_start,
            expiry_interval,
            will,
            params,
            mut connack,
        } = req;
        let mut wills = Vec::new();
        let mut resumed = false;
        if let Some(&sid) = self.by_client.get(&client_id) {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.generation += 1;
                s.held.clear();
                if let Some(old) = s.conn.take() {
                    // Session takeover (MQTT-3.1.4-3): close the old connection.
                    info!(client_id = %client_id, "session taken over by a new connection");
                    self.by_conn.remove(&old.id);
                    old.send(Outgoing::Disconnect(reason::SESSION_TAKEN_OVER));
                    if let Some(w) = s.will.take() {
                        // The old connection did not DISCONNECT normally. Its will is
                        // delayed only if the session continues and a delay was asked for.
                        if clean_start || will_delay(&w) == 0 {
                            wills.push(w);
                        }
                    }
                } else if let Some(w) = s.will.take() {
                    // A delayed will is cancelled by reconnecting, unless the session ends.
                    if clean_start {
                        wills.push(w);
                    }
                }
                resumed = !clean_start;
            }
            if !resumed {
                self.end_session(sid, "clean start");
            }
        }
        for w in wills {
            self.publish_will(w);
        }

        let sid = match self.by_client.get(&client_id) {
            Some(&sid) if resumed => sid,
            _ => {
                let sid = self.next_session;
                self.next_session += 1;
                let durable = expiry_interval > 0;
                self.sessions
                    .insert(sid, Session::new(sid, client_id.clone(), params, durable));
                self.by_client.insert(client_id.clone(), sid);
                sid
            }
        };
        self.by_conn.insert(link.id, sid);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.params = params;
        s.expiry_interval = expiry_interval;
        s.will = will;
        s.conn = Some(link);
        // A session kept in memory only, resumed with a Session Expiry Interval, is durable
        // from now on: write what it holds, or what it acknowledges would die with the process.
        let promote = !s.durable && expiry_interval > 0;
        s.durable |= promote;
        if s.durable {
            self.ops.push(Op::UpsertSession {
                sid,
                client_id: s.client_id.clone(),
                protocol: params.protocol.level(),
                expiry: expiry_interval,
                will: s.will.as_ref().map(will_to_stored),
            });
        }
        if promote {
            session_state_ops(s, &mut self.ops);
        }
        connack.session_present = resumed;
        let token = event_token(self.ops.len(), self.event_ops_start, self.next_token);
        hold(
            s,
            token,
            Held::Packet(Packet::ConnAck(connack)),
            &mut self.cur,
            &mut self.stats,
        );
        debug!(client_id = %s.client_id, resumed, durable = s.durable, "session attached");

        if resumed {
            // Resend what was in flight, in order, DUP set (MQTT-4.4.0-1).
            let now = Instant::now();
            let mut i = 0;
            while i < s.inflight.len() {
                let m = &s.inflight[i];
                let item = match m.state {
                    InflightState::AwaitingAck => {
                        if m.message.is_expired(now) {
                            self.stats.expired += 1;
                            if s.durable {
                                self.ops.push(Op::Delete { sid, seq: m.seq });
                            }
                            s.inflight.remove(i);
                            continue;
                        }
                        Held::Deliver {
                            packet_id: m.packet_id,
                            dup: true,
                            fresh: false,
                        }
                    }
                    InflightState::AwaitingComp => {
                        Held::Packet(Packet::PubRel(PubAckLike::new(m.packet_id)))
                    }
                };
                hold(s, 0, item, &mut self.cur, &mut self.stats);
                i += 1;
            }
            self.pump(sid);
        }
    }

    fn on_disconnected(&mut self, conn: ConnId, will: WillAction, session_expiry: Option<u32>) {
        let Some(sid) = self.by_conn.remove(&conn) else {
            return; // already taken over
        };
        self.ungate_waiters(sid);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.conn = None;
        s.held.clear();
        s.generation += 1;
        if let Some(e) = session_expiry {
            s.expiry_interval = e.min(self.cfg.max_session_expiry_secs);
        }
        let will = match will {
            WillAction::Publish => s.will.take(),
            WillAction::Discard => {
                s.will = None;
                None
            }
        };
        debug!(client_id = %s.client_id, will = will.is_some(), "client disconnected");
        let now = Instant::now();
        if s.expiry_interval == 0 {
            if let Some(w) = will {
                self.publish_will(w);
            }
            self.end_session(sid, "session expiry interval 0");
            return;
        }
        let generation = s.generation;
        let mut publish_now = None;
        if let Some(w) = will {
            let delay = will_delay(&w).min(s.expiry_interval);
            if delay == 0 {
                publish_now = Some(w);
            } else {
                s.will = Some(w);
                self.timers.push(Reverse(Timer {
                    at: now + Duration::from_secs(u64::from(delay)),
                    session: sid,
                    generation,
                    kind: TimerKind::WillDelay,
                }));
            }
        }
        if s.expiry_interval != u32::MAX {
            self.timers.push(Reverse(Timer {
                at: now + Duration::from_secs(u64::from(s.expiry_interval)),
                session: sid,
                generation,
                kind: TimerKind::SessionExpiry,
            }));
        }
        if s.durable {
            s.spill_all();
            s.offline_since_ms = unix_ms();
            self.ops.push(Op::SessionOffline {
                sid,
                at_ms: s.offline_since_ms,
                expiry: s.expiry_interval,
                will: s.will.as_ref().map(will_to_stored),
            });
        }
        if let Some(w) = publish_now {
            self.publish_will(w);
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&t.session) else {
                continue;
            };
            if s.generation != t.generation || s.is_online() {
                continue;
            }
            match t.kind {
                TimerKind::WillDelay => {
                    if let Some(w) = s.will.take() {
                        if s.durable {
                            self.ops.push(Op::SessionOffline {
                                sid: t.session,
                                at_ms: s.offline_since_ms,
                                expiry: s.expiry_interval,
                                will: None,
                            });
                        }
                        self.publish_will(w);
                    }
                }
                TimerKind::SessionExpiry => {
                    if let Some(w) = s.will.take() {
                        self.publish_will(w);
                    }
                    self.stats.sessions_expired += 1;
                    self.ops.push(Op::Count {
                        name: "sessions_expired",
                        add: 1,
                    });
                    self.end_session(t.session, "session expired");
                }
            }
        }
    }

    /// Removes a session and everything it holds. Queued messages go with it (counted).
    fn end_session(&mut self, sid: SessionId, why: &str) {
        self.ungate_waiters(sid);
        let Some(s) = self.sessions.remove(&sid) else {
            return;
        };
        if self.by_client.get(&s.client_id) == Some(&sid) {
            self.by_client.remove(&s.client_id);
        }
        let keys = s.tree_keys();
        self.tree
            .unsubscribe_all(sid, keys.iter().map(|(f, g)| (f.as_str(), g.as_deref())));
        if s.durable {
            self.ops.push(Op::DeleteSession { sid });
        }
        let lost = s.queue_len + s.inflight.len() as u64;
        if lost > 0 {
            info!(client_id = %s.client_id, messages = lost, why, "session ended with undelivered messages");
        } else {
            debug!(client_id = %s.client_id, why, "session ended");
        }
    }

    async fn shutdown(&mut self) {
        // Connections are closed by the server, so their wills are due (MQTT-3.1.2-8),
        // unless a Will Delay outlasts this restart (durable sessions keep it on disk).
        // Sessions that are not durable end now, and so do their delayed wills.
        let mut wills = Vec::new();
        let now_ms = unix_ms();
        for s in self.sessions.values_mut() {
            let online = s.conn.is_some();
            if s.durable {
                if online {
                    let keep = s.will.as_ref().is_some_and(|w| will_delay(w) > 0);
                    if !keep {
                        wills.extend(s.will.take());
                    }
                    self.ops.push(Op::SessionOffline {
                        sid: s.id,
                        at_ms: now_ms,
                        expiry: s.expiry_interval,
                        will: s.will.as_ref().map(will_to_stored),
                    });
                }
            } else {
                wills.extend(s.will.take());
            }
        }
        for w in wills {
            self.publish_will(w);
        }
        for s in self.sessions.values_mut() {
            s.held.clear();
            if let Some(c) = s.conn.take() {
                c.send(Outgoing::Disconnect(reason::SERVER_SHUTTING_DOWN));
            }
        }
        self.close_store().await;
        info!(stats = ?self.stats, "router stopped");
    }

    // ----- publish -----------------------------------------------------------------------

    fn on_publish(&mut self, conn: ConnId, publish: Publish, received: Instant) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        self.stats.publishes_in += 1;
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        if qos == QoS::ExactlyOnce {
            if let Some(s) = self.sessions.get_mut(&sid) {
                if s.incoming_qos2.contains(&packet_id) {
                    // A resend of a message we already have: acknowledge, don't route again.
                    let item = Held::PubAck {
                        packet_id,
                        qos2: true,
                        code: reason::SUCCESS,
                    };
                    hold(s, 0, item, &mut self.cur, &mut self.stats);
                    return;
                }
            }
        }
        let expires_at = publish
            .properties
            .message_expiry_interval
            .map(|secs| received + Duration::from_secs(u64::from(secs)));
        self.route_gated = false;
        let outcome = self.route(Some(sid), publish, expires_at);
        let gated = std::mem::take(&mut self.route_gated);
        let code = match outcome {
            RouteOutcome::Delivered => reason::SUCCESS,
            RouteOutcome::NoSubscribers => reason::NO_MATCHING_SUBSCRIBERS,
            RouteOutcome::QuotaExceeded => reason::QUOTA_EXCEEDED,
        };
        if qos == QoS::AtMostOnce {
            return;
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if code == reason::QUOTA_EXCEEDED && !s.params.protocol.is_v5() {
            // 3.x has no way to say "quota exceeded": leave the message unacknowledged so
            // the client keeps it and retries later (the refusal was logged by the queue).
            return;
        }
        if qos == QoS::ExactlyOnce && code < 0x80 {
            s.incoming_qos2.insert(packet_id);
            if s.durable {
                self.ops.push(Op::IncomingQos2 {
                    sid,
                    packet_id,
                    present: true,
                });
            }
        }
        let mut token = event_token(self.ops.len(), self.event_ops_start, self.next_token);
        if gated {
            token |= GATE_BIT;
        }
        let item = Held::PubAck {
            packet_id,
            qos2: qos == QoS::ExactlyOnce,
            code,
        };
        hold(s, token, item, &mut self.cur, &mut self.stats);
    }

    fn on_pubrel(&mut self, conn: ConnId, packet_id: u16) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let code = if s.incoming_qos2.remove(&packet_id) {
            if s.durable {
                self.ops.push(Op::IncomingQos2 {
                    sid,
                    packet_id,
                    present: false,
                });
            }
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        let token = event_token(self.ops.len(), self.event_ops_start, self.next_token);
        let comp = Packet::PubComp(PubAckLike::with_reason(packet_id, code));
        hold(s, token, Held::Packet(comp), &mut self.cur, &mut self.stats);
    }

    /// PUBACK (expecting `AwaitingAck`) or PUBCOMP (expecting `AwaitingComp`).
    fn on_ack(&mut self, conn: ConnId, packet_id: u16, expect: InflightState) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if let Some(i) = s.inflight_position(packet_id) {
            if s.inflight[i].state == expect {
                if let Some(m) = s.inflight.remove(i) {
                    if s.durable {
                        self.ops.push(Op::Delete { sid, seq: m.seq });
                    }
                }
                self.pump(sid);
            }
        }
    }

    fn on_pubrec(&mut self, conn: ConnId, packet_id: u16, code: u8) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        match s.inflight_position(packet_id) {
            Some(i) if code >= 0x80 => {
                // The receiver refused the message: it is done (MQTT-4.3.3).
                if let Some(m) = s.inflight.remove(i) {
                    if s.durable {
                        self.ops.push(Op::Delete { sid, seq: m.seq });
                    }
                }
                self.pump(sid);
            }
            Some(i) => {
                s.inflight[i].state = InflightState::AwaitingComp;
                if s.durable {
                    let seq = s.inflight[i].seq;
                    self.ops.push(Op::MarkReleased { sid, seq });
                }
                let token = event_token(self.ops.len(), self.event_ops_start, self.next_token);
                let rel = Packet::PubRel(PubAckLike::new(packet_id));
                hold(s, token, Held::Packet(rel), &mut self.cur, &mut self.stats);
            }
            None => {
                let rel = Packet::PubRel(PubAckLike::with_reason(
                    packet_id,
                    reason::PACKET_IDENTIFIER_NOT_FOUND,
                ));
                hold(s, 0, Held::Packet(rel), &mut self.cur, &mut self.stats);
            }
        }
    }

    fn publish_will(&mut self, w: Will) {
        let expires_at = w
            .properties
            .message_expiry_interval
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
        debug!(topic = %w.topic, "publishing will");
        self.route(None, will_publish(&w), expires_at);
    }

    /// Stores a retained message if asked, then hands a copy to every matching session.
    fn route(
        &mut self,
        publisher: Option<SessionId>,
        mut publish: Publish,
        expires_at: Option<Instant>,
    ) -> RouteOutcome {
        publish.dup = false;
        publish.packet_id = 0;
        publish.properties.topic_alias = None;
        publish.properties.subscription_identifiers.clear();
        if publish.retain {
            let value = (!publish.payload.is_empty()).then(|| Retained {
                publish: publish.clone(),
                expires_at,
            });
            self.ops.push(Op::Retain {
                topic: publish.topic.clone(),
                message: value
                    .as_ref()
                    .map(|r| (instant_to_unix(r.expires_at), encode_publish(&r.publish))),
            });
            // Visible at once; the publisher's ack still waits for the commit.
            self.retained.set(&publish.topic, value);
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        {
            let sessions = &self.sessions;
            self.tree.matches(
                &publish.topic,
                publisher,
                |sid| sessions.get(&sid).is_some_and(|s| s.is_online()),
                &mut matches,
            );
        }
        let mut outcome = if matches.is_empty() {
            RouteOutcome::NoSubscribers
        } else {
            RouteOutcome::Delivered
        };
        for m in matches.drain(..) {
            let mut p = publish.clone();
            p.qos = p.qos.min(m.qos);
            p.retain = publish.retain && m.retain_as_published;
            p.properties.subscription_identifiers = m.identifiers;
            let msg = Message {
                publish: p,
                expires_at,
            };
            let target = m.session;
            if !self.deliver(target, msg) {
                outcome = RouteOutcome::QuotaExceeded;
            }
            // Backpressure: a clean online subscriber falling behind a QoS 1/2 publisher
            // holds the publisher's acknowledgements until it catches up.
            if let (Some(p), true) = (publisher, publish.qos != QoS::AtMostOnce) {
                if let Some(t) = self.sessions.get_mut(&target) {
                    if p != target && !t.durable && t.is_online() && t.queue_len >= GATE_HIGH {
                        if !t.gated.contains(&p) {
                            t.gated.push(p);
                        }
                        self.route_gated = true;
                    }
                }
            }
        }
        self.matches = matches;
        outcome
    }

    /// Hands one message to a session: sent now if the client is online and its window is
    /// open, otherwise queued (in memory, or on disk for durable sessions), subject to the
    /// queue limits. Returns false if the `reject-new` policy refused it.
    fn deliver(&mut self, sid: SessionId, msg: Message) -> bool {
        let Router {
            sessions,
            cfg,
            stats,
            ops,
            cur,
            next_token,
            ..
        } = self;
        let Some(s) = sessions.get_mut(&sid) else {
            return true;
        };
        let mut msg = msg;
        if let Some(age) = s.limits.map(|l| l.max_age_secs).filter(|a| *a > 0) {
            let cap = Instant::now() + Duration::from_secs(u64::from(age));
            msg.expires_at = Some(msg.expires_at.map_or(cap, |t| t.min(cap)));
        }
        if !fits(s, &msg.publish) {
            stats.dropped_too_large += 1;
            debug!(client_id = %s.client_id, "message larger than the client's maximum packet size dropped");
            return true;
        }
        let now = Instant::now();
        if msg.publish.qos == QoS::AtMostOnce {
            if let Some(c) = &s.conn {
                let limit = cfg.max_queued_messages.max(1000);
                if c.backlog() >= limit {
                    stats.dropped_qos0_backlog += 1;
                    return true;
                }
                let p = msg.to_send(0, false, now);
                hold(s, 0, Held::Packet(Packet::Publish(p)), cur, stats);
                return true;
            }
            if !(cfg.queue_qos0_offline && s.expiry_interval > 0) {
                return true;
            }
        } else if s.window_open() && s.queue_empty() {
            let packet_id = s.allocate_packet_id();
            let seq = s.take_seq();
            let mut token = 0;
            if s.durable {
                ops.push(Op::Enqueue {
                    sid,
                    seq,
                    packet_id: Some(packet_id),
                    expires_at: instant_to_unix(msg.expires_at),
                    size: msg.publish.payload.len() as u32,
                    packet: encode_publish(&msg.publish),
                });
                // An internal session's QoS 1 delivery does not wait for the commit
                // (see `Session::internal`).
                if !(s.internal && msg.publish.qos == QoS::AtLeastOnce) {
                    token = *next_token;
                }
            }
            s.inflight.push_back(Inflight {
                packet_id,
                seq,
                state: InflightState::AwaitingAck,
                message: msg,
            });
            let item = Held::Deliver {
                packet_id,
                dup: false,
                fresh: token != 0,
            };
            hold(s, token, item, cur, stats);
            return true;
        }
        // Queue it, making room first if the queue is full.
        let len = msg.publish.payload.len() as u64;
        let limits = s.limits.unwrap_or(QueueLimits {
            max_messages: cfg.max_queued_messages as u64,
            max_bytes: cfg.max_queued_bytes,
            policy: cfg.queue_policy,
            max_age_secs: 0,
        });
        let full = |s: &Session| {
            (limits.max_messages > 0 && s.queue_len >= limits.max_messages)
                || (limits.max_bytes > 0 && s.queued_bytes + len > limits.max_bytes)
        };
        if full(s) {
            match limits.policy {
                QueuePolicy::RejectNew => {
                    note_drop(s, stats, "reject-new");
                    return false;
                }
                QueuePolicy::DropOldest => {
                    while full(s) && s.queue_len > 0 {
                        if let Some(q) = s.pop_queue() {
                            if s.durable {
                                ops.push(Op::Delete { sid, seq: q.seq });
                            }
                        } else {
                            // The oldest is on disk only; its exact size is known to the
                            // store, the router accounts the average queued size.
                            ops.push(Op::DeleteOldest { sid, count: 1 });
                            let average = s.queued_bytes / s.queue_len.max(1);
                            s.forget_queued(average);
                        }
                        note_drop(s, stats, "drop-oldest");
                    }
                    if full(s) {
                        // A single message larger than the byte budget.
                        note_drop(s, stats, "drop-oldest");
                        return true;
                    }
                }
            }
        }
        let seq = s.take_seq();
        if s.durable {
            ops.push(Op::Enqueue {
                sid,
                seq,
                packet_id: None,
                expires_at: instant_to_unix(msg.expires_at),
                size: len as u32,
                packet: encode_publish(&msg.publish),
            });
            cur.enqueued.push((sid, seq, len));
        }
        s.push_queue(Queued { seq, message: msg });
        true
    }

    /// Moves queued messages into the in-flight window while it has room, reading the
    /// queue back from disk when the in-memory part runs out.
    fn pump(&mut self, sid: SessionId) {
        let mut read_from = None;
        {
            let Router {
                sessions,
                stats,
                ops,
                cur,
                next_token,
                ..
            } = self;
            let Some(s) = sessions.get_mut(&sid) else {
                return;
            };
            let now = Instant::now();
            while s.window_open() {
                let Some(q) = s.pop_queue() else {
                    break;
                };
                let drop_row = q.message.is_expired(now) || !fits(s, &q.message.publish);
                if drop_row || q.message.publish.qos == QoS::AtMostOnce {
                    if s.durable {
                        ops.push(Op::Delete { sid, seq: q.seq });
                    }
                    if drop_row {
                        stats.expired += 1;
                    } else {
                        let p = q.message.to_send(0, false, now);
                        hold(s, 0, Held::Packet(Packet::Publish(p)), cur, stats);
                    }
                    continue;
                }
                let packet_id = s.allocate_packet_id();
                let mut token = 0;
                if s.durable {
                    ops.push(Op::MarkSent {
                        sid,
                        seq: q.seq,
                        packet_id,
                    });
                    if !(s.internal && q.message.publish.qos == QoS::AtLeastOnce) {
                        token = *next_token;
                    }
                }
                s.inflight.push_back(Inflight {
                    packet_id,
                    seq: q.seq,
                    state: InflightState::AwaitingAck,
                    message: q.message,
                });
                let item = Held::Deliver {
                    packet_id,
                    dup: false,
                    fresh: false,
                };
                hold(s, token, item, cur, stats);
            }
            // Read the on-disk part back before the in-memory part runs out, so delivery
            // does not stall on the read.
            if let (Some(from), false, true) = (s.spilled_from, s.reading, s.is_online()) {
                if s.queue.len() < READ_BATCH as usize {
                    if s.durable && s.queue_len > s.queue.len() as u64 {
                        s.reading = true;
                        read_from = Some((from, s.next_seq));
                    } else if s.queue.is_empty() {
                        s.spilled_from = None;
                    }
                }
            }
            if s.queue_len == 0 && s.drop_episode {
                s.drop_episode = false;
                info!(client_id = %s.client_id, dropped_total = s.dropped, "client queue drained");
            }
        }
        if self
            .sessions
            .get(&sid)
            .is_some_and(|s| !s.gated.is_empty() && s.queue_len <= GATE_LOW)
        {
            self.ungate_waiters(sid);
        }
        if let Some((from_seq, next_seq_at_request)) = read_from {
            debug!(sid, from_seq, "reading queue back from disk");
            self.store_command(Command::ReadQueue {
                sid,
                from_seq,
                limit: READ_BATCH,
                next_seq_at_request,
            });
        }
    }

    // ----- subscribe ---------------------------------------------------------------------

    fn on_subscribe(&mut self, conn: ConnId, sub: Subscribe) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        let cfg = self.cfg.clone();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut codes = Vec::with_capacity(sub.filters.len());
        // (filter, granted QoS, subscription identifier) whose retained messages to send.
        let mut want_retained: Vec<(String, QoS, Option<u32>)> = Vec::new();
        for f in &sub.filters {
            let (inner, group) = match topic::parse_shared(&f.filter) {
                Ok(Some((g, inner))) => (inner, Some(g)),
                Ok(None) => (f.filter.as_str(), None),
                Err(_) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if !valid_filter(inner, &cfg) {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            let is_new = !s.subscriptions.contains_key(&f.filter);
            if is_new
                && cfg.max_subscriptions_per_client > 0
                && s.subscriptions.len() >= cfg.max_subscriptions_per_client
            {
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let granted = f.options.qos.min(max_qos(&cfg));
            let mut options = f.options;
            options.qos = granted;
            let data = SubscriptionData {
                options,
                identifier: sub.subscription_identifier,
            };
            let existed = self.tree.subscribe(inner, group, sid, data.clone());
            if s.durable {
                self.ops.push(Op::Subscribe {
                    sid,
                    filter: f.filter.clone(),
                    options: options_to_byte(&options),
                    identifier: sub.subscription_identifier,
                });
            }
            s.subscriptions.insert(f.filter.clone(), data);
            codes.push(granted as u8);
            // Retained messages are not sent for shared subscriptions (MQTT-4.8.2).
            let send_retained = match f.options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if group.is_none() && send_retained {
                want_retained.push((inner.to_string(), granted, sub.subscription_identifier));
            }
        }
        let token = event_token(self.ops.len(), self.event_ops_start, self.next_token);
        let ack = Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            properties: AckProperties::default(),
            reason_codes: codes,
        });
        hold(s, token, Held::Packet(ack), &mut self.cur, &mut self.stats);
        if want_retained.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut found = Vec::new();
        for (filter, granted, identifier) in want_retained {
            self.retained.for_each_match(&filter, |_, r| {
                if r.expires_at.is_some_and(|t| t <= now) {
                    return;
                }
                let mut p = r.publish.clone();
                p.qos = p.qos.min(granted);
                p.retain = true;
                p.properties.subscription_identifiers = identifier.into_iter().collect();
                found.push(Message {
                    publish: p,
                    expires_at: r.expires_at,
                });
            });
        }
        for msg in found {
            self.deliver(sid, msg);
        }
    }

    fn on_unsubscribe(&mut self, conn: ConnId, unsub: Unsubscribe) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut codes = Vec::with_capacity(unsub.filters.len());
        for full in &unsub.filters {
            let (inner, group) = match topic::parse_shared(full) {
                Ok(Some((g, inner))) => (inner, Some(g)),
                Ok(None) => (full.as_str(), None),
                Err(_) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if !valid_filter(inner, &self.cfg) {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if s.subscriptions.remove(full).is_some() {
                self.tree.unsubscribe(inner, group, sid);
                if s.durable {
                    self.ops.push(Op::Unsubscribe {
                        sid,
                        filter: full.clone(),
                    });
                }
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        let token = event_token(self.ops.len(), self.event_ops_start, self.next_token);
        let ack = Packet::UnsubAck(UnsubAck {
            packet_id: unsub.packet_id,
            properties: AckProperties::default(),
            reason_codes: codes,
        });
        hold(s, token, Held::Packet(ack), &mut self.cur, &mut self.stats);
    }
}

enum RouteOutcome {
    Delivered,
    NoSubscribers,
    QuotaExceeded,
}

fn row_message(row: &QueueRow) -> Option<Message> {
    let publish = decode_publish(&row.packet)?;
    Some(Message {
        publish,
        expires_at: unix_to_instant(row.expires_at),
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

/// The token output of the current event waits for: the pending one if this event added
/// store ops (`ops_len > event_start`), else none (0).
fn event_token(ops_len: usize, event_start: usize, next_token: u64) -> u64 {
    if ops_len > event_start {
        next_token
    } else {
        0
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

/// Queues output for the session's connection: sent at once if it waits for nothing and
/// nothing is held ahead of it, otherwise held until `token` commits.
fn hold(s: &mut Session, token: u64, item: Held, cur: &mut Pending, stats: &mut RouterStats) {
    if s.conn.is_none() {
        return; // in-flight state is resent on reconnect; acks die with the connection
    }
    if token == 0 && s.held.is_empty() {
        release(s, item, true, stats);
    } else {
        if token & !GATE_BIT != 0 {
            cur.sids.push(s.id);
        }
        s.held.push_back((token, item));
    }
}

/// Releases held output whose tokens are committed (up to `completed`) and not gated.
fn flush_held(
    s: &mut Session,
    completed: u64,
    failed: &std::collections::HashSet<u64>,
    stats: &mut RouterStats,
) {
    while let Some((t, _)) = s.held.front() {
        if *t & GATE_BIT != 0 || *t > completed {
            break;
        }
        let Some((t, item)) = s.held.pop_front() else {
            break;
        };
        release(s, item, t == 0 || !failed.contains(&t), stats);
    }
}

fn release(s: &mut Session, item: Held, ok: bool, stats: &mut RouterStats) {
    let Some(c) = &s.conn else {
        return;
    };
    match item {
        Held::Packet(p) => {
            if matches!(p, Packet::Publish(_)) {
                stats.publishes_out += 1;
            }
            c.send(Outgoing::Packet(Box::new(p)));
        }
        Held::Deliver {
            packet_id,
            dup,
            fresh,
        } => {
            let Some(i) = s.inflight_position(packet_id) else {
                return;
            };
            if !ok && fresh {
                // Its row was never committed: it was not accepted, so it is not sent.
                s.inflight.remove(i);
                return;
            }
            let p = s.inflight[i]
                .message
                .to_send(packet_id, dup, Instant::now());
            stats.publishes_out += 1;
            c.send(Outgoing::Packet(Box::new(Packet::Publish(p))));
        }
        Held::PubAck {
            packet_id,
            qos2,
            code,
        } => {
            let code = if ok {
                code
            } else {
                if qos2 {
                    s.incoming_qos2.remove(&packet_id);
                }
                if !s.params.protocol.is_v5() {
                    warn!(client_id = %s.client_id, packet_id, "store refused the message: not acknowledged (3.x has no reason codes)");
                    return;
                }
                reason::QUOTA_EXCEEDED
            };
            let ack = PubAckLike::with_reason(packet_id, code);
            c.send(Outgoing::Packet(Box::new(if qos2 {
                Packet::PubRec(ack)
            } else {
                Packet::PubAck(ack)
            })));
        }
    }
}

fn note_drop(s: &mut Session, stats: &mut RouterStats, policy: &'static str) {
    s.dropped += 1;
    stats.dropped_queue_full += 1;
    if !s.drop_episode {
        s.drop_episode = true;
        warn!(client_id = %s.client_id, policy, queued = s.queue_len, "client queue full: dropping messages (logged once until the queue drains)");
    }
}
