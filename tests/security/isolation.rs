//! Security (issue 13): each attack of a client against what is not theirs, the limits that
//! keep unauthenticated sockets from exhausting a small gateway, and two protocol edges
//! (keep-alive cap, graceful server DISCONNECT). Operator-side checks (`check-config`,
//! `passwd`, the admin socket) are in `tests/security/operator.rs`.
//!
//! The ACL used throughout is the one from the issue:
//! `alice: readwrite alice/#`, `bob: readwrite bob/#`, `carol: write secret/#`,
//! `dash: read #` + `deny secret/#`, plus `watcher: read #` to observe.

use crate::common;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use holdfast::config::Config;
use holdfast::protocol::{
    reason, Connect, Packet, ProtocolVersion, QoS, Subscribe, SubscribeFilter, SubscriptionOptions,
    Will, WillProperties,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACL: &str = "\
user alice
topic readwrite alice/#

user bob
topic readwrite bob/#

user carol
topic write secret/#
topic write public/#

user dash
topic read #
topic deny secret/#

user watcher
topic read #
topic read $SYS/#
";

/// alice, bob, carol, dash and watcher, each with password `pw-<name>`.
fn write_files(dir: &Path, acl: &str) -> (PathBuf, PathBuf) {
    let mut text = String::new();
    for u in ["alice", "bob", "carol", "dash", "watcher"] {
        let h = holdfast::auth::password::hash_password(&format!("pw-{u}")).expect("hash");
        text.push_str(&format!("{u}:{h}\n"));
    }
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, text).expect("passwd");
    let acl_path = dir.join("acl");
    std::fs::write(&acl_path, acl).expect("acl");
    (passwd, acl_path)
}

fn secured(cfg: &mut Config, passwd: &Path, acl: &Path) {
    cfg.auth.password_file = Some(passwd.to_path_buf());
    cfg.auth.acl_file = Some(acl.to_path_buf());
}

fn login(version: ProtocolVersion, id: &str, user: &str, clean: bool) -> Connect {
    let mut c = connect_packet(version, id, clean);
    c.username = Some(user.into());
    c.password = Some(bytes::Bytes::from(format!("pw-{user}")));
    if version.is_v5() && !clean {
        c.properties.session_expiry_interval = Some(3600);
    }
    c
}

fn will(topic: &str, payload: &str) -> Will {
    Will {
        topic: topic.into(),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    }
}

async fn connack(addr: SocketAddr, c: Connect) -> (RawClient, u8, Packet) {
    let (client, ack) = RawClient::connect_with(addr, c).await;
    match &ack {
        Packet::ConnAck(a) => (client, a.reason_code, ack.clone()),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn user(addr: SocketAddr, version: ProtocolVersion, id: &str, name: &str) -> RawClient {
    let (c, code, ack) = connack(addr, login(version, id, name, true)).await;
    assert_eq!(code, 0, "{name} refused: {ack:?}");
    c
}

/// The 3.1.1 CONNACK return code as sent on the wire.
async fn v311_return_code(addr: SocketAddr, c: Connect) -> u8 {
    let mut client = RawClient::tcp(addr, ProtocolVersion::V311).await;
    client.send(Packet::Connect(Box::new(c))).await;
    let mut raw = [0u8; 4];
    tokio::time::timeout(TIMEOUT, client.stream().read_exact(&mut raw))
        .await
        .expect("timely")
        .expect("CONNACK bytes");
    assert_eq!(raw[..2], [0x20, 0x02], "{raw:?}");
    raw[3]
}

async fn subscribe_codes(c: &mut RawClient, filters: &[&str]) -> Vec<u8> {
    c.send(Packet::Subscribe(Subscribe {
        packet_id: 9,
        subscription_identifier: None,
        user_properties: vec![],
        filters: filters
            .iter()
            .map(|f| SubscribeFilter {
                filter: (*f).into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            })
            .collect(),
    }))
    .await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => a.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Next PUBLISH, acknowledged if QoS 1.
async fn next_topic(c: &mut RawClient) -> String {
    let p = c.recv_publish().await;
    if p.qos == QoS::AtLeastOnce {
        c.puback(p.packet_id).await;
    }
    p.topic.to_string()
}

// ----- 1. wills ----------------------------------------------------------------------

#[tokio::test]
async fn a_will_the_user_may_not_publish_is_refused_at_connect() {
    let files = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = write_files(files.path(), ACL);
    let b = start_broker(|c| secured(c, &pw, &acl)).await;
    let mut watcher = user(b.addr, ProtocolVersion::V5, "w", "watcher").await;
    assert_eq!(watcher.subscribe("#", QoS::AtMostOnce).await, vec![0]);

    let mut c = login(ProtocolVersion::V5, "bob-1", "bob", true);
    c.will = Some(will("alice/cmd", "reboot"));
    assert_eq!(connack(b.addr, c).await.1, reason::NOT_AUTHORIZED);
    let mut c = login(ProtocolVersion::V311, "bob-2", "bob", true);
    c.will = Some(will("alice/cmd", "reboot"));
    assert_eq!(v311_return_code(b.addr, c).await, 5);

    // His own topic is fine, and the will goes out when he drops.
    let mut c = login(ProtocolVersion::V311, "bob-3", "bob", true);
    c.will = Some(will("bob/status", "gone"));
    let (client, code, _) = connack(b.addr, c).await;
    assert_eq!(code, 0);
    drop(client);
    assert_eq!(next_topic(&mut watcher).await, "bob/status");
    watcher.expect_silence(Duration::from_millis(200)).await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_will_is_checked_again_against_the_acl_in_force_when_it_is_published() {
    let files = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = write_files(files.path(), ACL);
    let b = start_broker(|c| secured(c, &pw, &acl)).await;
    let mut watcher = user(b.addr, ProtocolVersion::V5, "w", "watcher").await;
    watcher.subscribe("#", QoS::AtMostOnce).await;

    let mut c = login(ProtocolVersion::V5, "bob-1", "bob", true);
    c.will = Some(will("bob/status", "gone"));
    let (bob, code, _) = connack(b.addr, c).await;
    assert_eq!(code, 0);
    // bob loses his write access while connected (SIGHUP), then drops.
    std::fs::write(
        &acl,
        ACL.replace("topic readwrite bob/#", "topic read bob/#"),
    )
    .expect("acl");
    assert_eq!(b.broker.as_ref().expect("running").reload(), 0);
    drop(bob);
    watcher.expect_silence(Duration::from_millis(400)).await;
    b.shutdown().await;
}

// ----- 2. sessions belong to their owner ---------------------------------------------------

#[tokio::test]
async fn another_user_can_neither_resume_nor_end_a_durable_session_even_after_a_restart() {
    let files = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = write_files(files.path(), ACL);
    let mut b = start_broker(|c| secured(c, &pw, &acl)).await;
    let (mut a, code, _) = connack(
        b.addr,
        login(ProtocolVersion::V311, "alice-dash", "alice", false),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(a.subscribe("alice/secret", QoS::AtLeastOnce).await, vec![1]);
    a.send(Packet::Disconnect(Default::default())).await;
    drop(a);
    let mut p = user(b.addr, ProtocolVersion::V5, "alice-pub", "alice").await;
    p.publish("alice/secret", b"pin 1234", QoS::AtLeastOnce, 1)
        .await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));

    for round in 0..2 {
        // bob, with his own valid password, asks for alice's session: refused, whether he
        // wants to resume it or start it clean (which would end hers).
        let bob = login(ProtocolVersion::V311, "alice-dash", "bob", false);
        assert_eq!(v311_return_code(b.addr, bob).await, 5, "round {round}");
        let bob = login(ProtocolVersion::V5, "alice-dash", "bob", true);
        assert_eq!(
            connack(b.addr, bob).await.1,
            reason::NOT_AUTHORIZED,
            "round {round}"
        );
        // Anonymous may not either (anonymous access is allowed on this listener).
        let anon = connect_packet(ProtocolVersion::V311, "alice-dash", false);
        assert_eq!(v311_return_code(b.addr, anon).await, 5, "round {round}");
        if round == 0 {
            // The owner is stored with the session: it survives a restart.
            let dir = b.dir.path().to_path_buf();
            let old = b.broker.take().expect("running");
            old.shutdown().await;
            let mut cfg = Config {
                data_dir: dir,
                listener: vec![holdfast::config::ListenerConfig::new("127.0.0.1:0")],
                ..Config::default()
            };
            cfg.sys.interval_secs = 0;
            secured(&mut cfg, &pw, &acl);
            let broker = holdfast::app::Gateway::start(&cfg).await.expect("restart");
            b.addr = broker.local_addrs()[0];
            b.broker = Some(broker);
        }
    }
    // alice's session and its message are intact.
    let (mut a, code, ack) = connack(
        b.addr,
        login(ProtocolVersion::V311, "alice-dash", "alice", false),
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        matches!(ack, Packet::ConnAck(ref c) if c.session_present),
        "{ack:?}"
    );
    let m = a.recv_publish().await;
    assert_eq!(
        (&*m.topic, &m.payload[..]),
        ("alice/secret", &b"pin 1234"[..])
    );
    b.shutdown().await;
}

#[tokio::test]
async fn stored_subscriptions_are_rechecked_on_resume_and_after_sighup() {
    let files = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = write_files(files.path(), ACL);
    let b = start_broker(|c| secured(c, &pw, &acl)).await;
    let addr = b.addr;
    // dash: a durable session subscribed to two topics, offline.
    let (mut d, code, _) = connack(addr, login(ProtocolVersion::V5, "dash-1", "dash", false)).await;
    assert_eq!(code, 0);
    assert_eq!(
        subscribe_codes(&mut d, &["public/a", "public/b"]).await,
        vec![1, 1]
    );
    d.send(Packet::Disconnect(Default::default())).await;
    drop(d);
    // dash, online, subscribed to one topic.
    let mut live = user(addr, ProtocolVersion::V5, "dash-2", "dash").await;
    assert_eq!(subscribe_codes(&mut live, &["public/b"]).await, vec![1]);

    // The operator denies dash `public/b` and reloads.
    std::fs::write(
        &acl,
        ACL.replace(
            "topic deny secret/#",
            "topic deny secret/#\ntopic deny public/b",
        ),
    )
    .expect("acl");
    assert_eq!(b.broker.as_ref().expect("running").reload(), 0);
    let mut carol = user(addr, ProtocolVersion::V5, "carol", "carol").await;
    for (i, t) in ["public/b", "public/a"].into_iter().enumerate() {
        carol.publish(t, b"m", QoS::AtLeastOnce, i as u16 + 1).await;
        assert!(matches!(carol.recv().await, Some(Packet::PubAck(_))));
    }
    // The online session no longer receives public/b...
    live.expect_silence(Duration::from_millis(300)).await;
    // ...and the resumed one gets only what it may still read.
    let (mut d, code, _) = connack(addr, login(ProtocolVersion::V5, "dash-1", "dash", false)).await;
    assert_eq!(code, 0);
    assert_eq!(next_topic(&mut d).await, "public/a");
    d.expect_silence(Duration::from_millis(300)).await;
    b.shutdown().await;
}

// ----- 3. $SYS ------------------------------------------------------------------------------

#[tokio::test]
async fn clients_cannot_publish_to_sys_topics() {
    // No ACL file: the attack worked on an open gateway too.
    let b = start_broker(|_| {}).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "sub").await;
    assert_eq!(sub.subscribe("$SYS/#", QoS::AtLeastOnce).await, vec![1]);

    let mut v5 = RawClient::connect(b.addr, ProtocolVersion::V5, "v5").await;
    let mut spoof = publish("$SYS/holdfast/broker/health", b"ok", QoS::AtLeastOnce, 1);
    spoof.retain = true;
    v5.send(Packet::Publish(spoof.clone())).await;
    match v5.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, reason::NOT_AUTHORIZED),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    v5.send(Packet::Publish(publish(
        "$SYS/x",
        b"q0",
        QoS::AtMostOnce,
        0,
    )))
    .await;
    let mut v3 = RawClient::connect(b.addr, ProtocolVersion::V311, "v3").await;
    v3.send(Packet::Publish(spoof)).await;
    match v3.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    sub.expect_silence(Duration::from_millis(300)).await;
    // Nothing was retained either.
    let mut late = RawClient::connect(b.addr, ProtocolVersion::V5, "late").await;
    late.subscribe("$SYS/#", QoS::AtLeastOnce).await;
    late.expect_silence(Duration::from_millis(200)).await;
    // Nor can a will go there.
    let mut c = connect_packet(ProtocolVersion::V5, "w", true);
    c.will = Some(will("$SYS/holdfast/broker/health", "spoof"));
    assert_eq!(connack(b.addr, c).await.1, reason::NOT_AUTHORIZED);
    b.shutdown().await;
}

// ----- 4. a deny rule filters a wildcard subscription per delivery --------------------------

#[tokio::test]
async fn a_deny_rule_filters_deliveries_of_a_wildcard_subscription_instead_of_refusing_it() {
    let files = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = write_files(files.path(), ACL);
    let b = start_broker(|c| secured(c, &pw, &acl)).await;
    let mut carol = user(b.addr, ProtocolVersion::V5, "carol", "carol").await;
    for (i, t) in ["secret/retained", "public/retained"]
        .into_iter()
        .enumerate()
    {
        let mut p = publish(t, b"r", QoS::AtLeastOnce, i as u16 + 1);
        p.retain = true;
        carol.send(Packet::Publish(p)).await;
        assert!(matches!(carol.recv().await, Some(Packet::PubAck(_))));
    }
    for (version, deny) in [(ProtocolVersion::V5, 0x87), (ProtocolVersion::V311, 0x80)] {
        let id = format!("dash-{version:?}");
        let mut dash = user(b.addr, version, &id, "dash").await;
        // `#` is granted; filters wholly inside the deny rule are refused.
        assert_eq!(
            subscribe_codes(&mut dash, &["#", "secret/#", "secret/a"]).await,
            vec![1, deny, deny],
            "{version:?}"
        );
        // Retained: only the readable one.
        assert_eq!(next_topic(&mut dash).await, "public/retained");
        dash.expect_silence(Duration::from_millis(200)).await;
        // Live: secret/x is filtered out, public/x delivered.
        for (i, t) in ["secret/x", "public/x"].into_iter().enumerate() {
            carol
                .publish(t, b"m", QoS::AtLeastOnce, i as u16 + 10)
                .await;
            let _ = carol.recv().await;
        }
        assert_eq!(next_topic(&mut dash).await, "public/x");
        dash.expect_silence(Duration::from_millis(200)).await;
    }
    b.shutdown().await;
}

// ----- 5. pre-authentication limits ---------------------------------------------------------

/// True if the broker closes `s` within `t` (EOF or reset).
async fn closed_within(s: &mut TcpStream, t: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(t, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_connect_larger_than_the_pre_connect_limit_is_refused_before_it_is_read() {
    let b = start_broker(|c| c.mqtt.max_connect_packet_size = 1024).await;
    // A CONNECT announcing 100 KiB: closed at once, without waiting for the body.
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    s.write_all(&[0x10, 0xa0, 0x8d, 0x06]).await.expect("write");
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    // A will larger than the limit: the same.
    let mut c = connect_packet(ProtocolVersion::V311, "big", true);
    c.will = Some(will("a/b", &"x".repeat(2000)));
    let mut client = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    client.send(Packet::Connect(Box::new(c))).await;
    assert!(closed_within(client.stream(), Duration::from_secs(2)).await);
    // Normal CONNECTs pass, and after CONNECT the usual packet size applies.
    let mut ok = RawClient::connect(b.addr, ProtocolVersion::V5, "ok").await;
    ok.subscribe("big/#", QoS::AtMostOnce).await;
    ok.publish("big/x", &[7u8; 4000], QoS::AtMostOnce, 0).await;
    assert_eq!(ok.recv_publish().await.payload.len(), 4000);
    b.shutdown().await;
}

#[tokio::test]
async fn sockets_in_the_handshake_are_capped() {
    let b = start_broker(|c| c.mqtt.max_handshaking = 3).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(b.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The fourth socket that says nothing is closed at once.
    let mut extra = TcpStream::connect(b.addr).await.expect("connect");
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    // The three finish their handshake; their places are free again.
    let mut clients = Vec::new();
    for (i, s) in idle.into_iter().enumerate() {
        let mut c = RawClient::from_stream(s, ProtocolVersion::V311);
        c.send(Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V311,
            &format!("c{i}"),
            true,
        ))))
        .await;
        assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == 0));
        clients.push(c);
    }
    let _more = RawClient::connect(b.addr, ProtocolVersion::V5, "more").await;
    b.shutdown().await;
}

#[tokio::test]
async fn password_checks_wait_for_a_hashing_slot_with_a_timeout() {
    let files = tempfile::tempdir().expect("tempdir");
    let (pw, acl) = write_files(files.path(), ACL);
    let b = start_broker(|c| {
        secured(c, &pw, &acl);
        c.auth.max_concurrent_hashes = 1;
        c.auth.hash_queue_timeout_ms = 1;
    })
    .await;
    let addr = b.addr;
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(async move {
                connack(
                    addr,
                    login(ProtocolVersion::V5, &format!("a{i}"), "alice", true),
                )
                .await
                .1
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.expect("task"));
    }
    assert!(codes.contains(&0), "{codes:?}");
    assert!(codes.contains(&reason::SERVER_UNAVAILABLE), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| [0, reason::SERVER_UNAVAILABLE].contains(c)),
        "{codes:?}"
    );
    b.shutdown().await;
}

// ----- 7. keep-alive cap --------------------------------------------------------------------

fn keep_alive_connect(version: ProtocolVersion, id: &str, keep_alive: u16) -> Connect {
    let mut c = connect_packet(version, id, true);
    c.keep_alive = keep_alive;
    c
}

fn server_keep_alive(ack: &Packet) -> Option<u16> {
    match ack {
        Packet::ConnAck(a) => a.properties.server_keep_alive,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn max_keep_alive_lowers_only_longer_keep_alives() {
    let b = start_broker(|c| c.mqtt.max_keep_alive = 30).await;
    let mut watcher = RawClient::connect(b.addr, ProtocolVersion::V5, "w").await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    // A short keep-alive is kept as asked: the client is told nothing and is held to 1 s.
    let mut c = keep_alive_connect(ProtocolVersion::V5, "short", 1);
    c.will = Some(will("wills/short", "gone"));
    let started = tokio::time::Instant::now();
    let (mut short, code, ack) = connack(b.addr, c).await;
    assert_eq!((code, server_keep_alive(&ack)), (0, None));
    let mut seen = short.expect_closed().await;
    assert!(
        matches!(seen.pop(), Some(Packet::Disconnect(d)) if d.reason_code == reason::KEEP_ALIVE_TIMEOUT)
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(next_topic(&mut watcher).await, "wills/short");
    // Longer ones, and 0, are lowered to the cap and v5 clients are told.
    for ka in [31, 600, 0] {
        let (_c, code, ack) =
            connack(b.addr, keep_alive_connect(ProtocolVersion::V5, "long", ka)).await;
        assert_eq!(
            (code, server_keep_alive(&ack)),
            (0, Some(30)),
            "keep-alive {ka}"
        );
    }
    let (_c, code, ack) = connack(b.addr, keep_alive_connect(ProtocolVersion::V5, "eq", 30)).await;
    assert_eq!((code, server_keep_alive(&ack)), (0, None));
    // 3.1.1 cannot be told: above the cap (or 0) it is refused, as Mosquitto does.
    for ka in [0, 31] {
        let c = keep_alive_connect(ProtocolVersion::V311, "v3", ka);
        assert_eq!(v311_return_code(b.addr, c).await, 2, "keep-alive {ka}");
    }
    let c = keep_alive_connect(ProtocolVersion::V311, "v3", 30);
    assert_eq!(v311_return_code(b.addr, c).await, 0);
    b.shutdown().await;
}

// ----- 8. graceful server DISCONNECT ----------------------------------------------------------

#[tokio::test]
async fn a_client_still_writing_reads_the_servers_disconnect_reason() {
    let b = start_broker(|c| c.mqtt.max_inflight = 2).await;
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "eager").await;
    // Three unacknowledged QoS 1 publishes exceed Receive Maximum 2 (0x93), and the client
    // keeps writing for a while without reading.
    let mut burst = bytes::BytesMut::new();
    for i in 1..=3u16 {
        holdfast::protocol::encode(
            &Packet::Publish(publish("t", b"m", QoS::AtLeastOnce, i)),
            ProtocolVersion::V5,
            &mut burst,
        );
    }
    c.send_raw(&burst).await;
    let q0 = {
        let mut b = bytes::BytesMut::new();
        for _ in 0..50 {
            holdfast::protocol::encode(
                &Packet::Publish(publish("t", &[1u8; 100], QoS::AtMostOnce, 0)),
                ProtocolVersion::V5,
                &mut b,
            );
        }
        b
    };
    // A client that has not read the DISCONNECT yet keeps writing: for a moment its
    // writes must still succeed (the server half-closes and drains instead of resetting).
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let w = c.stream().write_all(&q0).await;
        assert!(
            w.is_ok(),
            "write {i} after the server's DISCONNECT failed: {w:?}"
        );
    }
    let seen = c.expect_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == reason::RECEIVE_MAXIMUM_EXCEEDED)),
        "no DISCONNECT 0x93 read: {seen:?}"
    );
    b.shutdown().await;
}
