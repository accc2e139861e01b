//! One client's session as the router sees it: subscriptions, the outgoing in-flight window
//! (packet ids, QoS 1/2 states), the queue of messages waiting for the window or for the
//! client to come back, the incoming QoS 2 packet ids awaiting PUBREL, expiry, and the
//! output held back until the store has committed what it depends on.
//!
//! Invariants:
//! - a packet id is in `inflight` at most once; ids are 1..=65535;
//! - every message has a per-session sequence number; messages leave the queue in sequence
//!   order and enter `inflight` in that order, so per-session order is preserved across the
//!   window, reconnects and (for durable sessions) restarts;
//! - an in-flight message is removed only on PUBACK / PUBCOMP (or a PUBREC with an error
//!   reason), or when the whole session ends;
//! - durable sessions keep at most `MEM_QUEUE` (internal ones `MEM_QUEUE_INTERNAL`) queued
//!   messages in memory, and none while offline: `queue` is always a prefix of the queue,
//!   and everything from `spilled_from` on is on disk only. Memory does not grow with the
//!   number of queued messages.
//!
//! The session is owned by the router task; nothing here is shared or locked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::connection::ConnLink;
use super::topic_tree::{SessionId, SubscriptionData};
use crate::protocol::{Packet, ProtocolVersion, Publish, Will};

/// Queued messages a durable session keeps in memory (the rest stay on disk).
pub const MEM_QUEUE: usize = 256;
/// The same for an internal session (a bridge outbox): there are only a few, and when the
/// upstream is a little slower than the local publishers for a while, a longer window
/// keeps the outbox from reading back from disk what it wrote a moment ago.
pub const MEM_QUEUE_INTERNAL: usize = 4096;

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
    pub seq: u64,
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

/// A queued message and its sequence number.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: u64,
    pub message: Message,
}

/// Output waiting for a store commit (or behind output that is), so that it leaves in
/// order and only once what it acknowledges is durable.
// Mostly `Packet`s; boxing them would cost an allocation per held packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Held {
    Packet(Packet),
    /// Send the in-flight message with this packet id (looked up when released).
    Deliver {
        packet_id: u16,
        dup: bool,
        /// Its row is created by the same commit: if that commit fails, the message was
        /// not accepted and is not sent. Otherwise it is on disk already and goes out.
        fresh: bool,
    },
    /// Acknowledge an incoming QoS 1/2 PUBLISH; on a failed commit it becomes 0x97
    /// (v5) or is withheld (3.x).
    PubAck {
        packet_id: u16,
        qos2: bool,
        code: u8,
    },
}

/// Queue limits of one session (clients use the `[mqtt]` ones; a bridge outbox its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueLimits {
    /// 0 = unlimited.
    pub max_messages: u64,
    /// 0 = unlimited.
    pub max_bytes: u64,
    pub policy: crate::config::QueuePolicy,
    /// Messages older than this are dropped as expired (counted), seconds; 0 = never.
    pub max_age_secs: u32,
}

/// Limits and preferences of the client's current connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientParams {
    pub protocol: ProtocolVersion,
    /// Outgoing window: min(broker max_inflight, the client's Receive Maximum).
    pub window: u16,
    /// Largest packet the client accepts (v5 Maximum Packet Size), whole packet.
    pub max_packet_size: u32,
    /// Hand out the smallest free packet id (1..=window) instead of cycling through all
    /// 65535: a bridge maps each outbox's ids into its own range of upstream ids.
    pub compact_packet_ids: bool,
}

pub struct Session {
    pub id: SessionId,
    pub client_id: Arc<str>,
    /// Kept in the store (Session Expiry Interval > 0 when it was created).
    pub durable: bool,
    /// The online connection, if any.
    pub conn: Option<ConnLink>,
    pub params: ClientParams,
    /// Seconds the session outlives its connection; 0 = ends on disconnect,
    /// u32::MAX = never expires.
    pub expiry_interval: u32,
    /// Unix ms when the session went offline (durable sessions).
    pub offline_since_ms: i64,
    /// Subscriptions by full filter as subscribed (including any `$share/{group}/`).
    pub subscriptions: HashMap<String, SubscriptionData>,
    /// Last packet id handed out.
    next_packet_id: u16,
    /// Next message sequence number.
    pub next_seq: u64,
    pub inflight: VecDeque<Inflight>,
    /// The front of the queue that is in memory.
    pub queue: VecDeque<Queued>,
    /// Messages waiting (in memory or on disk), not counting in-flight ones.
    pub queue_len: u64,
    pub queued_bytes: u64,
    /// Queued messages from this sequence number on are on disk only.
    pub spilled_from: Option<u64>,
    /// A read-back of the on-disk queue is outstanding.
    pub reading: bool,
    /// Output waiting for a commit: (token, item); token 0 = not waiting itself.
    pub held: VecDeque<(u64, Held)>,
    /// Incoming QoS 2 packet ids received (and routed) whose PUBREL has not come yet.
    pub incoming_qos2: HashSet<u16>,
    /// Own queue limits instead of the `[mqtt]` ones (internal sessions).
    pub limits: Option<QueueLimits>,
    /// An internal session (a bridge's outbox): its QoS 1 messages go out without waiting
    /// for the commit that records them as sent. After a crash such a message is resent
    /// without DUP, which the upstream treats as the QoS 1 duplicate it may be anyway; a
    /// client's session keeps the stricter rule (a redelivery always carries DUP).
    pub internal: bool,
    /// Internal sessions: filters whose QoS 0 messages are kept like QoS 1 (queued while
    /// offline, stored, acknowledged). Empty for clients.
    pub queue_qos0: Vec<String>,
    /// Publishers whose acknowledgements wait until this session's queue shrinks
    /// (backpressure: a fast QoS 1/2 publisher is slowed to its slowest subscriber's pace
    /// instead of overflowing that subscriber's queue).
    pub gated: Vec<SessionId>,
    /// The will of the current (or last) connection.
    pub will: Option<Will>,
    /// Messages dropped for this session by a queue policy or size limit.
    pub dropped: u64,
    /// A drop episode is being logged: set on the first drop, cleared when the queue drains.
    pub drop_episode: bool,
    /// Bumped on every connect and disconnect, so timers armed earlier are ignored.
    pub generation: u64,
}

impl Session {
    pub fn new(id: SessionId, client_id: Arc<str>, params: ClientParams, durable: bool) -> Self {
        Session {
            id,
            client_id,
            durable,
            conn: None,
            params,
            expiry_interval: 0,
            offline_since_ms: 0,
            subscriptions: HashMap::new(),
            next_packet_id: 0,
            next_seq: 0,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queue_len: 0,
            queued_bytes: 0,
            spilled_from: None,
            reading: false,
            held: VecDeque::new(),
            incoming_qos2: HashSet::new(),
            gated: Vec::new(),
            limits: None,
            internal: false,
            queue_qos0: Vec::new(),
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

    /// Whether nothing is queued ahead of a new message (so it may go straight out).
    pub fn queue_empty(&self) -> bool {
        self.queue_len == 0
    }

    /// Next free packet id (1..=65535, skipping ids in flight). The window is never larger
    /// than 65535, so a free id always exists.
    pub fn allocate_packet_id(&mut self) -> u16 {
        if self.params.compact_packet_ids {
            // Smallest free id: one pass to mark the ids in use (ids above the window cannot
            // be the smallest free one), one to find the first gap.
            let n = self.inflight.len() + 1;
            // A bit per id 1..=n, on the stack for the usual windows (this runs for every
            // message a bridge outbox sends).
            let mut small = [0u64; 4];
            let mut large = Vec::new();
            let used: &mut [u64] = if n < 256 {
                &mut small
            } else {
                large.resize(n / 64 + 1, 0u64);
                &mut large
            };
            for m in &self.inflight {
                let id = usize::from(m.packet_id);
                if id <= n {
                    used[id / 64] |= 1 << (id % 64);
                }
            }
            let free = (1..=n)
                .find(|&i| used[i / 64] & (1 << (i % 64)) == 0)
                .unwrap_or(n);
            return free as u16;
        }
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

    pub fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Adds a message to the back of the queue (kept in memory only if allowed).
    pub fn push_queue(&mut self, q: Queued) {
        self.queue_len += 1;
        self.queued_bytes += q.message.publish.payload.len() as u64;
        let in_memory = !self.durable
            || (self.spilled_from.is_none()
                && self.is_online()
                && self.queue.len() < self.mem_queue());
        if in_memory {
            self.queue.push_back(q);
        } else if self.spilled_from.is_none() {
            self.spilled_from = Some(q.seq);
        }
    }

    /// Most queued messages kept in memory.
    fn mem_queue(&self) -> usize {
        if self.internal {
            MEM_QUEUE_INTERNAL
        } else {
            MEM_QUEUE
        }
    }

    /// Takes the front of the in-memory queue.
    pub fn pop_queue(&mut self) -> Option<Queued> {
        let q = self.queue.pop_front()?;
        self.forget_queued(q.message.publish.payload.len() as u64);
        Some(q)
    }

    /// Accounts for a queued message that left the queue.
    pub fn forget_queued(&mut self, size: u64) {
        self.queue_len = self.queue_len.saturating_sub(1);
        self.queued_bytes = self.queued_bytes.saturating_sub(size);
    }

    /// A durable session going offline releases its in-memory queue (it is on disk).
    pub fn spill_all(&mut self) {
        if let Some(front) = self.queue.front() {
            self.spilled_from = Some(front.seq);
            self.queue.clear();
        }
    }

    /// Subscription filters in the form the subscription tree wants: (filter, group).
    pub fn tree_keys(&self) -> Vec<(String, Option<String>)> {
        self.subscriptions
            .keys()
            .map(|full| split_share(full))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn inflight(packet_id: u16) -> Inflight {
        Inflight {
            packet_id,
            seq: u64::from(packet_id),
            state: InflightState::AwaitingAck,
            message: Message {
                publish: Publish::default(),
                expires_at: None,
            },
        }
    }

    #[test]
    fn compact_packet_ids_are_the_smallest_free_one_for_any_window() {
        let params = ClientParams {
            protocol: ProtocolVersion::V311,
            window: 1000,
            max_packet_size: u32::MAX,
            compact_packet_ids: true,
        };
        let mut s = Session::new(1, Arc::from("bridge"), params, true);
        assert_eq!(s.allocate_packet_id(), 1);
        // 1..=600 in flight except 7 and 300: 7 first, then 300, then 601.
        s.inflight = (1..=600)
            .filter(|id| *id != 7 && *id != 300)
            .map(inflight)
            .collect();
        assert_eq!(s.allocate_packet_id(), 7);
        s.inflight.push_back(inflight(7));
        assert_eq!(s.allocate_packet_id(), 300);
        s.inflight.push_back(inflight(300));
        assert_eq!(s.allocate_packet_id(), 601);
        // A small window (the stack bitset), with ids acked out of order.
        s.inflight = [1, 2, 4, 5, 63, 64].into_iter().map(inflight).collect();
        assert_eq!(s.allocate_packet_id(), 3);
        s.inflight = (1..=70).map(inflight).collect();
        assert_eq!(s.allocate_packet_id(), 71);
    }
}
