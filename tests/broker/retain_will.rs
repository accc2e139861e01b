//! Retained messages (store, replace, delete, Retain Handling, Retain As Published, expiry)
//! and will messages (published on abnormal close, not on DISCONNECT, Will Delay, 0x04).

use crate::common;
use std::time::Duration;

use common::*;
use holdfast::protocol::{
    reason, Disconnect, Packet, ProtocolVersion, QoS, SubscriptionOptions, Will, WillProperties,
};

async fn publish_retained(addr: std::net::SocketAddr, topic: &str, payload: &[u8]) {
    let mut p = RawClient::connect(addr, ProtocolVersion::V311, "retainer").await;
    let mut msg = publish(topic, payload, QoS::AtLeastOnce, 1);
    msg.retain = true;
    p.send(Packet::Publish(msg)).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
}

#[tokio::test]
async fn retained_message_is_stored_replaced_and_deleted() {
    let b = start_broker(|_| {}).await;
    publish_retained(b.addr, "r/a", b"first").await;
    publish_retained(b.addr, "r/a", b"second").await;
    publish_retained(b.addr, "r/b", b"other").await;

    let mut s = RawClient::connect(b.addr, ProtocolVersion::V311, "s1").await;
    s.subscribe("r/a", QoS::AtLeastOnce).await;
    let p = s.recv_publish().await;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"second");

    publish_retained(b.addr, "r/a", b"").await;
    let mut s2 = RawClient::connect(b.addr, ProtocolVersion::V311, "s2").await;
    s2.subscribe("r/#", QoS::AtMostOnce).await;
    let p = s2.recv_publish().await;
    assert_eq!(&*p.topic, "r/b");
    s2.expect_silence(Duration::from_millis(150)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn live_messages_to_existing_subscribers_have_retain_cleared_unless_rap() {
    let b = start_broker(|_| {}).await;
    let mut plain = RawClient::connect(b.addr, ProtocolVersion::V5, "plain").await;
    plain.subscribe("l", QoS::AtMostOnce).await;
    let mut rap = RawClient::connect(b.addr, ProtocolVersion::V5, "rap").await;
    rap.subscribe_opts(
        "l",
        SubscriptionOptions {
            retain_as_published: true,
            ..Default::default()
        },
        None,
    )
    .await;
    publish_retained(b.addr, "l", b"x").await;
    assert!(!plain.recv_publish().await.retain);
    assert!(rap.recv_publish().await.retain);
    b.shutdown().await;
}

#[tokio::test]
async fn retain_handling_controls_delivery_on_subscribe() {
    let b = start_broker(|_| {}).await;
    publish_retained(b.addr, "h", b"kept").await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "rh").await;
    let opts = |rh| SubscriptionOptions {
        retain_handling: rh,
        ..Default::default()
    };
    // 2: never.
    c.subscribe_opts("h", opts(2), None).await;
    c.expect_silence(Duration::from_millis(150)).await;
    // 1: only if the subscription is new; it exists now, so nothing.
    c.subscribe_opts("h", opts(1), None).await;
    c.expect_silence(Duration::from_millis(150)).await;
    // 0: always.
    c.subscribe_opts("h", opts(0), None).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"kept");
    // 1 on a new filter: sent.
    c.subscribe_opts("+", opts(1), None).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"kept");
    b.shutdown().await;
}

#[tokio::test]
async fn retained_messages_expire() {
    let b = start_broker(|_| {}).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    let mut msg = publish("exp/r", b"short-lived", QoS::AtMostOnce, 0);
    msg.retain = true;
    msg.properties.message_expiry_interval = Some(1);
    p.send(Packet::Publish(msg)).await;
    let mut early = RawClient::connect(b.addr, ProtocolVersion::V5, "early").await;
    early.subscribe("exp/r", QoS::AtMostOnce).await;
    let got = early.recv_publish().await;
    assert_eq!(got.properties.message_expiry_interval, Some(1));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut late = RawClient::connect(b.addr, ProtocolVersion::V5, "late").await;
    late.subscribe("exp/r", QoS::AtMostOnce).await;
    late.expect_silence(Duration::from_millis(150)).await;
    b.shutdown().await;
}

fn with_will(v: ProtocolVersion, id: &str, delay: Option<u32>) -> holdfast::protocol::Connect {
    let mut c = connect_packet(v, id, true);
    c.will = Some(Will {
        topic: "wills/x".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: delay,
            ..Default::default()
        },
    });
    c
}

async fn watcher(addr: std::net::SocketAddr) -> RawClient {
    let mut w = RawClient::connect(addr, ProtocolVersion::V311, "watcher").await;
    w.subscribe("wills/#", QoS::AtMostOnce).await;
    w
}

#[tokio::test]
async fn will_is_published_when_the_socket_drops() {
    let b = start_broker(|_| {}).await;
    let mut w = watcher(b.addr).await;
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let (c, _) = RawClient::connect_with(b.addr, with_will(v, "dies", None)).await;
        drop(c);
        assert_eq!(&w.recv_publish().await.payload[..], b"gone");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn will_is_not_published_on_normal_disconnect_but_is_on_0x04() {
    let b = start_broker(|_| {}).await;
    let mut w = watcher(b.addr).await;
    let (mut c, _) =
        RawClient::connect_with(b.addr, with_will(ProtocolVersion::V5, "polite", None)).await;
    c.send(Packet::Disconnect(Disconnect::default())).await;
    c.expect_closed().await;
    w.expect_silence(Duration::from_millis(200)).await;

    let (mut c, _) =
        RawClient::connect_with(b.addr, with_will(ProtocolVersion::V5, "with-will", None)).await;
    c.send(Packet::Disconnect(Disconnect {
        reason_code: reason::DISCONNECT_WITH_WILL,
        ..Default::default()
    }))
    .await;
    c.expect_closed().await;
    assert_eq!(&w.recv_publish().await.payload[..], b"gone");
    b.shutdown().await;
}

#[tokio::test]
async fn will_is_published_after_a_protocol_error() {
    let b = start_broker(|_| {}).await;
    let mut w = watcher(b.addr).await;
    let (mut c, _) =
        RawClient::connect_with(b.addr, with_will(ProtocolVersion::V311, "bad", None)).await;
    c.send_raw(&[0x30, 0x03, 0x00, 0x01, b'#']).await; // PUBLISH to a wildcard topic
    c.expect_closed().await;
    assert_eq!(&w.recv_publish().await.payload[..], b"gone");
    b.shutdown().await;
}

#[tokio::test]
async fn will_delay_holds_the_will_and_reconnecting_cancels_it() {
    let b = start_broker(|_| {}).await;
    let mut w = watcher(b.addr).await;
    let mk = || {
        let mut c = with_will(ProtocolVersion::V5, "delayed", Some(1));
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
        c
    };
    // Drop, come back within the delay: no will.
    let (c, _) = RawClient::connect_with(b.addr, mk()).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, _) = RawClient::connect_with(b.addr, mk()).await;
    w.expect_silence(Duration::from_millis(1300)).await;
    // Drop and stay away: the will comes after about a second.
    drop(c);
    let t0 = std::time::Instant::now();
    assert_eq!(&w.recv_publish().await.payload[..], b"gone");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    b.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_0x8b_and_publishes_wills() {
    let b = start_broker(|_| {}).await;
    let mut w = RawClient::connect(b.addr, ProtocolVersion::V5, "watcher5").await;
    w.subscribe("wills/#", QoS::AtMostOnce).await;
    let (_c, _) =
        RawClient::connect_with(b.addr, with_will(ProtocolVersion::V311, "victim", None)).await;
    b.shutdown().await;
    let seen = w.expect_closed().await;
    assert!(
        seen.iter()
            .any(|p| matches!(p, Packet::Publish(p) if &p.payload[..] == b"gone")),
        "{seen:?}"
    );
    assert!(matches!(
        seen.last(),
        Some(Packet::Disconnect(d)) if d.reason_code == reason::SERVER_SHUTTING_DOWN
    ));
}
