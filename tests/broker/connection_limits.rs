//! Connection limits and traffic counters over real TCP: the per-address connection rate
//! limit (a burst is admitted, the rest closed without a CONNACK, counted in `/metrics`,
//! admitted again after the refill; exempt networks), the per-user connection cap (v5
//! 0x97, 3.1.1 0x03, takeover, a place freed by a disconnect), and the bytes received /
//! sent counters against the exact bytes the clients sent.

use crate::common::{self, daemon, metrics};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use holdfast::protocol::{self, reason, Connect, Packet, ProtocolVersion, QoS};

/// Connects with `c`: `Some(reason code)` from the CONNACK (with the open connection), or
/// `None` when the broker closed the socket without one.
async fn try_connect(
    addr: SocketAddr,
    c: Connect,
) -> (Option<u8>, Option<crate::common::RawClient>) {
    let Ok(mut conn) = crate::common::RawClient::try_tcp(addr, c.protocol).await else {
        return (None, None);
    };
    if conn.try_send(&Packet::Connect(Box::new(c))).await.is_err() {
        return (None, None);
    }
    match conn.recv_timeout(TIMEOUT).await {
        Ok(Some(Packet::ConnAck(a))) => (Some(a.reason_code), Some(conn)),
        Ok(None) => (None, None),
        Ok(Some(other)) => panic!("expected CONNACK, got {other:?}"),
        Err(()) => panic!("neither CONNACK nor close within {TIMEOUT:?}"),
    }
}

fn user_connect(version: ProtocolVersion, id: &str, user: &str) -> Connect {
    let mut c = connect_packet(version, id, true);
    c.username = Some(user.into());
    c
}

/// Bytes of `p` on the wire.
fn wire_len(p: &Packet, version: ProtocolVersion) -> u64 {
    protocol::encoded_len(p, version) as u64
}

#[tokio::test]
async fn connection_rate_limit_refuses_a_burst_from_loopback_and_recovers() {
    let b = start_broker(|c| {
        c.mqtt.max_connection_rate = 1.0;
        c.mqtt.max_connection_burst = 3;
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await;
    let t0 = Instant::now();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for i in 0..8 {
        let c = connect_packet(ProtocolVersion::V311, &format!("rl{i}"), true);
        match try_connect(b.addr, c).await {
            (Some(0), Some(conn)) => admitted.push(conn),
            (None, _) => refused += 1,
            other => panic!("unexpected CONNACK {:?}", other.0),
        }
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "burst took {took:?}");
    // One token per second: a slow machine may earn one more during the burst.
    let most = 3 + took.as_secs_f64().ceil() as usize;
    assert!(
        (3..=most).contains(&admitted.len()),
        "admitted {} in {took:?}",
        admitted.len()
    );
    assert_eq!(refused, 8 - admitted.len());
    let m = metrics::scrape(&b).await;
    assert_eq!(
        m["holdfast_connections_rate_limited_total"], refused as f64,
        "counted in /metrics"
    );
    // Established connections are not affected.
    assert_eq!(m["holdfast_clients_connected"], admitted.len() as f64);

    // After the refill the address is admitted again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let c = connect_packet(ProtocolVersion::V5, "rl-after", true);
    assert_eq!(try_connect(b.addr, c).await.0, Some(0));
    b.shutdown().await;
}

#[tokio::test]
async fn exempt_networks_are_not_rate_limited() {
    let b = start_broker(|c| {
        c.mqtt.max_connection_rate = 0.5;
        c.mqtt.max_connection_burst = 1;
        c.mqtt.connection_rate_exempt = vec!["::1".into(), "127.0.0.0/8".into()];
    })
    .await;
    for i in 0..5 {
        let c = connect_packet(ProtocolVersion::V311, &format!("ex{i}"), true);
        assert_eq!(try_connect(b.addr, c).await.0, Some(0), "connect {i}");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn connections_per_user_are_capped_without_counting_takeovers() {
    let b = start_broker(|c| {
        c.auth.max_connections_per_user = 2;
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await;
    let (code, a1) = try_connect(b.addr, user_connect(ProtocolVersion::V5, "a1", "alice")).await;
    assert_eq!(code, Some(0));
    let mut a1 = a1.expect("a1");
    let (code, a2) = try_connect(b.addr, user_connect(ProtocolVersion::V311, "a2", "alice")).await;
    assert_eq!(code, Some(0));
    let mut a2 = a2.expect("a2");

    // A third client id: v5 Quota exceeded, 3.1.1 Server unavailable.
    let (code, _) = try_connect(b.addr, user_connect(ProtocolVersion::V5, "a3", "alice")).await;
    assert_eq!(code, Some(reason::QUOTA_EXCEEDED));
    let (code, _) = try_connect(b.addr, user_connect(ProtocolVersion::V311, "a3", "alice")).await;
    // The codec reads 3.1.1 return codes as v5 reasons: 0x03 on the wire is 0x88 here.
    assert_eq!(
        protocol::reason::v5_from_v3_connack_return_code(0x03),
        reason::SERVER_UNAVAILABLE
    );
    assert_eq!(
        code,
        Some(reason::SERVER_UNAVAILABLE),
        "3.1.1 return code 0x03"
    );

    // Other users and anonymous clients are not affected.
    let (code, _bob) = try_connect(b.addr, user_connect(ProtocolVersion::V5, "b1", "bob")).await;
    assert_eq!(code, Some(0));
    let anon = connect_packet(ProtocolVersion::V5, "anon", true);
    assert_eq!(try_connect(b.addr, anon).await.0, Some(0));

    // Taking over a1 (still connected) is accepted and does not use a third place.
    let (code, _a1b) = try_connect(b.addr, user_connect(ProtocolVersion::V5, "a1", "alice")).await;
    assert_eq!(code, Some(0), "takeover");
    match a1.recv_timeout(TIMEOUT).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.reason_code, reason::SESSION_TAKEN_OVER),
        other => panic!("the old a1 should be taken over: {other:?}"),
    }
    let (code, _) = try_connect(b.addr, user_connect(ProtocolVersion::V5, "a3", "alice")).await;
    assert_eq!(code, Some(reason::QUOTA_EXCEEDED), "still two client ids");

    // A disconnect frees a place.
    a2.try_send(&Packet::Disconnect(Default::default()))
        .await
        .expect("DISCONNECT");
    assert!(matches!(a2.recv_timeout(TIMEOUT).await, Ok(None)));
    let deadline = Instant::now() + TIMEOUT;
    let _a3 = loop {
        let (code, conn) =
            try_connect(b.addr, user_connect(ProtocolVersion::V311, "a3", "alice")).await;
        if code == Some(0) {
            break conn;
        }
        assert!(Instant::now() < deadline, "a3 still refused after a2 left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let m = metrics::scrape(&b).await;
    assert!(
        m["holdfast_connections_user_limited_total"] >= 3.0,
        "{:?}",
        m["holdfast_connections_user_limited_total"]
    );
    b.shutdown().await;
}

#[tokio::test]
async fn byte_counters_match_what_clients_sent_and_grow_by_what_they_received() {
    let b = start_broker(|c| c.metrics.bind = Some("127.0.0.1:0".into())).await;
    let v = ProtocolVersion::V311;
    let mut sent_by_clients = 0;
    let mut sub = RawClient::connect(b.addr, v, "bytes-sub").await;
    sent_by_clients += wire_len(
        &Packet::Connect(Box::new(connect_packet(v, "bytes-sub", true))),
        v,
    );
    sub.subscribe("bytes/t", QoS::AtMostOnce).await;
    sent_by_clients += 2 + 2 + 2 + "bytes/t".len() as u64 + 1; // SUBSCRIBE
    let mut publisher = RawClient::connect(b.addr, v, "bytes-pub").await;
    sent_by_clients += wire_len(
        &Packet::Connect(Box::new(connect_packet(v, "bytes-pub", true))),
        v,
    );

    let payload = vec![0x5a; 1000];
    let one = Packet::Publish(publish("bytes/t", &payload, QoS::AtMostOnce, 0));
    let one_len = wire_len(&one, v);
    for _ in 0..50 {
        publisher.send(one.clone()).await;
        sent_by_clients += one_len;
    }
    for _ in 0..50 {
        assert_eq!(sub.recv_publish().await.payload.len(), 1000);
    }
    for c in [&mut sub, &mut publisher] {
        c.send(Packet::Disconnect(Default::default())).await;
        sent_by_clients += 2;
        c.expect_closed().await;
    }

    // Exact once the connections have ended (each adds its remainder when it closes).
    let label = "{listener=\"127.0.0.1:0\"}";
    let deadline = Instant::now() + TIMEOUT;
    let m = loop {
        let m = metrics::scrape(&b).await;
        if m[&format!("holdfast_bytes_received_total{label}")] == sent_by_clients as f64
            || Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        m[&format!("holdfast_bytes_received_total{label}")],
        sent_by_clients as f64
    );
    let sent = m[&format!("holdfast_bytes_sent_total{label}")];
    assert!(sent >= (50 * one_len + 4 + 4 + 5) as f64, "sent {sent}");

    // The same figures in $SYS.
    let snap = b
        .broker
        .as_ref()
        .expect("broker")
        .observer()
        .snapshot()
        .await;
    let sys = holdfast::observe::sys::messages(&snap);
    let get = |t: &str| sys.iter().find(|(k, _)| k == t).map(|(_, v)| v.clone());
    assert_eq!(get("bytes/received"), Some(sent_by_clients.to_string()));
    assert_eq!(
        get("listener/127.0.0.1:0/bytes/sent"),
        Some((sent as u64).to_string())
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_refused_address_is_logged_once_per_episode() {
    let mut d =
        daemon::Daemon::started("[mqtt]\nmax_connection_rate = 1\nmax_connection_burst = 2\n")
            .await;
    let mut refused = 0;
    for i in 0..12 {
        let c = connect_packet(ProtocolVersion::V311, &format!("flood{i}"), true);
        if try_connect(d.addr, c).await.0.is_none() {
            refused += 1;
        }
    }
    assert!(refused >= 8, "refused {refused}");
    // The limiter logs synchronously in the accept loop, before the socket is closed.
    let log = d.log_text();
    let warnings = log
        .matches("connection rate limit: refusing connections from this source")
        .count();
    assert_eq!(warnings, 1, "{log}");
    assert!(log.contains("source=127.0.0.1"), "{log}");
    d.sigterm().await;
}

#[tokio::test]
async fn sighup_applies_new_connection_limits() {
    let mut d = daemon::Daemon::started("").await;
    let quick = |n: usize, prefix: &'static str| {
        let addr = d.addr;
        async move {
            let mut admitted = 0;
            for i in 0..n {
                let c = connect_packet(ProtocolVersion::V311, &format!("{prefix}{i}"), true);
                if try_connect(addr, c).await.0 == Some(0) {
                    admitted += 1;
                }
            }
            admitted
        }
    };
    assert_eq!(quick(6, "before").await, 6, "no limit by default");

    // `info` so that the reload's own lines show.
    let config = std::fs::read_to_string(&d.config)
        .expect("config")
        .replace("level = \"warn\"", "level = \"info\"");
    std::fs::write(
        &d.config,
        format!("{config}[mqtt]\nmax_connection_rate = 0.2\nmax_connection_burst = 2\n"),
    )
    .expect("write config");
    let mark = d.log_text().len();
    d.sighup();
    // Applied within the signal handler; the next connections see the new limit.
    let deadline = Instant::now() + TIMEOUT;
    while !d.log_text()[mark..].contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        d.log_text()[mark..].contains("connection limits changed"),
        "{}",
        d.log_text()
    );
    assert!(
        !d.log_text()[mark..].contains("need a restart"),
        "the limits are reloadable: {}",
        d.log_text()
    );
    let admitted = quick(6, "after").await;
    assert!((2..=3).contains(&admitted), "admitted {admitted}");
    d.sigterm().await;
}
