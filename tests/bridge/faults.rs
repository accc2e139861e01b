//! The bridge under link faults: the gateway (in-process Holdfast, or the real binary) is
//! bridged to an upstream (a second Holdfast, or Debian's Mosquitto started by the test)
//! through `common/proxy.rs`, a TCP proxy modelling the LTE link (cut, refuse, blackhole).
//!
//! Every uplink message carries a sequence number (u32 BE). The cloud subscriber is durable
//! and checks, as messages arrive, that the first copies of the sequence numbers are exactly
//! 0, 1, 2, ... (no gap, no reordering); later copies of an already seen number are counted
//! as redeliveries (QoS 1 after a lost PUBACK) and reported.
//!
//! Mosquitto tests skip loudly without Mosquitto unless `HOLDFAST_INTEROP=1`.

use crate::common::{self, mosquitto, proxy, seq};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use holdfast::bridge::{BridgeConfig, BridgeProtocol, Direction, TopicRule};
use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use mosquitto::{have_mosquitto, signal, wait_child, Mosquitto};
use proxy::Proxy;
use seq::*;
use tokio::time::Instant;

const V311: BridgeProtocol = BridgeProtocol::V311;
const V5: BridgeProtocol = BridgeProtocol::V5;

fn bridge_to(addr: SocketAddr, client_id: &str, protocol: BridgeProtocol) -> BridgeConfig {
    BridgeConfig {
        name: "up".into(),
        address: addr.to_string().into(),
        protocol,
        client_id: Some(client_id.into()),
        username: None,
        password: None,
        keepalive_secs: 5,
        inflight: 32,
        reconnect_min_ms: 100,
        reconnect_max_ms: 1000,
        connect_timeout_secs: 2,
        max_rate: 0,
        topic: crate::common::seq::site_rules(),
        ..BridgeConfig::example()
    }
}

async fn gateway(up: SocketAddr, protocol: BridgeProtocol) -> TestBroker {
    start_broker(|c| c.bridge = vec![bridge_to(up, "gw-faults", protocol)]).await
}

// ---------------------------------------------------------------------------------------
// Uplink under outages

/// Steady QoS 1 publishing (50 msg/s for 4 s) with a 2 s outage (cut + refuse) in the
/// middle: every acknowledged message arrives upstream, in order.
async fn uplink_outage(up: SocketAddr, test: &str, protocol: BridgeProtocol) {
    let proxy = Proxy::start(up).await;
    let mut cloud = SeqSub::start(up, "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(proxy.addr, protocol).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;

    let t0 = Instant::now();
    let publisher = steady_publisher(gw.addr, 0, 200, 50);
    cloud
        .until(Duration::from_secs(5), "a first part", |s| s.next >= 50)
        .await;
    proxy.outage();
    let acc = proxy.accepted();
    // What the upstream accepted before the cut may still be on its way; after that,
    // nothing new can come while the link is down.
    cloud.settle(Duration::from_millis(500)).await;
    cloud.expect_no_new(Duration::from_secs(2)).await;
    assert!(
        proxy.refused() > 0 || proxy.accepted() > acc,
        "the bridge retries during the outage"
    );
    proxy.restore();
    let acked = publisher.await.unwrap();
    assert_eq!(acked, 200);
    cloud.wait_for(acked, Duration::from_secs(15)).await;
    eprintln!(
        "[{test}] {acked} messages, all delivered {:?} after the start",
        t0.elapsed()
    );
    cloud.report(test);
    gw.shutdown().await;
}

#[tokio::test]
async fn uplink_survives_an_outage_mid_stream_holdfast_upstream() {
    let up = start_broker(|_| {}).await;
    uplink_outage(up.addr, "uplink-outage/holdfast", V311).await;
    up.shutdown().await;
}

#[tokio::test]
async fn uplink_survives_an_outage_mid_stream_holdfast_upstream_v5() {
    let up = start_broker(|_| {}).await;
    uplink_outage(up.addr, "uplink-outage/holdfast/v5", V5).await;
    up.shutdown().await;
}

#[tokio::test]
async fn uplink_survives_an_outage_mid_stream_mosquitto_upstream() {
    if !have_mosquitto() {
        return;
    }
    let mq = Mosquitto::start().await;
    uplink_outage(mq.addr(), "uplink-outage/mosquitto", V311).await;
}

#[tokio::test]
async fn uplink_survives_an_outage_mid_stream_mosquitto_upstream_v5() {
    if !have_mosquitto() {
        return;
    }
    let mq = Mosquitto::start().await;
    uplink_outage(mq.addr(), "uplink-outage/mosquitto/v5", V5).await;
}

/// A half-open link (bytes stop, nothing closes) longer than keep-alive: the bridge notices
/// through its pings (≤ 2 × keepalive), gives up the dead connection, keeps retrying, and
/// once the link heals the messages published meanwhile arrive, in order.
#[tokio::test]
async fn half_open_link_is_detected_and_the_backlog_follows_in_order() {
    half_open(V311).await;
}

#[tokio::test]
async fn half_open_link_is_detected_and_the_backlog_follows_in_order_v5() {
    half_open(V5).await;
}

async fn half_open(protocol: BridgeProtocol) {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(proxy.addr, protocol).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..10, 10).await;
    cloud.wait_for(10, Duration::from_secs(5)).await;

    let accepted = proxy.accepted();
    let t0 = Instant::now();
    proxy.blackhole(true);
    // Acknowledged locally while the link is dead (more than the in-flight window).
    publish_seqs(&mut sensor, UP_LOCAL, 10..60, 10).await;
    // keepalive 5 s: the second ping time with the first unanswered (≤ 10 s) ends the connection; the bridge
    // then opens a new one (silent too, timed out after connect_timeout_secs = 2).
    let limit = Duration::from_secs(2 * 5 + 2 + 2);
    while proxy.accepted() == accepted {
        assert!(
            t0.elapsed() < limit,
            "half-open link not detected within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let detected = t0.elapsed();
    // Stay dead a little longer: the first new attempt gets no CONNACK and is given up
    // after connect_timeout_secs, and the bridge tries again. (When the link heals, the
    // proxy delivers the abandoned attempts' CONNECTs too, as TCP would: session takeovers
    // upstream that the bridge must ride out.)
    let retried = Instant::now();
    while proxy.accepted() < accepted + 2 {
        assert!(
            retried.elapsed() < Duration::from_secs(2 + 1 + 2),
            "no retry after a silent connect attempt"
        );
        cloud.expect_no_new(Duration::from_millis(100)).await;
    }
    proxy.blackhole(false);
    let t1 = Instant::now();
    cloud.wait_for(60, Duration::from_secs(15)).await;
    eprintln!(
        "[half-open/{protocol:?}] dead link detected after {detected:?}; backlog delivered {:?} after the link healed; {} connections accepted by the proxy",
        t1.elapsed(),
        proxy.accepted()
    );
    cloud.report("half-open");
    // And the link keeps working afterwards.
    publish_seqs(&mut sensor, UP_LOCAL, 60..70, 10).await;
    cloud.wait_for(70, Duration::from_secs(10)).await;
    gw.shutdown().await;
    up.shutdown().await;
}

/// The upstream Mosquitto is restarted (SIGTERM, it saves its database; started again on
/// the same port and persistence dir) while the gateway keeps publishing: nothing lost.
#[tokio::test]
async fn upstream_mosquitto_restart_while_publishing_loses_nothing() {
    if !have_mosquitto() {
        return;
    }
    let mut mq = Mosquitto::start().await;
    let mut cloud = SeqSub::start(mq.addr(), "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(mq.addr(), V311).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;

    let publisher = steady_publisher(gw.addr, 0, 200, 50);
    cloud
        .until(Duration::from_secs(5), "a first part", |s| s.next >= 50)
        .await;
    cloud.go_offline();
    mq.stop().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    mq.spawn().await;
    let acked = publisher.await.unwrap();
    cloud.wait_for(acked, Duration::from_secs(20)).await;
    cloud.report("mosquitto-restart");
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The real binary, SIGKILLed with a backlog

fn write_gateway_config(dir: &Path, port: u16, upstream: SocketAddr, protocol: &str) -> PathBuf {
    let path = dir.join("holdfast.toml");
    std::fs::write(
        &path,
        format!(
            r#"data_dir = "{data}"
[[listener]]
bind = "127.0.0.1:{port}"
[log]
level = "info"

[[bridge]]
name = "up"
address = "{upstream}"
protocol = "{protocol}"
client_id = "gw-binary"
keepalive_secs = 5
inflight = 16
reconnect_min_ms = 100
reconnect_max_ms = 1000
connect_timeout_secs = 2
max_rate = 200

[[bridge.topic]]
pattern = "sensors/#"
direction = "out"
qos = 1
remote_prefix = "site/"
"#,
            data = dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

async fn spawn_gateway(config: &Path, port: u16, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(crate::common::bin())
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn holdfast");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("holdfast exited early: {st}");
        }
        assert!(Instant::now() < deadline, "holdfast does not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

fn sigkill(c: &mut Child) {
    c.kill().expect("SIGKILL");
    c.wait().expect("reap");
}

/// The real binary is SIGKILLed twice: while the upstream is unreachable with messages
/// queued, and again while the backlog drains (max_rate = 200 msg/s). Every message it
/// acknowledged before each kill arrives upstream, in order.
#[tokio::test]
async fn gateway_killed_during_outage_and_during_drain_loses_nothing() {
    killed_during_outage_and_drain("3.1.1").await;
}

#[tokio::test]
async fn gateway_killed_during_outage_and_during_drain_loses_nothing_v5() {
    killed_during_outage_and_drain("5").await;
}

async fn killed_during_outage_and_drain(protocol: &str) {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    proxy.refuse(true);
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let gw_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let config = write_gateway_config(dir.path(), port, proxy.addr, protocol);
    let log = dir.path().join("holdfast.log");

    let mut gw = spawn_gateway(&config, port, &log).await;
    let mut sensor = publisher(gw_addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..150, 25).await;
    drop(sensor);
    sigkill(&mut gw); // upstream unreachable, 150 acknowledged messages queued

    let mut gw = spawn_gateway(&config, port, &log).await;
    let mut sensor = publisher(gw_addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 150..300, 25).await;
    drop(sensor);
    cloud.expect_no_new(Duration::from_millis(300)).await;
    proxy.refuse(false);
    // Kill it again in the middle of the drain.
    cloud
        .until(Duration::from_secs(10), "the drain to start", |s| {
            s.next >= 60
        })
        .await;
    sigkill(&mut gw);
    let drained_before_kill = cloud.next;
    assert!(
        drained_before_kill < 300,
        "killed after the drain ended; raise the count"
    );

    let mut gw = spawn_gateway(&config, port, &log).await;
    cloud.wait_for(300, Duration::from_secs(20)).await;
    eprintln!(
        "[binary-kill/{protocol}] second kill after #{drained_before_kill} had arrived upstream"
    );
    cloud.report(&format!("binary-kill/{protocol}"));
    signal(gw.id(), "-TERM");
    wait_child(&mut gw, Duration::from_secs(10)).await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Downlink

/// Messages published in the cloud while the link is cut are kept by the upstream for the
/// bridge's persistent session and arrive locally (to a durable subscriber that was offline
/// too) after recovery, in order.
async fn downlink_outage(up: SocketAddr, test: &str, protocol: BridgeProtocol) {
    let proxy = Proxy::start(up).await;
    let mut cloud = SeqSub::start(up, "cloud-sub", "site/sensors/#", UP_REMOTE).await;
    let gw = gateway(proxy.addr, protocol).await;
    let mut local = SeqSub::start(gw.addr, "local-sub", "cmd/#", DOWN_LOCAL).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;

    let mut cloud_pub = publisher(up, "cloud-pub").await;
    publish_seqs(&mut cloud_pub, DOWN_REMOTE, 0..10, 10).await;
    local.wait_for(10, Duration::from_secs(5)).await;
    // Cut at once: the bridge may not have sent the upstream PUBACKs for these yet (they
    // follow the local commit), so some come down again after recovery: QoS 1 copies,
    // counted as redeliveries, never out of order.
    proxy.outage();
    local.go_offline();
    publish_seqs(&mut cloud_pub, DOWN_REMOTE, 10..60, 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    local.wait_for(60, Duration::from_secs(10)).await;
    // And live traffic flows after the backlog.
    publish_seqs(&mut cloud_pub, DOWN_REMOTE, 60..70, 10).await;
    local.wait_for(70, Duration::from_secs(5)).await;
    local.report(test);
    gw.shutdown().await;
}

#[tokio::test]
async fn downlink_published_during_an_outage_arrives_after_recovery_holdfast_upstream() {
    let up = start_broker(|_| {}).await;
    downlink_outage(up.addr, "downlink-outage/holdfast", V311).await;
    up.shutdown().await;
}

#[tokio::test]
async fn downlink_published_during_an_outage_arrives_after_recovery_holdfast_upstream_v5() {
    let up = start_broker(|_| {}).await;
    downlink_outage(up.addr, "downlink-outage/holdfast/v5", V5).await;
    up.shutdown().await;
}

#[tokio::test]
async fn downlink_published_during_an_outage_arrives_after_recovery_mosquitto_upstream() {
    if !have_mosquitto() {
        return;
    }
    let mq = Mosquitto::start().await;
    downlink_outage(mq.addr(), "downlink-outage/mosquitto", V311).await;
}

#[tokio::test]
async fn downlink_published_during_an_outage_arrives_after_recovery_mosquitto_upstream_v5() {
    if !have_mosquitto() {
        return;
    }
    let mq = Mosquitto::start().await;
    downlink_outage(mq.addr(), "downlink-outage/mosquitto/v5", V5).await;
}

/// Basic interop with Mosquitto as the upstream: uplink mapping and order, downlink
/// mapping and order, no loop.
#[tokio::test]
async fn mosquitto_upstream_uplink_and_downlink() {
    mosquitto_interop(V311).await;
}

#[tokio::test]
async fn mosquitto_upstream_uplink_and_downlink_v5() {
    mosquitto_interop(V5).await;
}

async fn mosquitto_interop(protocol: BridgeProtocol) {
    if !have_mosquitto() {
        return;
    }
    let mq = Mosquitto::start().await;
    let mut cloud = SeqSub::start(mq.addr(), "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(mq.addr(), protocol).await;
    let mut local = SeqSub::start(gw.addr, "local-sub", "cmd/#", DOWN_LOCAL).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;

    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..100, 20).await;
    cloud.wait_for(100, Duration::from_secs(10)).await;
    let mut cloud_pub = publisher(mq.addr(), "cloud-pub").await;
    publish_seqs(&mut cloud_pub, DOWN_REMOTE, 0..100, 20).await;
    local.wait_for(100, Duration::from_secs(10)).await;
    // What came down is not sent back up (the cloud sub sees site/cmd/seq once each: as
    // its own subscription, not as a bridge echo).
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_millis(800);
    while let Some(c) = cloud.c.as_mut() {
        match c
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(Some(Packet::Publish(p))) => {
                c.puback(p.packet_id).await;
                if *p.topic == *DOWN_REMOTE {
                    seen += 1;
                }
            }
            _ => break,
        }
    }
    assert!(
        seen <= 100,
        "{seen} copies of 100 downlink messages upstream: a loop"
    );
    assert_eq!(
        (cloud.dups, local.dups),
        (0, 0),
        "no redelivery without faults"
    );
    gw.shutdown().await;
    // Mosquitto logs each client's protocol level, clean flag and keep-alive.
    let level = if protocol == V5 { "p5" } else { "p2" }; // p2 = 3.1.1 in its logs
    let want = format!("as gw-faults ({level}, c0, k5");
    assert!(
        mq.log().contains(&want),
        "the bridge did not connect with `{want}`: {}",
        mq.log()
    );
}

// ---------------------------------------------------------------------------------------
// Drain

/// 10k messages queued during an outage drain upstream after recovery (rate printed).
///
/// The gateway runs with `mqtt.max_queued_messages = 0` (unlimited): with the default
/// (1000, drop-oldest) the outbox drops acknowledged messages, see
/// `outbox_is_not_subject_to_client_queue_limits`.
#[tokio::test]
async fn drain_of_10k_queued_messages_after_an_outage() {
    drain_10k(V311).await;
}

#[tokio::test]
async fn drain_of_10k_queued_messages_after_an_outage_v5() {
    drain_10k(V5).await;
}

async fn drain_10k(protocol: BridgeProtocol) {
    const N: u32 = 10_000;
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    proxy.refuse(true);
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = start_broker(|c| {
        c.bridge = vec![bridge_to(proxy.addr, "gw-drain", protocol)];
        c.mqtt.max_queued_messages = 0;
    })
    .await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    let t0 = Instant::now();
    publish_seqs(&mut sensor, UP_LOCAL, 0..N, 100).await;
    let queued_in = t0.elapsed();
    let t1 = Instant::now();
    proxy.refuse(false);
    cloud.wait_for(N, Duration::from_secs(90)).await;
    let drained_in = t1.elapsed();
    // The release-build rate is measured by `cargo bench --bench bridge_compare`.
    eprintln!(
        "[drain/{protocol:?}] queued {N} in {queued_in:?} ({:.0} msg/s); drained upstream in {drained_in:?} ({:.0} msg/s incl. reconnect backoff)",
        f64::from(N) / queued_in.as_secs_f64(),
        f64::from(N) / drained_in.as_secs_f64()
    );
    cloud.report(&format!("drain/{protocol:?}"));
    gw.shutdown().await;
    up.shutdown().await;
}

/// Pins a broker bug (see the report / `src/broker/router/mod.rs` `Router::deliver`): the
/// bridge outbox is an ordinary durable session for the queue limits, so with the default
/// `max_queued_messages = 1000` and `queue_policy = drop-oldest`, an outage longer than
/// ~1000 messages silently deletes the oldest messages that were already acknowledged to
/// their publishers.
#[tokio::test]
async fn outbox_is_not_subject_to_client_queue_limits() {
    const N: u32 = 1_500;
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    proxy.refuse(true);
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(proxy.addr, V311).await; // default queue limits
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..N, 100).await;
    proxy.refuse(false);
    cloud.wait_for(N, Duration::from_secs(30)).await;
    gw.shutdown().await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Priority classes

/// A backlog of telemetry (priority 0) and, published after it, alarms (priority 1) waits
/// for a link that is down; when the link comes up the alarms drain first, then the
/// telemetry, each in its own order, nothing lost. Over MQTT 3.1.1 and 5, and with the
/// real binary SIGKILLed while the backlog waits (each priority's outbox is recovered).
async fn priorities_drain_first(protocol: BridgeProtocol, crash: bool) {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    proxy.refuse(true);
    let mut cloud = RawClient::connect(up.addr, ProtocolVersion::V311, "cloud-prio").await;
    cloud.subscribe("site/#", QoS::AtLeastOnce).await;
    let alarms = TopicRule {
        pattern: "alarms/#".into(),
        direction: Direction::Out,
        qos: 1,
        local_prefix: String::new(),
        remote_prefix: "site/".into(),
        priority: 1,
        queue_qos0: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let (config, log) = (dir.path().join("holdfast.toml"), dir.path().join("log"));
    let (gw_addr, window, gw) = if crash {
        // inflight 16, sensors/# at priority 0 (see write_gateway_config), plus alarms.
        let version = if protocol == V5 { "5" } else { "3.1.1" };
        write_gateway_config(dir.path(), port, proxy.addr, version);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(
            "\n[[bridge.topic]]\npattern = \"alarms/#\"\nremote_prefix = \"site/\"\npriority = 1\n",
        );
        std::fs::write(&config, text).unwrap();
        (SocketAddr::from(([127, 0, 0, 1], port)), 16, None)
    } else {
        let mut cfg = bridge_to(proxy.addr, "gw-prio", protocol);
        cfg.inflight = 8;
        cfg.topic = vec![cfg.topic[0].clone(), alarms];
        let gw = start_broker(|c| c.bridge = vec![cfg]).await;
        (gw.addr, 8, Some(gw))
    };
    let mut child = if crash {
        Some(spawn_gateway(&config, port, &log).await)
    } else {
        None
    };
    let mut sensor = publisher(gw_addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..300, 50).await;
    publish_seqs(&mut sensor, "alarms/a", 0..30, 10).await;
    drop(sensor);
    if let Some(c) = child.as_mut() {
        sigkill(c);
        child = Some(spawn_gateway(&config, port, &log).await);
    }
    proxy.refuse(false);
    let mut order = Vec::new();
    let (mut next_t, mut next_a) = (0u32, 0u32);
    while order.len() < 330 {
        let p = match cloud.recv_timeout(Duration::from_secs(15)).await {
            Ok(Some(Packet::Publish(p))) => p,
            other => panic!("after {} messages: {other:?}", order.len()),
        };
        cloud.puback(p.packet_id).await;
        let seq = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
        if *p.topic == *UP_REMOTE {
            assert_eq!(seq, next_t, "telemetry in order");
            next_t += 1;
        } else {
            assert_eq!(&*p.topic, "site/alarms/a");
            assert_eq!(seq, next_a, "alarms in order");
            next_a += 1;
        }
        order.push(p.topic.contains("alarms"));
    }
    let last_alarm = order.iter().rposition(|a| *a).unwrap();
    let telemetry_before = order[..last_alarm].iter().filter(|a| !**a).count();
    eprintln!(
        "[priorities/{protocol:?}/crash={crash}] all 30 alarms delivered after {telemetry_before} of 300 telemetry messages"
    );
    // The only telemetry that may slip ahead is what was handed to the link before the
    // first alarm (one in-flight window at most).
    assert!(
        telemetry_before <= window,
        "{telemetry_before} telemetry messages before the last alarm"
    );
    if let Some(mut c) = child {
        signal(c.id(), "-TERM");
        wait_child(&mut c, Duration::from_secs(10)).await;
    }
    if let Some(gw) = gw {
        gw.shutdown().await;
    }
    up.shutdown().await;
}

#[tokio::test]
async fn higher_priority_backlog_drains_first() {
    priorities_drain_first(V311, false).await;
}

#[tokio::test]
async fn higher_priority_backlog_drains_first_v5() {
    priorities_drain_first(V5, false).await;
}

#[tokio::test]
async fn higher_priority_backlog_drains_first_after_a_sigkill() {
    priorities_drain_first(V5, true).await;
}
