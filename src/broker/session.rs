//! One client's session as the router sees it: subscriptions, the outgoing in-flight window
//! (packet ids, QoS 1/2 states), the queue of messages waiting for the window or for the
//! client to come back, the incoming QoS 2 packet ids awaiting PUBREL, and expiry.
//!
//! Invariants:
//! - a packet id is in `inflight` at most once; ids are 1..=65535;
//! - messages leave `queue` in FIFO order and enter `inflight` in that same order, so
//!   per-session order is preserved across the window and across reconnects;
//! - an in-flight message is removed only on PUBACK / PUBCOMP (or a PUBREC with an error
//!   reason), or when the whole session ends.
//!
//! The session is owned by the router task; nothing here is shared or locked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::connection::ConnLink;
use super::topic_tree::{SessionId, SubscriptionData};
use crate::protocol::{ProtocolVersion, Publish, QoS, Will};

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent (QoS 1 or 2), waiting for PUBACK or PUBREC.
    AwaitingAck,
    /// PUBREC received and PUBREL sent, waiting for PUBCOMP.
    AwaitingComp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub packet_id: u16,
    pub state: InflightState,
    pub message: Message,
}

/// A message routed to a session, before a packet id is assigned.
#[derive(Debug, Clone)]
pub struct Message {
    /// The PUBLISH as it will go out: QoS already reduced to the granted QoS, retain flag
    /// already decided, subscription identifiers set; packet id 0 until sent.
    pub publish: Publish,
    /// When the message expires (v5 Message Expiry Interval), measured from its arrival.
    pub expires_at: Option<Instant>,
}

impl Message {
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The PUBLISH to put on the wire now: the Message Expiry Interval is rewritten to the
    /// time remaining (MQTT-3.3.2-6).
    pub fn to_send(&self, packet_id: u16, dup: bool, now: Instant) -> Publish {
        let mut p = self.publish.clone();
        p.packet_id = packet_id;
        p.dup = dup;
        if let Some(at) = self.expires_at {
            let left = at.saturating_duration_since(now).as_secs_f64().ceil() as u32;
            p.properties.message_expiry_interval = Some(left.max(1));
        }
        p
    }
}

/// Limits and preferences of the client's current connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientParams {
    pub protocol: ProtocolVersion,
    /// Outgoing window: min(broker max_inflight, the client's Receive Maximum).
    pub window: u16,
    /// Largest packet the client accepts (v5 Maximum Packet Size), whole packet.
    pub max_packet_size: u32,
}

pub struct Session {
    pub id: SessionId,
    pub client_id: Arc<str>,
    /// The online connection, if any.
    pub conn: Option<ConnLink>,
    pub params: ClientParams,
    /// Seconds the session outlives its connection; 0 = ends on disconnect,
    /// u32::MAX = never expires.
    pub expiry_interval: u32,
    /// Subscriptions by full filter as subscribed (including any `$share/{group}/`).
    pub subscriptions: HashMap<String, SubscriptionData>,
    /// Last packet id handed out.
    next_packet_id: u16,
    pub inflight: VecDeque<Inflight>,
    pub queue: VecDeque<Message>,
    pub queued_bytes: u64,
    /// Incoming QoS 2 packet ids received (and routed) whose PUBREL has not come yet.
    pub incoming_qos2: HashSet<u16>,
    /// The will of the current (or last) connection.
    pub will: Option<Will>,
    /// Messages dropped for this session by a queue policy or size limit.
    pub dropped: u64,
    /// A drop episode is being logged: set on the first drop, cleared when the queue drains.
    pub drop_episode: bool,
    /// Bumped on every disconnect, so timers armed for an earlier disconnect are ignored.
    pub generation: u64,
}

impl Session {
    pub fn new(id: SessionId, client_id: Arc<str>, params: ClientParams) -> Self {
        Session {
            id,
            client_id,
            conn: None,
            params,
            expiry_interval: 0,
            subscriptions: HashMap::new(),
            next_packet_id: 0,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            incoming_qos2: HashSet::new(),
            will: None,
            dropped: 0,
            drop_episode: false,
            generation: 0,
        }
    }

    pub fn is_online(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether another QoS 1/2 message may be sent now.
    pub fn window_open(&self) -> bool {
        self.conn.is_some() && self.inflight.len() < usize::from(self.params.window)
    }

    /// Next free packet id (1..=65535, skipping ids in flight). The window is never larger
    /// than 65535, so a free id always exists.
    pub fn allocate_packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if self.next_packet_id == 0 {
                self.next_packet_id = 1;
            }
            let id = self.next_packet_id;
            if !self.inflight.iter().any(|m| m.packet_id == id) {
                return id;
            }
        }
    }

    /// Position of an in-flight packet id; acks usually come in order, so this is
    /// normally the first element.
    pub fn inflight_position(&self, packet_id: u16) -> Option<usize> {
        self.inflight.iter().position(|m| m.packet_id == packet_id)
    }

    pub fn push_queue(&mut self, msg: Message) {
        self.queued_bytes += msg.publish.payload.len() as u64;
        self.queue.push_back(msg);
    }

    pub fn pop_queue(&mut self) -> Option<Message> {
        let msg = self.queue.pop_front()?;
        self.queued_bytes = self
            .queued_bytes
            .saturating_sub(msg.publish.payload.len() as u64);
        Some(msg)
    }

    /// Subscription filters in the form the subscription tree wants: (filter, group).
    pub fn tree_keys(&self) -> Vec<(String, Option<String>)> {
        self.subscriptions
            .keys()
            .map(|full| split_share(full))
            .collect()
    }

    pub fn has_qos(&self, qos: QoS) -> bool {
        qos != QoS::AtMostOnce
    }
}

/// Splits `$share/{group}/{filter}` into (filter, Some(group)); other filters into (filter, None).
/// Only called on filters that were validated at subscribe time.
pub fn split_share(full: &str) -> (String, Option<String>) {
    match crate::protocol::topic::parse_shared(full) {
        Ok(Some((group, filter))) => (filter.to_string(), Some(group.to_string())),
        _ => (full.to_string(), None),
    }
}
