//! MQTT 5 features: message expiry, topic aliases both ways, maximum packet size both ways,
//! No Local, properties forwarded (payload format, content type, response topic,
//! correlation data, user properties), request problem information, Receive Maximum,
//! session expiry changed on DISCONNECT, and reason codes on acks.

use crate::common;
use std::time::Duration;

use common::*;
use holdfast::protocol::{
    reason, Disconnect, DisconnectProperties, Packet, ProtocolVersion, PubAckLike, QoS,
    SubscriptionOptions,
};

fn disconnect_reason(packets: &[Packet]) -> Option<u8> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason_code),
        _ => None,
    })
}

#[tokio::test]
async fn properties_are_forwarded_to_subscribers() {
    let b = start_broker(|_| {}).await;
    let mut s = RawClient::connect(b.addr, ProtocolVersion::V5, "s").await;
    s.subscribe("p", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    let mut m = publish("p", "héllo".as_bytes(), QoS::AtMostOnce, 0);
    m.properties.payload_format_indicator = Some(1);
    m.properties.content_type = Some("text/plain".into());
    m.properties.response_topic = Some("reply/here".into());
    m.properties.correlation_data = Some(bytes::Bytes::from_static(b"\x00\x01"));
    m.properties.user_properties = vec![("k".into(), "v".into()), ("k".into(), "w".into())];
    p.send(Packet::Publish(m.clone())).await;
    let got = s.recv_publish().await;
    assert_eq!(got.properties.payload_format_indicator, Some(1));
    assert_eq!(got.properties.content_type, m.properties.content_type);
    assert_eq!(got.properties.response_topic, m.properties.response_topic);
    assert_eq!(
        got.properties.correlation_data,
        m.properties.correlation_data
    );
    assert_eq!(got.properties.user_properties, m.properties.user_properties);
    b.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_with_payload_format_indicator_gets_0x99() {
    let b = start_broker(|_| {}).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    let mut m = publish("pf", &[0xff, 0xfe], QoS::AtLeastOnce, 4);
    m.properties.payload_format_indicator = Some(1);
    p.send(Packet::Publish(m)).await;
    match p.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, reason::PAYLOAD_FORMAT_INVALID),
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn puback_says_no_matching_subscribers() {
    let b = start_broker(|_| {}).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    p.publish("nobody/home", b"x", QoS::AtLeastOnce, 1).await;
    match p.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, reason::NO_MATCHING_SUBSCRIBERS),
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn expired_queued_messages_are_not_delivered_and_remaining_interval_is_forwarded() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "off", false);
    conn.properties.session_expiry_interval = Some(60);
    let (mut s, _) = RawClient::connect_with(b.addr, conn.clone()).await;
    s.subscribe("e/#", QoS::AtLeastOnce).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    let mut short = publish("e/short", b"short", QoS::AtLeastOnce, 1);
    short.properties.message_expiry_interval = Some(1);
    let mut long = publish("e/long", b"long", QoS::AtLeastOnce, 2);
    long.properties.message_expiry_interval = Some(100);
    p.send(Packet::Publish(short)).await;
    p.send(Packet::Publish(long)).await;
    p.recv().await;
    p.recv().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut s, _) = RawClient::connect_with(b.addr, conn).await;
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"long");
    let left = got
        .properties
        .message_expiry_interval
        .expect("remaining interval");
    assert!((97..=99).contains(&left), "{left}");
    s.puback(got.packet_id).await;
    s.expect_silence(Duration::from_millis(150)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn incoming_topic_alias_is_resolved() {
    let b = start_broker(|_| {}).await;
    let mut s = RawClient::connect(b.addr, ProtocolVersion::V5, "s").await;
    s.subscribe("alias/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    let mut first = publish("alias/long/topic", b"1", QoS::AtMostOnce, 0);
    first.properties.topic_alias = Some(3);
    p.send(Packet::Publish(first)).await;
    let mut second = publish("", b"2", QoS::AtMostOnce, 0);
    second.properties.topic_alias = Some(3);
    p.send(Packet::Publish(second)).await;
    for want in [b"1", b"2"] {
        let got = s.recv_publish().await;
        assert_eq!(&*got.topic, "alias/long/topic");
        assert_eq!(&got.payload[..], want);
        assert_eq!(got.properties.topic_alias, None);
    }
    b.shutdown().await;
}

#[tokio::test]
async fn topic_alias_errors_disconnect() {
    let b = start_broker(|c| c.mqtt.topic_alias_maximum = 2).await;
    // Above the maximum: 0x94.
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p1").await;
    let mut m = publish("a", b"1", QoS::AtMostOnce, 0);
    m.properties.topic_alias = Some(3);
    p.send(Packet::Publish(m)).await;
    assert_eq!(
        disconnect_reason(&p.expect_closed().await),
        Some(reason::TOPIC_ALIAS_INVALID)
    );
    // Unknown alias with an empty topic: protocol error.
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p2").await;
    let mut m = publish("", b"1", QoS::AtMostOnce, 0);
    m.properties.topic_alias = Some(1);
    p.send(Packet::Publish(m)).await;
    assert_eq!(
        disconnect_reason(&p.expect_closed().await),
        Some(reason::PROTOCOL_ERROR)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn outgoing_topic_aliases_are_used_when_the_client_allows() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "s", true);
    conn.properties.topic_alias_maximum = Some(1);
    let (mut s, _) = RawClient::connect_with(b.addr, conn).await;
    s.subscribe("oa/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    p.publish("oa/one", b"1", QoS::AtMostOnce, 0).await;
    p.publish("oa/one", b"2", QoS::AtMostOnce, 0).await;
    p.publish("oa/two", b"3", QoS::AtMostOnce, 0).await;
    let m1 = s.recv_publish().await;
    assert_eq!((&*m1.topic, m1.properties.topic_alias), ("oa/one", Some(1)));
    let m2 = s.recv_publish().await;
    assert_eq!((&*m2.topic, m2.properties.topic_alias), ("", Some(1)));
    let m3 = s.recv_publish().await;
    assert_eq!((&*m3.topic, m3.properties.topic_alias), ("oa/two", None));
    b.shutdown().await;
}

#[tokio::test]
async fn oversized_outgoing_messages_are_dropped_for_small_clients() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "small", true);
    conn.properties.maximum_packet_size = Some(64);
    let (mut s, _) = RawClient::connect_with(b.addr, conn).await;
    s.subscribe("big", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    p.publish("big", &[7u8; 200], QoS::AtLeastOnce, 1).await;
    p.publish("big", b"fits", QoS::AtLeastOnce, 2).await;
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"fits");
    b.shutdown().await;
}

#[tokio::test]
async fn incoming_packets_over_max_packet_size_disconnect_with_0x95() {
    let b = start_broker(|c| c.mqtt.max_packet_size = 128).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    p.publish("big", &[1u8; 500], QoS::AtMostOnce, 0).await;
    assert_eq!(
        disconnect_reason(&p.expect_closed().await),
        Some(reason::PACKET_TOO_LARGE)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn no_local_suppresses_own_messages() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "echo").await;
    c.subscribe_opts(
        "nl",
        SubscriptionOptions {
            no_local: true,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut other = RawClient::connect(b.addr, ProtocolVersion::V5, "other").await;
    c.publish("nl", b"mine", QoS::AtMostOnce, 0).await;
    other.publish("nl", b"theirs", QoS::AtMostOnce, 0).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"theirs");
    c.expect_silence(Duration::from_millis(150)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "nls").await;
    c.send(Packet::Subscribe(holdfast::protocol::Subscribe {
        packet_id: 1,
        subscription_identifier: None,
        user_properties: vec![],
        filters: vec![holdfast::protocol::SubscribeFilter {
            filter: "$share/g/x".into(),
            options: SubscriptionOptions {
                no_local: true,
                ..Default::default()
            },
        }],
    }))
    .await;
    assert_eq!(
        disconnect_reason(&c.expect_closed().await),
        Some(reason::PROTOCOL_ERROR)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn receive_maximum_limits_in_flight_messages_to_the_client() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "rm", true);
    conn.properties.receive_maximum = Some(2);
    let (mut s, _) = RawClient::connect_with(b.addr, conn).await;
    s.subscribe("w", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    for i in 1..=5u16 {
        p.publish("w", &[i as u8], QoS::AtLeastOnce, i).await;
    }
    let a = s.recv_publish().await;
    let _b2 = s.recv_publish().await;
    s.expect_silence(Duration::from_millis(200)).await;
    s.puback(a.packet_id).await;
    assert_eq!(&s.recv_publish().await.payload[..], &[3]);
    s.expect_silence(Duration::from_millis(150)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn exceeding_our_receive_maximum_disconnects_with_0x93() {
    let b = start_broker(|c| c.mqtt.max_inflight = 2).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "greedy").await;
    // QoS 2 publishes stay unacknowledged until PUBREL, which we never send.
    for i in 1..=3u16 {
        p.publish("x", b"q2", QoS::ExactlyOnce, i).await;
    }
    let seen = p.expect_closed().await;
    assert_eq!(
        disconnect_reason(&seen),
        Some(reason::RECEIVE_MAXIMUM_EXCEEDED)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn raising_session_expiry_from_zero_on_disconnect_is_a_protocol_error() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "se0").await;
    c.send(Packet::Disconnect(Disconnect {
        reason_code: 0,
        properties: DisconnectProperties {
            session_expiry_interval: Some(60),
            ..Default::default()
        },
    }))
    .await;
    assert_eq!(
        disconnect_reason(&c.expect_closed().await),
        Some(reason::PROTOCOL_ERROR)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn session_expiry_can_be_shortened_on_disconnect() {
    let b = start_broker(|_| {}).await;
    let mut conn = connect_packet(ProtocolVersion::V5, "short", false);
    conn.properties.session_expiry_interval = Some(600);
    let (mut c, _) = RawClient::connect_with(b.addr, conn.clone()).await;
    c.subscribe("s", QoS::AtLeastOnce).await;
    c.send(Packet::Disconnect(Disconnect {
        reason_code: 0,
        properties: DisconnectProperties {
            session_expiry_interval: Some(0),
            ..Default::default()
        },
    }))
    .await;
    c.expect_closed().await;
    let (_c, ack) = RawClient::connect_with(b.addr, conn).await;
    assert!(matches!(ack, Packet::ConnAck(a) if !a.session_present));
    b.shutdown().await;
}

#[tokio::test]
async fn pubrel_for_unknown_packet_id_gets_0x92() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "rel").await;
    c.send(Packet::PubRel(PubAckLike::new(77))).await;
    match c.recv().await {
        Some(Packet::PubComp(a)) => {
            assert_eq!(
                (a.packet_id, a.reason_code),
                (77, reason::PACKET_IDENTIFIER_NOT_FOUND)
            )
        }
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn subscribe_and_unsubscribe_reason_codes() {
    let b = start_broker(|c| c.mqtt.max_subscriptions_per_client = 2).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "codes").await;
    assert_eq!(
        c.subscribe("a/#/b", QoS::AtMostOnce).await,
        vec![reason::TOPIC_FILTER_INVALID]
    );
    assert_eq!(
        c.subscribe("$share//x", QoS::AtMostOnce).await,
        vec![reason::TOPIC_FILTER_INVALID]
    );
    assert_eq!(c.subscribe("one", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(c.subscribe("two", QoS::ExactlyOnce).await, vec![2]);
    assert_eq!(
        c.subscribe("three", QoS::AtMostOnce).await,
        vec![reason::QUOTA_EXCEEDED]
    );
    c.send(Packet::Unsubscribe(holdfast::protocol::Unsubscribe {
        packet_id: 5,
        user_properties: vec![],
        filters: vec!["one".into(), "never".into()],
    }))
    .await;
    match c.recv().await {
        Some(Packet::UnsubAck(u)) => {
            assert_eq!(
                u.reason_codes,
                vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED]
            )
        }
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn v3_suback_failure_is_0x80() {
    let b = start_broker(|_| {}).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V311, "v3codes").await;
    assert_eq!(c.subscribe("a/#/b", QoS::AtMostOnce).await, vec![0x80]);
    b.shutdown().await;
}
