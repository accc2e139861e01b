//! The MQTT 5 upstream (`protocol = "5"`) against a second Holdfast as the cloud broker:
//! QoS 2 both ways, what the upstream grants in its CONNACK (Maximum QoS, Maximum Packet
//! Size), refusals by reason code, session takeover (DISCONNECT 0x8E) and No Local on
//! `both` rules; QoS 2 both ways against Debian's Mosquitto. The fault tests (outages, half-open links, SIGKILL, Mosquitto as the
//! upstream) run for both protocols in tests/bridge/faults.rs.

use crate::common::{self, daemon, mosquitto};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use holdfast::bridge::{BridgeConfig, BridgeProtocol, Direction, TopicRule};
use holdfast::config::Config;
use holdfast::protocol::{Packet, ProtocolVersion, PubAckLike, Publish, QoS};
use tokio::time::Instant;

const V5: ProtocolVersion = ProtocolVersion::V5;
const BRIDGE_ID: &str = "gw-v5";

fn rule(pattern: &str, direction: Direction, qos: u8) -> TopicRule {
    TopicRule {
        pattern: pattern.into(),
        direction,
        qos,
        local_prefix: String::new(),
        remote_prefix: "site/".into(),
        priority: 0,
        queue_qos0: false,
    }
}

fn bridge_to(addr: SocketAddr, rules: Vec<TopicRule>) -> BridgeConfig {
    BridgeConfig {
        name: "up".into(),
        address: addr.to_string().into(),
        protocol: BridgeProtocol::V5,
        client_id: Some(BRIDGE_ID.into()),
        username: None,
        password: None,
        reconnect_min_ms: 50,
        reconnect_max_ms: 300,
        keepalive_secs: 5,
        topic: rules,
        ..BridgeConfig::example()
    }
}

/// A gateway bridged to `up` with `rules`; returns once the bridge is connected.
async fn gateway(up: SocketAddr, rules: Vec<TopicRule>) -> TestBroker {
    let gw = start_broker(|c: &mut Config| c.bridge = vec![bridge_to(up, rules)]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status(gw.dir.path()).await["connected"]
        .as_bool()
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "bridge did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw
}

/// The bridge's status, as `holdfast bridge status --json` reports it (admin socket).
async fn status(data_dir: &Path) -> serde_json::Value {
    crate::common::seq::bridge_status(data_dir).await
}

async fn wait_status(gw: &TestBroker, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(gw.dir.path()).await;
        if ok(&st) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(addr: SocketAddr, id: &str) -> RawClient {
    RawClient::connect(addr, V5, id).await
}

/// A QoS 2 publish, the whole exchange: PUBLISH, PUBREC, PUBREL, PUBCOMP.
async fn publish_qos2(c: &mut RawClient, topic: &str, payload: &[u8], id: u16) {
    c.publish(topic, payload, QoS::ExactlyOnce, id).await;
    match c.recv().await {
        Some(Packet::PubRec(a)) => {
            assert_eq!(a.packet_id, id);
            assert!(a.reason_code < 0x80, "{a:?}");
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    c.send(Packet::PubRel(PubAckLike::new(id))).await;
    match c.recv().await {
        Some(Packet::PubComp(a)) => assert_eq!(a.packet_id, id),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

async fn publish_qos1(c: &mut RawClient, topic: &str, payload: &[u8], id: u16) {
    c.publish(topic, payload, QoS::AtLeastOnce, id).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.reason_code < 0x80, "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Receives `n` messages as a subscriber, completing every QoS 1/2 exchange, then checks
/// that nothing else arrives for a moment (no duplicates).
async fn receive(c: &mut RawClient, n: usize) -> Vec<Publish> {
    let mut got = Vec::new();
    receive_into(c, &mut got, n, Duration::from_secs(10)).await;
    got
}

/// Receives until `got` holds `n` messages, then until nothing more comes for 400 ms.
async fn receive_into(c: &mut RawClient, got: &mut Vec<Publish>, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let wait = if got.len() < n {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(400)
        };
        match c.recv_timeout(wait).await {
            Ok(Some(Packet::Publish(p))) => {
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => c.puback(p.packet_id).await,
                    QoS::ExactlyOnce => c.send(Packet::PubRec(PubAckLike::new(p.packet_id))).await,
                }
                got.push(p);
            }
            Ok(Some(Packet::PubRel(r))) => {
                c.send(Packet::PubComp(PubAckLike::new(r.packet_id))).await
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(()) if got.len() >= n => return,
            Err(()) => panic!("received {} of {n} messages: {got:?}", got.len()),
        }
    }
}

fn payloads(got: &[Publish]) -> Vec<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

#[tokio::test]
async fn qos2_uplink_and_downlink_exactly_once_in_order() {
    let up = start_broker(|_| {}).await;
    let (gw, mut cloud) = qos2_both_ways(up.addr).await;
    // The cloud subscriber saw the downlink messages once each (its own subscription),
    // and nothing came back up from the gateway.
    let echo = receive(&mut cloud, 30).await;
    assert_eq!(payloads(&echo), numbered(30));
    wait_status(&gw, "nothing else went up", |st| {
        st["sent"] == 30 && st["received"] == 30
    })
    .await;
    gw.shutdown().await;
    up.shutdown().await;
}

/// 30 QoS 2 messages up (local QoS 2 publisher → QoS 2 subscriber upstream) and 30 down,
/// each exactly once, in order, at QoS 2, with the topics mapped; the outbox ends empty.
/// Returns the gateway and the upstream subscriber (subscribed to `site/#`).
async fn qos2_both_ways(up: SocketAddr) -> (TestBroker, RawClient) {
    let mut cloud = client(up, "cloud-sub").await;
    assert_eq!(cloud.subscribe("site/#", QoS::ExactlyOnce).await, vec![2]);
    let gw = gateway(
        up,
        vec![
            rule("sensors/#", Direction::Out, 2),
            rule("cmd/#", Direction::In, 2),
        ],
    )
    .await;
    let mut local = client(gw.addr, "local-sub").await;
    assert_eq!(local.subscribe("cmd/#", QoS::ExactlyOnce).await, vec![2]);

    let mut sensor = client(gw.addr, "sensor").await;
    for i in 0..30u16 {
        publish_qos2(&mut sensor, "sensors/t", i.to_string().as_bytes(), i + 1).await;
    }
    let got = receive(&mut cloud, 30).await;
    assert_eq!(payloads(&got), numbered(30), "exactly once, in order");
    assert!(got
        .iter()
        .all(|p| p.qos == QoS::ExactlyOnce && &*p.topic == "site/sensors/t"));

    let mut cloud_pub = client(up, "cloud-pub").await;
    for i in 0..30u16 {
        publish_qos2(
            &mut cloud_pub,
            "site/cmd/x",
            i.to_string().as_bytes(),
            i + 1,
        )
        .await;
    }
    let got = receive(&mut local, 30).await;
    assert_eq!(payloads(&got), numbered(30), "exactly once, in order");
    assert!(got
        .iter()
        .all(|p| p.qos == QoS::ExactlyOnce && &*p.topic == "cmd/x"));
    wait_status(&gw, "every uplink message completed", |st| {
        st["acked"] == 30 && st["outbox"]["queued"] == 0 && st["outbox"]["inflight"] == 0
    })
    .await;
    (gw, cloud)
}

/// The upstream grants Maximum QoS 1: QoS 2 rules go up at QoS 1, and the upstream's
/// PUBACK completes the local QoS 2 exchange (the outbox empties, nothing is stuck).
#[tokio::test]
async fn upstream_maximum_qos_1_carries_qos2_rules_at_qos1() {
    let up = start_broker(|c| c.mqtt.max_qos = 1).await;
    let mut cloud = client(up.addr, "cloud-sub").await;
    cloud.subscribe("site/#", QoS::AtLeastOnce).await;
    let gw = gateway(up.addr, vec![rule("sensors/#", Direction::Out, 2)]).await;
    let mut sensor = client(gw.addr, "sensor").await;
    for i in 0..20u16 {
        publish_qos2(&mut sensor, "sensors/t", i.to_string().as_bytes(), i + 1).await;
    }
    let got = receive(&mut cloud, 20).await;
    assert_eq!(payloads(&got), numbered(20));
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
    wait_status(&gw, "the outbox empties", |st| {
        st["acked"] == 20 && st["outbox"]["queued"] == 0 && st["outbox"]["inflight"] == 0
    })
    .await;
    gw.shutdown().await;
    up.shutdown().await;
}

/// Messages the upstream refuses (PUBACK 0x87 from its ACL) or can never take (larger
/// than its Maximum Packet Size) are removed from the outbox and counted as rejected;
/// they do not block the messages behind them.
#[tokio::test]
async fn upstream_refusals_are_counted_and_do_not_block_the_outbox() {
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    std::fs::write(
        &acl,
        // holdfast/#: the bridge's link state (`notifications`, on by default).
        "topic readwrite site/#\ntopic readwrite holdfast/#\ntopic deny site/sensors/secret/#\n",
    )
    .unwrap();
    let up = start_broker(|c| {
        c.auth.acl_file = Some(acl.clone());
        c.mqtt.max_packet_size = 2048;
    })
    .await;
    let mut cloud = client(up.addr, "cloud-sub").await;
    // (A filter overlapping a deny rule is refused as a whole.)
    assert_eq!(
        cloud.subscribe("site/sensors/a", QoS::AtLeastOnce).await,
        vec![1]
    );
    let gw = gateway(up.addr, vec![rule("sensors/#", Direction::Out, 1)]).await;
    let mut sensor = client(gw.addr, "sensor").await;
    publish_qos1(&mut sensor, "sensors/a", b"0", 1).await;
    publish_qos1(&mut sensor, "sensors/secret/x", b"denied", 2).await;
    publish_qos1(&mut sensor, "sensors/a", b"1", 3).await;
    publish_qos1(&mut sensor, "sensors/a", &vec![b'x'; 4000], 4).await;
    publish_qos1(&mut sensor, "sensors/a", b"2", 5).await;
    let got = receive(&mut cloud, 3).await;
    assert_eq!(payloads(&got), numbered(3));
    wait_status(&gw, "two rejected, the outbox empty", |st| {
        st["rejected"] == 2 && st["acked"] == 3 && st["outbox"]["queued"] == 0
    })
    .await;
    gw.shutdown().await;
    up.shutdown().await;
}

/// Another client takes the bridge's client id upstream: the upstream sends the bridge
/// DISCONNECT 0x8E, which the bridge reports and answers by reconnecting (taking the
/// session back). Messages queued meanwhile follow in order.
#[tokio::test]
async fn session_taken_over_upstream_is_reported_and_the_bridge_reconnects() {
    let up = start_broker(|_| {}).await;
    let mut cloud = client(up.addr, "cloud-sub").await;
    cloud.subscribe("site/#", QoS::AtLeastOnce).await;
    let gw = gateway(up.addr, vec![rule("sensors/#", Direction::Out, 1)]).await;
    let mut sensor = client(gw.addr, "sensor").await;
    publish_qos1(&mut sensor, "sensors/a", b"0", 1).await;
    assert_eq!(payloads(&receive(&mut cloud, 1).await), numbered(1));

    let mut impostor = RawClient::tcp(up.addr, V5).await;
    impostor
        .send(Packet::Connect(Box::new(connect_packet(
            V5, BRIDGE_ID, false,
        ))))
        .await;
    match impostor.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.reason_code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    wait_status(&gw, "the takeover is reported", |st| {
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("DISCONNECT 0x8e"))
    })
    .await;
    // The bridge comes back and takes its session over in turn.
    match impostor.recv_timeout(Duration::from_secs(5)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.reason_code, 0x8E),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    for i in 1..10u16 {
        publish_qos1(&mut sensor, "sensors/a", i.to_string().as_bytes(), i + 1).await;
    }
    let got = receive(&mut cloud, 9).await;
    assert_eq!(payloads(&got), numbered(10)[1..].to_vec());
    wait_status(&gw, "reconnected", |st| {
        st["connected"] == true && st["connects"].as_u64() >= Some(2)
    })
    .await;
    gw.shutdown().await;
    up.shutdown().await;
}

/// A `both` rule over MQTT 5: the upstream subscription has No Local, so what the gateway
/// publishes upstream is not sent back down (over 3.1.1 it comes back, and local
/// subscribers would see it twice).
#[tokio::test]
async fn both_direction_rule_does_not_echo() {
    let up = start_broker(|_| {}).await;
    let mut cloud = client(up.addr, "cloud-sub").await;
    cloud.subscribe("site/#", QoS::AtLeastOnce).await;
    let gw = gateway(up.addr, vec![rule("shared/#", Direction::Both, 1)]).await;
    let mut local = client(gw.addr, "local-sub").await;
    local.subscribe("shared/#", QoS::AtLeastOnce).await;

    let mut sensor = client(gw.addr, "sensor").await;
    for i in 0..5u16 {
        publish_qos1(&mut sensor, "shared/up", i.to_string().as_bytes(), i + 1).await;
    }
    assert_eq!(payloads(&receive(&mut cloud, 5).await), numbered(5));
    let got = receive(&mut local, 5).await;
    assert_eq!(payloads(&got), numbered(5), "each local message once");

    let mut cloud_pub = client(up.addr, "cloud-pub").await;
    for i in 0..5u16 {
        publish_qos1(
            &mut cloud_pub,
            "site/shared/down",
            i.to_string().as_bytes(),
            i + 1,
        )
        .await;
    }
    let got = receive(&mut local, 5).await;
    assert_eq!(payloads(&got), numbered(5));
    assert!(got.iter().all(|p| &*p.topic == "shared/down"));
    // The cloud subscriber sees the cloud's own messages once: none came back up.
    assert_eq!(payloads(&receive(&mut cloud, 5).await), numbered(5));
    gw.shutdown().await;
    up.shutdown().await;
}

/// QoS 2 end to end across a gateway crash: the real binary is SIGKILLed while its outbox
/// drains (paced at 200 msg/s) and restarted. A message whose PUBREC had arrived upstream
/// but was not yet stored is resent with DUP and the same packet id, which the upstream
/// (keeping the bridge's session) recognises; one whose PUBREC was stored gets its PUBREL.
/// The cloud subscriber sees every message exactly once, in order.
#[tokio::test]
async fn qos2_uplink_exactly_once_across_a_gateway_sigkill() {
    const N: usize = 300;
    let up = start_broker(|_| {}).await;
    let mut cloud = client(up.addr, "cloud-sub").await;
    cloud.subscribe("site/#", QoS::ExactlyOnce).await;
    let mut gw = daemon::Daemon::started(&format!(
        "[mqtt]\nmax_queued_messages = 0\n\
         [[bridge]]\nname = \"up\"\naddress = \"{}\"\nprotocol = \"5\"\nclient_id = \"{BRIDGE_ID}\"\n\
         keepalive_secs = 5\ninflight = 16\nreconnect_min_ms = 50\nreconnect_max_ms = 300\nmax_rate = 200\n\
         [[bridge.topic]]\npattern = \"sensors/#\"\ndirection = \"out\"\nqos = 2\nremote_prefix = \"site/\"\n",
        up.addr
    ))
    .await;
    let mut sensor = client(gw.addr, "sensor").await;
    for i in 0..N {
        let id = (i % 60_000) as u16 + 1;
        publish_qos2(&mut sensor, "sensors/t", i.to_string().as_bytes(), id).await;
    }
    drop(sensor);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 60 {
        assert!(Instant::now() < deadline, "the drain did not start");
        match cloud.recv_timeout(Duration::from_secs(5)).await {
            Ok(Some(Packet::Publish(p))) => {
                cloud
                    .send(Packet::PubRec(PubAckLike::new(p.packet_id)))
                    .await;
                got.push(p);
            }
            Ok(Some(Packet::PubRel(r))) => {
                cloud
                    .send(Packet::PubComp(PubAckLike::new(r.packet_id)))
                    .await
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    gw.sigkill();
    assert!(got.len() < N, "killed after the drain ended");
    let at_kill = got.len();
    gw.start().await;
    receive_into(&mut cloud, &mut got, N, Duration::from_secs(20)).await;
    eprintln!("[qos2-sigkill] killed after {at_kill} of {N} had arrived upstream");
    assert_eq!(payloads(&got), numbered(N), "exactly once, in order");
    up.shutdown().await;
}

/// QoS 2 both ways with Mosquitto as the MQTT 5 upstream: a local QoS 2 publisher's
/// messages reach a QoS 2 subscriber on Mosquitto exactly once, in order, at QoS 2; QoS 2
/// messages published on Mosquitto reach a local QoS 2 subscriber the same way.
#[tokio::test]
async fn mosquitto_upstream_qos2_both_ways() {
    if !mosquitto::have_mosquitto() {
        return;
    }
    let mq = mosquitto::Mosquitto::start().await;
    let (gw, _cloud) = qos2_both_ways(mq.addr()).await;
    gw.shutdown().await;
    assert!(
        mq.log().contains(&format!("as {BRIDGE_ID} (p5, c0")),
        "{}",
        mq.log()
    );
}
