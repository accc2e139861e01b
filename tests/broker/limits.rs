//! Configured limits and their reason codes: per-client queue limits with both policies,
//! topic length and depth, QoS 0 backlog for slow readers.

use crate::common;
use std::time::Duration;

use common::*;
use holdfast::config::QueuePolicy;
use holdfast::protocol::{reason, Packet, ProtocolVersion, QoS};

/// Parks a persistent subscriber on `q` and disconnects it; returns its CONNECT.
async fn offline_subscriber(addr: std::net::SocketAddr, id: &str) -> holdfast::protocol::Connect {
    let mut conn = connect_packet(ProtocolVersion::V5, id, false);
    conn.properties.session_expiry_interval = Some(300);
    let (mut c, _) = RawClient::connect_with(addr, conn.clone()).await;
    c.subscribe("q", QoS::AtLeastOnce).await;
    c.send(Packet::Disconnect(Default::default())).await;
    c.expect_closed().await;
    conn
}

async fn drain(addr: std::net::SocketAddr, conn: holdfast::protocol::Connect) -> Vec<u8> {
    let (mut c, _) = RawClient::connect_with(addr, conn).await;
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = c.recv_timeout(Duration::from_millis(300)).await {
        got.push(p.payload[0]);
        c.puback(p.packet_id).await;
    }
    got
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_messages() {
    let b = start_broker(|c| {
        c.mqtt.max_queued_messages = 3;
        c.mqtt.durable_max_queued_messages = 3;
        c.mqtt.queue_policy = QueuePolicy::DropOldest;
    })
    .await;
    let conn = offline_subscriber(b.addr, "do").await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    for i in 1..=5u8 {
        p.publish("q", &[i], QoS::AtLeastOnce, u16::from(i)).await;
        match p.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, 0),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(drain(b.addr, conn).await, vec![3, 4, 5]);
    b.shutdown().await;
}

#[tokio::test]
async fn reject_new_answers_quota_exceeded_to_v5_and_withholds_the_v3_ack() {
    let b = start_broker(|c| {
        c.mqtt.max_queued_messages = 3;
        c.mqtt.durable_max_queued_messages = 3;
        c.mqtt.queue_policy = QueuePolicy::RejectNew;
    })
    .await;
    let conn = offline_subscriber(b.addr, "rn").await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p5").await;
    let mut codes = Vec::new();
    for i in 1..=5u8 {
        p.publish("q", &[i], QoS::AtLeastOnce, u16::from(i)).await;
        match p.recv().await {
            Some(Packet::PubAck(a)) => codes.push(a.reason_code),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        codes,
        vec![0, 0, 0, reason::QUOTA_EXCEEDED, reason::QUOTA_EXCEEDED]
    );

    let mut p3 = RawClient::connect(b.addr, ProtocolVersion::V311, "p3").await;
    p3.publish("q", &[6], QoS::AtLeastOnce, 1).await;
    p3.expect_silence(Duration::from_millis(300)).await;

    assert_eq!(drain(b.addr, conn).await, vec![1, 2, 3]);
    b.shutdown().await;
}

#[tokio::test]
async fn queued_bytes_limit_applies() {
    let b = start_broker(|c| {
        c.mqtt.max_queued_messages = 0;
        c.mqtt.durable_max_queued_messages = 0;
        c.mqtt.max_queued_bytes = 10;
        c.mqtt.durable_max_queued_bytes = 10;
    })
    .await;
    let conn = offline_subscriber(b.addr, "bytes").await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    for i in 1..=5u8 {
        p.publish("q", &[i; 4], QoS::AtLeastOnce, u16::from(i))
            .await;
        p.recv().await;
    }
    // 4-byte payloads, 10-byte budget: the newest two survive drop-oldest.
    assert_eq!(drain(b.addr, conn).await, vec![4, 5]);
    b.shutdown().await;
}

#[tokio::test]
async fn topic_length_and_depth_limits() {
    let b = start_broker(|c| {
        c.mqtt.max_topic_levels = 3;
        c.mqtt.max_topic_length = 16;
    })
    .await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "lim").await;
    assert_eq!(
        c.subscribe("a/b/c/d", QoS::AtMostOnce).await,
        vec![reason::TOPIC_FILTER_INVALID]
    );
    assert_eq!(
        c.subscribe("this/is/far-too-long", QoS::AtMostOnce).await,
        vec![reason::TOPIC_FILTER_INVALID]
    );
    assert_eq!(c.subscribe("a/b/c", QoS::AtMostOnce).await, vec![0]);
    c.publish("a/b/c/d", b"deep", QoS::AtMostOnce, 0).await;
    let seen = c.expect_closed().await;
    assert!(seen.iter().any(
        |p| matches!(p, Packet::Disconnect(d) if d.reason_code == reason::TOPIC_NAME_INVALID)
    ));
    b.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_stall_others() {
    let b = start_broker(|c| {
        c.mqtt.max_queued_messages = 100;
        c.mqtt.durable_max_queued_messages = 100;
    })
    .await;
    // The stalled client subscribes and then never reads its socket.
    let mut stalled = RawClient::connect(b.addr, ProtocolVersion::V311, "stalled").await;
    stalled.subscribe("flood", QoS::AtMostOnce).await;
    let mut fast = RawClient::connect(b.addr, ProtocolVersion::V311, "fast").await;
    fast.subscribe("flood", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V311, "p").await;
    let payload = vec![0u8; 1024];
    // 20 MB in lockstep batches: the fast reader must get every message while the stalled
    // one's socket, write buffer and backlog fill up and its QoS 0 excess is dropped.
    for _batch in 0..200 {
        for _ in 0..100 {
            p.publish("flood", &payload, QoS::AtMostOnce, 0).await;
        }
        for _ in 0..100 {
            fast.recv_publish().await;
        }
    }
    drop(stalled);
    b.shutdown().await;
}

#[tokio::test]
async fn a_fast_qos1_publisher_is_slowed_to_its_subscriber_instead_of_losing_messages() {
    // Queue limit 1000 with drop-oldest: without backpressure a publisher that is acked at
    // once would overflow the slow subscriber's queue and messages would be dropped.
    let b = start_broker(|c| {
        c.mqtt.max_queued_messages = 1000;
        c.mqtt.durable_max_queued_messages = 1000;
    })
    .await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V311, "slow").await;
    sub.subscribe("bp", QoS::AtLeastOnce).await;
    let total: u32 = 5000;
    let reader = tokio::spawn(async move {
        let mut next = 0u32;
        while next < total {
            let p = sub.recv_publish().await;
            let n = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
            assert_eq!(n, next, "in order, nothing dropped");
            next += 1;
            sub.puback(p.packet_id).await;
            if next.is_multiple_of(100) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "fast").await;
    // A well-behaved v5 publisher: at most 64 unacknowledged (the advertised Receive Maximum).
    let mut outstanding = 0;
    for i in 0..total {
        while outstanding >= 64 {
            match p.recv().await {
                Some(Packet::PubAck(_)) => outstanding -= 1,
                other => panic!("{other:?}"),
            }
        }
        p.publish(
            "bp",
            &i.to_be_bytes(),
            QoS::AtLeastOnce,
            (i % 60000 + 1) as u16,
        )
        .await;
        outstanding += 1;
    }
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("subscriber received everything")
        .unwrap();
    b.shutdown().await;
}
