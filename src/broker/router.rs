//! The router: the one task that owns all sessions, the subscription tree and the retained
//! messages. Connections send it `RouterEvent`s over one bounded channel; it answers by
//! pushing packets onto each connection's outgoing channel. Because a single task sees every
//! event in order, per-session ordering, packet-id bookkeeping and session takeover need no
//! locks.
//!
//! Acknowledgement contract (today, without the store): a QoS 1 PUBACK / QoS 2 PUBREC is
//! pushed to the publisher's connection only after the message has been handed to every
//! matching session (sent, or queued in that session). The durable store (SQLite) slots in
//! at `Router::on_publish`: messages for durable targets are committed first and the ack is
//! pushed when the commit completes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::connection::{ConnId, ConnLink, Outgoing};
use super::retained::RetainedStore;
use super::session::{ClientParams, Inflight, InflightState, Message, Session};
use super::topic_tree::{Match, SessionId, SubscriptionData, SubscriptionTree};
use crate::config::{MqttConfig, QueuePolicy};
use crate::protocol::reason;
use crate::protocol::topic;
use crate::protocol::{
    AckProperties, ConnAck, Packet, PubAckLike, Publish, PublishProperties, QoS, SubAck, Subscribe,
    UnsubAck, Unsubscribe, Will,
};

/// How many events the router takes from its channel per wake-up.
const BATCH: usize = 256;

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
    /// Graceful shutdown: publish wills, tell every client, then answer.
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouterStats {
    pub publishes_in: u64,
    pub publishes_out: u64,
    pub dropped_queue_full: u64,
    pub dropped_qos0_backlog: u64,
    pub dropped_too_large: u64,
    pub expired: u64,
    pub sessions_expired: u64,
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

pub struct Router {
    cfg: Arc<MqttConfig>,
    rx: mpsc::Receiver<RouterEvent>,
    sessions: HashMap<SessionId, Session>,
    by_client: HashMap<Arc<str>, SessionId>,
    by_conn: HashMap<ConnId, SessionId>,
    tree: SubscriptionTree,
    retained: RetainedStore<Retained>,
    timers: BinaryHeap<Reverse<Timer>>,
    next_session: SessionId,
    /// Scratch buffer for subscription matches, reused across publishes.
    matches: Vec<Match>,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(cfg: Arc<MqttConfig>, rx: mpsc::Receiver<RouterEvent>) -> Self {
        Router {
            cfg,
            rx,
            sessions: HashMap::new(),
            by_client: HashMap::new(),
            by_conn: HashMap::new(),
            tree: SubscriptionTree::new(),
            retained: RetainedStore::new(),
            timers: BinaryHeap::new(),
            next_session: 1,
            matches: Vec::new(),
            stats: RouterStats::default(),
        }
    }

    /// Runs until a `Shutdown` event is handled or every sender is gone.
    pub async fn run(mut self) {
        let mut events = Vec::with_capacity(BATCH);
        loop {
            let next_timer = self.timers.peek().map(|Reverse(t)| t.at);
            tokio::select! {
                n = self.rx.recv_many(&mut events, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for ev in events.drain(..) {
                        if let RouterEvent::Shutdown { done } = ev {
                            self.shutdown();
                            let _ = done.send(());
                            return;
                        }
                        self.handle(ev);
                    }
                }
                _ = sleep_until_opt(next_timer) => self.fire_timers(),
            }
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
            RouterEvent::Shutdown { .. } => {}
        }
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

        let sid = if resumed {
            self.by_client[&client_id]
        } else {
            let sid = self.next_session;
            self.next_session += 1;
            self.sessions
                .insert(sid, Session::new(sid, client_id.clone(), params));
            self.by_client.insert(client_id.clone(), sid);
            sid
        };
        self.by_conn.insert(link.id, sid);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.params = params;
        s.expiry_interval = expiry_interval;
        s.will = will;
        connack.session_present = resumed;
        link.send(Outgoing::Packet(Packet::ConnAck(connack)));
        s.conn = Some(link);
        debug!(client_id = %s.client_id, resumed, "session attached");

        if resumed {
            // Resend what was in flight, in order, DUP set (MQTT-4.4.0-1).
            let now = Instant::now();
            let mut i = 0;
            while i < s.inflight.len() {
                let m = &s.inflight[i];
                match m.state {
                    InflightState::AwaitingAck => {
                        if m.message.is_expired(now) {
                            self.stats.expired += 1;
                            s.inflight.remove(i);
                            continue;
                        }
                        let p = m.message.to_send(m.packet_id, true, now);
                        send_publish_packet(s, p, &mut self.stats);
                    }
                    InflightState::AwaitingComp => {
                        let rel = Packet::PubRel(PubAckLike::new(m.packet_id));
                        if let Some(c) = &s.conn {
                            c.send(Outgoing::Packet(rel));
                        }
                    }
                }
                i += 1;
            }
            pump(s, &self.cfg, &mut self.stats);
        }
    }

    fn on_disconnected(&mut self, conn: ConnId, will: WillAction, session_expiry: Option<u32>) {
        let Some(sid) = self.by_conn.remove(&conn) else {
            return; // already taken over
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.conn = None;
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
        debug!(client_id = %s.client_id, ?will, "client disconnected");
        let now = Instant::now();
        if s.expiry_interval == 0 {
            if let Some(w) = will {
                self.publish_will(w);
            }
            self.end_session(sid, "session expiry interval 0");
            return;
        }
        let generation = s.generation;
        if let Some(w) = will {
            let delay = will_delay(&w).min(s.expiry_interval);
            if delay == 0 {
                self.publish_will(w);
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
        if let Some(s) = self.sessions.get(&sid) {
            if s.expiry_interval != u32::MAX {
                self.timers.push(Reverse(Timer {
                    at: now + Duration::from_secs(u64::from(s.expiry_interval)),
                    session: sid,
                    generation,
                    kind: TimerKind::SessionExpiry,
                }));
            }
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
                        self.publish_will(w);
                    }
                }
                TimerKind::SessionExpiry => {
                    if let Some(w) = s.will.take() {
                        self.publish_will(w);
                    }
                    self.stats.sessions_expired += 1;
                    self.end_session(t.session, "session expired");
                }
            }
        }
    }

    /// Removes a session and everything it holds. Queued messages go with it (counted).
    fn end_session(&mut self, sid: SessionId, why: &str) {
        let Some(s) = self.sessions.remove(&sid) else {
            return;
        };
        if self.by_client.get(&s.client_id) == Some(&sid) {
            self.by_client.remove(&s.client_id);
        }
        let keys = s.tree_keys();
        self.tree
            .unsubscribe_all(sid, keys.iter().map(|(f, g)| (f.as_str(), g.as_deref())));
        let lost = s.queue.len() + s.inflight.len();
        if lost > 0 {
            info!(client_id = %s.client_id, messages = lost, why, "session ended with undelivered messages");
        } else {
            debug!(client_id = %s.client_id, why, "session ended");
        }
    }

    fn shutdown(&mut self) {
        // Connections are closed by the server: their wills are published (MQTT-3.1.2-8),
        // and so are delayed wills, because every session ends with this process.
        let mut wills = Vec::new();
        for s in self.sessions.values_mut() {
            if let Some(w) = s.will.take() {
                wills.push(w);
            }
        }
        for w in wills {
            self.publish_will(w);
        }
        for s in self.sessions.values_mut() {
            if let Some(c) = s.conn.take() {
                c.send(Outgoing::Disconnect(reason::SERVER_SHUTTING_DOWN));
            }
        }
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
            if let Some(s) = self.sessions.get(&sid) {
                if s.incoming_qos2.contains(&packet_id) {
                    // A resend of a message we already have: acknowledge, don't route again.
                    send_to(s, Packet::PubRec(PubAckLike::new(packet_id)));
                    return;
                }
            }
        }
        let expires_at = publish
            .properties
            .message_expiry_interval
            .map(|secs| received + Duration::from_secs(u64::from(secs)));
        let outcome = self.route(Some(sid), publish, expires_at);
        let code = match outcome {
            RouteOutcome::Delivered => reason::SUCCESS,
            RouteOutcome::NoSubscribers => reason::NO_MATCHING_SUBSCRIBERS,
            RouteOutcome::QuotaExceeded => reason::QUOTA_EXCEEDED,
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if code == reason::QUOTA_EXCEEDED && !s.params.protocol.is_v5() {
            // 3.x has no way to say "quota exceeded": leave the message unacknowledged so
            // the client keeps it and retries later (the refusal was logged by the queue).
            return;
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                send_to(s, Packet::PubAck(PubAckLike::with_reason(packet_id, code)));
            }
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    s.incoming_qos2.insert(packet_id);
                }
                send_to(s, Packet::PubRec(PubAckLike::with_reason(packet_id, code)));
            }
        }
    }

    fn on_pubrel(&mut self, conn: ConnId, packet_id: u16) {
        let Some(s) = self.session_of(conn) else {
            return;
        };
        let code = if s.incoming_qos2.remove(&packet_id) {
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        send_to(s, Packet::PubComp(PubAckLike::with_reason(packet_id, code)));
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
                s.inflight.remove(i);
                pump(s, &self.cfg, &mut self.stats);
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
                s.inflight.remove(i);
                pump(s, &self.cfg, &mut self.stats);
            }
            Some(i) => {
                s.inflight[i].state = InflightState::AwaitingComp;
                send_to(s, Packet::PubRel(PubAckLike::new(packet_id)));
            }
            None => send_to(
                s,
                Packet::PubRel(PubAckLike::with_reason(
                    packet_id,
                    reason::PACKET_IDENTIFIER_NOT_FOUND,
                )),
            ),
        }
    }

    fn publish_will(&mut self, w: Will) {
        let props = &w.properties;
        let publish = Publish {
            dup: false,
            qos: w.qos,
            retain: w.retain,
            topic: w.topic.clone(),
            packet_id: 0,
            properties: PublishProperties {
                payload_format_indicator: props.payload_format_indicator,
                message_expiry_interval: props.message_expiry_interval,
                topic_alias: None,
                response_topic: props.response_topic.clone(),
                correlation_data: props.correlation_data.clone(),
                user_properties: props.user_properties.clone(),
                subscription_identifiers: Vec::new(),
                content_type: props.content_type.clone(),
            },
            payload: w.payload.clone(),
        };
        let expires_at = props
            .message_expiry_interval
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
        debug!(topic = %w.topic, "publishing will");
        self.route(None, publish, expires_at);
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
            if publish.payload.is_empty() {
                self.retained.set(&publish.topic, None);
            } else {
                self.retained.set(
                    &publish.topic,
                    Some(Retained {
                        publish: publish.clone(),
                        expires_at,
                    }),
                );
            }
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
            let Some(s) = self.sessions.get_mut(&m.session) else {
                continue;
            };
            let mut p = publish.clone();
            p.qos = p.qos.min(m.qos);
            p.retain = publish.retain && m.retain_as_published;
            p.properties.subscription_identifiers = m.identifiers;
            let msg = Message {
                publish: p,
                expires_at,
            };
            if !deliver(s, msg, &self.cfg, &mut self.stats) {
                outcome = RouteOutcome::QuotaExceeded;
            }
        }
        self.matches = matches;
        outcome
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
        send_to(
            s,
            Packet::SubAck(SubAck {
                packet_id: sub.packet_id,
                properties: AckProperties::default(),
                reason_codes: codes,
            }),
        );
        if want_retained.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut found = Vec::new();
        let mut expired = Vec::new();
        for (filter, granted, identifier) in want_retained {
            self.retained.for_each_match(&filter, |topic, r| {
                if r.expires_at.is_some_and(|t| t <= now) {
                    expired.push(topic.to_string());
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
        for t in expired {
            self.retained.set(&t, None);
            self.stats.expired += 1;
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            for msg in found {
                deliver(s, msg, &self.cfg, &mut self.stats);
            }
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
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        send_to(
            s,
            Packet::UnsubAck(UnsubAck {
                packet_id: unsub.packet_id,
                properties: AckProperties::default(),
                reason_codes: codes,
            }),
        );
    }

    fn session_of(&mut self, conn: ConnId) -> Option<&mut Session> {
        let sid = self.by_conn.get(&conn)?;
        self.sessions.get_mut(sid)
    }
}

enum RouteOutcome {
    Delivered,
    NoSubscribers,
    QuotaExceeded,
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

fn send_to(s: &Session, packet: Packet) {
    if let Some(c) = &s.conn {
        c.send(Outgoing::Packet(packet));
    }
}

/// Puts a PUBLISH on the session's connection unless it exceeds the client's Maximum Packet
/// Size, in which case it is dropped as if delivered (MQTT-3.1.2-25).
fn send_publish_packet(s: &Session, p: Publish, stats: &mut RouterStats) -> bool {
    let Some(c) = &s.conn else {
        return false;
    };
    if s.params.max_packet_size != u32::MAX {
        let packet = Packet::Publish(p);
        let len = crate::protocol::encoded_len(&packet, s.params.protocol);
        if len > s.params.max_packet_size as usize {
            stats.dropped_too_large += 1;
            debug!(client_id = %s.client_id, len, "message larger than the client's maximum packet size dropped");
            return false;
        }
        c.send(Outgoing::Packet(packet));
    } else {
        c.send(Outgoing::Packet(Packet::Publish(p)));
    }
    stats.publishes_out += 1;
    true
}

/// Hands one message to a session: sent now if the client is online and its window is
/// open, otherwise queued (subject to the queue limits). Returns false if the message was
/// refused by the `reject-new` policy.
fn deliver(s: &mut Session, msg: Message, cfg: &MqttConfig, stats: &mut RouterStats) -> bool {
    let now = Instant::now();
    if msg.publish.qos == QoS::AtMostOnce {
        if let Some(c) = &s.conn {
            let limit = cfg.max_queued_messages.max(1000);
            if c.backlog() >= limit {
                stats.dropped_qos0_backlog += 1;
                return true;
            }
            let p = msg.to_send(0, false, now);
            send_publish_packet(s, p, stats);
        } else if cfg.queue_qos0_offline {
            return enqueue(s, msg, cfg, stats);
        }
        return true;
    }
    if s.window_open() && s.queue.is_empty() {
        send_inflight(s, msg, now, stats);
        return true;
    }
    enqueue(s, msg, cfg, stats)
}

fn send_inflight(s: &mut Session, msg: Message, now: Instant, stats: &mut RouterStats) {
    let packet_id = s.allocate_packet_id();
    let p = msg.to_send(packet_id, false, now);
    if send_publish_packet(s, p, stats) {
        s.inflight.push_back(Inflight {
            packet_id,
            state: InflightState::AwaitingAck,
            message: msg,
        });
    }
}

fn enqueue(s: &mut Session, msg: Message, cfg: &MqttConfig, stats: &mut RouterStats) -> bool {
    let len = msg.publish.payload.len() as u64;
    let full = |s: &Session| {
        (cfg.max_queued_messages > 0 && s.queue.len() >= cfg.max_queued_messages)
            || (cfg.max_queued_bytes > 0 && s.queued_bytes + len > cfg.max_queued_bytes)
    };
    if full(s) {
        match cfg.queue_policy {
            QueuePolicy::DropOldest => {
                while full(s) && s.pop_queue().is_some() {
                    note_drop(s, stats, "drop-oldest");
                }
                if full(s) {
                    // A single message larger than the byte budget.
                    note_drop(s, stats, "drop-oldest");
                    return true;
                }
            }
            QueuePolicy::RejectNew => {
                note_drop(s, stats, "reject-new");
                return false;
            }
        }
    }
    s.push_queue(msg);
    true
}

fn note_drop(s: &mut Session, stats: &mut RouterStats, policy: &'static str) {
    s.dropped += 1;
    stats.dropped_queue_full += 1;
    if !s.drop_episode {
        s.drop_episode = true;
        warn!(client_id = %s.client_id, policy, queued = s.queue.len(), "client queue full: dropping messages (logged once until the queue drains)");
    }
}

/// Moves queued messages into the in-flight window while it has room.
fn pump(s: &mut Session, _cfg: &MqttConfig, stats: &mut RouterStats) {
    let now = Instant::now();
    while s.window_open() {
        let Some(msg) = s.pop_queue() else {
            break;
        };
        if msg.is_expired(now) {
            stats.expired += 1;
            continue;
        }
        if msg.publish.qos == QoS::AtMostOnce {
            let p = msg.to_send(0, false, now);
            send_publish_packet(s, p, stats);
        } else {
            send_inflight(s, msg, now, stats);
        }
    }
    if s.queue.is_empty() && s.drop_episode {
        s.drop_episode = false;
        info!(client_id = %s.client_id, dropped_total = s.dropped, "client queue drained");
    }
}
