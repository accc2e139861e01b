//! The upstream bridge against a real upstream: a second Holdfast (in-process) and Debian's
//! Mosquitto. Uplink and downlink mapping, loop prevention, store-and-forward while the
//! upstream is down, and order after reconnect.

mod common;

use std::time::Duration;

use common::*;
use holdfast::bridge::{BridgeConfig, Direction, TopicRule};
use holdfast::protocol::{Packet, ProtocolVersion, QoS};

fn bridge_to(addr: std::net::SocketAddr) -> BridgeConfig {
    BridgeConfig {
        name: "up".into(),
        address: addr.to_string(),
        client_id: Some("gw-test".into()),
        username: None,
        password: None,
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        keepalive_secs: 5,
        topic: vec![
            TopicRule {
                pattern: "sensors/#".into(),
                direction: Direction::Out,
                qos: 1,
                local_prefix: String::new(),
                remote_prefix: "site/".into(),
            },
            TopicRule {
                pattern: "cmd/#".into(),
                direction: Direction::In,
                qos: 1,
                local_prefix: String::new(),
                remote_prefix: "site/".into(),
            },
            TopicRule {
                pattern: "shared/#".into(),
                direction: Direction::Both,
                qos: 1,
                local_prefix: String::new(),
                remote_prefix: "site/".into(),
            },
        ],
        ..BridgeConfig::example()
    }
}

async fn publish_acked(c: &mut RawClient, topic: &str, payload: &[u8], id: u16) {
    c.publish(topic, payload, QoS::AtLeastOnce, id).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.reason_code < 0x80, "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn uplink_and_downlink_through_a_holdfast_upstream() {
    let up = start_broker(|_| {}).await;
    let mut cloud_sub = RawClient::connect(up.addr, ProtocolVersion::V311, "cloud-sub").await;
    cloud_sub.subscribe("site/#", QoS::AtLeastOnce).await;

    let up_addr = up.addr;
    let gw = start_broker(|c| c.bridge = vec![bridge_to(up_addr)]).await;
    let mut local_sub = RawClient::connect(gw.addr, ProtocolVersion::V311, "local-sub").await;
    local_sub.subscribe("cmd/#", QoS::AtLeastOnce).await;
    // Give the bridge a moment to connect and subscribe upstream.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut sensor = RawClient::connect(gw.addr, ProtocolVersion::V311, "sensor").await;
    for i in 0..50u16 {
        publish_acked(&mut sensor, "sensors/t", &i.to_be_bytes(), i + 1).await;
    }
    for i in 0..50u16 {
        let p = cloud_sub.recv_publish().await;
        assert_eq!(&*p.topic, "site/sensors/t");
        assert_eq!(&p.payload[..], &i.to_be_bytes(), "in order");
        cloud_sub.puback(p.packet_id).await;
    }

    let mut cloud_pub = RawClient::connect(up.addr, ProtocolVersion::V311, "cloud-pub").await;
    publish_acked(&mut cloud_pub, "site/cmd/reboot", b"now", 1).await;
    let p = local_sub.recv_publish().await;
    assert_eq!((&*p.topic, &p.payload[..]), ("cmd/reboot", &b"now"[..]));
    local_sub.puback(p.packet_id).await;
    // The cloud subscriber sees the command once (it is subscribed to site/#).
    let p = cloud_sub.recv_publish().await;
    assert_eq!(&*p.topic, "site/cmd/reboot");
    cloud_sub.puback(p.packet_id).await;

    // A `both` rule: what comes down is not sent back up (no loop).
    local_sub.subscribe("shared/#", QoS::AtLeastOnce).await;
    publish_acked(&mut cloud_pub, "site/shared/state", b"on", 2).await;
    let p = local_sub.recv_publish().await;
    assert_eq!(&*p.topic, "shared/state");
    local_sub.puback(p.packet_id).await;
    let p = cloud_sub.recv_publish().await;
    assert_eq!(&*p.topic, "site/shared/state");
    cloud_sub.puback(p.packet_id).await;
    cloud_sub.expect_silence(Duration::from_millis(500)).await;
    // ...while a local publish on the same rule goes up.
    publish_acked(&mut sensor, "shared/state", b"off", 99).await;
    let p = cloud_sub.recv_publish().await;
    assert_eq!(
        (&*p.topic, &p.payload[..]),
        ("site/shared/state", &b"off"[..])
    );
    gw.shutdown().await;
    up.shutdown().await;
}

#[tokio::test]
async fn messages_published_while_upstream_is_down_arrive_in_order_after_it_returns() {
    // Pick the upstream port first, start the gateway while nothing listens there.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = probe.local_addr().unwrap();
    drop(probe);
    // The cloud has a durable subscriber from before (so nothing the bridge delivers on
    // reconnect goes to nobody); then the upstream goes away.
    let up_dir = tempfile::tempdir().unwrap();
    {
        let up = start_broker(|c| {
            c.data_dir = up_dir.path().to_path_buf();
            c.listener = vec![holdfast::config::ListenerConfig {
                bind: up_addr.to_string(),
            }]
        })
        .await;
        let (mut s, _) = RawClient::connect_with(
            up.addr,
            connect_packet(ProtocolVersion::V311, "cloud-sub", false),
        )
        .await;
        s.subscribe("site/#", QoS::AtLeastOnce).await;
        up.shutdown().await;
    }
    let gw = start_broker(|c| c.bridge = vec![bridge_to(up_addr)]).await;
    let mut sensor = RawClient::connect(gw.addr, ProtocolVersion::V311, "sensor").await;
    for i in 0..300u16 {
        publish_acked(&mut sensor, "sensors/t", &i.to_be_bytes(), i % 1000 + 1).await;
    }
    let up = start_broker(|c| {
        c.data_dir = up_dir.path().to_path_buf();
        c.listener = vec![holdfast::config::ListenerConfig {
            bind: up_addr.to_string(),
        }]
    })
    .await;
    let mut cloud_sub = RawClient::connect_with(
        up.addr,
        connect_packet(ProtocolVersion::V311, "cloud-sub", false),
    )
    .await
    .0;
    for i in 0..300u16 {
        let p = tokio::time::timeout(Duration::from_secs(20), cloud_sub.recv_publish())
            .await
            .expect("backlog drains after the upstream returns");
        assert_eq!(&p.payload[..], &i.to_be_bytes(), "in order, none lost");
        cloud_sub.puback(p.packet_id).await;
    }
    gw.shutdown().await;
    up.shutdown().await;
}
