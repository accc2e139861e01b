//! One connected period: messages between the outboxes (internal sessions) and the
//! upstream link, in both directions, until the link drops.
//!
//! What bounds the uplink (all per connection):
//! - the router's window per outbox (`inflight`, at most the upstream's Receive Maximum);
//! - `inflight_bytes`: QoS 1/2 payload bytes sent and not yet acknowledged (one message is
//!   always allowed, however large), so a slow link holds a few seconds of data, not a
//!   window of large messages that would all be resent after a drop;
//! - priorities: a lower one waits while a higher one has messages held or in flight;
//! - the drain pacer (`max_rate`, `max_bytes_rate`).
//!
//! Messages over a bound are *held* here in order (they are in the router's in-flight
//! window, so after a drop the router resends them like any other).
//!
//! When the link is dead: with QoS 1/2 messages in flight, no acknowledgement for
//! `ack_timeout_secs` (plus the head of the line's time on the wire at the measured rate)
//! ends the period (a half-open link under traffic is noticed in
//! seconds; the keep-alive still covers idle links). Acknowledgements are read while a
//! batch is being written ([`super::link`]), so a slow but moving link never trips it.
//!
//! Bytes (metered links): with `linger_ms`, what is queued for the link waits up to that
//! long after its oldest byte for more to join it, unless 16 KiB wait or the in-flight
//! window is full; the dead-link timer allows for it. Over MQTT 5, remote topics get
//! topic aliases up to the upstream's Topic Alias Maximum (per connection, first come
//! first served).
//!
//! Packet ids: outbox `k`'s id `i` goes upstream as `k × stride + i` with `stride =
//! 65535 / outboxes`, independent of `inflight`: a restart with a lower `inflight` (the
//! router resends what was in flight with its old ids) cannot make one outbox's
//! acknowledgement land on another's message.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;
use tracing::{info, warn};

use super::error::Lost;
use super::pacer::Pacer;
use super::upstream::{AckKind, Granted, UpEvent, Upstream};
use super::{Bridge, End, ACKED, RECEIVED, SENT};
use crate::broker::client::{ClientRx, ClientTx, Closed, Outgoing};
use crate::protocol::{reason, topic, Packet, PubAckLike, Publish, QoS};

/// How long a priority counts as busy after its last message: the router hands over the
/// next one only after the previous acknowledgement reached it, so "nothing in flight"
/// alone would let lower priorities slip in between.
const PRIORITY_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// One connected period: the outboxes' connections and what the upstream granted.
pub(super) struct Period {
    pub granted: Granted,
    /// One per outbox, highest priority first.
    pub classes: Vec<Class>,
    /// Upstream packet id = class index × `stride` + the outbox's own id.
    pub stride: u16,
    /// Messages sent upstream below their local QoS (the upstream's Maximum QoS is
    /// lower), by upstream packet id, with the local QoS: the upstream's answer completes
    /// them.
    pub emulated: HashMap<u16, QoS>,
    /// Payload bytes of each QoS 1/2 message in flight, by upstream packet id.
    sizes: Vec<u32>,
    in_flight_bytes: u64,
    max_bytes: u64,
    in_flight: usize,
    /// The last acknowledgement (or the moment something went in flight after a quiet
    /// spell): the link is dead when messages are in flight and this is older than
    /// `ack_timeout`.
    last_ack: Instant,
    ack_timeout: std::time::Duration,
    /// Downlink QoS 2 releases whose outbox was unknown (sent to every outbox): by packet
    /// id, (answers still due, success forwarded).
    fanout: HashMap<u16, (usize, bool)>,
    /// Something moved: an upstream acknowledgement or a downlink message (resets the
    /// reconnect backoff).
    pub progress: bool,
    /// The upstream answered 0x97 Quota exceeded (keeps the backoff growing).
    pub quota: bool,
    /// The first message sent after the last acknowledgement: (outbox, its packet id). If
    /// the upstream closes the connection while it is out, it is the suspect.
    pub suspect: Option<(usize, u16)>,
    /// Messages still to send one at a time to find the one the upstream refuses by
    /// closing the connection (see `super::strikes`); 0 = not isolating.
    pub isolate_left: u32,
    /// Upstream ids of the QoS 1/2 messages in flight, in the order they were sent: the
    /// front is the head of the line, whose time on the wire the ack timer allows for.
    order: VecDeque<u16>,
    /// The link's rate as the acknowledgements show it, bytes/s (kept across connections
    /// by the bridge), and the measurement window: (since, bytes acknowledged).
    pub rate: f64,
    rate_window: Option<(Instant, u64)>,
    /// MQTT 5 topic aliases announced on this connection: remote topic → alias (at most
    /// the upstream's Topic Alias Maximum, first come first served; the rest go with their
    /// topic).
    aliases: HashMap<std::sync::Arc<str>, u16>,
}

/// Rate assumed before any measurement, bytes/s: a slow uplink (a message of 1 MB at the
/// head of the line gets 20 s on top of `ack_timeout_secs` until the real rate is known).
pub(super) const INITIAL_RATE: f64 = 50_000.0;
/// The ack timer never assumes a slower link than this, bytes/s.
const FLOOR_RATE: f64 = 10_000.0;
/// Shortest measurement window for the rate (bursts of acknowledgements would inflate it).
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

/// `linger_ms` never holds more than this many bytes: a full batch is written at once.
const LINGER_MAX_BYTES: usize = 16 * 1024;

/// One outbox during a connected period.
pub(super) struct Class {
    /// The outbox's session in the router.
    pub tx: ClientTx,
    /// Its local filters (which outbox a downlink message is published through).
    pub filters: Vec<String>,
    /// QoS 1/2 messages sent upstream and not yet completed.
    pub in_flight: usize,
    /// When the router last handed this outbox a message.
    pub last_message: Option<Instant>,
    /// Messages held back (priorities, `inflight_bytes`), in order.
    pub held: VecDeque<Publish>,
}

impl Period {
    pub fn new(granted: Granted, classes: Vec<Class>, max_bytes: u64, ack_timeout: u64) -> Period {
        let n = classes.len().max(1) as u16;
        Period {
            granted,
            classes,
            stride: u16::MAX / n,
            emulated: HashMap::new(),
            sizes: vec![0; usize::from(u16::MAX) + 1],
            in_flight_bytes: 0,
            max_bytes: max_bytes.max(1),
            in_flight: 0,
            last_ack: Instant::now(),
            ack_timeout: std::time::Duration::from_secs(ack_timeout.max(1)),
            fanout: HashMap::new(),
            progress: false,
            quota: false,
            suspect: None,
            isolate_left: 0,
            order: VecDeque::new(),
            rate: INITIAL_RATE,
            rate_window: None,
            aliases: HashMap::new(),
        }
    }

    /// The topic alias for `topic` on this connection: `(alias, already announced)`, or
    /// `None` when the upstream allows no (more) aliases.
    fn alias(&self, topic: &str) -> Option<(u16, bool)> {
        if let Some(a) = self.aliases.get(topic) {
            return Some((*a, true));
        }
        let next = u16::try_from(self.aliases.len() + 1).ok()?;
        (next <= self.granted.topic_alias_maximum).then_some((next, false))
    }

    /// Whether nothing more can join what is queued for writing soon: the in-flight
    /// window (`window` messages) or the byte bound is full, or messages are held back.
    fn blocked(&self, window: usize) -> bool {
        self.in_flight >= window
            || self.in_flight_bytes >= self.max_bytes
            || self.classes.iter().any(|c| !c.held.is_empty())
    }

    /// QoS 1/2 messages sent upstream and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

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
    /// within `PRIORITY_GRACE`; or `inflight_bytes` are out)?
    fn gated(&self, k: usize) -> bool {
        if self.in_flight_bytes >= self.max_bytes || (self.isolate_left > 0 && self.in_flight > 0) {
            return true;
        }
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

    /// When the link counts as dead unless an acknowledgement comes (messages in flight):
    /// `ack_timeout` after the last acknowledgement, plus the time the message at the head
    /// of the line needs on the wire at the measured rate (a large message on a slow link
    /// is not a dead link).
    fn ack_deadline(&self) -> Option<Instant> {
        if self.in_flight == 0 {
            return None;
        }
        let head = self
            .order
            .front()
            .map_or(0, |id| self.sizes[usize::from(*id)]);
        let wire = f64::from(head) / self.rate.max(FLOOR_RATE);
        Some(self.last_ack + self.ack_timeout + std::time::Duration::from_secs_f64(wire))
    }

    fn sent(&mut self, k: usize, upstream_id: u16, bytes: usize) {
        if self.in_flight == 0 {
            self.last_ack = Instant::now();
        }
        self.in_flight += 1;
        self.classes[k].in_flight += 1;
        self.sizes[usize::from(upstream_id)] = bytes as u32;
        self.in_flight_bytes += bytes as u64;
        self.order.push_back(upstream_id);
    }

    fn completed(&mut self, k: usize, upstream_id: u16, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let c = &mut self.classes[k];
        c.in_flight = c.in_flight.saturating_sub(1);
        let size = std::mem::take(&mut self.sizes[usize::from(upstream_id)]);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(u64::from(size));
        if let Some(i) = self.order.iter().position(|id| *id == upstream_id) {
            self.order.remove(i);
        }
        // The rate: bytes acknowledged over at least `RATE_WINDOW` of busy link.
        match &mut self.rate_window {
            None => self.rate_window = Some((now, 0)),
            Some((since, bytes)) => {
                *bytes += u64::from(size);
                let took = now.duration_since(*since);
                if took >= RATE_WINDOW {
                    let sample = *bytes as f64 / took.as_secs_f64();
                    self.rate = 0.5 * self.rate + 0.5 * sample;
                    self.rate_window = Some((now, 0));
                }
            }
        }
        if self.in_flight == 0 {
            self.rate_window = None;
        }
    }
}

impl Bridge {
    pub(super) async fn pump<U: Upstream>(
        &self,
        up: &mut U,
        period: &mut Period,
        rxs: &mut [ClientRx],
        early: Vec<UpEvent>,
    ) -> End {
        for ev in early {
            if let Some(end) = self.incoming(up, period, ev).await {
                return end;
            }
        }
        let mut rates = self.rates.clone();
        let (rate, bytes_rate) = *rates.borrow_and_update();
        let mut pacer = Pacer::new(rate, bytes_rate);
        let failback = self.failover.failback();
        let linger = std::time::Duration::from_millis(self.cfg.linger_ms);
        let window = self.window(period);
        // When the oldest bytes not yet written were queued (`linger_ms`).
        let mut pending_since: Option<Instant> = None;
        loop {
            // Highest priority first.
            for (k, rx) in rxs.iter_mut().enumerate() {
                while pacer.ready() {
                    let Ok(out) = rx.try_recv() else {
                        break;
                    };
                    match self.outgoing(up, period, k, out).await {
                        Err(end) => return end,
                        Ok(bytes) => pacer.sent(bytes),
                    }
                }
            }
            if let Err(end) = self.release_held(up, period, &mut pacer).await {
                return end;
            }
            // `linger_ms`: what is queued waits (up to that long after the oldest of it)
            // for more to share its segments, unless nothing more can join it soon.
            let linger_until = if linger.is_zero() || up.pending() == 0 {
                pending_since = None;
                None
            } else {
                let since = *pending_since.get_or_insert_with(Instant::now);
                let due = since + linger;
                let now = Instant::now();
                (due > now && up.pending() < LINGER_MAX_BYTES && !period.blocked(window))
                    .then_some(due)
            };
            if linger_until.is_none() {
                pending_since = None;
                if let Err(e) = up.flush().await {
                    return End::Lost(e.into());
                }
            }
            self.publish_counts();
            // What was read while writing (acknowledgements), before any timer is judged.
            match up.try_next() {
                Err(e) => return End::Lost(e.into()),
                Ok(Some(ev)) => {
                    if let Some(end) = self.incoming(up, period, ev).await {
                        return end;
                    }
                    continue;
                }
                Ok(None) => {}
            }
            let recheck = period.recheck_at().filter(|t| *t > Instant::now());
            // Messages may wait up to `linger` before they are written.
            let dead_at = period.ack_deadline().map(|t| t + linger);
            // Everything is written (or lingers, untouched): `next` may be cancelled here.
            let ev = tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                _ = failback.cancelled() => return End::Failback,
                _ = tokio::time::sleep_until(linger_until.unwrap_or_else(Instant::now)), if linger_until.is_some() => continue,
                _ = tokio::time::sleep_until(dead_at.unwrap_or_else(Instant::now)), if dead_at.is_some() => {
                    return End::Lost(Lost::NoAck {
                        secs: period.ack_timeout.as_secs(),
                        in_flight: period.in_flight,
                    });
                }
                _ = tokio::time::sleep_until(recheck.unwrap_or_else(Instant::now)), if recheck.is_some() => continue,
                out = recv_any(rxs), if pacer.ready() => match out {
                    None => return End::Shutdown,
                    Some((k, out)) => {
                        match self.outgoing(up, period, k, out).await {
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
                    Err(e) => return End::Lost(e.into()),
                    Ok(None) => break,
                    Ok(Some(ev)) => {
                        if let Some(end) = self.incoming(up, period, ev).await {
                            return end;
                        }
                    }
                }
                ev = up.try_next();
            }
        }
    }

    /// The router's in-flight window per outbox on this connection, times the outboxes
    /// (as `connected` computes it).
    fn window(&self, period: &Period) -> usize {
        let n = period.classes.len().max(1);
        let per = usize::from(self.cfg.inflight)
            .min(usize::from(period.granted.receive_maximum) / n)
            .min(usize::from(self.shared.broker.mqtt().max_inflight))
            .max(1);
        per * n
    }

    /// Sends held messages of the outboxes that nothing holds back any more.
    async fn release_held<U: Upstream>(
        &self,
        up: &mut U,
        period: &mut Period,
        pacer: &mut Pacer,
    ) -> Result<(), End> {
        for k in 0..period.classes.len() {
            while pacer.ready() && !period.gated(k) {
                let Some(p) = period.classes[k].held.pop_front() else {
                    break;
                };
                let bytes = self.uplink(up, period, k, p).await?;
                pacer.sent(bytes);
            }
        }
        Ok(())
    }

    /// What sending to the router means for the connected period: `Some(End::Shutdown)`
    /// if the router is gone.
    pub(super) fn to_router(sent: Result<(), Closed>) -> Option<End> {
        sent.err().map(|_| End::Shutdown)
    }

    /// Handles one event from upstream. `Some` ends the connected period.
    async fn incoming<U: Upstream>(
        &self,
        up: &mut U,
        period: &mut Period,
        ev: UpEvent,
    ) -> Option<End> {
        match ev {
            UpEvent::Nothing => None,
            UpEvent::Disconnect(why) => Some(End::Lost(why.into())),
            UpEvent::Publish(p) => {
                self.count(RECEIVED);
                period.progress = true;
                self.downlink(up, period, p).await
            }
            UpEvent::Release(packet_id) => self.release(period, packet_id).await,
            UpEvent::Ack {
                kind,
                packet_id: upstream_id,
                reason,
            } => {
                let Some((k, packet_id)) = period.local_id(upstream_id) else {
                    warn!(bridge = %self.cfg.name, packet_id = upstream_id, "acknowledgement for a packet id we did not use; ignored");
                    return None;
                };
                if reason == reason::QUOTA_EXCEEDED {
                    // How AWS IoT and HiveMQ throttle: not a verdict on the message. It
                    // stays in flight in the outbox and goes again after a backoff, in
                    // order with what followed it.
                    period.quota = true;
                    return Some(End::Lost(Lost::Quota { packet_id }));
                }
                let now = Instant::now();
                period.last_ack = now;
                period.suspect = None;
                if period.isolate_left > 0 {
                    period.isolate_left = self.strikes.acked();
                }
                let done = kind != AckKind::Rec || reason >= 0x80;
                if reason >= 0x80 {
                    warn!(bridge = %self.cfg.name, packet_id, reason = format!("{reason:#04x}"), "the upstream refused a message (v5 reason code); it is removed from the outbox and counted as rejected");
                    self.status(|st| st.rejected += 1);
                } else {
                    period.progress = true;
                    if done {
                        self.count(ACKED);
                    }
                }
                if done {
                    period.completed(k, upstream_id, now);
                }
                // A QoS 2 message the upstream only takes at QoS 1: its PUBACK is our PUBREC.
                let kind = match (kind, period.emulated.get(&upstream_id)) {
                    (AckKind::Ack, Some(QoS::ExactlyOnce)) => AckKind::Rec,
                    _ => kind,
                };
                if kind != AckKind::Rec || reason >= 0x80 {
                    period.emulated.remove(&upstream_id);
                }
                let tx = &period.classes[k].tx;
                Self::to_router(match kind {
                    // Accepted by the upstream (the next hop holds it now).
                    AckKind::Ack if reason < 0x80 => tx.upstream_ack(packet_id).await,
                    AckKind::Ack => tx.puback(packet_id).await,
                    AckKind::Rec => tx.pubrec(packet_id, reason).await,
                    AckKind::Comp => tx.pubcomp(packet_id).await,
                })
            }
        }
    }

    /// A downlink PUBREL: to the outbox that published the message (it holds the packet
    /// id); if that is not known (a gateway restart since), to every outbox, and the one
    /// that has it answers the PUBCOMP (see `outgoing`).
    async fn release(&self, period: &mut Period, packet_id: u16) -> Option<End> {
        let known = self
            .qos2_down
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&packet_id))
            .filter(|k| *k < period.classes.len());
        let targets: Vec<usize> = match known {
            Some(k) => vec![k],
            None if period.classes.len() == 1 => vec![0],
            None => {
                period
                    .fanout
                    .insert(packet_id, (period.classes.len(), false));
                (0..period.classes.len()).collect()
            }
        };
        for k in targets {
            if let Some(end) = Self::to_router(period.classes[k].tx.pubrel(packet_id).await) {
                return Some(end);
            }
        }
        None
    }

    /// Hands one message from upstream to the router; its upstream acknowledgement waits
    /// for the router's (after the local commit). `Some` ends the connected period.
    async fn downlink<U: Upstream>(
        &self,
        up: &mut U,
        period: &Period,
        mut p: Publish,
    ) -> Option<End> {
        let Some(local) = self.local_topic(&p.topic) else {
            warn!(bridge = %self.cfg.name, topic = %p.topic, "downlink message matches no `in` rule; acknowledged and dropped");
            let ack = PubAckLike::new(p.packet_id);
            let packet = match p.qos {
                QoS::AtMostOnce => return None,
                QoS::AtLeastOnce => Packet::PubAck(ack),
                QoS::ExactlyOnce => Packet::PubRec(ack),
            };
            return up.queue(packet).err().map(|e| End::Lost(e.into()));
        };
        let k = self.downlink_class(period, &local);
        let Some(class) = period.classes.get(k) else {
            return Some(End::Lost(Lost::NoOutbox));
        };
        if p.qos == QoS::ExactlyOnce {
            if let Ok(mut m) = self.qos2_down.lock() {
                m.insert(p.packet_id, k);
            }
        }
        p.topic = local.into();
        p.dup = false;
        // Upstream-only properties: ours are assigned by the router for each subscriber.
        p.properties.subscription_identifiers.clear();
        p.properties.topic_alias = None;
        if p.qos == QoS::AtMostOnce {
            p.packet_id = 0;
        }
        Self::to_router(class.tx.publish(p).await)
    }

    /// The outbox a downlink message is published through: the one whose `out` filters
    /// match its local topic (No Local then keeps it from going back up), else the lowest
    /// priority (the default outbox).
    fn downlink_class(&self, period: &Period, local: &str) -> usize {
        period
            .classes
            .iter()
            .position(|c| c.filters.iter().any(|f| topic::matches(f, local)))
            .unwrap_or(period.classes.len().saturating_sub(1))
    }

    /// Handles one packet from outbox `k`: the payload bytes it puts on the link (for the
    /// drain pacer), or `Err` to end the connected period.
    async fn outgoing<U: Upstream>(
        &self,
        up: &mut U,
        period: &mut Period,
        k: usize,
        out: Outgoing,
    ) -> Result<usize, End> {
        let packet = match out {
            Outgoing::Disconnect(_) => {
                return Err(if self.shutdown.is_cancelled() {
                    End::Shutdown
                } else {
                    End::Lost(Lost::Detached)
                })
            }
            Outgoing::Packet(p) => *p,
        };
        let lost = |e| End::Lost(Lost::Link(e));
        if matches!(packet, Packet::Publish(_)) && period.classes.len() > 1 {
            period.classes[k].last_message = Some(Instant::now());
        }
        match packet {
            // Behind held messages of its own priority too, or it would overtake them.
            Packet::Publish(p) if period.gated(k) || !period.classes[k].held.is_empty() => {
                period.classes[k].held.push_back(p)
            }
            Packet::Publish(p) => return self.uplink(up, period, k, p).await,
            // The router released a QoS 2 message: upstream, unless it only took it at a
            // lower QoS (then it is complete already).
            Packet::PubRel(mut a) => {
                let upstream_id = period.upstream_id(k, a.packet_id);
                if period.emulated.remove(&upstream_id).is_some() {
                    let sent = period.classes[k].tx.pubcomp(a.packet_id).await;
                    if let Some(end) = Self::to_router(sent) {
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
            // The answer of one outbox to a release sent to all of them: the success goes
            // up, "not found" only if no outbox had it.
            Packet::PubComp(a) if period.fanout.contains_key(&a.packet_id) => {
                let id = a.packet_id;
                let mut forward = None;
                if let Some(f) = period.fanout.get_mut(&id) {
                    f.0 = f.0.saturating_sub(1);
                    if a.reason_code < 0x80 && !f.1 {
                        f.1 = true;
                        forward = Some(a);
                    } else if f.0 == 0 && !f.1 {
                        forward = Some(a);
                    }
                    if f.0 == 0 {
                        period.fanout.remove(&id);
                    }
                }
                if let Some(a) = forward {
                    up.queue(Packet::PubComp(a)).map_err(lost)?;
                }
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
        period: &mut Period,
        k: usize,
        mut p: Publish,
    ) -> Result<usize, End> {
        let tx = period.classes[k].tx.clone();
        let packet_id = p.packet_id;
        let upstream_id = period.upstream_id(k, packet_id);
        let local_qos = p.qos;
        let Some(remote) = self.remote_topic(&p.topic) else {
            // Cannot happen (the session only subscribes `out` rules); don't let it block
            // the queue.
            let refused = reason::IMPLEMENTATION_SPECIFIC_ERROR;
            return self.complete_now(&tx, local_qos, packet_id, refused).await;
        };
        if local_qos != QoS::AtMostOnce && self.strikes.set_aside(k, packet_id) {
            warn!(bridge = %self.cfg.name, topic = %p.topic, "the upstream closed the connection when this message was in flight alone (after reject_after_closes closes with it first in flight): removed from the outbox and counted as rejected");
            self.status(|st| st.rejected += 1);
            let refused = reason::IMPLEMENTATION_SPECIFIC_ERROR;
            return self.complete_now(&tx, local_qos, packet_id, refused).await;
        }
        let remote: std::sync::Arc<str> = remote.into();
        let alias = period.alias(&remote);
        p.topic = match alias {
            // Announced on this connection: the topic goes as an empty string.
            Some((_, true)) => "".into(),
            _ => remote.clone(),
        };
        p.qos = p.qos.min(period.granted.maximum_qos);
        p.retain &= period.granted.retain_available;
        p.properties.subscription_identifiers.clear();
        p.properties.topic_alias = alias.map(|(a, _)| a);
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
            return self.complete_now(&tx, local_qos, packet_id, refused).await;
        }
        if let Some((a, false)) = alias {
            period.aliases.insert(remote, a);
        }
        self.count(SENT);
        if sent_qos != QoS::AtMostOnce {
            if period.suspect.is_none() {
                period.suspect = Some((k, packet_id));
            }
            period.sent(k, upstream_id, bytes);
        }
        if sent_qos < local_qos {
            // The upstream's Maximum QoS is lower: its acknowledgement (or none, at QoS 0)
            // completes the message.
            period.emulated.insert(upstream_id, local_qos);
            if sent_qos == QoS::AtMostOnce {
                if let Some(end) = self.complete(&tx, local_qos, packet_id, 0).await {
                    return Err(end);
                }
            }
        }
        Ok(bytes)
    }

    async fn complete_now(
        &self,
        tx: &ClientTx,
        qos: QoS,
        packet_id: u16,
        reason: u8,
    ) -> Result<usize, End> {
        match self.complete(tx, qos, packet_id, reason).await {
            Some(end) => Err(end),
            None => Ok(0),
        }
    }

    /// Tells the router an outbox message is done without an upstream acknowledgement:
    /// PUBACK (QoS 1) or PUBREC (QoS 2): with a failure `reason` the router deletes it at
    /// once; with 0 its PUBREL follows, answered in `outgoing` (the message is in
    /// `emulated`).
    async fn complete(&self, tx: &ClientTx, qos: QoS, packet_id: u16, reason: u8) -> Option<End> {
        match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Self::to_router(tx.puback(packet_id).await),
            QoS::ExactlyOnce => Self::to_router(tx.pubrec(packet_id, reason).await),
        }
    }
}

/// The next packet from any outbox, highest priority first; `None` once one is closed.
async fn recv_any(rxs: &mut [ClientRx]) -> Option<(usize, Outgoing)> {
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
