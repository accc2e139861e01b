//! The bridge on bad links (issue 14): a slow, throttled uplink with a small far-end
//! buffer; a black hole under traffic; QoS 0 during an outage; the QoS 2 downlink release
//! with priority classes; admin commands on internal sessions; `inflight` lowered across a
//! restart; backoff after connections that fail at once and a message the upstream answers
//! by closing; the default client id; `both` rules over MQTT 3.1.1; v5 0x97 Quota exceeded;
//! "stalled" in the status. Every test runs the bridge over `common/proxy.rs` against a real
//! upstream (a second Holdfast) unless said otherwise.

use crate::common::{self, metrics, proxy, seq};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use holdfast::bridge::{BridgeConfig, BridgeProtocol, Direction, TopicRule};
use holdfast::protocol::{self, Packet, ProtocolVersion, PubAckLike, QoS};
use proxy::Proxy;
use seq::*;
use tokio::time::Instant;

const V311: BridgeProtocol = BridgeProtocol::V311;
const V5: BridgeProtocol = BridgeProtocol::V5;

fn rule(pattern: &str, direction: Direction, qos: u8, priority: u8) -> TopicRule {
    TopicRule {
        pattern: pattern.into(),
        direction,
        qos,
        local_prefix: String::new(),
        remote_prefix: "site/".into(),
        priority,
        ..BridgeConfig::example().topic[0].clone()
    }
}

/// Default settings except what a test needs to be quick: fast reconnects, a 2 s connect
/// timeout (the old whole-window write bound, too).
fn bridge_to(addr: SocketAddr, protocol: BridgeProtocol) -> BridgeConfig {
    BridgeConfig {
        name: "up".into(),
        address: addr.to_string().into(),
        protocol,
        client_id: Some("gw-links".into()),
        username: None,
        password: None,
        reconnect_min_ms: 100,
        reconnect_max_ms: 1000,
        connect_timeout_secs: 2,
        topic: vec![
            rule("sensors/#", Direction::Out, 1, 0),
            rule("cmd/#", Direction::In, 1, 0),
        ],
        ..BridgeConfig::example()
    }
}

/// A `[[bridge]]` table in TOML (keys a test sets that older builds did not know fail
/// here, loudly, as they would for an operator).
fn bridge_from_toml(toml: &str) -> BridgeConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holdfast.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = holdfast::config::Config::load_from(Some(&path), HashMap::new())
        .unwrap_or_else(|e| panic!("config: {e}"));
    cfg.bridge.into_iter().next().expect("one bridge")
}

async fn gateway(b: BridgeConfig) -> TestBroker {
    start_broker(|c| c.bridge = vec![b]).await
}

/// The bridge's status as `holdfast bridge status --json` reports it (admin socket).
async fn status(data_dir: &Path) -> serde_json::Value {
    crate::common::seq::bridge_status(data_dir).await
}

async fn wait_status(dir: &Path, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(dir).await;
        if ok(&st) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn numbered(seq: u32, size: usize) -> Vec<u8> {
    let mut p = vec![0x5a; size.max(4)];
    p[..4].copy_from_slice(&seq.to_be_bytes());
    p
}

// ---------------------------------------------------------------------------------------
// 1. Slow uplink

/// `count` QoS 1 messages of `size` bytes queued during an outage; the link comes back at
/// `rate` bytes/s with 50 ms latency and a 16 kB far-end buffer. The window takes longer to
/// write than the old whole-batch write bound (`connect_timeout_secs`, 2 s here) even after
/// the gateway's own socket buffer (megabytes on loopback) took its part: the backlog must
/// drain over one connection, without duplicates.
async fn slow_uplink(protocol: BridgeProtocol, count: u32, size: usize, rate: u64) {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start_small_buffer(up.addr, 16 * 1024).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(bridge_to(proxy.addr, protocol)).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;

    proxy.outage();
    let mut sensor = publisher(gw.addr, "sensor").await;
    for s in 0..count {
        let id = pid_for(s);
        sensor
            .publish(UP_LOCAL, &numbered(s, size), QoS::AtLeastOnce, id)
            .await;
        assert!(matches!(sensor.recv().await, Some(Packet::PubAck(_))));
    }
    proxy.throttle(rate);
    proxy.latency(Duration::from_millis(50));
    let accepted = proxy.accepted();
    proxy.refuse(false);
    let t0 = Instant::now();
    let ideal = Duration::from_secs_f64((count as usize * size) as f64 / rate as f64);
    cloud
        .wait_for(count, ideal * 3 + Duration::from_secs(5))
        .await;
    let took = t0.elapsed();
    eprintln!(
        "[slow-uplink/{protocol:?}] {count} x {size} B at {rate} B/s drained in {took:?} (line time {ideal:?}); {} duplicates; {} connections",
        cloud.dups,
        proxy.accepted() - accepted
    );
    assert_eq!(cloud.dups, 0, "nothing is sent twice");
    assert!(
        proxy.accepted() - accepted <= 2,
        "one connection carries the drain (a retry of the first attempt at most): {}",
        proxy.accepted() - accepted
    );
    gw.shutdown().await;
    up.shutdown().await;
}

#[tokio::test]
async fn slow_uplink_drains_a_large_backlog_without_resending_it() {
    slow_uplink(V311, 32, 300_000, 2_000_000).await;
}

#[tokio::test]
async fn slow_uplink_drains_a_large_backlog_without_resending_it_v5() {
    slow_uplink(V5, 32, 300_000, 2_000_000).await;
}

/// The issue's numbers: 32 x 300 kB at 200 kB/s (about 50 s; run by hand for the README).
#[tokio::test]
#[ignore = "about a minute: the README's slow-link figure"]
async fn slow_uplink_issue_scenario() {
    slow_uplink(V311, 32, 300_000, 200_000).await;
}

/// One message that needs longer on the wire (3 s at 300 kB/s) than `ack_timeout_secs`
/// (1 s): the acknowledgement timer allows for the time the message at the head of the
/// line needs, so it arrives, once, over one connection.
#[tokio::test]
async fn a_message_longer_on_the_wire_than_the_ack_timeout_still_goes() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start_small_buffer(up.addr, 16 * 1024).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let b = BridgeConfig {
        ack_timeout_secs: 1,
        ..bridge_to(proxy.addr, V311)
    };
    let gw = gateway(b).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    proxy.throttle(300_000);
    let accepted = proxy.accepted();
    let mut sensor = publisher(gw.addr, "sensor").await;
    sensor
        .publish(UP_LOCAL, &numbered(0, 900_000), QoS::AtLeastOnce, 1)
        .await;
    assert!(matches!(sensor.recv().await, Some(Packet::PubAck(_))));
    cloud.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(cloud.dups, 0);
    assert_eq!(proxy.accepted(), accepted, "no reconnect");
    gw.shutdown().await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 2. Half-open under traffic

/// Default keep-alive (30 s) and acknowledgement timeout: a 6 s black hole under steady
/// traffic is noticed within it (no acknowledgement for 5 s with messages in flight), and
/// everything arrives in order once the link heals.
async fn black_hole(protocol: BridgeProtocol) {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let b = BridgeConfig {
        keepalive_secs: 30,
        ..bridge_to(proxy.addr, protocol)
    };
    let gw = gateway(b).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;

    let publisher = steady_publisher(gw.addr, 0, 4000, 500);
    cloud
        .until(Duration::from_secs(5), "a first part", |s| s.next >= 500)
        .await;
    let accepted = proxy.accepted();
    proxy.blackhole(true);
    let t0 = Instant::now();
    let mut detected = None;
    while t0.elapsed() < Duration::from_secs(6) {
        if detected.is_none() && proxy.accepted() > accepted {
            detected = Some(t0.elapsed());
        }
        // Keep reading upstream meanwhile (nothing new can arrive).
        cloud.try_until(Duration::from_millis(20), &|_| false).await;
    }
    proxy.blackhole(false);
    // Keep reading upstream until the publisher is done (a durable subscriber that stops
    // reading for a while is not what this test is about).
    while !publisher.is_finished() {
        cloud.try_until(Duration::from_millis(50), &|_| false).await;
    }
    let acked = publisher.await.unwrap();
    cloud.wait_for(acked, Duration::from_secs(20)).await;
    eprintln!(
        "[black-hole/{protocol:?}] 6 s black hole at 500 msg/s noticed after {detected:?}; {acked} messages in order, {} duplicates",
        cloud.dups
    );
    let detected = detected.expect("the dead link is noticed while the black hole lasts");
    assert!(detected <= Duration::from_secs(6), "{detected:?}");
    gw.shutdown().await;
    up.shutdown().await;
}

#[tokio::test]
async fn black_hole_under_traffic_is_noticed_within_the_ack_timeout() {
    black_hole(V311).await;
}

#[tokio::test]
async fn black_hole_under_traffic_is_noticed_within_the_ack_timeout_v5() {
    black_hole(V5).await;
}

// ---------------------------------------------------------------------------------------
// 3. QoS 0 during an outage

#[tokio::test]
async fn qos0_uplink_during_an_outage_is_counted_as_dropped() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    proxy.outage();
    let gw = gateway(bridge_to(proxy.addr, V311)).await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    for i in 0..10u8 {
        sensor.publish("sensors/q0", &[i], QoS::AtMostOnce, 0).await;
    }
    wait_status(
        gw.dir.path(),
        "ten QoS 0 messages counted as dropped",
        |st| st["outbox"]["dropped"] == 10,
    )
    .await;
    gw.shutdown().await;
    up.shutdown().await;
}

#[tokio::test]
async fn qos0_uplink_during_an_outage_is_queued_when_the_rule_asks() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let b = bridge_from_toml(&format!(
        "[[bridge]]\nname = \"up\"\naddress = \"{}\"\nclient_id = \"gw-q0\"\n\
         reconnect_min_ms = 100\nreconnect_max_ms = 500\nconnect_timeout_secs = 2\n\
         [[bridge.topic]]\npattern = \"sensors/#\"\nremote_prefix = \"site/\"\nqueue_qos0 = true\n",
        proxy.addr
    ));
    let gw = gateway(b).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    proxy.outage();
    let mut sensor = publisher(gw.addr, "sensor").await;
    for s in 0..10u32 {
        sensor
            .publish(UP_LOCAL, &s.to_be_bytes(), QoS::AtMostOnce, 0)
            .await;
    }
    probe(gw.addr).await; // the QoS 0 ones were routed before this PUBACK
    proxy.restore();
    cloud.wait_for(10, Duration::from_secs(10)).await;
    let st = status(gw.dir.path()).await;
    assert_eq!(st["outbox"]["dropped"], 0, "{st}");
    gw.shutdown().await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 4. QoS 2 downlink with priority classes

/// A scripted MQTT 5 upstream (the exchange needs an upstream that reuses a packet id at
/// once, which a real broker does only after 65,535 messages): the bridge's PUBCOMP for a
/// downlink QoS 2 message on a priority-1 topic must be a success, and the next message
/// with the same packet id must be delivered.
#[tokio::test]
async fn qos2_downlink_release_reaches_the_outbox_that_took_the_message() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(listener.local_addr().unwrap()).await;
    let b = BridgeConfig {
        topic: vec![
            rule("alarms/#", Direction::Both, 2, 1),
            rule("telemetry/#", Direction::Out, 1, 0),
        ],
        // The script expects SUBSCRIBE right after the CONNACK (no state message).
        notifications: false,
        ..bridge_to(proxy.addr, V5)
    };
    let gw = gateway(b).await;
    let mut local = RawClient::connect(gw.addr, ProtocolVersion::V5, "local-sub").await;
    local.subscribe("alarms/#", QoS::ExactlyOnce).await;

    let (up, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .expect("the bridge connects")
        .unwrap();
    // The kit's raw client, here on the server's side of the socket.
    let mut up = RawClient::from_stream(up, ProtocolVersion::V5);
    assert!(matches!(
        up.recv().await.expect("the bridge answers"),
        Packet::Connect(_)
    ));
    up.send(Packet::ConnAck(Default::default())).await;
    let sub = match up.recv().await.expect("the bridge answers") {
        Packet::Subscribe(s) => s,
        other => panic!("expected SUBSCRIBE, got {other:?}"),
    };
    let suback = protocol::SubAck {
        packet_id: sub.packet_id,
        reason_codes: vec![2; sub.filters.len()],
        ..Default::default()
    };
    up.send(Packet::SubAck(suback)).await;
    for (n, topic) in ["site/alarms/a", "site/alarms/b"].into_iter().enumerate() {
        let mut p = publish(topic, b"fire", QoS::ExactlyOnce, 7);
        p.retain = false;
        up.send(Packet::Publish(p)).await;
        match up.recv().await.expect("the bridge answers") {
            Packet::PubRec(a) => assert_eq!((a.packet_id, a.reason_code), (7, 0), "message {n}"),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        up.send(Packet::PubRel(PubAckLike::new(7))).await;
        match up.recv().await.expect("the bridge answers") {
            Packet::PubComp(a) => assert_eq!(
                (a.packet_id, a.reason_code),
                (7, 0),
                "PUBCOMP of message {n} (0x92: the release went to an outbox that never had it)"
            ),
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        let got = local.recv_publish().await;
        assert_eq!(
            &*got.topic,
            &topic["site/".len()..],
            "message {n} delivered"
        );
        local
            .send(Packet::PubRec(PubAckLike::new(got.packet_id)))
            .await;
        assert!(matches!(local.recv().await, Some(Packet::PubRel(_))));
        local
            .send(Packet::PubComp(PubAckLike::new(got.packet_id)))
            .await;
    }
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 5. Admin commands on internal sessions

#[tokio::test]
async fn admin_refuses_to_drop_a_bridge_outbox() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let gw = gateway(bridge_to(proxy.addr, V311)).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    let dir = gw.dir.path().to_path_buf();
    let r = tokio::task::spawn_blocking(move || holdfast::admin::drop_session(&dir, "$bridge/up"))
        .await
        .unwrap();
    let err = r.expect_err("an internal session cannot be dropped");
    assert!(err.to_string().contains("internal"), "{err:#}");
    // The uplink still works.
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..5, 5).await;
    cloud.wait_for(5, Duration::from_secs(5)).await;
    gw.shutdown().await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 6. `inflight` lowered across a restart

/// Messages in flight (sent into a black hole) when the gateway stops; it restarts with a
/// smaller `inflight`: everything arrives, in order, per priority.
async fn lowered_inflight(protocol: BridgeProtocol, priorities: bool) {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/sensors/#", UP_REMOTE).await;
    let mut alarms =
        SeqSub::start(up.addr, "cloud-alarms", "site/alarms/#", "site/alarms/seq").await;
    let data = tempfile::tempdir().unwrap();
    let config = |inflight: u16| {
        let mut topic = vec![rule("sensors/#", Direction::Out, 1, 0)];
        if priorities {
            topic.push(rule("alarms/#", Direction::Out, 1, 1));
        }
        BridgeConfig {
            inflight,
            topic,
            ..bridge_to(proxy.addr, protocol)
        }
    };
    let start = |b: BridgeConfig| {
        let dir = data.path().to_path_buf();
        start_broker(move |c| {
            c.data_dir = dir;
            c.bridge = vec![b];
        })
    };
    let gw = start(config(16)).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    proxy.blackhole(true);
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..12, 12).await;
    if priorities {
        publish_seqs(&mut sensor, "alarms/seq", 0..12, 12).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.shutdown().await;
    proxy.cut();
    proxy.restore();

    let gw = start(config(4)).await;
    cloud.wait_for(12, Duration::from_secs(10)).await;
    if priorities {
        alarms.wait_for(12, Duration::from_secs(10)).await;
    }
    gw.shutdown().await;
    up.shutdown().await;
}

#[tokio::test]
async fn lowering_inflight_across_a_restart_with_messages_in_flight() {
    lowered_inflight(V311, false).await;
}

#[tokio::test]
async fn lowering_inflight_across_a_restart_with_messages_in_flight_v5_priorities() {
    lowered_inflight(V5, true).await;
}

// ---------------------------------------------------------------------------------------
// 7. Backoff after failures right after CONNACK; a message refused by closing

/// Two gateways flashed with one client id take the upstream session from each other
/// right after each CONNACK: without progress the backoff keeps growing instead of
/// restarting at `reconnect_min_ms` every time.
#[tokio::test]
async fn connections_that_fail_right_after_connack_back_off() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let b = BridgeConfig {
        reconnect_min_ms: 100,
        reconnect_max_ms: 5000,
        ..bridge_to(proxy.addr, V311)
    };
    let a = gateway(b.clone()).await;
    let c = gateway(b).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let n = proxy.accepted();
    eprintln!("[takeover-fight] {n} connections in {:?}", t0.elapsed());
    assert!(
        n <= 24,
        "{n} connections in 6 s: the backoff restarts after every CONNACK"
    );
    a.shutdown().await;
    c.shutdown().await;
    up.shutdown().await;
}

/// A 3.1.1 upstream closes the connection on a packet larger than it accepts (3.1.1 cannot
/// announce its limit): that message is set aside (counted as rejected) after
/// `reject_after_closes` attempts instead of blocking the outbox for ever.
#[tokio::test]
async fn a_message_the_upstream_refuses_by_closing_is_set_aside() {
    let up = start_broker(|c| c.mqtt.max_packet_size = 10_000).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let b = BridgeConfig {
        reconnect_min_ms: 50,
        reconnect_max_ms: 200,
        ..bridge_to(proxy.addr, V311)
    };
    let gw = gateway(b).await;
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..1, 1).await;
    sensor
        .publish("sensors/big", &[0u8; 20_000], QoS::AtLeastOnce, 500)
        .await;
    assert!(matches!(sensor.recv().await, Some(Packet::PubAck(_))));
    publish_seqs(&mut sensor, UP_LOCAL, 1..5, 4).await;
    cloud.wait_for(5, Duration::from_secs(15)).await;
    wait_status(gw.dir.path(), "the big message counted as rejected", |st| {
        st["rejected"] == 1
    })
    .await;
    gw.shutdown().await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 8. Default client id

#[tokio::test]
async fn default_client_id_comes_from_the_machine_id_or_the_device_id() {
    let up = start_broker(|_| {}).await;
    let ids = tempfile::tempdir().unwrap();
    let mut gws = Vec::new();
    for (n, mid) in [
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
    ]
    .into_iter()
    .enumerate()
    {
        let path = ids.path().join(format!("machine-id-{n}"));
        std::fs::write(&path, format!("{mid}\n")).unwrap();
        let b = BridgeConfig {
            client_id: None,
            ..bridge_to(up.addr, V311)
        };
        let path2 = path.clone();
        gws.push(
            start_broker(move |c| {
                c.bridge = vec![b];
                c.machine_id_file = path2;
            })
            .await,
        );
    }
    let b = BridgeConfig {
        client_id: None,
        ..bridge_to(up.addr, V311)
    };
    gws.push(
        start_broker(move |c| {
            c.bridge = vec![b];
            c.device_id = Some("pump-7".into());
        })
        .await,
    );
    let mut seen = Vec::new();
    for gw in &gws {
        wait_status(gw.dir.path(), "connected", |st| st["connected"] == true).await;
        seen.push(
            status(gw.dir.path()).await["client_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    eprintln!("[client-id] {seen:?}");
    assert_ne!(seen[0], seen[1], "two machines, two client ids");
    assert!(
        !seen[0].contains("0123456789abcdef"),
        "the machine id itself is not disclosed"
    );
    assert_eq!(seen[2], "holdfast-pump-7-up");
    for gw in gws {
        gw.shutdown().await;
    }
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 9. `both` over MQTT 3.1.1

#[tokio::test]
async fn a_both_rule_over_mqtt_311_is_refused_with_a_clear_error() {
    let mut cfg = holdfast::config::Config {
        bridge: vec![BridgeConfig {
            topic: vec![rule("shared/#", Direction::Both, 1, 0)],
            ..bridge_to("127.0.0.1:1883".parse().unwrap(), V311)
        }],
        ..Default::default()
    };
    let err = cfg.validate().expect_err("refused").to_string();
    assert!(
        err.contains("bridge[0].topic[0]") && err.contains("3.1.1"),
        "{err}"
    );
    // The same over MQTT 5 (No Local) is fine, and so are separate remote prefixes.
    cfg.bridge[0].protocol = V5;
    cfg.validate().unwrap();
    cfg.bridge[0].protocol = V311;
    cfg.bridge[0].topic = vec![rule("shared/#", Direction::Out, 1, 0), {
        let mut r = rule("shared/#", Direction::In, 1, 0);
        r.remote_prefix = "cloud/".into();
        r
    }];
    cfg.validate().unwrap();
}

// ---------------------------------------------------------------------------------------
// 10. v5 0x97 Quota exceeded

/// The upstream's queue for an offline durable subscriber holds 5 messages (reject-new):
/// beyond that it answers 0x97. The bridge backs off and retries; once the subscriber
/// drains its queue, all 12 arrive, in order.
#[tokio::test]
async fn quota_exceeded_is_retried_not_deleted() {
    let up = start_broker(|c| {
        c.mqtt.max_queued_messages = 5;
        c.mqtt.queue_policy = holdfast::config::QueuePolicy::RejectNew;
    })
    .await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/sensors/#", UP_REMOTE).await;
    cloud.go_offline();
    let gw = gateway(bridge_to(proxy.addr, V5)).await;
    wait_status(gw.dir.path(), "connected", |st| st["connected"] == true).await;
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..12, 12).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.wait_for(12, Duration::from_secs(15)).await;
    let st = status(gw.dir.path()).await;
    assert_eq!(st["rejected"], 0, "{st}");
    gw.shutdown().await;
    up.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 11. Stalled

#[tokio::test]
async fn status_sys_and_healthz_say_stalled_when_the_backlog_does_not_move() {
    let up = start_broker(|_| {}).await;
    let proxy = Proxy::start(up.addr).await;
    let mut cloud = SeqSub::start(up.addr, "cloud-sub", "site/#", UP_REMOTE).await;
    let b = bridge_from_toml(&format!(
        "[[bridge]]\nname = \"up\"\naddress = \"{}\"\nclient_id = \"gw-stall\"\n\
         reconnect_min_ms = 100\nreconnect_max_ms = 500\nconnect_timeout_secs = 2\nstall_secs = 2\n\
         [[bridge.topic]]\npattern = \"sensors/#\"\nremote_prefix = \"site/\"\n",
        proxy.addr
    ));
    let gw = start_broker(|c| {
        c.bridge = vec![b];
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await;
    let http = gw.broker.as_ref().unwrap().metrics_addr().unwrap();
    wait_link(gw.addr, &mut cloud, Duration::from_secs(10)).await;
    let mut watcher = RawClient::connect(gw.addr, ProtocolVersion::V311, "watcher").await;
    watcher
        .subscribe("$SYS/holdfast/bridge/up/state", QoS::AtMostOnce)
        .await;
    assert_eq!(&watcher.recv_publish().await.payload[..], b"connected");

    // Throttled to nothing: connected, but nothing moves.
    proxy.throttle(1);
    let mut sensor = publisher(gw.addr, "sensor").await;
    publish_seqs(&mut sensor, UP_LOCAL, 0..3, 3).await;
    wait_status(gw.dir.path(), "stalled", |st| st["stalled"] == true).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match watcher.recv_timeout(left).await {
            Ok(Some(Packet::Publish(p))) if &p.payload[..] == b"stalled" => break,
            Ok(Some(_)) => {}
            other => panic!("no `stalled` state under $SYS: {other:?}"),
        }
    }
    let (_, _, body) = metrics::http(http, "GET", "/healthz").await;
    assert!(body.contains("bridge up: stalled"), "{body}");

    proxy.cut();
    proxy.restore();
    cloud.wait_for(3, Duration::from_secs(10)).await;
    wait_status(gw.dir.path(), "moving again", |st| st["stalled"] == false).await;
    let (_, _, body) = metrics::http(http, "GET", "/healthz").await;
    assert!(!body.contains("stalled"), "{body}");
    gw.shutdown().await;
    up.shutdown().await;
}
