//! The kill-the-child crash loop (in the style of sled's) shared by `tests/durable/crash_loop.rs`
//! (SIGKILL: a process crash) and `tests/durable/power_cut.rs` (SIGKILL with the power-cut VFS on:
//! every write not covered by a sync is lost, as at a power cut).
//!
//! The real binary is killed at a random moment, again and again, while a publisher streams
//! QoS 1 messages (sequence numbers in the payload) and a durable subscriber sometimes
//! receives. A quarter of the kills land in the first 30 ms: during start-up, while the
//! store is being recovered. Every `drain_every` rounds (and at the end) the broker stays
//! up: the publisher gets everything acknowledged, the subscriber drains, and every
//! acknowledged message must have been delivered.
//!
//! Checked, over all rounds:
//! - every message the broker acknowledged (PUBACK 0x00) is delivered to the subscriber;
//! - the subscriber's fresh deliveries (DUP = 0, or DUP = 1 for a message it never saw)
//!   form a subsequence of what the publisher put on the wire, in order (a message the
//!   publisher resent after a reconnect may legitimately arrive twice; anything else twice
//!   is a bug);
//! - a message seen again must carry DUP = 1 and a packet id it was delivered with before
//!   (unless it is another copy the publisher resent, matched as a fresh delivery);
//! - a resumed subscriber session is always present (CONNACK Session Present = 1);
//! - the broker is alive whenever it is killed (its store always opens).
//!
//! `strict` makes each of these an assertion; otherwise they are counted in [`Outcome`]
//! (how `tests/durable/power_cut.rs` shows that `synchronous = "normal"` loses messages).
//!
//! Like a real client, the publisher keeps its unacknowledged messages and resends them
//! with DUP = 1 after reconnecting; those may or may not have arrived before.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use crate::daemon::Daemon;
use crate::RawClient;
use holdfast::protocol::{
    reason, ConnAck, Connect, ConnectProperties, Packet, ProtocolVersion, PubAckLike, Publish, QoS,
    Subscribe, SubscribeFilter, SubscriptionOptions,
};

const TOPIC: &str = "crash/seq";
/// Unacknowledged messages the publisher allows itself (below the broker's Receive Maximum).
const WINDOW: usize = 32;
/// Longest wait for any single answer from a live broker.
const PATIENCE: Duration = Duration::from_secs(15);
/// Longest a drain (broker up, everything acknowledged and delivered) may take.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);

/// xorshift64* — small, seeded, good enough to pick delays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// An integer environment variable (panics on garbage: a typo must not go unnoticed).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be an integer, got {v:?}"))
    })
}

/// The seed from `name`, or from the clock.
pub fn seed_from_env(name: &str) -> u64 {
    env_u64(name).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

pub fn connect_packet(id: &str, clean_start: bool, expiry: u32) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_start,
        keep_alive: 60,
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..Default::default()
        },
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
    }
}

/// Opens an MQTT connection; `None` if the broker is not there (refused, reset, closed).
/// Panics if a live broker refuses the CONNECT or does not answer.
pub async fn open(addr: SocketAddr, c: Connect) -> Option<(RawClient, ConnAck)> {
    let mut conn = RawClient::try_tcp(addr, ProtocolVersion::V5).await.ok()?;
    conn.try_send(&Packet::Connect(Box::new(c))).await.ok()?;
    match conn.recv_timeout(PATIENCE).await {
        Ok(Some(Packet::ConnAck(a))) => {
            assert_eq!(a.reason_code, reason::SUCCESS, "CONNACK {a:?}");
            Some((conn, a))
        }
        Ok(Some(other)) => panic!("expected CONNACK, got {other:?}"),
        Ok(None) => None,
        Err(()) => panic!("no CONNACK within {PATIENCE:?}"),
    }
}

fn packet_id(seq: u64) -> u16 {
    (seq % 65535) as u16 + 1
}

fn payload(seq: u64) -> Vec<u8> {
    // Some padding, so the queue has some weight on disk.
    format!("{seq:016}:{}", "x".repeat(48)).into_bytes()
}

fn seq_of(p: &Publish) -> u64 {
    let text = std::str::from_utf8(&p.payload).expect("utf-8 payload");
    text.split(':')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad payload {text:?}"))
}

#[derive(Default, Debug, Clone, Copy)]
pub struct Counts {
    pub sent: u64,
    pub resent: u64,
    pub acked: u64,
    pub fresh: u64,
    pub redelivered: u64,
    /// Deliveries that broke the order / DUP rules, and resumed sessions found missing
    /// (non-strict runs only; a strict run panics instead).
    pub anomalies: u64,
}

/// The publisher's view: what it put on the wire (in order) and what was acknowledged.
#[derive(Default)]
struct Publisher {
    next_seq: u64,
    /// Sent, not acknowledged: seq -> packet id (resent in seq order).
    unacked: BTreeMap<u64, u16>,
    by_packet_id: HashMap<u16, u64>,
    acked: Vec<bool>,
    counts: Counts,
}

impl Publisher {
    fn write_publish(&self, seq: u64, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TOPIC.into(),
            packet_id: packet_id(seq),
            properties: Default::default(),
            payload: payload(seq).into(),
        })
    }

    fn on_puback(&mut self, a: &PubAckLike) {
        let seq = self
            .by_packet_id
            .remove(&a.packet_id)
            .unwrap_or_else(|| panic!("PUBACK for unknown packet id {}", a.packet_id));
        self.unacked.remove(&seq);
        assert_eq!(
            a.reason_code,
            reason::SUCCESS,
            "PUBACK of seq {seq} is not a success: {a:?}"
        );
        self.acked[seq as usize] = true;
        self.counts.acked += 1;
    }

    /// Connects (retrying while the broker starts), resends what is unacknowledged, then
    /// streams new messages (unless `finish`) until the broker dies; with `finish`, returns
    /// once everything is acknowledged.
    async fn run(
        &mut self,
        addr: SocketAddr,
        log: &RefCell<Vec<u64>>,
        dead: &Cell<bool>,
        finish: bool,
    ) {
        'connection: loop {
            if dead.get() {
                return;
            }
            let Some((mut conn, _)) = open(addr, connect_packet("pub", true, 0)).await else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            let resend: Vec<u64> = self.unacked.keys().copied().collect();
            for seq in resend {
                log.borrow_mut().push(seq);
                self.counts.resent += 1;
                if conn.try_send(&self.write_publish(seq, true)).await.is_err() {
                    continue 'connection;
                }
            }
            loop {
                if finish && self.unacked.is_empty() {
                    return;
                }
                while !finish && self.unacked.len() < WINDOW {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.acked.push(false);
                    let id = packet_id(seq);
                    assert!(self.by_packet_id.insert(id, seq).is_none());
                    self.unacked.insert(seq, id);
                    log.borrow_mut().push(seq);
                    self.counts.sent += 1;
                    if conn
                        .try_send(&self.write_publish(seq, false))
                        .await
                        .is_err()
                    {
                        continue 'connection;
                    }
                }
                match conn.recv_timeout(PATIENCE).await {
                    Ok(Some(Packet::PubAck(a))) => self.on_puback(&a),
                    Ok(Some(other)) => panic!("publisher: unexpected {other:?}"),
                    Ok(None) => continue 'connection,
                    Err(()) => panic!(
                        "publisher: no PUBACK within {PATIENCE:?} ({} unacked)",
                        self.unacked.len()
                    ),
                }
            }
        }
    }
}

/// The durable subscriber's view and the checks on every delivery.
struct Subscriber {
    strict: bool,
    /// Position in the publisher's wire log after the last fresh delivery.
    pos: usize,
    received: Vec<bool>,
    /// Packet ids each seq was delivered with.
    packet_ids: HashMap<u64, Vec<u16>>,
    counts: Counts,
}

impl Subscriber {
    fn new(strict: bool) -> Subscriber {
        Subscriber {
            strict,
            pos: 0,
            received: Vec::new(),
            packet_ids: HashMap::new(),
            counts: Counts::default(),
        }
    }

    /// A broken rule: panics in a strict run, counted (first few printed) otherwise.
    fn anomaly(&mut self, what: String) {
        assert!(!self.strict, "{what}");
        self.counts.anomalies += 1;
        if self.counts.anomalies <= 3 {
            println!("anomaly (counted, not fatal in this run): {what}");
        }
    }

    fn check(&mut self, p: &Publish, log: &[u64]) {
        assert_eq!(p.qos, QoS::AtLeastOnce, "{p:?}");
        let seq = seq_of(p);
        if self.received.len() <= seq as usize {
            self.received.resize(seq as usize + 1, false);
        }
        if p.dup && self.received[seq as usize] && self.packet_ids[&seq].contains(&p.packet_id) {
            self.counts.redelivered += 1;
            return;
        }
        // A fresh delivery: the next copy of `seq` the publisher put on the wire. (Also a
        // DUP = 1 delivery with a packet id never seen for this seq: the broker sent that
        // copy before a crash, but it did not arrive; it must be another copy the
        // publisher sent, or it is a redelivery with a changed packet id.)
        match log[self.pos..].iter().position(|&s| s == seq) {
            Some(i) => {
                self.pos += i + 1;
                self.counts.fresh += 1;
            }
            None => {
                let before = log[..self.pos].iter().rposition(|&s| s == seq);
                let context = &log[self.pos.saturating_sub(8)..(self.pos + 8).min(log.len())];
                self.anomaly(format!(
                    "seq {seq} (dup = {}, packet id {}) delivered out of order, twice without \
                     DUP, or redelivered with another packet id: already received = {} (packet \
                     ids {:?}), publisher wire log position of it before the current point = \
                     {before:?}, current point = {}, log around it = {context:?}",
                    p.dup,
                    p.packet_id,
                    self.received[seq as usize],
                    self.packet_ids.get(&seq),
                    self.pos
                ));
            }
        }
        self.received[seq as usize] = true;
        self.packet_ids.entry(seq).or_default().push(p.packet_id);
    }

    /// Connects (retrying while the broker starts) and receives, checks and acknowledges
    /// until the broker dies, or, with `until_quiet`, until nothing comes for that long.
    async fn run(
        &mut self,
        addr: SocketAddr,
        log: &RefCell<Vec<u64>>,
        dead: &Cell<bool>,
        until_quiet: Option<Duration>,
    ) {
        loop {
            if dead.get() {
                return;
            }
            let Some((mut conn, ack)) = open(addr, connect_packet("sub", false, 3600)).await else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            if !ack.session_present {
                self.anomaly("the durable subscriber's session was lost".into());
            }
            loop {
                match conn.recv_timeout(until_quiet.unwrap_or(PATIENCE * 4)).await {
                    Ok(Some(Packet::Publish(p))) => {
                        self.check(&p, &log.borrow());
                        if conn
                            .try_send(&Packet::PubAck(PubAckLike::new(p.packet_id)))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(Some(other)) => panic!("subscriber: unexpected {other:?}"),
                    Ok(None) => break,
                    Err(()) if until_quiet.is_some() => return,
                    Err(()) => panic!("subscriber: nothing received for a long time"),
                }
            }
        }
    }
}

/// How to run the loop.
pub struct LoopOptions {
    /// `store.synchronous`.
    pub synchronous: &'static str,
    /// Runs the broker with `HOLDFAST_TEST_POWERCUT_VFS=1`: each SIGKILL is a power cut.
    pub power_cut: bool,
    pub rounds: u64,
    pub seed: u64,
    /// A drain (broker up, everything acknowledged must be delivered) every this many
    /// rounds, and after the last.
    pub drain_every: u64,
    /// Every check is an assertion; otherwise broken rules are counted.
    pub strict: bool,
    /// Stops after the first drain that finds acknowledged messages lost.
    pub stop_at_loss: bool,
}

/// What a loop did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rounds: u64,
    /// SIGKILLs (rounds and the kill after each drain).
    pub kills: u64,
    pub publisher: Counts,
    pub subscriber: Counts,
    /// Acknowledged messages never delivered (found at the drains).
    pub lost: u64,
    /// Drains that found new losses.
    pub drains_with_loss: u64,
    /// Rounds checked by a drain (the last drain may come after the last round).
    pub rounds_checked: u64,
    /// The broker's log, all starts.
    pub log: String,
}

/// Runs the crash loop on a fresh broker installation (see the module doc).
pub async fn crash_loop(o: LoopOptions) -> Outcome {
    let LoopOptions {
        synchronous,
        power_cut,
        rounds,
        seed,
        drain_every,
        strict,
        stop_at_loss,
    } = o;
    let name = if power_cut { "power-cut" } else { "crash" };
    let mut rng = Rng::new(seed);
    let mut d = Daemon::new(&format!(
        "[mqtt]\nmax_queued_messages = 0\n[store]\nsynchronous = \"{synchronous}\"\n"
    ));
    if power_cut {
        d.env
            .push((holdfast::store::powercut::ENV_VAR.into(), "1".into()));
    }
    let addr = d.addr;

    // The durable subscriber's session and subscription, committed (SUBACK) and offline;
    // a clean stop, so the setup is on disk (synced) before the first cut.
    d.start().await;
    {
        let (mut c, _) = open(addr, connect_packet("sub", true, 3600))
            .await
            .expect("connect");
        c.try_send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscription_identifier: None,
            user_properties: vec![],
            filters: vec![SubscribeFilter {
                filter: TOPIC.into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            }],
        }))
        .await
        .unwrap();
        match c.recv_timeout(PATIENCE).await {
            Ok(Some(Packet::SubAck(a))) => assert_eq!(a.reason_codes, vec![1]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        c.try_send(&Packet::Disconnect(Default::default()))
            .await
            .unwrap();
        d.wait_offline_committed("sub").await;
    }
    d.sigterm().await;

    let log = RefCell::new(Vec::new());
    let mut publisher = Publisher::default();
    let mut subscriber = Subscriber::new(strict);
    let mut out = Outcome::default();
    let mut rounds_since_drain = 0;
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let before_pub = publisher.counts;
        let before_sub = subscriber.counts;
        // A quarter of the kills land in the first 30 ms: during start-up and recovery.
        let early = rng.below(4) == 0;
        let delay = Duration::from_millis(if early { rng.below(30) } else { rng.below(300) });
        let subscriber_online = rng.below(3) == 0;
        let dead = Cell::new(false);
        d.spawn();
        let mut alive = true;
        let killer = async {
            tokio::time::sleep(delay).await;
            alive = d.sigkill_alive();
            dead.set(true);
        };
        let subscribe = async {
            if subscriber_online {
                subscriber.run(addr, &log, &dead, None).await;
            }
        };
        tokio::join!(killer, publisher.run(addr, &log, &dead, false), subscribe);
        assert!(
            alive,
            "round {round}: holdfast had exited before the kill (its store did not open?) \
             (seed {seed})\n{}",
            d.log_text()
        );
        out.rounds += 1;
        out.kills += 1;
        rounds_since_drain += 1;
        let (p, s) = (publisher.counts, subscriber.counts);
        println!(
            "round {round:4}: killed after {:3} ms{}, subscriber {}: sent {} resent {} acked {} | delivered {} redelivered(DUP) {} | unacked {}",
            delay.as_millis(),
            if early { " (start-up)" } else { "" },
            if subscriber_online { "online " } else { "offline" },
            p.sent - before_pub.sent,
            p.resent - before_pub.resent,
            p.acked - before_pub.acked,
            s.fresh - before_sub.fresh,
            s.redelivered - before_sub.redelivered,
            publisher.unacked.len(),
        );
        if (round + 1) % drain_every != 0 && round + 1 != rounds {
            continue;
        }
        // The broker stays up: the publisher gets all its messages acknowledged, the
        // subscriber drains, and everything acknowledged must be there.
        d.start().await;
        let still = Cell::new(false);
        let drained = tokio::time::timeout(DRAIN_LIMIT, async {
            publisher.run(addr, &log, &still, true).await;
            subscriber
                .run(addr, &log, &still, Some(Duration::from_millis(700)))
                .await;
        })
        .await;
        assert!(
            drained.is_ok(),
            "after round {round}: no drain within {DRAIN_LIMIT:?} (seed {seed})\n{}",
            d.log_text()
        );
        let missing: Vec<u64> = (0..publisher.next_seq)
            .filter(|&s| {
                !subscriber
                    .received
                    .get(s as usize)
                    .copied()
                    .unwrap_or(false)
            })
            .collect();
        assert!(publisher.acked.iter().all(|&a| a));
        let new_losses = missing.len() as u64 - out.lost;
        assert!(
            !strict || missing.is_empty(),
            "after round {round}: {} acknowledged messages never delivered, first {:?} (seed {seed})",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        println!(
            "round {round:4}: drained, {} of {} acknowledged messages delivered, {new_losses} newly lost",
            publisher.next_seq - missing.len() as u64,
            publisher.next_seq
        );
        out.lost = missing.len() as u64;
        out.rounds_checked += rounds_since_drain;
        rounds_since_drain = 0;
        if new_losses > 0 {
            out.drains_with_loss += 1;
        }
        let alive = d.sigkill_alive();
        assert!(alive, "holdfast exited during the drain\n{}", d.log_text());
        out.kills += 1;
        if stop_at_loss && out.lost > 0 {
            break;
        }
    }
    out.publisher = publisher.counts;
    out.subscriber = subscriber.counts;
    out.log = d.log_text();
    assert!(
        !out.log.contains("DATABASE IS CORRUPT"),
        "the store was found corrupt (seed {seed})\n{}",
        out.log
    );
    println!(
        "{name} loop (synchronous = {synchronous}): {} rounds in {:.1} s, {} messages, {} acknowledged, {} resends, {} DUP redeliveries, {} lost, {} anomalies (seed {seed})",
        out.rounds,
        started.elapsed().as_secs_f64(),
        out.publisher.sent,
        out.publisher.acked,
        out.publisher.resent,
        out.subscriber.redelivered,
        out.lost,
        out.subscriber.anomalies,
    );
    out
}
