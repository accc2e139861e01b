//! Helpers shared by the bridge fault tests: publishers of numbered messages and `SeqSub`,
//! a durable subscriber that checks, as messages arrive, that the first copies of the
//! sequence numbers are exactly 0, 1, 2, ... (no gap, no reordering) and counts later
//! copies as redeliveries.

use std::net::SocketAddr;
use std::time::Duration;

use crate::*;
use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use tokio::time::Instant;

/// Uplink data: local topic and its name upstream.
pub const UP_LOCAL: &str = "sensors/seq";
pub const UP_REMOTE: &str = "site/sensors/seq";
/// Downlink data: topic in the cloud and its local name.
pub const DOWN_REMOTE: &str = "site/cmd/seq";
pub const DOWN_LOCAL: &str = "cmd/seq";
/// Link probes (not counted as data).
pub const PROBE_LOCAL: &str = "sensors/probe";

pub fn pid_for(seq: u32) -> u16 {
    (seq % 65535) as u16 + 1
}

// ---------------------------------------------------------------------------------------
// Publishers

/// Connects a clean publisher, retrying while the broker (re)starts.
pub async fn publisher(addr: SocketAddr, id: &str) -> RawClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return RawClient::connect(addr, ProtocolVersion::V311, id).await;
        }
        assert!(Instant::now() < deadline, "{addr} does not accept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn publish_acked(c: &mut RawClient, topic: &str, payload: &[u8], id: u16) {
    c.publish(topic, payload, QoS::AtLeastOnce, id).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => {
            assert!(a.reason_code < 0x80, "{a:?}");
            assert_eq!(a.packet_id, id);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Publishes `seqs` on `topic`, `window` at a time, and waits for every PUBACK.
pub async fn publish_seqs(c: &mut RawClient, topic: &str, seqs: std::ops::Range<u32>, window: u32) {
    let mut next = seqs.start;
    while next < seqs.end {
        let batch = (seqs.end - next).min(window);
        for s in next..next + batch {
            c.publish(topic, &s.to_be_bytes(), QoS::AtLeastOnce, pid_for(s))
                .await;
        }
        for _ in 0..batch {
            match c.recv().await {
                Some(Packet::PubAck(a)) => assert!(a.reason_code < 0x80, "{a:?}"),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        next += batch;
    }
}

/// Publishes `count` messages from `from` at `rate` per second, each waiting for its PUBACK;
/// returns how many were acknowledged.
pub fn steady_publisher(
    addr: SocketAddr,
    from: u32,
    count: u32,
    rate: u32,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut c = publisher(addr, "steady").await;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        for s in from..from + count {
            tick.tick().await;
            publish_acked(&mut c, UP_LOCAL, &s.to_be_bytes(), pid_for(s)).await;
        }
        count
    })
}

pub async fn probe(addr: SocketAddr) {
    let mut c = publisher(addr, "prober").await;
    publish_acked(&mut c, PROBE_LOCAL, b"probe", 1).await;
}

// ---------------------------------------------------------------------------------------
// The checking subscriber

/// A durable (clean session false) QoS 1 subscriber that reconnects by itself when its
/// broker goes away, acknowledges everything, and checks the order of sequence numbers
/// on `topic` as they arrive.
pub struct SeqSub {
    pub addr: SocketAddr,
    pub id: String,
    pub topic: String,
    pub c: Option<RawClient>,
    /// Next sequence number expected (all below arrived, in order).
    pub next: u32,
    /// Copies of already seen numbers, and how many of them had DUP set.
    pub dups: u32,
    pub dups_flagged: u32,
    pub probes: u32,
    pub reconnects: u32,
}

impl SeqSub {
    pub async fn start(addr: SocketAddr, id: &str, filter: &str, topic: &str) -> SeqSub {
        let mut s = SeqSub {
            addr,
            id: id.into(),
            topic: topic.into(),
            c: None,
            next: 0,
            dups: 0,
            dups_flagged: 0,
            probes: 0,
            reconnects: 0,
        };
        s.connect(Instant::now() + Duration::from_secs(10)).await;
        let mut c = s.c.take().unwrap();
        assert_eq!(c.subscribe(filter, QoS::AtLeastOnce).await, vec![1]);
        s.c = Some(c);
        s
    }

    /// (Re)connects with clean session false, retrying until `deadline`.
    pub async fn connect(&mut self, deadline: Instant) {
        loop {
            if let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await
            {
                drop(stream);
                let (c, ack) = RawClient::connect_with(
                    self.addr,
                    connect_packet(ProtocolVersion::V311, &self.id, false),
                )
                .await;
                if matches!(ack, Packet::ConnAck(ref a) if a.reason_code == 0) {
                    self.c = Some(c);
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: cannot reconnect to {}",
                self.id,
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Disconnects (the durable session keeps collecting).
    pub fn go_offline(&mut self) {
        self.c = None;
    }

    pub fn handle(&mut self, p: holdfast::protocol::Publish) {
        if *p.topic == *self.topic {
            let seq = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
            if seq == self.next {
                self.next += 1;
            } else if seq < self.next {
                self.dups += 1;
                self.dups_flagged += u32::from(p.dup);
            } else {
                panic!(
                    "{}: gap or reordering: got #{seq} while expecting #{} (a message was lost or overtaken)",
                    self.id, self.next
                );
            }
        } else if p.topic.ends_with("/probe") {
            self.probes += 1;
        }
    }

    /// Reads until `done(self)` holds; panics after `within`.
    pub async fn until(&mut self, within: Duration, what: &str, done: impl Fn(&SeqSub) -> bool) {
        if !self.try_until(within, &done).await {
            panic!(
                "{}: timed out after {within:?} waiting for {what} (next #{}, {} dups, {} reconnects)",
                self.id, self.next, self.dups, self.reconnects
            );
        }
    }

    /// Reads until `done(self)` holds (true) or `within` passes (false).
    pub async fn try_until(&mut self, within: Duration, done: &impl Fn(&SeqSub) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while !done(self) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if self.c.is_none() {
                self.connect(deadline + Duration::from_secs(5)).await;
                self.reconnects += 1;
            }
            let c = self.c.as_mut().unwrap();
            match c
                .recv_timeout(deadline.saturating_duration_since(now))
                .await
            {
                Err(()) => {}
                Ok(None) => self.c = None,
                Ok(Some(Packet::Publish(p))) => {
                    if p.qos != QoS::AtMostOnce {
                        c.puback(p.packet_id).await;
                    }
                    self.handle(p);
                }
                Ok(Some(Packet::PingResp)) | Ok(Some(Packet::SubAck(_))) => {}
                Ok(Some(other)) => panic!("{}: unexpected {other:?}", self.id),
            }
        }
        true
    }

    /// Waits until #0..#n-1 all arrived (in order).
    pub async fn wait_for(&mut self, n: u32, within: Duration) {
        self.until(within, &format!("#{}", n.saturating_sub(1)), |s| {
            s.next >= n
        })
        .await
    }

    /// Asserts nothing new arrives for `t` (duplicates are fine).
    pub async fn expect_no_new(&mut self, t: Duration) {
        let before = self.next;
        self.read_for(t).await;
        assert_eq!(self.next, before, "{}: unexpected new messages", self.id);
    }

    /// Reads until nothing new has arrived for `quiet`: what an upstream had accepted before
    /// a cut may still be on its way to this subscriber (which reads the upstream directly).
    pub async fn settle(&mut self, quiet: Duration) {
        loop {
            let before = self.next;
            self.read_for(quiet).await;
            if self.next == before {
                return;
            }
        }
    }

    /// Reads (and acknowledges) whatever arrives for `t`.
    async fn read_for(&mut self, t: Duration) {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if let Some(c) = self.c.as_mut() {
                match c.recv_timeout(deadline - Instant::now()).await {
                    Ok(Some(Packet::Publish(p))) => {
                        c.puback(p.packet_id).await;
                        self.handle(p);
                    }
                    Ok(None) => self.c = None,
                    _ => {}
                }
            } else {
                tokio::time::sleep(deadline - Instant::now()).await;
            }
        }
    }

    pub fn report(&self, test: &str) {
        eprintln!(
            "[{test}] {}: {} messages in order, {} redelivered copies ({} with DUP), {} reconnects",
            self.id, self.next, self.dups, self.dups_flagged, self.reconnects
        );
    }
}

/// Publishes a probe on the gateway until one arrives upstream: the bridge is connected
/// and (since it subscribes before attaching the outbox) its `in` rules are subscribed.
pub async fn wait_link(gw: SocketAddr, cloud: &mut SeqSub, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        probe(gw).await;
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "bridge did not come up within {within:?}");
        let want = cloud.probes + 1;
        if cloud
            .try_until(left.min(Duration::from_secs(2)), &|s| s.probes >= want)
            .await
        {
            return;
        }
    }
}

/// The first bridge's status as JSON (through the running broker's admin socket in
/// `data_dir`), as `holdfast bridge status --json` prints it.
pub async fn bridge_status(data_dir: &std::path::Path) -> serde_json::Value {
    let dir = data_dir.to_path_buf();
    let all = tokio::task::spawn_blocking(move || holdfast::admin::bridge_status(&dir))
        .await
        .expect("join")
        .expect("admin socket answers")
        .expect("a broker runs");
    let first = all.into_iter().next().expect("one bridge");
    serde_json::to_value(first).expect("serializable")
}

/// The bridge rules most bridge tests use: `sensors/#` out to `site/sensors/#` and
/// `site/cmd/#` in to `cmd/#`, QoS 1.
pub fn site_rules() -> Vec<holdfast::bridge::TopicRule> {
    use holdfast::bridge::{Direction, TopicRule};
    let rule = |pattern: &str, direction| TopicRule {
        pattern: pattern.into(),
        direction,
        qos: 1,
        local_prefix: String::new(),
        remote_prefix: "site/".into(),
        priority: 0,
        queue_qos0: false,
    };
    vec![
        rule("sensors/#", Direction::Out),
        rule("cmd/#", Direction::In),
    ]
}
