//! The bridge for fleets (issue 15): failover across an address list and failback to the
//! primary, the link state published upstream (retained `1`, will `0`), per-bridge
//! Prometheus metrics, `linger_ms` and MQTT 5 topic aliases. The upstreams are two real
//! Mosquitto brokers, each behind the fault-injecting proxy (`common/proxy.rs`).

use crate::common::{self, daemon, metrics, mosquitto, proxy, seq};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use holdfast::bridge::{BridgeConfig, BridgeProtocol, Direction, TopicRule};
use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use mosquitto::{have_mosquitto, Mosquitto};
use proxy::Proxy;
use seq::*;
use tokio::time::Instant;

const CLIENT_ID: &str = "gw-fleet";
const STATE_TOPIC: &str = "holdfast/gw-fleet/state";

fn bridge_to(addresses: &[SocketAddr], protocol: BridgeProtocol) -> BridgeConfig {
    BridgeConfig {
        name: "up".into(),
        address: addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .into(),
        protocol,
        client_id: Some(CLIENT_ID.into()),
        username: None,
        password: None,
        reconnect_min_ms: 100,
        reconnect_max_ms: 1000,
        connect_timeout_secs: 2,
        ack_timeout_secs: 2,
        failback_secs: 3600,
        topic: vec![TopicRule {
            pattern: "sensors/#".into(),
            direction: Direction::Out,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: "site/".into(),
            priority: 0,
            queue_qos0: false,
        }],
        ..BridgeConfig::example()
    }
}

async fn gateway(b: BridgeConfig) -> TestBroker {
    start_broker(|c| {
        c.bridge = vec![b];
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await
}

async fn status(data_dir: &Path) -> serde_json::Value {
    crate::common::seq::bridge_status(data_dir).await
}

async fn wait_status(
    dir: &Path,
    what: &str,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let st = status(dir).await;
        if ok(&st) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn connected_to(addr: SocketAddr) -> impl Fn(&serde_json::Value) -> bool {
    move |st| st["connected"] == true && st["address"] == addr.to_string()
}

/// Messages seen on the state topic: (payload, retain flag).
type States = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;

/// A subscriber on an upstream broker that records, in arrival order, the sequence numbers
/// of the uplink data and every message on the state topic (payload, retain flag).
struct Collector {
    seqs: Arc<Mutex<Vec<u32>>>,
    states: States,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(addr: SocketAddr, id: &str) -> Collector {
        let mut c = RawClient::connect(addr, ProtocolVersion::V311, id).await;
        assert_eq!(c.subscribe("site/#", QoS::AtLeastOnce).await, vec![1]);
        assert_eq!(c.subscribe(STATE_TOPIC, QoS::AtLeastOnce).await, vec![1]);
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let states = Arc::new(Mutex::new(Vec::new()));
        let (s, t) = (seqs.clone(), states.clone());
        let task = tokio::spawn(async move {
            loop {
                match c.recv_timeout(Duration::from_secs(3600)).await {
                    Ok(Some(Packet::Publish(p))) => {
                        if p.qos != QoS::AtMostOnce {
                            c.puback(p.packet_id).await;
                        }
                        if &*p.topic == UP_REMOTE {
                            let seq = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
                            s.lock().unwrap().push(seq);
                        } else if &*p.topic == STATE_TOPIC {
                            t.lock().unwrap().push((p.payload.to_vec(), p.retain));
                        }
                    }
                    Ok(Some(_)) | Err(()) => {}
                    Ok(None) => return,
                }
            }
        });
        Collector { seqs, states, task }
    }

    fn seqs(&self) -> Vec<u32> {
        self.seqs.lock().unwrap().clone()
    }

    fn states(&self) -> Vec<(Vec<u8>, bool)> {
        self.states.lock().unwrap().clone()
    }

    async fn wait_state(&self, payload: &[u8], within: Duration) {
        let deadline = Instant::now() + within;
        while !self.states().iter().any(|(p, _)| p == payload) {
            assert!(
                Instant::now() < deadline,
                "state {:?} not seen upstream: {:?}",
                String::from_utf8_lossy(payload),
                self.states()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The first copies of the numbers, read over `lists` in order (the primary's, then the
/// backup's), must be exactly 0..n: nothing lost, nothing overtaken. Returns the copies
/// seen again (resent after the switch).
fn check_in_order(lists: &[Vec<u32>], n: u32) -> u32 {
    let mut next = 0;
    let mut dups = 0;
    for l in lists {
        for &s in l {
            if s == next {
                next += 1;
            } else if s < next {
                dups += 1;
            } else {
                panic!("gap or reordering: #{s} while expecting #{next}: {lists:?}");
            }
        }
    }
    assert_eq!(next, n, "every message arrived: {lists:?}");
    dups
}

async fn wait_total(cols: &[&Collector], n: u32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut all: Vec<u32> = cols.iter().flat_map(|c| c.seqs()).collect();
        all.sort_unstable();
        all.dedup();
        if all.len() as u32 >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived upstream",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Failover

/// The primary is cut (and refuses new connections) while messages flow: the bridge
/// switches to the backup, which gets the rest in order; what the primary did not
/// acknowledge is resent there; nothing is lost. Status shows the backup in use.
#[tokio::test]
async fn primary_cut_mid_stream_the_backup_gets_the_rest_in_order() {
    if !have_mosquitto() {
        return;
    }
    let (a, b) = (Mosquitto::start().await, Mosquitto::start().await);
    let (pa, pb) = (Proxy::start(a.addr()).await, Proxy::start(b.addr()).await);
    let ca = Collector::start(a.addr(), "cloud-a").await;
    let cb = Collector::start(b.addr(), "cloud-b").await;
    let gw = gateway(bridge_to(&[pa.addr, pb.addr], BridgeProtocol::V311)).await;
    let dir = gw.dir.path().to_path_buf();
    wait_status(
        &dir,
        "on the primary",
        Duration::from_secs(10),
        connected_to(pa.addr),
    )
    .await;

    const N: u32 = 600;
    let publisher = steady_publisher(gw.addr, 0, N, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ca.seqs().len() < 150 {
        assert!(Instant::now() < deadline, "nothing reaches the primary");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pa.outage();
    let cut_at = ca.seqs().len();
    wait_status(
        &dir,
        "on the backup",
        Duration::from_secs(10),
        connected_to(pb.addr),
    )
    .await;
    assert_eq!(
        publisher.await.unwrap(),
        N,
        "every local publish acknowledged"
    );
    wait_total(&[&ca, &cb], N, Duration::from_secs(20)).await;
    // Give the primary's subscriber a moment for what Mosquitto had accepted before the cut.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (la, lb) = (ca.seqs(), cb.seqs());
    let dups = check_in_order(&[la.clone(), lb.clone()], N);
    eprintln!(
        "[failover] primary got {} (cut at {cut_at}), backup {}, {dups} resent copies",
        la.len(),
        lb.len()
    );
    assert!(lb.len() >= (N as usize) / 4, "the backup carried the rest");
    let st = status(&dir).await;
    assert_eq!(
        st["addresses"],
        serde_json::json!([pa.addr.to_string(), pb.addr.to_string()])
    );
    gw.shutdown().await;
}

/// With the primary down at start-up the bridge uses the backup; once the primary answers
/// again it goes back within `failback_secs` (probe) and new messages reach the primary,
/// in order after those the backup got.
#[tokio::test]
async fn failback_returns_to_the_primary_once_it_answers() {
    if !have_mosquitto() {
        return;
    }
    let (a, b) = (Mosquitto::start().await, Mosquitto::start().await);
    let (pa, pb) = (Proxy::start(a.addr()).await, Proxy::start(b.addr()).await);
    pa.outage();
    let ca = Collector::start(a.addr(), "cloud-a").await;
    let cb = Collector::start(b.addr(), "cloud-b").await;
    let cfg = BridgeConfig {
        failback_secs: 1,
        ..bridge_to(&[pa.addr, pb.addr], BridgeProtocol::V311)
    };
    let gw = gateway(cfg).await;
    let dir = gw.dir.path().to_path_buf();
    wait_status(
        &dir,
        "on the backup",
        Duration::from_secs(10),
        connected_to(pb.addr),
    )
    .await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..50, 10).await;
    wait_total(&[&cb], 50, Duration::from_secs(10)).await;

    pa.restore();
    wait_status(
        &dir,
        "back on the primary",
        Duration::from_secs(10),
        connected_to(pa.addr),
    )
    .await;
    publish_seqs(&mut sensor, UP_LOCAL, 50..100, 10).await;
    wait_total(&[&ca, &cb], 100, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    check_in_order(&[cb.seqs(), ca.seqs()], 100);
    assert!(
        ca.seqs().contains(&99),
        "new messages go to the primary: {:?}",
        ca.seqs()
    );
    // The switch ended the backup link politely: no `0` from a will there.
    assert!(
        !cb.states().iter().any(|(p, _)| p == b"0"),
        "{:?}",
        cb.states()
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Connection state upstream

async fn state_topic_is_retained_upstream(protocol: BridgeProtocol) {
    if !have_mosquitto() {
        return;
    }
    let a = Mosquitto::start().await;
    let gw = gateway(bridge_to(&[a.addr()], protocol)).await;
    wait_status(gw.dir.path(), "connected", Duration::from_secs(10), |st| {
        st["connected"] == true
    })
    .await;
    // A subscriber arriving later gets the retained `1`.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let late = Collector::start(a.addr(), "late").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if late.states().contains(&(b"1".to_vec(), true)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retained 1: {:?}",
            late.states()
        );
    }
    // A clean shutdown says `0` (3.1.1: published before DISCONNECT; 5: DISCONNECT 0x04).
    let watcher = Collector::start(a.addr(), "watcher").await;
    gw.shutdown().await;
    watcher.wait_state(b"0", Duration::from_secs(5)).await;
    let late = Collector::start(a.addr(), "later").await;
    late.wait_state(b"0", Duration::from_secs(5)).await;
    assert!(late.states().contains(&(b"0".to_vec(), true)), "retained");
}

#[tokio::test]
async fn state_topic_is_retained_upstream_v311() {
    state_topic_is_retained_upstream(BridgeProtocol::V311).await;
}

#[tokio::test]
async fn state_topic_is_retained_upstream_v5() {
    state_topic_is_retained_upstream(BridgeProtocol::V5).await;
}

/// The real binary, SIGKILLed: the upstream publishes the will, a retained `0`.
#[tokio::test]
async fn the_will_says_0_upstream_when_the_gateway_is_sigkilled() {
    if !have_mosquitto() {
        return;
    }
    let a = Mosquitto::start().await;
    let watcher = Collector::start(a.addr(), "watcher").await;
    let mut gw = daemon::Daemon::started(&format!(
        "[[bridge]]\nname = \"up\"\naddress = [\"{}\"]\nclient_id = \"{CLIENT_ID}\"\n\
         reconnect_min_ms = 100\n[[bridge.topic]]\npattern = \"sensors/#\"\nremote_prefix = \"site/\"\n",
        a.addr()
    ))
    .await;
    watcher.wait_state(b"1", Duration::from_secs(10)).await;
    gw.sigkill();
    watcher.wait_state(b"0", Duration::from_secs(5)).await;
    let late = Collector::start(a.addr(), "late").await;
    late.wait_state(b"0", Duration::from_secs(5)).await;
    assert_eq!(late.states().last(), Some(&(b"0".to_vec(), true)));
}

#[tokio::test]
async fn notifications_false_publishes_no_state() {
    if !have_mosquitto() {
        return;
    }
    let a = Mosquitto::start().await;
    let watcher = Collector::start(a.addr(), "watcher").await;
    let cfg = BridgeConfig {
        notifications: false,
        ..bridge_to(&[a.addr()], BridgeProtocol::V311)
    };
    let gw = gateway(cfg).await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..3, 3).await;
    wait_total(&[&watcher], 3, Duration::from_secs(10)).await;
    gw.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(watcher.states().is_empty(), "{:?}", watcher.states());
}

// ---------------------------------------------------------------------------------------
// Metrics

fn m(all: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *all.get(key)
        .unwrap_or_else(|| panic!("{key} missing: {all:#?}"))
}

/// `holdfast_bridge_*{bridge="up"}` follow the link: connected, backlog (messages, bytes,
/// age of the oldest) during an outage, reconnects and messages by result after it.
#[tokio::test]
async fn bridge_metrics_follow_the_link_and_the_backlog() {
    if !have_mosquitto() {
        return;
    }
    let a = Mosquitto::start().await;
    let pa = Proxy::start(a.addr()).await;
    let ca = Collector::start(a.addr(), "cloud-a").await;
    let gw = gateway(bridge_to(&[pa.addr], BridgeProtocol::V311)).await;
    let dir = gw.dir.path().to_path_buf();
    wait_status(
        &dir,
        "connected",
        Duration::from_secs(10),
        connected_to(pa.addr),
    )
    .await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..5, 5).await;
    wait_total(&[&ca], 5, Duration::from_secs(10)).await;
    wait_status(&dir, "acked", Duration::from_secs(5), |st| st["acked"] == 5).await;
    let s = metrics::scrape(&gw).await;
    assert_eq!(m(&s, "holdfast_bridge_connected{bridge=\"up\"}"), 1.0);
    let info = format!(
        "holdfast_bridge_address_info{{bridge=\"up\",address=\"{}\"}}",
        pa.addr
    );
    assert_eq!(m(&s, &info), 1.0);
    assert_eq!(
        m(&s, "holdfast_bridge_backlog_messages{bridge=\"up\"}"),
        0.0
    );
    assert_eq!(
        m(
            &s,
            "holdfast_bridge_oldest_message_age_seconds{bridge=\"up\"}"
        ),
        0.0
    );
    assert_eq!(
        m(&s, "holdfast_bridge_reconnects_total{bridge=\"up\"}"),
        0.0
    );
    assert_eq!(
        m(
            &s,
            "holdfast_bridge_messages_total{bridge=\"up\",result=\"sent\"}"
        ),
        5.0
    );
    assert_eq!(
        m(
            &s,
            "holdfast_bridge_messages_total{bridge=\"up\",result=\"acked\"}"
        ),
        5.0
    );
    assert_eq!(
        m(
            &s,
            "holdfast_bridge_messages_total{bridge=\"up\",result=\"rejected\"}"
        ),
        0.0
    );
    assert_eq!(
        m(
            &s,
            "holdfast_bridge_messages_total{bridge=\"up\",result=\"dropped\"}"
        ),
        0.0
    );

    pa.outage();
    wait_status(&dir, "down", Duration::from_secs(10), |st| {
        st["connected"] == false
    })
    .await;
    publish_seqs(&mut sensor, UP_LOCAL, 5..8, 3).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = metrics::scrape(&gw).await;
    assert_eq!(m(&s, "holdfast_bridge_connected{bridge=\"up\"}"), 0.0);
    assert_eq!(
        m(&s, "holdfast_bridge_backlog_messages{bridge=\"up\"}"),
        3.0
    );
    assert_eq!(m(&s, "holdfast_bridge_backlog_bytes{bridge=\"up\"}"), 12.0);
    let age = m(
        &s,
        "holdfast_bridge_oldest_message_age_seconds{bridge=\"up\"}",
    );
    assert!((1.0..30.0).contains(&age), "oldest age {age}");

    pa.restore();
    wait_total(&[&ca], 8, Duration::from_secs(10)).await;
    wait_status(&dir, "acked", Duration::from_secs(5), |st| st["acked"] == 8).await;
    let s = metrics::scrape(&gw).await;
    assert_eq!(
        m(&s, "holdfast_bridge_reconnects_total{bridge=\"up\"}"),
        1.0
    );
    assert_eq!(
        m(&s, "holdfast_bridge_backlog_messages{bridge=\"up\"}"),
        0.0
    );
    assert_eq!(
        m(
            &s,
            "holdfast_bridge_messages_total{bridge=\"up\",result=\"acked\"}"
        ),
        8.0
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Bytes on metered links

/// `linger_ms` holds an outgoing publish for others to join it, but the local publisher's
/// PUBACK follows the commit, not the upstream.
#[tokio::test]
async fn linger_holds_the_uplink_but_never_the_local_puback() {
    if !have_mosquitto() {
        return;
    }
    let a = Mosquitto::start().await;
    let ca = Collector::start(a.addr(), "cloud-a").await;
    let cfg = BridgeConfig {
        linger_ms: 1500,
        ack_timeout_secs: 5,
        ..bridge_to(&[a.addr()], BridgeProtocol::V5)
    };
    let gw = gateway(cfg).await;
    wait_status(gw.dir.path(), "connected", Duration::from_secs(10), |st| {
        st["connected"] == true
    })
    .await;
    // The state notification lingers like anything else: let it go first.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    let t0 = Instant::now();
    publish_seqs(&mut sensor, UP_LOCAL, 0..3, 3).await;
    let acked = t0.elapsed();
    assert!(
        acked < Duration::from_millis(1000),
        "local PUBACKs took {acked:?}"
    );
    assert!(ca.seqs().is_empty(), "still lingering: {:?}", ca.seqs());
    wait_total(&[&ca], 3, Duration::from_secs(5)).await;
    let arrived = t0.elapsed();
    assert!(
        arrived >= Duration::from_millis(1200),
        "arrived after {arrived:?}"
    );
    check_in_order(&[ca.seqs()], 3);
    gw.shutdown().await;
}

/// MQTT 5 topic aliases upstream: after the first message on a topic, the topic is not
/// sent again (bytes per message on the link, counted by the proxy), and every message
/// still arrives on its own topic. The upstream is a Holdfast (Topic Alias Maximum 64).
#[tokio::test]
async fn topic_aliases_upstream_save_the_topic_and_keep_it_right() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let long = "x".repeat(100);
    let topics: Vec<String> = (0..3).map(|i| format!("sensors/{long}/{i}")).collect();
    let mut sub = RawClient::connect(up.addr, ProtocolVersion::V311, "cloud").await;
    assert_eq!(sub.subscribe("site/#", QoS::AtLeastOnce).await, vec![1]);
    let gw = gateway(BridgeConfig {
        notifications: false,
        ..bridge_to(&[proxy.addr], BridgeProtocol::V5)
    })
    .await;
    wait_status(gw.dir.path(), "connected", Duration::from_secs(10), |st| {
        st["connected"] == true
    })
    .await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    let mut got = Vec::new();
    // First one message per topic (aliases announced), then 60 more.
    for (i, t) in topics.iter().enumerate() {
        publish_acked(&mut sensor, t, &(i as u32).to_be_bytes(), 1).await;
    }
    while got.len() < 3 {
        let p = sub.recv_publish().await;
        sub.puback(p.packet_id).await;
        got.push((p.topic.to_string(), p.payload.to_vec()));
    }
    let before = proxy.bytes_up();
    const N: usize = 60;
    for i in 3..3 + N {
        publish_acked(&mut sensor, &topics[i % 3], &(i as u32).to_be_bytes(), 1).await;
    }
    while got.len() < 3 + N {
        let p = sub.recv_publish().await;
        sub.puback(p.packet_id).await;
        got.push((p.topic.to_string(), p.payload.to_vec()));
    }
    let after = proxy.bytes_up();
    for (topic, payload) in &got {
        let i = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
        assert_eq!(topic, &format!("site/{}", topics[i % 3]), "message #{i}");
    }
    let per_message = (after - before) as f64 / N as f64;
    eprintln!(
        "[aliases] {per_message:.1} bytes received upstream per message (topic {} bytes)",
        topics[0].len() + 5
    );
    assert!(
        per_message < 40.0,
        "{per_message} bytes per message: the topic went again"
    );
    gw.shutdown().await;
    up.shutdown().await;
}
