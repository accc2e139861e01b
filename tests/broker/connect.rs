//! CONNECT handling: protocol levels, client ids, keep-alive, takeover, limits, CONNACK
//! properties, and session resumption within one broker run.

use crate::common;
use std::time::{Duration, Instant};

use common::*;
use holdfast::protocol::{reason, Auth, ConnAck, Packet, ProtocolVersion, PubAckLike, QoS};

fn connack(p: Packet) -> ConnAck {
    match p {
        Packet::ConnAck(a) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn disconnect_reason(packets: &[Packet]) -> Option<u8> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason_code),
        _ => None,
    })
}

#[tokio::test]
async fn empty_client_id_gets_an_assigned_identifier() {
    let b = start_broker(|_| {}).await;
    let (_c, ack) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V5, "", true)).await;
    let ack = connack(ack);
    assert_eq!(ack.reason_code, 0);
    let id = ack
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    assert!(!id.is_empty());

    let (_c, ack) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V311, "", true)).await;
    assert_eq!(connack(ack).reason_code, 0);
    b.shutdown().await;
}

#[tokio::test]
async fn empty_client_id_without_clean_start_is_rejected() {
    let b = start_broker(|_| {}).await;
    for (v, expect) in [
        (ProtocolVersion::V5, reason::CLIENT_IDENTIFIER_NOT_VALID),
        // 3.1.1 return code 0x02 maps from 0x85.
        (ProtocolVersion::V311, reason::CLIENT_IDENTIFIER_NOT_VALID),
    ] {
        let (mut c, ack) = RawClient::connect_with(b.addr, connect_packet(v, "", false)).await;
        assert_eq!(connack(ack).reason_code, expect, "{v:?}");
        assert!(c.expect_closed().await.is_empty());
    }
    // And on the wire, 3.1.1 sees return code 2.
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    c.send(Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V311,
        "",
        false,
    ))))
    .await;
    let mut raw = [0u8; 4];
    use tokio::io::AsyncReadExt;
    c.stream().read_exact(&mut raw).await.unwrap();
    assert_eq!(raw, [0x20, 0x02, 0x00, 0x02]);
    b.shutdown().await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_return_code_1_and_close() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    // CONNECT, protocol "MQTT" level 6.
    c.send_raw(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a',
    ])
    .await;
    let seen = c.expect_closed().await;
    assert_eq!(seen.len(), 1);
    assert_eq!(
        connack(seen[0].clone()).reason_code,
        reason::UNSUPPORTED_PROTOCOL_VERSION
    );
    b.shutdown().await;
}

#[tokio::test]
async fn legacy_mqtt31_clients_connect() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V31, "old-sensor").await;
    assert_eq!(c.subscribe("s", QoS::AtLeastOnce).await, vec![1]);
    b.shutdown().await;
}

#[tokio::test]
async fn first_packet_must_be_connect() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    c.send(Packet::PingReq).await;
    assert!(c.expect_closed().await.is_empty());
    b.shutdown().await;
}

#[tokio::test]
async fn idle_socket_is_closed_after_connect_timeout() {
    let b = start_broker(|c| c.mqtt.connect_timeout_secs = 1).await;
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    let t0 = Instant::now();
    assert!(c.expect_closed().await.is_empty());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn keep_alive_timeout_closes_with_0x8d_after_one_and_a_half_intervals() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "ka", true);
    conn.keep_alive = 1;
    let (mut c, ack) = RawClient::connect_with(b.addr, conn).await;
    assert_eq!(connack(ack).reason_code, 0);
    let t0 = Instant::now();
    let seen = c.expect_closed().await;
    let took = t0.elapsed();
    assert_eq!(disconnect_reason(&seen), Some(reason::KEEP_ALIVE_TIMEOUT));
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn pings_keep_the_connection_alive() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V311, "pinger", true);
    conn.keep_alive = 1;
    let (mut c, _) = RawClient::connect_with(b.addr, conn).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
    }
    b.shutdown().await;
}

#[tokio::test]
async fn server_keep_alive_is_advertised_and_enforced() {
    let b = start_broker(|c| c.mqtt.server_keep_alive = Some(1)).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "ska", true);
    conn.keep_alive = 600;
    let (mut c, ack) = RawClient::connect_with(b.addr, conn).await;
    assert_eq!(connack(ack).properties.server_keep_alive, Some(1));
    let seen = c.expect_closed().await;
    assert_eq!(disconnect_reason(&seen), Some(reason::KEEP_ALIVE_TIMEOUT));
    b.shutdown().await;
}

#[tokio::test]
async fn second_connection_with_same_id_takes_over_with_0x8e() {
    let b = start_broker(|_| {}).await;
    let mut first = RawClient::connect(b.addr, ProtocolVersion::V5, "dup").await;
    let _second = RawClient::connect(b.addr, ProtocolVersion::V5, "dup").await;
    let seen = first.expect_closed().await;
    assert_eq!(disconnect_reason(&seen), Some(reason::SESSION_TAKEN_OVER));
    b.shutdown().await;
}

#[tokio::test]
async fn connack_advertises_the_brokers_real_limits() {
    let b = start_broker(|c| {
        c.mqtt.max_inflight = 17;
        c.mqtt.max_packet_size = 4096;
        c.mqtt.max_qos = 1;
        c.mqtt.retain_available = false;
        c.mqtt.topic_alias_maximum = 5;
    })
    .await;
    let (_c, ack) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V5, "lim", true)).await;
    let p = connack(ack).properties;
    assert_eq!(p.receive_maximum, Some(17));
    assert_eq!(p.maximum_packet_size, Some(4096));
    assert_eq!(p.maximum_qos, Some(1));
    assert_eq!(p.retain_available, Some(0));
    assert_eq!(p.topic_alias_maximum, Some(5));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifiers_available, Some(1));
    b.shutdown().await;
}

#[tokio::test]
async fn max_connections_refuses_with_quota_exceeded_or_server_unavailable() {
    let b = start_broker(|c| c.mqtt.max_connections = 2).await;
    let _a = RawClient::connect(b.addr, ProtocolVersion::V311, "a").await;
    let _b = RawClient::connect(b.addr, ProtocolVersion::V311, "b").await;
    let (_c, ack) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V5, "c", true)).await;
    assert_eq!(connack(ack).reason_code, reason::QUOTA_EXCEEDED);
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    c.send(Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V311,
        "d",
        true,
    ))))
    .await;
    let mut raw = [0u8; 4];
    use tokio::io::AsyncReadExt;
    c.stream().read_exact(&mut raw).await.unwrap();
    assert_eq!(raw, [0x20, 0x02, 0x00, 0x03]);
    b.shutdown().await;
}

#[tokio::test]
async fn anonymous_clients_refused_when_not_allowed() {
    let b = start_broker(|c| c.mqtt.allow_anonymous = false).await;
    let (_c, ack) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V5, "anon", true)).await;
    assert_eq!(connack(ack).reason_code, reason::NOT_AUTHORIZED);
    let mut named = connect_packet(ProtocolVersion::V5, "named", true);
    named.username = Some("sensor".into());
    named.password = Some(bytes::Bytes::from_static(&[0xff, 0x00, 0x80]));
    let (_c, ack) = RawClient::connect_with(b.addr, named).await;
    assert_eq!(connack(ack).reason_code, 0);
    b.shutdown().await;
}

#[tokio::test]
async fn enhanced_authentication_is_refused_and_auth_packets_are_protocol_errors() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "scram", true);
    conn.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let (_c, ack) = RawClient::connect_with(b.addr, conn).await;
    assert_eq!(connack(ack).reason_code, reason::BAD_AUTHENTICATION_METHOD);

    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "auth").await;
    c.send(Packet::Auth(Auth::default())).await;
    assert_eq!(
        disconnect_reason(&c.expect_closed().await),
        Some(reason::PROTOCOL_ERROR)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "twice").await;
    c.send(Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V5,
        "twice",
        true,
    ))))
    .await;
    assert_eq!(
        disconnect_reason(&c.expect_closed().await),
        Some(reason::PROTOCOL_ERROR)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_queues_while_offline() {
    let b = start_broker(|_| {}).await;
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let id = format!("durable-{v:?}");
        let mut conn = connect_packet(v, &id, false);
        conn.properties.session_expiry_interval = Some(300);
        let (mut c, ack) = RawClient::connect_with(b.addr, conn.clone()).await;
        assert!(!connack(ack).session_present);
        c.subscribe("q/#", QoS::AtLeastOnce).await;
        c.send(Packet::Disconnect(Default::default())).await;
        assert!(c.expect_closed().await.is_empty());

        let mut publ = RawClient::connect(b.addr, v, &format!("p-{v:?}")).await;
        for i in 0..20u16 {
            publ.publish("q/x", &i.to_be_bytes(), QoS::AtLeastOnce, i + 1)
                .await;
            assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
        }

        let (mut c, ack) = RawClient::connect_with(b.addr, conn).await;
        assert!(connack(ack).session_present, "{v:?}");
        for i in 0..20u16 {
            let p = c.recv_publish().await;
            assert_eq!(&p.payload[..], &i.to_be_bytes(), "in order");
            c.puback(p.packet_id).await;
        }
        c.expect_silence(Duration::from_millis(100)).await;
    }
    b.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_with_dup_on_reconnect() {
    let b = start_broker(|_| {}).await;
    let conn = connect_packet(ProtocolVersion::V311, "slow", false);
    let (mut c, _) = RawClient::connect_with(b.addr, conn.clone()).await;
    c.subscribe("d", QoS::ExactlyOnce).await;
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "p").await;
    publ.publish("d", b"1", QoS::AtLeastOnce, 1).await;
    publ.publish("d", b"2", QoS::ExactlyOnce, 2).await;
    let first = c.recv_publish().await;
    let second = c.recv_publish().await;
    assert!(!first.dup && !second.dup);
    // Ack the QoS 2 one half-way (PUBREC), then drop the connection.
    c.send(Packet::PubRec(PubAckLike::new(second.packet_id)))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::PubRel(_))));
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (mut c, ack) = RawClient::connect_with(b.addr, conn).await;
    assert!(connack(ack).session_present);
    let again = c.recv_publish().await;
    assert!(again.dup);
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(&again.payload[..], b"1");
    match c.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, second.packet_id),
        other => panic!("expected PUBREL resend, got {other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn clean_start_discards_the_old_session() {
    let b = start_broker(|_| {}).await;
    let (mut c, _) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V311, "cs", false)).await;
    c.subscribe("z", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut c, ack) =
        RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V311, "cs", true)).await;
    assert!(!connack(ack).session_present);
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "p").await;
    publ.publish("z", b"gone", QoS::AtMostOnce, 0).await;
    c.expect_silence(Duration::from_millis(200)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn v5_session_expiry_ends_the_session() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "exp", false);
    conn.properties.session_expiry_interval = Some(1);
    let (mut c, _) = RawClient::connect_with(b.addr, conn.clone()).await;
    c.subscribe("e", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_c, ack) = RawClient::connect_with(b.addr, conn).await;
    assert!(!connack(ack).session_present);
    b.shutdown().await;
}

#[tokio::test]
async fn mosquitto_bridge_connect_with_the_private_bit_is_accepted() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    // CONNECT "MQTT" level 0x84 (bridge bit), clean session, keep-alive 60, id "br".
    c.send_raw(&[
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x84, 0x02, 0x00, 0x3c, 0x00, 0x02, b'b',
        b'r',
    ])
    .await;
    assert_eq!(connack(c.recv().await.expect("CONNACK")).reason_code, 0);
    b.shutdown().await;
}
