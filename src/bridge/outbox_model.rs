//! A model test of a bridge outbox, in the style of vector's disk_v2 `tests/model`: random
//! sequences of [`Action`]s drive the real gateway (router, store writer, SQLite file in a
//! temp dir, the outbox standing session built from a real `[[bridge]]` section) and a
//! small reference model side by side.
//!
//! The test plays the bridge's pump through the same typed handle the pump uses
//! (`broker::client`): it attaches as the outbox `$bridge/<name>` with the bridge's
//! options, takes the PUBLISH packets the router hands it as "sent upstream", and answers
//! them with [`ClientTx::upstream_ack`] as the pump does for an upstream PUBACK. The real
//! bridge task of the `[[bridge]]` section points at a closed port and never attaches.
//!
//! What must hold (checked against the model):
//! - upstream sees every QoS 1 message the gateway acknowledged locally, first receipts in
//!   publish order; the only messages missing are at most the ones the queue policy
//!   counted as dropped;
//! - a message comes again only if upstream had not acknowledged it (after a link drop or
//!   a restart), and then with DUP set; QoS 0 messages come at most once;
//! - at settle points the router's queue count equals the unsent rows on disk, and at the
//!   end, with everything acknowledged upstream, both are zero.
//!
//! Store answers arrive late: actions are sent without waiting for commits, and half the
//! cases run with `store.commit_delay_ms = 4`, so the publisher's PUBACKs, the outbox's
//! deliveries and the upstream's acknowledgements interleave with the writer's commits.
//! (Timing decides the exact interleaving; the deterministic, step-by-step ones are
//! `broker::router`'s own model test on its harness, which cannot host a standing session
//! without a hook in `router::harness`.)
//!
//! 24 cases per property in CI; `PROPTEST_CASES=300` for a longer search.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rusqlite::OptionalExtension;

use super::{outbox_id, BridgeConfig, Direction, TopicRule};
use crate::app::Gateway;
use crate::broker::client::{ClientOptions, ClientRx, ClientTx, Outgoing};
use crate::config::{Config, ListenerConfig, QueuePolicy};
use crate::protocol::{Packet, ProtocolVersion, Publish, QoS};

const BRIDGE: &str = "model";
/// The outbox's window: small, so messages wait in the queue while others are in flight.
const WINDOW: u16 = 4;
/// Bound on anything that must happen (a PUBACK, a commit): a hang fails, it never waits
/// for ever.
const BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Action {
    /// A local client publishes `n` messages to the bridged topic, QoS 1 or QoS 0; their
    /// PUBACKs come when they come.
    Publish { n: u8, qos1: bool },
    /// The upstream acknowledges the oldest `n` messages in flight (a broker acknowledges
    /// in order), after the outbox took what the router sent it.
    UpstreamAck(u8),
    /// The link drops: the outbox detaches; what was in flight goes back to its queue.
    Drop,
    /// The link is back: the outbox attaches again and the router resends.
    Reconnect,
    /// Every PUBACK and delivery due arrives; counts are checked against the disk.
    Settle,
    /// The gateway stops (gracefully) and starts again on the same files.
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        // Publishing and acknowledging dominate, so the queue fills and drains (and with
        // a limit, overflows) many times per case.
        6 => (1..12u8, prop::bool::weighted(0.8)).prop_map(|(n, qos1)| Action::Publish { n, qos1 }),
        5 => (1..6u8).prop_map(Action::UpstreamAck),
        // Drops without a settle before them catch in-flight messages whose rows are not
        // committed yet (relay sessions send before the commit).
        2 => Just(Action::Drop),
        3 => Just(Action::Reconnect),
        2 => Just(Action::Settle),
        // Restarts are the most expensive step (a gateway start, ~tens of ms).
        1 => Just(Action::Restart),
    ]
}

/// `store.commit_delay_ms`: 0 answers each batch at once; a few milliseconds make every
/// store answer late, so upstream acknowledgements, drops and reconnects land between a
/// message's delivery and its row's commit (relay sessions send before the commit).
fn commit_delay() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 1 => Just(4u64)]
}

fn gateway_config(dir: &std::path::Path, limit: u64, commit_delay_ms: u64) -> Config {
    let bridge = BridgeConfig {
        name: BRIDGE.into(),
        // A closed port: the real bridge task never attaches; the test is its pump.
        address: "127.0.0.1:1".into(),
        notifications: false,
        client_id: None,
        username: None,
        password: None,
        reconnect_min_ms: 60_000,
        reconnect_max_ms: 60_000,
        inflight: WINDOW,
        max_queued_messages: limit,
        queue_policy: QueuePolicy::DropOldest,
        topic: vec![TopicRule {
            pattern: "m/#".into(),
            direction: Direction::Out,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: String::new(),
            priority: 0,
            ..BridgeConfig::example().topic[0].clone()
        }],
        ..BridgeConfig::example()
    };
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        listener: vec![ListenerConfig::new("127.0.0.1:0")],
        bridge: vec![bridge],
        ..Default::default()
    };
    cfg.store.commit_delay_ms = commit_delay_ms;
    cfg
}

struct World {
    dir: tempfile::TempDir,
    cfg: Config,
    gw: Option<Gateway>,
    outbox_id: Arc<str>,
    publisher: Option<(ClientTx, ClientRx)>,
    outbox: Option<(ClientTx, ClientRx)>,
    next_id: u32,
    next_pid: u16,
    /// Publisher packet id → message id, QoS 1 PUBACK not received yet.
    pending: HashMap<u16, u32>,
    /// QoS 1 messages the gateway acknowledged locally.
    acked: Vec<u32>,
    refused: HashSet<u32>,
    /// QoS 1 messages whose PUBACK was still due when the gateway stopped.
    unknown: HashSet<u32>,
    qos0: HashSet<u32>,
    /// Delivered on the current attachment and not acknowledged upstream: (packet id, id).
    in_flight: VecDeque<(u16, u32)>,
    upstream_acked: HashSet<u32>,
    /// Every delivery upstream in arrival order: (id, DUP, QoS).
    got: Vec<(u32, bool, QoS)>,
    seen: HashSet<u32>,
    /// The outbox's drop counter from earlier runs of the gateway (counters live in memory).
    dropped_before: u64,
    /// Of those, QoS 0 messages dropped while the outbox was detached.
    dropped_qos0_before: u64,
}

fn message_id(p: &Publish) -> u32 {
    std::str::from_utf8(&p.payload[..8])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("payload starts with the message id")
}

impl World {
    fn gw(&self) -> &Gateway {
        self.gw.as_ref().expect("gateway running")
    }

    async fn attach_outbox(&mut self) {
        let opts = ClientOptions {
            client_id: self.outbox_id.clone(),
            clean_start: false,
            expiry_interval: u32::MAX,
            protocol: ProtocolVersion::V5,
            window: WINDOW,
            compact_packet_ids: true,
        };
        let c = self.gw().broker().connect(opts).await.expect("router up");
        self.in_flight.clear();
        self.outbox = Some(c);
    }

    async fn publisher(&mut self) -> &ClientTx {
        if self.publisher.is_none() {
            let opts = ClientOptions {
                client_id: "model-publisher".into(),
                clean_start: true,
                expiry_interval: 0,
                protocol: ProtocolVersion::V5,
                window: 64,
                compact_packet_ids: false,
            };
            self.publisher = Some(self.gw().broker().connect(opts).await.expect("router up"));
        }
        &self.publisher.as_ref().expect("just set").0
    }

    /// The publisher's acknowledgements received so far.
    fn take_pubacks(&mut self) {
        let Some((_, rx)) = self.publisher.as_mut() else {
            return;
        };
        while let Ok(out) = rx.try_recv() {
            if let Outgoing::Packet(p) = out {
                if let Packet::PubAck(a) = *p {
                    let Some(id) = self.pending.remove(&a.packet_id) else {
                        continue;
                    };
                    if a.reason_code < 0x80 {
                        self.acked.push(id);
                    } else {
                        self.refused.insert(id);
                    }
                }
            }
        }
    }

    /// What the router handed the outbox so far: "sent upstream".
    fn take_deliveries(&mut self) {
        let Some((_, rx)) = self.outbox.as_mut() else {
            return;
        };
        let mut got = Vec::new();
        while let Ok(out) = rx.try_recv() {
            match out {
                Outgoing::Packet(p) => {
                    if let Packet::Publish(p) = *p {
                        got.push(p);
                    }
                }
                Outgoing::Disconnect(code) => {
                    panic!("the router detached the outbox ({code:#04x})")
                }
            }
        }
        for p in got {
            let id = message_id(&p);
            assert!(
                !self.upstream_acked.contains(&id),
                "message {id} delivered again after upstream acknowledged it (got {:?})",
                self.got
            );
            if p.qos == QoS::AtMostOnce {
                assert!(
                    !self.seen.contains(&id),
                    "QoS 0 message {id} delivered twice"
                );
            } else {
                assert!(
                    !self.seen.contains(&id) || p.dup,
                    "message {id} delivered again without DUP"
                );
                self.in_flight.push_back((p.packet_id, id));
            }
            self.got.push((id, p.dup, p.qos));
            self.seen.insert(id);
        }
    }

    async fn apply(&mut self, a: &Action) {
        match *a {
            Action::Publish { n, qos1 } => {
                for _ in 0..n {
                    let id = self.next_id;
                    self.next_id += 1;
                    let qos = if qos1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    let packet_id = if qos1 {
                        self.next_pid = self.next_pid % 60_000 + 1;
                        self.pending.insert(self.next_pid, id);
                        self.next_pid
                    } else {
                        self.qos0.insert(id);
                        0
                    };
                    let mut payload = format!("{id:08}").into_bytes();
                    payload.resize(64, b'.');
                    let p = Publish {
                        dup: false,
                        qos,
                        retain: false,
                        topic: "m/x".into(),
                        packet_id,
                        properties: Default::default(),
                        payload: payload.into(),
                    };
                    self.publisher().await.publish(p).await.expect("router up");
                }
                self.take_pubacks();
            }
            Action::UpstreamAck(n) => {
                self.take_deliveries();
                let Some((tx, _)) = self.outbox.as_ref() else {
                    return;
                };
                for _ in 0..n {
                    let Some((pid, id)) = self.in_flight.pop_front() else {
                        break;
                    };
                    tx.upstream_ack(pid).await.expect("router up");
                    self.upstream_acked.insert(id);
                }
            }
            Action::Drop => {
                if let Some((tx, _)) = self.outbox.take() {
                    tx.disconnect().await;
                }
                self.in_flight.clear();
            }
            Action::Reconnect => {
                if self.outbox.is_none() {
                    self.attach_outbox().await;
                }
            }
            Action::Settle => {
                self.settle().await;
                self.check_counts().await;
            }
            Action::Restart => {
                self.take_pubacks();
                self.unknown.extend(self.pending.drain().map(|(_, id)| id));
                self.publisher = None;
                self.outbox = None;
                self.in_flight.clear();
                let (dropped, dropped_qos0) = self.drop_counters().await;
                self.dropped_before += dropped;
                self.dropped_qos0_before += dropped_qos0;
                if let Some(gw) = self.gw.take() {
                    gw.shutdown().await;
                }
                self.gw = Some(Gateway::start(&self.cfg).await.expect("gateway restarts"));
            }
        }
    }

    /// Waits for every PUBACK due and for the outbox's deliveries to stop coming.
    async fn settle(&mut self) {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            self.take_pubacks();
            if self.pending.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "PUBACKs never came for {:?}",
                self.pending
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if self.outbox.is_none() {
            return;
        }
        // Deliveries are complete when the router's in-flight window holds exactly what
        // the outbox took, and it is full or nothing waits behind it.
        loop {
            self.take_deliveries();
            let stats = self.gw().broker().session_stats(&self.outbox_id).await;
            let stats = stats.expect("the outbox session exists");
            let taken = self.in_flight.len() as u64;
            if stats.inflight == taken && (stats.queued == 0 || taken >= u64::from(WINDOW)) {
                self.take_deliveries();
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "deliveries never settled: router {stats:?}, outbox took {taken}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// This run's (drops counted on the outbox, QoS 0 drops while detached).
    async fn drop_counters(&self) -> (u64, u64) {
        let broker = self.gw().broker();
        let dropped = broker
            .session_stats(&self.outbox_id)
            .await
            .map_or(0, |s| s.dropped);
        let snapshot = broker.snapshot().await.expect("router up");
        (dropped, snapshot.stats.dropped_qos0_bridge_offline)
    }

    /// (the router's count of waiting messages, unsent rows on disk, all rows on disk).
    async fn counts(&self) -> (u64, u64, u64) {
        let stats = self.gw().broker().session_stats(&self.outbox_id).await;
        let queued = stats.map_or(0, |s| s.queued);
        let db = crate::store::inspect::open_store_read_only(self.dir.path()).expect("store");
        // The standing session's row is written at start-up, not necessarily committed yet.
        let sid: Option<i64> = db
            .query_row(
                "SELECT sid FROM session WHERE client_id = ?1",
                [&*self.outbox_id],
                |r| r.get(0),
            )
            .optional()
            .expect("read the session table");
        let Some(sid) = sid else {
            return (queued, 0, 0);
        };
        let (lo, hi) = crate::store::queue_range(sid as u64);
        let count = |sql: &str| -> u64 {
            db.query_row(sql, [lo, hi], |r| r.get::<_, i64>(0))
                .expect("count rows") as u64
        };
        let unsent =
            count("SELECT count(*) FROM queue_all WHERE id BETWEEN ?1 AND ?2 AND state = 0");
        let all = count("SELECT count(*) FROM queue_all WHERE id BETWEEN ?1 AND ?2");
        (queued, unsent, all)
    }

    /// The router's count equals the unsent rows on disk (bookkeeping that rides along
    /// with a later commit gets until `BOUND` to land).
    async fn check_counts(&self) {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let (queued, unsent, _) = self.counts().await;
            if queued == unsent {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "router counts {queued} queued, disk holds {unsent} unsent rows"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(mut self) {
        self.settle().await;
        if self.outbox.is_none() {
            self.attach_outbox().await;
        }
        // Upstream takes and acknowledges everything until nothing more comes.
        loop {
            self.settle().await;
            if self.in_flight.is_empty() {
                break;
            }
            while !self.in_flight.is_empty() {
                self.apply(&Action::UpstreamAck(u8::MAX)).await;
            }
        }
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let counts = self.counts().await;
            if counts == (0, 0, 0) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "outbox not empty at the end: (queued, unsent rows, rows) = {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (dropped, dropped_qos0) = self.drop_counters().await;
        // The session's counter counts QoS 0 messages dropped while it was detached too.
        let dropped = self.dropped_before + dropped - (self.dropped_qos0_before + dropped_qos0);
        let mut first = Vec::new();
        let mut firsts = HashSet::new();
        for (id, _, qos) in &self.got {
            if *qos != QoS::AtMostOnce && firsts.insert(*id) {
                first.push(*id);
            }
        }
        assert!(
            first.windows(2).all(|w| w[0] < w[1]),
            "QoS 1 messages reached upstream out of order: {first:?}"
        );
        for id in &first {
            assert!(
                self.acked.contains(id)
                    || self.unknown.contains(id)
                    || self.pending.values().any(|v| v == id),
                "message {id} went upstream but was never published at QoS 1"
            );
            assert!(
                !self.refused.contains(id),
                "refused message {id} went upstream"
            );
            assert!(
                !self.qos0.contains(id),
                "QoS 0 message {id} went upstream as QoS 1"
            );
        }
        let lost: Vec<u32> = self
            .acked
            .iter()
            .filter(|id| !firsts.contains(id))
            .copied()
            .collect();
        assert!(
            lost.len() as u64 <= dropped,
            "acknowledged messages never reached upstream beyond the {dropped} counted drops: {lost:?}"
        );
        if let Some(gw) = self.gw.take() {
            gw.shutdown().await;
        }
    }
}

fn run(actions: &[Action], limit: u64, commit_delay_ms: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = gateway_config(dir.path(), limit, commit_delay_ms);
        let gw = Gateway::start(&cfg).await.expect("gateway starts");
        let mut w = World {
            dir,
            cfg,
            gw: Some(gw),
            outbox_id: outbox_id(BRIDGE, 0).into(),
            publisher: None,
            outbox: None,
            next_id: 0,
            next_pid: 0,
            pending: HashMap::new(),
            acked: Vec::new(),
            refused: HashSet::new(),
            unknown: HashSet::new(),
            qos0: HashSet::new(),
            in_flight: VecDeque::new(),
            upstream_acked: HashSet::new(),
            got: Vec::new(),
            seen: HashSet::new(),
            dropped_before: 0,
            dropped_qos0_before: 0,
        };
        w.attach_outbox().await;
        for a in actions {
            w.apply(a).await;
        }
        w.finish().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_outbox_delivers_every_acknowledged_message_in_order_through_drops_and_restarts(
        actions in proptest::collection::vec(action(), 1..40),
        commit_delay_ms in commit_delay(),
    ) {
        run(&actions, 0, commit_delay_ms);
    }

    #[test]
    fn a_full_outbox_drops_only_what_its_policy_counts(
        actions in proptest::collection::vec(action(), 1..40),
        commit_delay_ms in commit_delay(),
    ) {
        run(&actions, 10, commit_delay_ms);
    }
}
