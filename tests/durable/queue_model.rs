//! Model-based test of a durable subscriber's queue against the real broker (in process).
//!
//! Random sequences of operations (publish, receive with and without acknowledging,
//! disconnect, reconnect, graceful restart, a message that expires while queued) drive the
//! broker and a small in-memory model of the subscriber's queue side by side. The model says
//! exactly which message must arrive next; unacknowledged messages come back after a
//! reconnect or restart, those the client has already seen with DUP = 1. `max_inflight` is 4
//! so most messages wait in the queue, and long offline stretches push the queue past the 64
//! messages a durable session keeps in memory, so it is read back from disk.

use crate::common;
use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use common::*;
use holdfast::protocol::{Disconnect, Packet, ProtocolVersion, PubAckLike, Publish, QoS};
use proptest::prelude::*;

const WINDOW: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// The publisher sends n QoS 1 messages and waits for their PUBACKs.
    Publish(u32),
    /// The subscriber (if online) reads up to k messages, acknowledging each.
    Receive(usize),
    /// The subscriber (if online) reads up to k messages without acknowledging them.
    ReceiveNoAck(usize),
    Disconnect,
    Reconnect,
    /// Graceful broker restart on the same data dir (everyone is disconnected).
    Restart,
    /// While the subscriber is offline: a message with a 1 s expiry, then wait past it.
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop_oneof![1..8u32, 60..90u32].prop_map(Op::Publish),
        4 => (1..12usize).prop_map(Op::Receive),
        2 => (1..6usize).prop_map(Op::ReceiveNoAck),
        2 => Just(Op::Disconnect),
        3 => Just(Op::Reconnect),
        1 => Just(Op::Restart),
        1 => Just(Op::Expire),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Msg {
    id: u32,
    /// The client read it (and did not acknowledge it): a resend must carry DUP = 1.
    seen: bool,
    /// It was within the in-flight window while the client was online: the broker may have
    /// sent it, so a resend may carry DUP = 1.
    maybe_sent: bool,
}

/// The subscriber's queue as the broker must present it: unacknowledged messages in order.
#[derive(Default)]
struct Model {
    msgs: VecDeque<Msg>,
    online: bool,
    /// The first `read` messages were read on the current connection and not acknowledged.
    read: usize,
    next_id: u32,
}

impl Model {
    fn window_sent(&mut self) {
        if self.online {
            for m in self.msgs.iter_mut().take(WINDOW) {
                m.maybe_sent = true;
            }
        }
    }

    fn offline(&mut self) {
        self.online = false;
        self.read = 0;
    }
}

struct Sub {
    c: RawClient,
    /// PUBLISHes that arrived while waiting for a PINGRESP.
    early: VecDeque<Publish>,
}

impl Sub {
    async fn next(&mut self) -> Publish {
        if let Some(p) = self.early.pop_front() {
            return p;
        }
        self.c.recv_publish().await
    }

    /// PINGREQ/PINGRESP: the connection forwards packets to the router in order, so every
    /// PUBACK sent before has reached the router once the PINGRESP is back.
    async fn barrier(&mut self) {
        self.c.send(Packet::PingReq).await;
        loop {
            match self.c.recv().await {
                Some(Packet::PingResp) => return,
                Some(Packet::Publish(p)) => self.early.push_back(p),
                other => panic!("expected PINGRESP, got {other:?}"),
            }
        }
    }
}

fn payload_id(p: &Publish) -> u32 {
    std::str::from_utf8(&p.payload)
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("payload {:?}", p.payload))
}

struct World {
    dir: tempfile::TempDir,
    broker: Option<TestBroker>,
    publisher: Option<RawClient>,
    next_pid: u16,
    sub: Option<Sub>,
    model: Model,
    /// Ids that expired: they must never arrive.
    expired: HashSet<u32>,
    expires_done: bool,
}

async fn start(dir: &Path) -> TestBroker {
    let dir = dir.to_path_buf();
    start_broker(move |c| {
        c.data_dir = dir;
        c.store.synchronous = holdfast::store::Synchronous::Normal;
        c.mqtt.max_inflight = WINDOW as u16;
        c.mqtt.max_queued_messages = 0;
    })
    .await
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path()).await;
        let mut w = World {
            dir,
            broker: Some(broker),
            publisher: None,
            next_pid: 0,
            sub: None,
            model: Model::default(),
            expired: HashSet::new(),
            expires_done: false,
        };
        let mut s = w.connect_sub(true).await;
        assert_eq!(s.c.subscribe("m/#", QoS::AtLeastOnce).await, vec![1]);
        w.sub = Some(s);
        w.model.online = true;
        w
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.broker.as_ref().unwrap().addr
    }

    async fn connect_sub(&self, clean: bool) -> Sub {
        let mut c = connect_packet(ProtocolVersion::V5, "sub", clean);
        c.properties.session_expiry_interval = Some(300);
        let (c, ack) = RawClient::connect_with(self.addr(), c).await;
        match ack {
            Packet::ConnAck(a) if a.reason_code == 0 => assert_eq!(a.session_present, !clean),
            other => panic!("subscriber connect refused: {other:?}"),
        }
        Sub {
            c,
            early: VecDeque::new(),
        }
    }

    async fn publish(&mut self, n: u32, expiry: Option<u32>) -> Vec<u32> {
        if self.publisher.is_none() {
            self.publisher =
                Some(RawClient::connect(self.addr(), ProtocolVersion::V5, "pub").await);
        }
        let p = self.publisher.as_mut().unwrap();
        let mut ids = Vec::new();
        let mut left = n;
        while left > 0 {
            // Never more than the broker's Receive Maximum outstanding.
            let chunk = left.min(WINDOW as u32);
            let mut pids = Vec::new();
            for _ in 0..chunk {
                let id = self.model.next_id;
                self.model.next_id += 1;
                self.next_pid = self.next_pid % 60000 + 1;
                let mut m = publish(
                    "m/x",
                    id.to_string().as_bytes(),
                    QoS::AtLeastOnce,
                    self.next_pid,
                );
                m.properties.message_expiry_interval = expiry;
                p.send(Packet::Publish(m)).await;
                pids.push(self.next_pid);
                ids.push(id);
            }
            for pid in pids {
                match p.recv().await {
                    Some(Packet::PubAck(a)) => {
                        assert_eq!((a.packet_id, a.reason_code), (pid, 0), "PUBACK")
                    }
                    other => panic!("expected PUBACK, got {other:?}"),
                }
            }
            left -= chunk;
        }
        ids
    }

    /// Reads the next expected message and checks it against the model.
    async fn expect_next(&mut self, ack: bool) {
        let sub = self.sub.as_mut().unwrap();
        let p = sub.next().await;
        let id = payload_id(&p);
        let m = self.model.msgs[self.model.read];
        assert!(
            !self.expired.contains(&id),
            "expired message {id} delivered"
        );
        assert_eq!(id, m.id, "next message; model queue: {:?}", self.model.msgs);
        assert_eq!(p.qos, QoS::AtLeastOnce);
        if m.seen {
            assert!(p.dup, "{id} was seen before: DUP must be 1");
        }
        if !m.maybe_sent {
            assert!(!p.dup, "{id} was never sent: DUP must be 0");
        }
        if ack {
            sub.c
                .send(Packet::PubAck(PubAckLike::new(p.packet_id)))
                .await;
            self.model.msgs.remove(self.model.read);
        } else {
            self.model.msgs[self.model.read].seen = true;
            self.model.read += 1;
        }
    }

    /// How many messages must arrive now (window and queue permitting), up to k. With
    /// `ack` the window slides as they are acknowledged; without, at most what is left of it.
    fn available(&self, k: usize, ack: bool) -> usize {
        let m = &self.model;
        if !m.online || m.read >= WINDOW {
            return 0;
        }
        let n = k.min(m.msgs.len() - m.read);
        if ack {
            n
        } else {
            n.min(WINDOW - m.read)
        }
    }

    async fn go_offline(&mut self, graceful: bool) {
        if let Some(mut s) = self.sub.take() {
            s.barrier().await;
            if graceful {
                s.c.send(Packet::Disconnect(Disconnect {
                    reason_code: 0,
                    properties: Default::default(),
                }))
                .await;
                let _ = s.c.recv_timeout(Duration::from_secs(2)).await;
            }
        }
        self.model.window_sent();
        self.model.offline();
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish(n) => {
                let ids = self.publish(n, None).await;
                for id in ids {
                    self.model.msgs.push_back(Msg {
                        id,
                        seen: false,
                        maybe_sent: false,
                    });
                }
            }
            Op::Receive(k) => {
                for _ in 0..self.available(k, true) {
                    self.expect_next(true).await;
                }
            }
            Op::ReceiveNoAck(k) => {
                for _ in 0..self.available(k, false) {
                    self.expect_next(false).await;
                }
            }
            Op::Disconnect => {
                if self.model.online {
                    self.go_offline(true).await;
                }
            }
            Op::Reconnect => {
                if !self.model.online {
                    self.sub = Some(self.connect_sub(false).await);
                    self.model.online = true;
                }
            }
            Op::Restart => {
                if self.model.online {
                    self.go_offline(false).await;
                }
                self.publisher = None;
                let b = self.broker.take().unwrap();
                b.shutdown().await;
                self.broker = Some(start(self.dir.path()).await);
            }
            Op::Expire => {
                if !self.model.online && !self.expires_done {
                    self.expires_done = true;
                    let ids = self.publish(1, Some(1)).await;
                    self.expired.extend(ids);
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                }
            }
        }
        self.model.window_sent();
    }

    /// Reconnects if needed, acknowledges everything, and checks nothing else arrives.
    async fn finish(mut self) {
        if !self.model.online {
            self.apply(&Op::Reconnect).await;
        }
        // Acknowledge what was read without acking on this connection: PUBACKs in order.
        // (They are simply acked by reconnecting once more; simpler: go offline and back.)
        if self.model.read > 0 {
            self.go_offline(true).await;
            self.apply(&Op::Reconnect).await;
        }
        while self.available(usize::MAX, true) > 0 {
            self.expect_next(true).await;
            self.model.window_sent();
        }
        let sub = self.sub.as_mut().unwrap();
        assert!(sub.early.is_empty(), "extra: {:?}", sub.early);
        sub.c.expect_silence(Duration::from_millis(300)).await;
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
    }
}

fn run(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut w = World::new().await;
        for op in &ops {
            w.apply(op).await;
        }
        w.finish().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        // HOLDFAST_MODEL_CASES=200 for a longer search.
        cases: std::env::var("HOLDFAST_MODEL_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(12),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn durable_queue_matches_the_model(ops in proptest::collection::vec(op(), 1..20)) {
        run(ops);
    }
}

/// A fixed sequence through the disk read-back path, restarts and expiry, so that these
/// paths are covered whatever the random cases turn out to be.
#[test]
fn durable_queue_fixed_scenario() {
    run(vec![
        Op::Publish(3),
        Op::ReceiveNoAck(2),
        Op::Disconnect,
        Op::Publish(70),
        Op::Expire,
        Op::Publish(5),
        Op::Restart,
        Op::Reconnect,
        Op::Receive(10),
        Op::ReceiveNoAck(3),
        Op::Restart,
        Op::Publish(80),
        Op::Reconnect,
        Op::Receive(100),
    ]);
}
