//! Observability end to end: `$SYS/holdfast/...` values appear and move; `/metrics` over
//! real HTTP parses as Prometheus text and moves too; `/healthz` is 200, and 503 while the
//! store writer is stuck behind a lock; `holdfast status` against the real binary; sd-notify
//! `READY=1`, `WATCHDOG=1` (withheld while the writer is stuck) and `STOPPING=1` on a Unix
//! datagram socket standing in for systemd.

use crate::common::{self, daemon, metrics};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use metrics::{http, parse_prometheus};

/// Collects `$SYS` messages into `seen` until `done(seen)` holds; panics after `within`.
async fn sys_until(
    c: &mut RawClient,
    seen: &mut HashMap<String, String>,
    within: Duration,
    what: &str,
    done: impl Fn(&HashMap<String, String>) -> bool,
) {
    let deadline = Instant::now() + within;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv_timeout(left).await {
            Ok(Some(Packet::Publish(p))) => {
                seen.insert(
                    p.topic.to_string(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                );
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection closed while waiting for {what}"),
            Err(()) => panic!("timed out waiting for {what}; seen: {seen:#?}"),
        }
    }
}

fn num(seen: &HashMap<String, String>, leaf: &str) -> Option<f64> {
    seen.get(&format!("$SYS/holdfast/{leaf}"))?.parse().ok()
}

#[tokio::test]
async fn sys_topics_appear_and_move() {
    let t0 = Instant::now();
    let b = start_broker(|c| c.sys.interval_secs = 1).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "watcher").await;
    sub.subscribe("$SYS/holdfast/#", QoS::AtMostOnce).await;
    const LEAVES: &[&str] = &[
        "version",
        "uptime",
        "clients/connected",
        "clients/sessions",
        "clients/sessions/durable",
        "messages/received",
        "messages/sent",
        "messages/retained",
        "messages/dropped",
        "messages/dropped/queue_full",
        "messages/dropped/qos0_backlog",
        "messages/dropped/too_large",
        "messages/dropped/disk_budget",
        "messages/dropped/expired",
        "store/size",
        "store/commits",
        "store/commit_latency/p50",
        "store/commit_latency/p99",
    ];
    let mut seen = HashMap::new();
    // Retained values (in no particular order) and live ones until every topic was seen.
    sys_until(&mut sub, &mut seen, TIMEOUT, "every $SYS topic", |s| {
        LEAVES
            .iter()
            .all(|l| s.contains_key(&format!("$SYS/holdfast/{l}")))
    })
    .await;
    assert_eq!(
        seen["$SYS/holdfast/version"],
        env!("CARGO_PKG_VERSION"),
        "{seen:#?}"
    );
    for leaf in &LEAVES[1..] {
        assert!(num(&seen, leaf).is_some(), "no number at {leaf}: {seen:#?}");
    }
    assert!(num(&seen, "store/size").unwrap() > 0.0, "{seen:#?}");
    let received0 = num(&seen, "messages/received").unwrap();
    let commits0 = num(&seen, "store/commits").unwrap();

    // Traffic: QoS 1 retained messages (each a commit) from another client.
    let mut publ = RawClient::connect(b.addr, ProtocolVersion::V311, "pub").await;
    for i in 1..=5u16 {
        let mut p = publish("obs/t", b"x", QoS::AtLeastOnce, i);
        p.retain = true;
        publ.send(Packet::Publish(p)).await;
        match publ.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, i),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    sys_until(
        &mut sub,
        &mut seen,
        Duration::from_secs(5),
        "counters to move",
        |s| {
            num(s, "messages/received").unwrap_or(0.0) >= received0 + 5.0
                && num(s, "store/commits").unwrap_or(0.0) > commits0
                && num(s, "clients/connected") == Some(2.0)
                && num(s, "uptime").unwrap_or(0.0) >= 1.0
        },
    )
    .await;
    b.shutdown().await;
    eprintln!("sys_topics_appear_and_move: {:?}", t0.elapsed());
}

#[tokio::test]
async fn metrics_and_healthz_over_http() {
    let t0 = Instant::now();
    let b = start_broker(|c| {
        c.metrics.bind = Some("127.0.0.1:0".into());
        c.sys.interval_secs = 1;
    })
    .await;
    let addr = b
        .broker
        .as_ref()
        .unwrap()
        .metrics_addr()
        .expect("metrics bound");

    let (code, headers, body) = http(addr, "GET", "/healthz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok\n"), "{body}");
    assert_eq!(headers["connection"], "close");

    let (code, headers, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    assert!(headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let m = parse_prometheus(&body);
    for name in [
        "holdfast_uptime_seconds",
        "holdfast_router_up",
        "holdfast_store_writer_up",
        "holdfast_clients_connected",
        "holdfast_sessions",
        "holdfast_sessions_durable",
        "holdfast_messages_received_total",
        "holdfast_messages_sent_total",
        "holdfast_messages_retained",
        "holdfast_messages_dropped_total{reason=\"queue_full\"}",
        "holdfast_messages_dropped_total{reason=\"qos0_backlog\"}",
        "holdfast_messages_dropped_total{reason=\"too_large\"}",
        "holdfast_messages_dropped_total{reason=\"disk_budget\"}",
        "holdfast_messages_dropped_total{reason=\"expired\"}",
        "holdfast_store_size_bytes{file=\"db\"}",
        "holdfast_store_size_bytes{file=\"wal\"}",
        "holdfast_store_commits_total",
        "holdfast_store_commit_duration_seconds_bucket{le=\"+Inf\"}",
        "holdfast_store_commit_duration_seconds_count",
        "holdfast_store_commit_latency_interval_seconds{quantile=\"0.99\"}",
    ] {
        assert!(m.contains_key(name), "{name} missing:\n{body}");
    }
    assert_eq!(m["holdfast_router_up"], 1.0);
    assert_eq!(m["holdfast_store_writer_up"], 1.0);
    let build = format!(
        "holdfast_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(m[&build], 1.0);

    // Traffic moves the counters.
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "metrics-pub").await;
    for i in 1..=3u16 {
        let mut p = publish("m/t", b"payload", QoS::AtLeastOnce, i);
        p.retain = true;
        c.send(Packet::Publish(p)).await;
        assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    }
    let (_, _, body) = http(addr, "GET", "/metrics").await;
    let m2 = parse_prometheus(&body);
    assert_eq!(
        m2["holdfast_messages_received_total"],
        m["holdfast_messages_received_total"] + 3.0
    );
    assert!(m2["holdfast_store_commits_total"] > m["holdfast_store_commits_total"]);
    assert!(
        m2["holdfast_store_commit_duration_seconds_count"]
            > m["holdfast_store_commit_duration_seconds_count"]
    );
    assert_eq!(m2["holdfast_clients_connected"], 1.0);

    let (code, _, _) = http(addr, "GET", "/nope").await;
    assert_eq!(code, 404);
    let (code, headers, _) = http(addr, "POST", "/metrics").await;
    assert_eq!(code, 405);
    assert_eq!(headers["allow"], "GET, HEAD");
    let (code, headers, body) = http(addr, "HEAD", "/healthz").await;
    assert_eq!((code, body.as_str()), (200, ""));
    assert!(headers["content-length"].parse::<usize>().unwrap() > 0);

    // A stuck store writer (another process holds the write lock, so a commit waits out
    // SQLite's 5 s busy timeout) makes /healthz fail within its 2 s deadline...
    let db = holdfast::store::db_path(b.dir.path());
    let lock = rusqlite::Connection::open(&db).expect("open db");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut p = publish("m/stuck", b"x", QoS::AtLeastOnce, 9);
    p.retain = true;
    c.send(Packet::Publish(p)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let (code, _, body) = http(addr, "GET", "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store: not responding"), "{body}");
    assert!(body.contains("router: ok"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // ...and recover once it is released.
    lock.execute_batch("COMMIT").expect("release");
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _, body) = http(addr, "GET", "/healthz").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.shutdown().await;
    eprintln!("metrics_and_healthz_over_http: {:?}", t0.elapsed());
}

#[tokio::test]
async fn status_command_against_the_real_binary() {
    let t0 = Instant::now();
    let mut d = daemon::Daemon::started("[sys]\ninterval_secs = 1\n").await;
    let c = connect_v311(&d, "status-client", false).await;
    // Wait for a latency interval with commits in it (the durable session's commit).
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let out = Command::new(crate::common::bin())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .expect("run holdfast status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let first = text.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&format!("holdfast {} (pid ", env!("CARGO_PKG_VERSION")))
            && first.ends_with(", healthy"),
        "{text}"
    );
    assert!(text.contains("clients:   1 connected"), "{text}");
    assert!(
        text.contains("sessions:  1 (1 durable, 1 online)"),
        "{text}"
    );
    assert!(text.contains("dropped:   none"), "{text}");
    assert!(text.contains("store:     "), "{text}");
    assert!(text.contains("bridges:   none"), "{text}");
    assert!(text.contains("\ntraffic:   "), "{text}");

    let out = Command::new(crate::common::bin())
        .args(["status", "--json", "--config"])
        .arg(&d.config)
        .output()
        .expect("run holdfast status --json");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["pid"].as_u64(), d.pid().map(u64::from));
    assert_eq!(v["health"]["router"], true);
    assert_eq!(v["health"]["store"], true);
    assert_eq!(v["router"]["sessions"]["durable"], 1);
    assert!(v["store"]["db_bytes"].as_u64().unwrap() > 0);
    assert!(v["store"]["commits"].as_u64().unwrap() > 0);
    assert!(v["bridges"].is_array());
    assert_eq!(
        v["traffic"]["listeners"][0]["bind"].as_str(),
        Some(d.addr.to_string().as_str())
    );
    assert_eq!(v["clients"]["rate_limited"], 0);

    drop(c);
    d.sigterm().await;
    let out = Command::new(crate::common::bin())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()
        .expect("run holdfast status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no gateway running"), "{err}");
    eprintln!("status_command_against_the_real_binary: {:?}", t0.elapsed());
}

/// Datagrams received on a socket standing in for systemd's notify socket.
struct Notifications {
    sock: tokio::net::UnixDatagram,
}

impl Notifications {
    /// The next datagram within `t`, or None.
    async fn next(&self, t: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(t, self.sock.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    }

    /// Waits for a datagram with the line `line`; returns the datagrams seen before.
    async fn expect(&self, line: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(m) if m.lines().any(|l| l == line) => return seen,
                Some(m) => seen.push(m),
                None => panic!("no {line} within {within:?}; got {seen:?}"),
            }
        }
    }
}

#[tokio::test]
async fn sd_notify_ready_watchdog_stopping() {
    let t0 = Instant::now();
    let mut d = daemon::Daemon::new("");
    let path = d.dir.path().join("notify.sock");
    let n = Notifications {
        sock: tokio::net::UnixDatagram::bind(&path).expect("bind notify socket"),
    };
    d.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    d.start().await;
    let before = n.expect("READY=1", Duration::from_secs(10)).await;
    assert!(
        before.iter().all(|m| !m.contains("WATCHDOG=1")),
        "no ping before READY: {before:?}"
    );
    // Pings every 200 ms.
    let started = Instant::now();
    for _ in 0..3 {
        n.expect("WATCHDOG=1", Duration::from_secs(2)).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // A stuck store writer: the pings stop while it cannot commit...
    let lock = rusqlite::Connection::open(d.db_path()).expect("open db");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut c = crate::common::RawClient::try_tcp(d.addr, ProtocolVersion::V311)
        .await
        .expect("tcp");
    c.try_send(&Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V311,
        "stuck",
        false,
    ))))
    .await
    .expect("connect");
    tokio::time::sleep(Duration::from_millis(500)).await;
    while n.next(Duration::from_millis(1)).await.is_some() {} // pings sent before the lock
    if let Some(m) = n.next(Duration::from_millis(1500)).await {
        panic!("no ping expected while the writer is stuck, got {m:?}");
    }
    // ...and resume once it is released.
    lock.execute_batch("COMMIT").expect("release");
    drop(lock);
    n.expect("WATCHDOG=1", Duration::from_secs(10)).await;
    drop(c);

    d.signal("TERM");
    n.expect("STOPPING=1", Duration::from_secs(5)).await;
    d.sigterm().await; // already signalled: waits for the clean exit
    eprintln!("sd_notify_ready_watchdog_stopping: {:?}", t0.elapsed());
}

#[tokio::test]
async fn extend_timeout_is_sent_while_the_store_opens_slowly() {
    let t0 = Instant::now();
    let mut d = daemon::Daemon::new("");
    // A first run creates the database.
    d.start().await;
    d.sigterm().await;

    let path = d.dir.path().join("notify.sock");
    let n = Notifications {
        sock: tokio::net::UnixDatagram::bind(&path).expect("bind notify socket"),
    };
    d.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        (
            holdfast::observe::notify::EXTEND_EVERY_TEST_VAR.into(),
            "100".into(),
        ),
    ];
    // Another process holds the write lock: opening the store waits for it (busy timeout
    // 5 s), standing in for a long recovery or migration.
    let lock = rusqlite::Connection::open(d.db_path()).expect("open db");
    lock.execute_batch("BEGIN EXCLUSIVE")
        .expect("take the lock");
    d.spawn();
    let mut extends = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while extends < 4 {
        let m = n
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|| panic!("only {extends} EXTEND_TIMEOUT_USEC\n{}", d.log_text()));
        assert!(
            !m.contains("READY=1"),
            "ready while the store is locked: {m}"
        );
        if m.lines().any(|l| l == "EXTEND_TIMEOUT_USEC=300000") {
            extends += 1;
        }
    }
    lock.execute_batch("COMMIT").expect("release");
    drop(lock);
    n.expect("READY=1", Duration::from_secs(10)).await;
    // No more extensions once started.
    while let Some(m) = n.next(Duration::from_millis(300)).await {
        assert!(!m.contains("EXTEND_TIMEOUT_USEC"), "after READY: {m}");
    }
    d.sigterm().await;
    eprintln!(
        "extend_timeout_is_sent_while_the_store_opens_slowly: {:?}",
        t0.elapsed()
    );
}

/// Waits until the daemon's log contains `needle` (after `from` bytes); panics after `within`.
async fn wait_for_log(d: &daemon::Daemon, from: usize, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = d.log_text();
        if text.get(from..).is_some_and(|t| t.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within {within:?}:\n{}",
            text.get(from..).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 3.1.1 client on the daemon, CONNACK received.
async fn connect_v311(d: &daemon::Daemon, id: &str, clean: bool) -> crate::common::RawClient {
    let mut c = crate::common::RawClient::try_tcp(d.addr, ProtocolVersion::V311)
        .await
        .expect("tcp");
    c.try_send(&Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V311,
        id,
        clean,
    ))))
    .await
    .expect("connect");
    assert!(matches!(
        c.recv_timeout(TIMEOUT).await,
        Ok(Some(Packet::ConnAck(_)))
    ));
    c
}

#[tokio::test]
async fn sighup_changes_the_log_level_and_a_bad_file_changes_nothing() {
    let t0 = Instant::now();
    let d = daemon::Daemon::started("").await; // [log] level = "warn"
    let quiet = connect_v311(&d, "before-reload", true).await;
    // Debug lines of that connection would be written by now; there are none at warn.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !d.log_text().contains("client connected"),
        "{}",
        d.log_text()
    );

    let original = std::fs::read_to_string(&d.config).expect("config");
    let debug =
        original.replace("level = \"warn\"", "level = \"debug\"") + "[mqtt]\nmax_inflight = 7\n";
    assert_ne!(debug, original);
    std::fs::write(&d.config, &debug).expect("write config");
    let mark = d.log_text().len();
    d.sighup();
    wait_for_log(&d, mark, "log level changed", Duration::from_secs(5)).await;
    // The non-reloadable change is named, not applied.
    wait_for_log(&d, mark, "mqtt.max_inflight", Duration::from_secs(1)).await;
    let _loud = connect_v311(&d, "after-reload", true).await;
    wait_for_log(&d, mark, "client_id=after-reload", Duration::from_secs(5)).await;

    // A bad file: the error names the key and the file; debug stays in force.
    std::fs::write(
        &d.config,
        debug.replace("level = \"debug\"", "level = \"holdfast=loud\""),
    )
    .expect("write config");
    let mark = d.log_text().len();
    d.sighup();
    wait_for_log(
        &d,
        mark,
        "configuration not reloaded",
        Duration::from_secs(5),
    )
    .await;
    let text = d.log_text()[mark..].to_string();
    assert!(text.contains("log.level"), "{text}");
    assert!(
        text.contains(&d.config.display().to_string()),
        "names the file: {text}"
    );
    let _still = connect_v311(&d, "after-bad-file", true).await;
    wait_for_log(&d, mark, "client_id=after-bad-file", Duration::from_secs(5)).await;
    drop(quiet);
    let mut d = d;
    d.sigterm().await;
    eprintln!(
        "sighup_changes_the_log_level_and_a_bad_file_changes_nothing: {:?}",
        t0.elapsed()
    );
}
