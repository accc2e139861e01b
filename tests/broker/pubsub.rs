//! Publish/subscribe over real TCP: QoS 0/1/2 flows, QoS downgrade, wildcards, `$` topics,
//! overlapping and shared subscriptions, with our raw client and with rumqttc v4/v5.

use crate::common;
use std::time::Duration;

use common::*;
use holdfast::protocol::{Packet, ProtocolVersion, PubAckLike, QoS, SubscriptionOptions};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];

#[tokio::test]
async fn qos0_qos1_qos2_flows_in_every_protocol_version() {
    let b = start_broker(|_| {}).await;
    for v in VERSIONS {
        let mut sub = RawClient::connect(b.addr, v, &format!("sub-{v:?}")).await;
        assert_eq!(sub.subscribe("t/#", QoS::ExactlyOnce).await, vec![2]);
        let mut publ = RawClient::connect(b.addr, v, &format!("pub-{v:?}")).await;

        publ.publish("t/0", b"zero", QoS::AtMostOnce, 0).await;
        let p = sub.recv_publish().await;
        assert_eq!((p.qos, &p.payload[..]), (QoS::AtMostOnce, &b"zero"[..]));

        publ.publish("t/1", b"one", QoS::AtLeastOnce, 7).await;
        match publ.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, 7),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        let p = sub.recv_publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_ne!(p.packet_id, 0);
        sub.puback(p.packet_id).await;

        publ.publish("t/2", b"two", QoS::ExactlyOnce, 9).await;
        assert!(matches!(publ.recv().await, Some(Packet::PubRec(a)) if a.packet_id == 9));
        publ.send(Packet::PubRel(PubAckLike::new(9))).await;
        assert!(matches!(publ.recv().await, Some(Packet::PubComp(a)) if a.packet_id == 9));
        let p = sub.recv_publish().await;
        assert_eq!(p.qos, QoS::ExactlyOnce);
        sub.send(Packet::PubRec(PubAckLike::new(p.packet_id))).await;
        assert!(matches!(sub.recv().await, Some(Packet::PubRel(a)) if a.packet_id == p.packet_id));
        sub.send(Packet::PubComp(PubAckLike::new(p.packet_id)))
            .await;
        sub.expect_silence(Duration::from_millis(100)).await;
    }
    b.shutdown().await;
}

#[tokio::test]
async fn qos2_resend_before_pubrel_is_delivered_once() {
    let b = start_broker(|_| {}).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V311, "sub").await;
    sub.subscribe("x", QoS::AtMostOnce).await;
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "pub").await;
    publ.publish("x", b"once", QoS::ExactlyOnce, 3).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(_))));
    let mut again = publish("x", b"once", QoS::ExactlyOnce, 3);
    again.dup = true;
    publ.send(Packet::Publish(again)).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(_))));
    publ.send(Packet::PubRel(PubAckLike::new(3))).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubComp(_))));
    assert_eq!(&sub.recv_publish().await.payload[..], b"once");
    sub.expect_silence(Duration::from_millis(200)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn granted_qos_is_the_minimum_of_publish_and_subscription() {
    let b = start_broker(|_| {}).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V311, "sub").await;
    sub.subscribe("q", QoS::AtLeastOnce).await;
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "pub").await;
    publ.publish("q", b"2", QoS::ExactlyOnce, 1).await;
    assert_eq!(sub.recv_publish().await.qos, QoS::AtLeastOnce);
    b.shutdown().await;
}

#[tokio::test]
async fn max_qos_caps_granted_qos() {
    let b = start_broker(|c| c.mqtt.max_qos = 1).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "sub").await;
    assert_eq!(sub.subscribe("q", QoS::ExactlyOnce).await, vec![1]);
    b.shutdown().await;
}

#[tokio::test]
async fn wildcards_match_and_dollar_topics_need_explicit_first_level() {
    let b = start_broker(|_| {}).await;
    let mut all = RawClient::connect(b.addr, ProtocolVersion::V311, "all").await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut plus = RawClient::connect(b.addr, ProtocolVersion::V311, "plus").await;
    plus.subscribe("+/status", QoS::AtMostOnce).await;
    let mut sys = RawClient::connect(b.addr, ProtocolVersion::V311, "sys").await;
    // `$SYS` itself is the gateway's (clients may not publish there, tests/security/isolation.rs);
    // any other `$` topic follows the same matching rule.
    sys.subscribe("$app/#", QoS::AtMostOnce).await;
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "pub").await;

    publ.publish("$app/uptime", b"1", QoS::AtMostOnce, 0).await;
    publ.publish("dev/status", b"2", QoS::AtMostOnce, 0).await;

    assert_eq!(&*sys.recv_publish().await.topic, "$app/uptime");
    assert_eq!(&*all.recv_publish().await.topic, "dev/status");
    assert_eq!(&*plus.recv_publish().await.topic, "dev/status");
    sys.expect_silence(Duration::from_millis(100)).await;
    all.expect_silence(Duration::from_millis(100)).await;
    plus.expect_silence(Duration::from_millis(100)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_copy_with_highest_qos_and_all_identifiers() {
    let b = start_broker(|_| {}).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "sub").await;
    let o = |qos| SubscriptionOptions {
        qos,
        ..Default::default()
    };
    sub.subscribe_opts("a/+", o(QoS::AtMostOnce), Some(5)).await;
    sub.subscribe_opts("a/#", o(QoS::AtLeastOnce), Some(9))
        .await;
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V5, "pub").await;
    publ.publish("a/b", b"x", QoS::AtLeastOnce, 1).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![5, 9]);
    sub.puback(p.packet_id).await;
    sub.expect_silence(Duration::from_millis(150)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn shared_subscription_round_robins_within_a_group_for_v3_and_v5() {
    let b = start_broker(|_| {}).await;
    let mut members = Vec::new();
    for (i, v) in [
        ProtocolVersion::V311,
        ProtocolVersion::V5,
        ProtocolVersion::V311,
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = RawClient::connect(b.addr, v, &format!("m{i}")).await;
        assert_eq!(
            c.subscribe("$share/g/jobs/+", QoS::AtMostOnce).await,
            vec![0]
        );
        members.push(c);
    }
    let mut other = RawClient::connect(b.addr, ProtocolVersion::V311, "other").await;
    other.subscribe("$share/h/jobs/#", QoS::AtMostOnce).await;
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "pub").await;
    for i in 0..9 {
        publ.publish(&format!("jobs/{i}"), b"j", QoS::AtMostOnce, 0)
            .await;
    }
    for m in members.iter_mut() {
        for _ in 0..3 {
            m.recv_publish().await;
        }
        m.expect_silence(Duration::from_millis(100)).await;
    }
    for _ in 0..9 {
        other.recv_publish().await;
    }
    b.shutdown().await;
}

#[tokio::test]
async fn rumqttc_v4_and_v5_clients_exchange_messages() {
    let b = start_broker(|_| {}).await;
    let port = b.addr.port();

    // v4 subscriber, v5 publisher.
    let mut o4 = rumqttc::MqttOptions::new("r4", "127.0.0.1", port);
    o4.set_keep_alive(Duration::from_secs(5));
    let (c4, mut el4) = rumqttc::AsyncClient::new(o4, 100);
    c4.subscribe("r/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let sub_task = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 10 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                el4.poll().await.expect("v4 event loop")
            {
                got.push(p.payload.to_vec());
            }
        }
        got
    });
    // Let the SUBSCRIBE land before publishing.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let o5 = rumqttc::v5::MqttOptions::new("r5", "127.0.0.1", port);
    let (c5, mut el5) = rumqttc::v5::AsyncClient::new(o5, 100);
    tokio::spawn(async move { while el5.poll().await.is_ok() {} });
    for i in 0..10u8 {
        c5.publish(
            "r/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            vec![i],
        )
        .await
        .unwrap();
    }
    let got = tokio::time::timeout(Duration::from_secs(10), sub_task)
        .await
        .expect("subscriber got everything in time")
        .unwrap();
    assert_eq!(got, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    b.shutdown().await;
}
