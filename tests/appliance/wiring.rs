//! The gateway's wiring (`holdfast::app`) and the broker core's client API
//! (`holdfast::broker::client`): internal clients publish and acknowledge through the
//! typed handle exactly as network clients do, the reserved client ids stay reserved, and
//! shutdown stops the parts in the documented order.

use crate::common;
use std::time::{Duration, Instant};

use common::*;
use holdfast::bridge::BridgeConfig;
use holdfast::broker::client::{ClientOptions, Outgoing, Reserved};
use holdfast::protocol::{reason, ConnectProperties, Packet, ProtocolVersion, QoS};

/// Connects a v5 client with a Session Expiry Interval of an hour.
async fn durable_v5(addr: std::net::SocketAddr, id: &str) -> RawClient {
    let mut c = connect_packet(ProtocolVersion::V5, id, false);
    c.properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        ..Default::default()
    };
    let (client, ack) = RawClient::connect_with(addr, c).await;
    assert!(
        matches!(ack, Packet::ConnAck(ref a) if a.reason_code == 0),
        "{ack:?}"
    );
    client
}

async fn next(rx: &mut holdfast::broker::client::ClientRx) -> Packet {
    match tokio::time::timeout(TIMEOUT, rx.recv()).await {
        Ok(Some(Outgoing::Packet(p))) => *p,
        other => panic!("expected a packet from the router, got {other:?}"),
    }
}

/// An internal client's QoS 1 publish is acknowledged only once it is on disk for the
/// durable subscriber it matched (the PUBACK means committed), and that subscriber gets
/// it when it comes back.
#[tokio::test]
async fn an_internal_client_publishes_through_the_client_api_and_is_acked_after_commit() {
    let b = start_broker(|_| {}).await;
    let gw = b.broker.as_ref().expect("running");
    let mut sub = durable_v5(b.addr, "keeper").await;
    sub.subscribe("plant/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;

    let (tx, mut rx) = gw
        .broker()
        .connect(ClientOptions {
            client_id: Reserved::Serial.client_id("api-test"),
            clean_start: true,
            expiry_interval: 0,
            protocol: ProtocolVersion::V5,
            window: 1,
            compact_packet_ids: true,
        })
        .await
        .expect("router running");
    assert!(matches!(next(&mut rx).await, Packet::ConnAck(a) if a.reason_code == 0));
    tx.publish(publish("plant/boiler", b"71.5", QoS::AtLeastOnce, 7))
        .await
        .expect("router running");
    match next(&mut rx).await {
        Packet::PubAck(a) => {
            assert_eq!(a.packet_id, 7);
            assert_eq!(a.reason_code, 0);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Acknowledged means committed: a separate reader of the database sees the row now.
    let dir = b.dir.path().to_path_buf();
    let sessions = tokio::task::spawn_blocking(move || holdfast::admin::list_sessions(&dir))
        .await
        .expect("join")
        .expect("store readable");
    let keeper = sessions
        .iter()
        .find(|s| s.client_id == "keeper")
        .expect("durable session listed");
    assert_eq!(keeper.queued, 1, "{sessions:?}");
    tx.disconnect().await;

    let mut sub = durable_v5(b.addr, "keeper").await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"71.5");
    assert_eq!(&*p.topic, "plant/boiler");
    sub.puback(p.packet_id).await;
    b.shutdown().await;
}

/// Network clients may not take an internal client's id, whatever the kind.
#[tokio::test]
async fn network_clients_may_not_use_reserved_client_ids() {
    let b = start_broker(|_| {}).await;
    for r in Reserved::ALL {
        let id = r.client_id("intruder");
        let (_c, ack) =
            RawClient::connect_with(b.addr, connect_packet(ProtocolVersion::V5, &id, true)).await;
        match ack {
            Packet::ConnAck(a) => {
                assert_eq!(a.reason_code, reason::CLIENT_IDENTIFIER_NOT_VALID, "{id}")
            }
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
    }
    b.shutdown().await;
}

/// Shutdown order: clients are told (DISCONNECT 0x8B) while the admin socket still
/// exists, every tracked task (connections, the bridge, observers) ends without waiting
/// for the shutdown timeout, and the admin socket is removed last.
#[tokio::test]
async fn shutdown_ends_clients_and_tasks_before_removing_the_admin_socket() {
    let b = start_broker(|c| {
        c.mqtt.shutdown_timeout_secs = 30;
        c.sys.interval_secs = 1;
        c.metrics.bind = Some("127.0.0.1:0".into());
        c.bridge = vec![BridgeConfig {
            name: "nowhere".into(),
            // Nothing listens on port 1: the bridge sits in its reconnect backoff.
            address: "127.0.0.1:1".into(),
            ..BridgeConfig::example()
        }];
    })
    .await;
    let socket = b.dir.path().join(holdfast::admin::SOCKET_NAME);
    assert!(socket.exists(), "admin socket serves while running");
    let metrics = b
        .broker
        .as_ref()
        .and_then(|g| g.metrics_addr())
        .expect("metrics");
    let mut client = RawClient::connect(b.addr, ProtocolVersion::V5, "stayer").await;

    let t0 = Instant::now();
    let TestBroker {
        mut broker, dir, ..
    } = b;
    let gw = broker.take().expect("running");
    let stopping = tokio::spawn(gw.shutdown());
    let seen = client.expect_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == reason::SERVER_SHUTTING_DOWN),
        "{seen:?}"
    );
    assert!(
        socket.exists(),
        "the admin socket is removed only after the clients are disconnected"
    );
    tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .expect("shutdown ends")
        .expect("join");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "every task ended on the shutdown token instead of the 30 s timeout: {took:?}"
    );
    assert!(!socket.exists(), "admin socket removed at the end");
    assert!(
        tokio::net::TcpStream::connect(metrics).await.is_err(),
        "/metrics stopped"
    );
    drop(dir);
}
