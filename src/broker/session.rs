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
//!   messages and `MEM_QUEUE_BYTES` (`MEM_QUEUE_BYTES_INTERNAL`) payload bytes in memory,
//!   and none while offline: `queue` is always a prefix of the queue,
//!   and everything from `spilled_from` on is on disk only. Memory does not grow with the
//!   number of queued messages.
//!
//! - a gateway holds up to ~10,000 sessions, so what every session carries is kept small
//!   (issue 17; `router::memory_tests` guards the sizes): rare parts are boxed (the will,
//!   in-flight bodies, held packets), subscriptions are a sorted vector, and emptied
//!   queues, windows and held output give their memory back (`shrink_idle`).
//!
//! The session is owned by the router task; nothing here is shared or locked.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::connection::ConnLink;
use super::lazy::{Few, Lazy};
use super::readback::{Charge, ReadPool};
use super::topic_tree::{SessionId, SubscriptionData};
use crate::protocol::{Packet, ProtocolVersion, Publish, Will};

/// Queued messages a durable session keeps in memory (the rest stay on disk).
pub const MEM_QUEUE: usize = 256;
/// The same for an internal session (a bridge outbox): there are only a few, and when the
/// upstream is a little slower than the local publishers for a while, a longer window
/// keeps the outbox from reading back from disk what it wrote a moment ago.
pub const MEM_QUEUE_INTERNAL: usize = 4096;
/// Payload bytes a durable session keeps in its in-memory queue, whatever the message
/// count: 4,096 messages of 1 MiB would otherwise be 4 GiB on a 512 MB gateway. The rest
/// stays on disk and is read back as the window drains.
pub const MEM_QUEUE_BYTES: u64 = 1024 * 1024;
/// The same for an internal session (a bridge outbox).
pub const MEM_QUEUE_BYTES_INTERNAL: u64 = 4 * 1024 * 1024;
/// `Session::spilled` when nothing is on disk only.
const NOT_SPILLED: u64 = u64::MAX;

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
    /// None: the body is on disk only (a durable session that went offline, or was just
    /// recovered): read back (`Session::inflight_on_disk`) before it is resent. Boxed, so
    /// a slot of the window is 24 bytes rather than 248: a `VecDeque` never holds fewer
    /// than 4 slots, and the message itself is already in memory.
    pub message: Option<Box<Message>>,
}

/// A message routed to a session, before a packet id is assigned.
#[derive(Debug, Clone)]
pub struct Message {
    /// The PUBLISH as it will go out: QoS already reduced to the granted QoS, retain flag
    /// already decided, subscription identifiers set; packet id 0 until sent.
    pub publish: Publish,
    /// When the message expires (v5 Message Expiry Interval), measured from its arrival.
    pub expires_at: Option<Instant>,
    /// Its share of the gateway's read-back budget while a durable session holds it in
    /// memory (`super::readback`); None for everything else.
    pub charge: Option<Charge>,
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
#[derive(Debug)]
pub enum Held {
    /// Boxed: it goes to the connection in this box (`Outgoing::Packet`), and an inline
    /// `Packet` would make every held item, deliveries included, 224 bytes instead of 16
    /// (a window of 64 held deliveries per session while 10,000 sessions drain).
    Packet(Box<Packet>),
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

impl Held {
    pub fn packet(p: Packet) -> Held {
        Held::Packet(Box::new(p))
    }
}

/// Where a queued row was when it left the queue behind the router's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowPlace {
    /// In the in-memory queue (removed from it now).
    Memory,
    /// Taken into the in-flight window already.
    InFlight,
    /// On disk only, still counted.
    Disk,
    /// Already accounted for.
    Gone,
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

/// What only internal sessions (bridge outboxes) set: boxed, so the ~10,000 client sessions
/// of a gateway do not each carry it (48 bytes inline).
#[derive(Debug)]
struct OwnPolicy {
    limits: Option<QueueLimits>,
    queue_qos0: Vec<String>,
}

/// Incoming QoS 2 packet ids awaiting PUBREL, each with the store token its message was
/// stored with. The map is allocated on the first QoS 2 PUBLISH (and kept, like a map's
/// table): most sessions never receive one, and an empty `HashMap` inline costs 48 bytes
/// in every session.
#[allow(
    clippy::box_collection,
    reason = "boxed for its size inline (8 bytes, not 24-48)"
)]
#[derive(Debug, Default)]
pub struct Qos2Ids(Option<Box<HashMap<u16, u64>>>);

impl Qos2Ids {
    pub fn get(&self, packet_id: &u16) -> Option<&u64> {
        self.0.as_ref().and_then(|m| m.get(packet_id))
    }

    pub fn insert(&mut self, packet_id: u16, token: u64) -> Option<u64> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(packet_id, token)
    }

    pub fn remove(&mut self, packet_id: &u16) -> Option<u64> {
        self.0.as_mut().and_then(|m| m.remove(packet_id))
    }

    pub fn keys(&self) -> impl Iterator<Item = &u16> {
        self.0.iter().flat_map(|m| m.keys())
    }
}

impl FromIterator<(u16, u64)> for Qos2Ids {
    fn from_iter<I: IntoIterator<Item = (u16, u64)>>(iter: I) -> Self {
        let map: HashMap<u16, u64> = iter.into_iter().collect();
        Qos2Ids((!map.is_empty()).then(|| Box::new(map)))
    }
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
    pub subscriptions: Subscriptions,
    /// Last packet id handed out.
    next_packet_id: u16,
    /// Next message sequence number.
    pub next_seq: u64,
    /// The in-flight window (allocated on first use, like `queue`, `held` and `gated`:
    /// empty in nearly every one of a gateway's sessions).
    pub inflight: Lazy<VecDeque<Inflight>>,
    /// The front of the queue that is in memory.
    pub queue: Lazy<VecDeque<Queued>>,
    /// Payload bytes in `queue` (approximate after read-backs; bounds memory, not policy).
    pub queue_mem_bytes: u64,
    /// Messages waiting (in memory or on disk), not counting in-flight ones.
    pub queue_len: u64,
    pub queued_bytes: u64,
    /// Queued messages from this sequence number on are on disk only ([`NOT_SPILLED`]: none;
    /// not an `Option`, 8 bytes less in each session: `spilled_from`).
    spilled: u64,
    /// A read-back of the on-disk queue is outstanding.
    pub reading: bool,
    /// The outstanding read-back was asked for a read position that has since moved back
    /// (`spill_all`): its answer is discarded and the read asked again.
    pub read_stale: bool,
    /// Oldest messages the queue limit dropped while a read-back was outstanding and the
    /// in-memory queue was empty: they are the first rows of that read's answer (the store
    /// answers the read before it sees the drops), deleted when it arrives. Counted already;
    /// `drops_pending_bytes` is what was subtracted for them (an estimate until then).
    pub drops_pending: u32,
    pub drops_pending_bytes: u64,
    /// Output waiting for a commit: (token, item); token 0 = not waiting itself.
    pub held: Lazy<VecDeque<(u64, Held)>>,
    /// Incoming QoS 2 packet ids received (and routed) whose PUBREL has not come yet, with
    /// the store token that carries what the message was stored with (0: nothing to wait
    /// for). A resend of the PUBLISH is acknowledged only once that token has committed,
    /// and a failed token removes the id again (the message was refused, not received).
    pub incoming_qos2: Qos2Ids,
    /// An internal session's own queue limits and QoS 0 rules (`None`: the `[mqtt]` ones
    /// and none; see [`Session::limits`], [`Session::queue_qos0`]).
    own_policy: Option<Box<OwnPolicy>>,
    /// A relay session (a bridge's outbox; set from `client::DeliveryPolicy::relay`, which
    /// lists every exception it gets): its QoS 1 messages go out without waiting
    /// for the commit that records them as sent. After a crash such a message is resent
    /// without DUP, which the upstream treats as the QoS 1 duplicate it may be anyway; a
    /// client's session keeps the stricter rule (a redelivery always carries DUP).
    pub internal: bool,
    /// Publishers whose acknowledgements wait until this session's queue shrinks
    /// (backpressure: a fast QoS 1/2 publisher is slowed to its slowest subscriber's pace
    /// instead of overflowing that subscriber's queue).
    pub gated: Lazy<Vec<SessionId>>,
    /// The will of the current (or last) connection (boxed: most sessions have none, and
    /// a `Will` inline would add 176 bytes to every session).
    pub will: Option<Box<Will>>,
    /// Messages dropped for this session by a queue policy or size limit.
    pub dropped: u64,
    /// A drop episode is being logged: set on the first drop, cleared when the queue drains.
    pub drop_episode: bool,
    /// Bumped on every connect and disconnect, so timers armed earlier are ignored.
    pub generation: u64,
    /// Who the session belongs to (`router::security`).
    pub owner: crate::auth::SessionOwner,
    /// The ACL in force for the session (None: no ACL file, or an internal session):
    /// replaced at every CONNECT and SIGHUP; wills and filtered deliveries obey it.
    pub acl: Option<Arc<crate::auth::ClientAcl>>,
    /// Some subscription overlaps a deny rule of `acl`: deliveries are checked one by one.
    /// False for every other session (no check per delivery).
    pub acl_filtered: bool,
    /// Charged to the gateway's read-back budget (which the router passes in: not kept in
    /// each of 10,000 sessions) for the message bodies it holds in memory while it is
    /// durable (not internal). False: never charged.
    pub charged: bool,
    /// In the router's queue of sessions waiting for budget to read back.
    pub read_waiting: bool,
    /// Some in-flight messages awaiting PUBACK / PUBREC have their bodies on disk only:
    /// they are read back (and resent with DUP) before anything new is sent.
    pub inflight_on_disk: bool,
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
            subscriptions: Subscriptions::default(),
            next_packet_id: 0,
            next_seq: 0,
            inflight: Lazy::default(),
            queue: Lazy::default(),
            queue_mem_bytes: 0,
            queue_len: 0,
            queued_bytes: 0,
            spilled: NOT_SPILLED,
            reading: false,
            read_stale: false,
            drops_pending: 0,
            drops_pending_bytes: 0,
            held: Lazy::default(),
            incoming_qos2: Qos2Ids::default(),
            gated: Lazy::default(),
            own_policy: None,
            internal: false,
            will: None,
            dropped: 0,
            drop_episode: false,
            owner: crate::auth::SessionOwner::Unknown,
            acl: None,
            acl_filtered: false,
            charged: false,
            read_waiting: false,
            inflight_on_disk: false,
            generation: 0,
        }
    }

    /// Own queue limits instead of the `[mqtt]` ones (internal sessions).
    pub fn limits(&self) -> Option<QueueLimits> {
        self.own_policy.as_ref().and_then(|p| p.limits)
    }

    /// Internal sessions: filters whose QoS 0 messages are kept like QoS 1 (queued while
    /// offline, stored, acknowledged). Empty for clients.
    pub fn queue_qos0(&self) -> &[String] {
        self.own_policy.as_ref().map_or(&[], |p| &p.queue_qos0)
    }

    /// Sets an internal session's own limits and QoS 0 rules (allocated only when there are
    /// any).
    pub fn set_own_policy(&mut self, limits: Option<QueueLimits>, queue_qos0: Vec<String>) {
        self.own_policy = (limits.is_some() || !queue_qos0.is_empty())
            .then(|| Box::new(OwnPolicy { limits, queue_qos0 }));
    }

    pub fn is_online(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether another QoS 1/2 message may be sent now.
    pub fn window_open(&self) -> bool {
        self.conn.is_some()
            && !self.inflight_on_disk
            && self.inflight.len() < usize::from(self.params.window)
    }

    /// A durable session going offline keeps its in-flight window on disk only: the
    /// bodies (and their read-back budget) are let go; the packet ids and states stay.
    pub fn inflight_to_disk(&mut self) {
        if !self.durable {
            return;
        }
        for m in &mut self.inflight {
            m.message = None;
        }
        self.inflight_on_disk = self
            .inflight
            .iter()
            .any(|m| m.state == InflightState::AwaitingAck);
    }

    /// Whether nothing is queued ahead of a new message (so it may go straight out).
    /// Decided by positions, never by the count: everything not in memory is at or after
    /// `spilled_from` on disk until a read-back finds nothing more there.
    pub fn queue_empty(&self) -> bool {
        self.queue.is_empty() && self.spilled_from().is_none()
    }

    /// A queued row left the queue behind the router's back (expiry sweep, disk budget,
    /// a refused commit): forgets it if it is still counted, and says where it was.
    /// Rows taken into the in-flight window, or read back and dropped since, were
    /// accounted for when that happened.
    pub fn forget_row(&mut self, seq: u64, size: u64) -> RowPlace {
        if let Some(i) = self.queue.iter().position(|q| q.seq == seq) {
            if let Some(q) = self.queue.remove(i) {
                let size = q.message.publish.payload.len() as u64;
                self.queue_mem_bytes = self.queue_mem_bytes.saturating_sub(size);
                self.forget_queued(size);
            }
            RowPlace::Memory
        } else if self.inflight.iter().any(|m| m.seq == seq) {
            RowPlace::InFlight
        } else if self.spilled_from().is_some_and(|from| seq >= from) {
            self.forget_queued(size);
            RowPlace::Disk
        } else {
            RowPlace::Gone
        }
    }

    /// With nothing queued in memory, on disk or pending, the counts are exactly zero
    /// (whatever estimate brought them here).
    pub fn settle_counts(&mut self) {
        if self.queue.is_empty()
            && self.spilled_from().is_none()
            && !self.reading
            && self.drops_pending == 0
        {
            self.queue_len = 0;
            self.queued_bytes = 0;
        }
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

    /// Adds a message to the back of the queue (kept in memory only if allowed; `pool`:
    /// the read-back budget).
    pub fn push_queue(&mut self, q: Queued, pool: &Arc<ReadPool>) {
        self.queue_len += 1;
        let size = q.message.publish.payload.len() as u64;
        self.queued_bytes += size;
        let in_memory = !self.durable
            || (self.spilled_from().is_none()
                && self.is_online()
                && self.queue.len() < self.mem_queue()
                && (self.queue.is_empty()
                    || self.queue_mem_bytes + size <= self.mem_queue_bytes())
                && self.mem_fits(&q.message, pool));
        if in_memory {
            let mut q = q;
            self.charge(&mut q.message, pool);
            self.queue_mem_bytes += size;
            self.queue.push_back(q);
        } else if self.spilled_from().is_none() {
            self.set_spilled_from(Some(q.seq));
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

    /// Most payload bytes kept in the in-memory queue.
    fn mem_queue_bytes(&self) -> u64 {
        if self.internal {
            MEM_QUEUE_BYTES_INTERNAL
        } else {
            MEM_QUEUE_BYTES
        }
    }

    /// Takes the front of the in-memory queue.
    pub fn pop_queue(&mut self) -> Option<Queued> {
        let q = self.queue.pop_front()?;
        let size = q.message.publish.payload.len() as u64;
        self.queue_mem_bytes = self.queue_mem_bytes.saturating_sub(size);
        self.forget_queued(size);
        Some(q)
    }

    /// Appends a message read back from disk to the in-memory queue.
    pub fn push_read_back(&mut self, mut q: Queued, pool: &Arc<ReadPool>) {
        self.charge(&mut q.message, pool);
        self.queue_mem_bytes += q.message.publish.payload.len() as u64;
        self.queue.push_back(q);
    }

    /// Queued messages from this sequence number on are on disk only (None: none are).
    pub fn spilled_from(&self) -> Option<u64> {
        (self.spilled != NOT_SPILLED).then_some(self.spilled)
    }

    pub fn set_spilled_from(&mut self, seq: Option<u64>) {
        // Sequence numbers stop at `store::MAX_SEQ`, far below the mark.
        self.spilled = seq.unwrap_or(NOT_SPILLED);
    }

    /// The read-back budget (`pool`) if this session's message bodies are charged to it:
    /// durable, non-internal sessions only.
    pub fn budget<'a>(&self, pool: &'a Arc<ReadPool>) -> Option<&'a Arc<ReadPool>> {
        Some(pool).filter(|_| self.charged && self.durable && !self.internal)
    }

    /// Whether the budget leaves room to keep `m`'s body in memory.
    pub fn mem_fits(&self, m: &Message, pool: &Arc<ReadPool>) -> bool {
        self.budget(pool)
            .is_none_or(|p| p.fits(super::readback::cost(&m.publish)))
    }

    /// Charges `m`'s body to the budget (once) while this session holds it.
    pub fn charge(&self, m: &mut Message, pool: &Arc<ReadPool>) {
        if let (Some(pool), None) = (self.budget(pool), &m.charge) {
            m.charge = Some(pool.charge(super::readback::cost(&m.publish)));
        }
    }

    /// Gives back the memory of an emptied queue, window, held output or gated list: its
    /// slots and the box they were in, and 10,000 idle sessions would otherwise each keep
    /// what their last burst needed (a VecDeque never shrinks by itself).
    pub fn shrink_idle(&mut self) {
        self.queue.release_if_empty();
        self.inflight.release_if_empty();
        self.held.release_if_empty();
        self.gated.release_if_empty();
    }

    /// Accounts for a queued message that left the queue.
    pub fn forget_queued(&mut self, size: u64) {
        self.queue_len = self.queue_len.saturating_sub(1);
        self.queued_bytes = self.queued_bytes.saturating_sub(size);
    }

    /// A durable session going offline releases its in-memory queue (it is on disk).
    pub fn spill_all(&mut self) {
        if let Some(front) = self.queue.front() {
            self.set_spilled_from(Some(front.seq));
            self.queue.clear();
            // An answer on its way was asked for a later position: it must not be taken.
            self.read_stale = self.reading;
        }
        self.queue_mem_bytes = 0;
    }

    /// Subscription filters in the form the subscription tree wants: (filter, group).
    pub fn tree_keys(&self) -> Vec<(String, Option<String>)> {
        self.subscriptions.keys().map(split_share).collect()
    }
}

/// A session's subscriptions by full filter, sorted by filter. Sessions of a gateway hold
/// one or a few subscriptions, and 10,000 sessions each with a hash map of one entry would
/// spend ~190 bytes apiece on it (issue 17). The one subscription of most sessions is kept
/// inline ([`Few`]: no allocation of its own), more go to a vector. Lookups are binary
/// searches; an insert or removal moves the entries behind it (32 bytes each), which stays
/// cheap up to `mqtt.max_subscriptions_per_client`-sized sets.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions(Few<(Box<str>, SubscriptionData)>);

impl Subscriptions {
    fn find(&self, filter: &str) -> Result<usize, usize> {
        self.0
            .as_slice()
            .binary_search_by(|(f, _)| (**f).cmp(filter))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, filter: &str) -> Option<&SubscriptionData> {
        self.find(filter).ok().map(|i| &self.0.as_slice()[i].1)
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.find(filter).is_ok()
    }

    /// Adds or replaces; returns what it replaced.
    pub fn insert(
        &mut self,
        filter: impl AsRef<str>,
        data: SubscriptionData,
    ) -> Option<SubscriptionData> {
        let filter = filter.as_ref();
        match self.find(filter) {
            Ok(i) => Some(std::mem::replace(&mut self.0.as_mut_slice()[i].1, data)),
            Err(i) => {
                self.0.insert(i, (Box::from(filter), data));
                None
            }
        }
    }

    pub fn remove(&mut self, filter: &str) -> Option<SubscriptionData> {
        let i = self.find(filter).ok()?;
        self.0.remove(i).map(|(_, data)| data)
    }

    /// Filters in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(f, _)| &**f)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SubscriptionData)> {
        self.0.iter().map(|(f, d)| (&**f, d))
    }

    /// Entry slots allocated on the heap.
    #[cfg(test)]
    pub fn allocated_slots(&self) -> usize {
        match &self.0 {
            Few::Many(v) => v.capacity(),
            Few::None | Few::One(_) => 0,
        }
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
            message: Some(Box::new(Message {
                publish: Publish::default(),
                expires_at: None,
                charge: None,
            })),
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

    #[test]
    fn a_bridge_outbox_keeps_its_in_memory_queue_bounded_in_bytes() {
        let params = ClientParams {
            protocol: ProtocolVersion::V311,
            window: 10,
            max_packet_size: u32::MAX,
            compact_packet_ids: true,
        };
        let mut s = Session::new(1, Arc::from("bridge"), params, true);
        s.internal = true;
        let (link, _rx) = ConnLink::new(1);
        s.conn = Some(link);
        let big = bytes::Bytes::from(vec![0u8; 64 * 1024]);
        let pool = super::super::readback::ReadPool::new(1 << 20);
        for seq in 0..MEM_QUEUE_INTERNAL as u64 {
            let publish = Publish {
                payload: big.clone(),
                ..Default::default()
            };
            s.push_queue(
                Queued {
                    seq,
                    message: Message {
                        publish,
                        expires_at: None,
                        charge: None,
                    },
                },
                &pool,
            );
        }
        let in_memory: u64 = s
            .queue
            .iter()
            .map(|q| q.message.publish.payload.len() as u64)
            .sum();
        assert!(
            in_memory <= MEM_QUEUE_BYTES_INTERNAL,
            "{in_memory} bytes in memory"
        );
        assert_eq!(in_memory, s.queue_mem_bytes);
        assert_eq!(s.queue_len, MEM_QUEUE_INTERNAL as u64);
        assert_eq!(s.spilled_from(), Some(s.queue.len() as u64));
        // Taking from the front frees the budget.
        let before = s.queue_mem_bytes;
        s.pop_queue();
        assert_eq!(s.queue_mem_bytes, before - big.len() as u64);
    }
}
