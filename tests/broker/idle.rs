//! Idle plain-TCP clients waiting without a task (`mqtt.park_idle_ms`,
//! `broker::connection::park`), over real TCP: a parked client is counted in `/metrics`
//! (`holdfast_clients_idle`) and still gets what the router sends it, has its packets
//! answered, is closed by its keep-alive, taken over, told about a shutdown, and has its will
//! published when its socket goes; a client that parks between every packet loses nothing.

use crate::common::{self, metrics};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use holdfast::protocol::{reason, Packet, ProtocolVersion, QoS, Will, WillProperties};

/// `/metrics` gauge `name` of the broker.
async fn gauge(b: &TestBroker, name: &str) -> f64 {
    metrics::scrape(b).await[name]
}

/// Waits until `n` clients are parked (panics after 10 s).
async fn until_idle(b: &TestBroker, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let idle = gauge(b, "holdfast_clients_idle").await;
        if idle == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{idle} clients idle, waited for {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn broker(park_idle_ms: u64) -> TestBroker {
    start_broker(|c| {
        c.mqtt.park_idle_ms = park_idle_ms;
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await
}

fn disconnect_reason(packets: &[Packet]) -> Option<u8> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason_code),
        _ => None,
    })
}

async fn with_will(addr: SocketAddr, id: &str, keep_alive: u16) -> RawClient {
    let mut c = connect_packet(ProtocolVersion::V5, id, true);
    c.keep_alive = keep_alive;
    c.will = Some(Will {
        topic: format!("wills/{id}").into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    let (c, ack) = RawClient::connect_with(addr, c).await;
    assert!(matches!(ack, Packet::ConnAck(a) if a.reason_code == 0));
    c
}

#[tokio::test]
async fn a_parked_client_gets_its_messages_and_its_packets_are_answered() {
    let b = broker(100).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "idle-sub").await;
    sub.subscribe("idle/t", QoS::AtLeastOnce).await;
    until_idle(&b, 1.0).await;
    assert_eq!(gauge(&b, "holdfast_clients_connected").await, 1.0);

    // The router's packet wakes it (through its link).
    let mut publisher = RawClient::connect(b.addr, ProtocolVersion::V5, "idle-pub").await;
    publisher
        .publish("idle/t", b"one", QoS::AtLeastOnce, 1)
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"one");
    sub.puback(p.packet_id).await;

    // Both park again; the socket wakes it: a ping, then a publish of its own.
    until_idle(&b, 2.0).await;
    sub.send(Packet::PingReq).await;
    assert_eq!(sub.recv().await, Some(Packet::PingResp));
    until_idle(&b, 2.0).await;
    sub.publish("idle/t", b"two", QoS::AtLeastOnce, 7).await;
    let mut got_ack = false;
    let mut got_msg = false;
    while !(got_ack && got_msg) {
        match sub.recv_timeout(TIMEOUT).await {
            Ok(Some(Packet::PubAck(a))) if a.packet_id == 7 => got_ack = true,
            Ok(Some(Packet::Publish(p))) if &p.payload[..] == b"two" => {
                got_msg = true;
                sub.puback(p.packet_id).await;
            }
            other => panic!("expected the PUBACK and the message, got {other:?}"),
        }
    }
    b.shutdown().await;
}

#[tokio::test]
async fn a_parked_client_is_closed_by_its_keep_alive_and_its_will_is_published() {
    let b = broker(100).await;
    let mut watcher = RawClient::connect(b.addr, ProtocolVersion::V5, "idle-watch").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut quiet = with_will(b.addr, "idle-ka", 1).await;
    let t0 = Instant::now();
    until_idle(&b, 2.0).await;
    let seen = quiet.expect_closed().await;
    let took = t0.elapsed();
    assert_eq!(disconnect_reason(&seen), Some(reason::KEEP_ALIVE_TIMEOUT));
    // 1.5 × keep-alive, checked every `park::SWEEP` (500 ms) while parked.
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let will = watcher.recv_publish().await;
    assert_eq!(&*will.topic, "wills/idle-ka");
    b.shutdown().await;
}

#[tokio::test]
async fn a_parked_client_whose_socket_closes_has_its_will_published() {
    let b = broker(100).await;
    let mut watcher = RawClient::connect(b.addr, ProtocolVersion::V5, "idle-watch2").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let gone = with_will(b.addr, "idle-gone", 0).await;
    until_idle(&b, 2.0).await;
    drop(gone);
    let will = watcher.recv_publish().await;
    assert_eq!(&*will.topic, "wills/idle-gone");
    until_idle(&b, 1.0).await;
    assert_eq!(gauge(&b, "holdfast_clients_connected").await, 1.0);
    b.shutdown().await;
}

#[tokio::test]
async fn a_parked_client_is_taken_over_and_told_about_a_shutdown() {
    let b = broker(100).await;
    let mut first = RawClient::connect(b.addr, ProtocolVersion::V5, "idle-dup").await;
    until_idle(&b, 1.0).await;
    let mut second = RawClient::connect(b.addr, ProtocolVersion::V5, "idle-dup").await;
    let seen = first.expect_closed().await;
    assert_eq!(disconnect_reason(&seen), Some(reason::SESSION_TAKEN_OVER));

    until_idle(&b, 1.0).await;
    let t0 = Instant::now();
    b.shutdown().await;
    let seen = second.expect_closed().await;
    assert_eq!(disconnect_reason(&seen), Some(reason::SERVER_SHUTTING_DOWN));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_client_that_parks_between_packets_loses_nothing() {
    // 1 ms: the publisher and the subscriber park between nearly every packet.
    let b = broker(1).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V311, "idle-many-sub").await;
    sub.subscribe("idle/many", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connect(b.addr, ProtocolVersion::V311, "idle-many-pub").await;
    const N: u16 = 300;
    for i in 1..=N {
        publisher
            .publish("idle/many", &i.to_be_bytes(), QoS::AtLeastOnce, i)
            .await;
        assert!(
            matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.packet_id == i),
            "PUBACK {i}"
        );
        let p = sub.recv_publish().await;
        assert_eq!(&p.payload[..], &i.to_be_bytes(), "message {i} in order");
        sub.puback(p.packet_id).await;
        if i % 3 == 0 {
            // Long enough to park, usually; sometimes not: both paths run.
            tokio::time::sleep(Duration::from_millis(u64::from(i % 4))).await;
        }
    }
    b.shutdown().await;
}
