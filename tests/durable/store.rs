//! Issue 12: durable sessions keep every acknowledged message. One test per defect found:
//! the default queue limits, session ids at their boundaries, the router's queue
//! bookkeeping racing the store (read-backs, drop-oldest, expiry sweeps, refused commits),
//! QoS 2 acknowledgements and disk errors. Real broker in process, real SQLite files.

use crate::common::{self, metrics};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use holdfast::config::Config;
use holdfast::protocol::{Packet, ProtocolVersion, Publish, QoS};

fn index_of(p: &Publish) -> u32 {
    std::str::from_utf8(&p.payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload on {}: {:?}", p.topic, p.payload))
}

/// Publishes `range` as QoS 1 messages on `topic` (payload = the number), up to 100 in flight,
/// and returns how many were acknowledged with success.
async fn publish_range(addr: SocketAddr, topic: &str, range: std::ops::Range<u32>) -> u32 {
    let mut p = RawClient::connect(addr, ProtocolVersion::V311, "publisher").await;
    let mut acked = 0;
    let mut in_flight = 0;
    let total = range.len();
    let mut sent = 0;
    let mut it = range.into_iter();
    while (acked as usize) < total {
        while in_flight < 100 {
            let Some(i) = it.next() else { break };
            let pid = (i % 60_000 + 1) as u16;
            p.publish(topic, i.to_string().as_bytes(), QoS::AtLeastOnce, pid)
                .await;
            in_flight += 1;
            sent += 1;
        }
        match p.recv().await {
            Some(Packet::PubAck(_)) => {
                acked += 1;
                in_flight -= 1;
            }
            other => panic!("expected PUBACK, got {other:?} after {sent} sent"),
        }
    }
    acked
}

/// Receives and acknowledges until `quiet` passes without a message; the payload numbers.
async fn drain(c: &mut RawClient, quiet: Duration) -> Vec<u32> {
    drain_acking(c, quiet, index_of).await
}

// ----- 1. defaults -------------------------------------------------------------------------

/// `mosquitto_sub -i dash -c -q 1`, stopped; 3,000 QoS 1 messages; `dash` reconnects: with
/// the default configuration every one of them arrives, in order.
#[tokio::test]
async fn default_config_keeps_a_durable_sessions_whole_backlog() {
    let b = start_broker(|_| {}).await;
    let (mut dash, _) = connect_durable_as(b.addr, ProtocolVersion::V311, "dash", false).await;
    assert_eq!(dash.subscribe("sensors/#", QoS::AtLeastOnce).await, vec![1]);
    disconnect(dash).await;
    assert_eq!(publish_range(b.addr, "sensors/t", 0..3000).await, 3000);
    let (mut dash, present) =
        connect_durable_as(b.addr, ProtocolVersion::V311, "dash", false).await;
    assert!(present);
    let got = drain(&mut dash, Duration::from_millis(1500)).await;
    assert_eq!(
        got,
        (0..3000).collect::<Vec<_>>(),
        "the whole backlog, in order"
    );
    b.shutdown().await;
}

// ----- 2. session ids ----------------------------------------------------------------------

/// Sessions whose store ids sit at the old scheme's edges (2^23 - 2 .. 2^23 + 1, 2^24, and
/// the largest id) keep and deliver their messages, before and after a restart, and new
/// durable sessions created after them do too.
#[tokio::test]
async fn durable_sessions_work_whatever_their_stored_session_id() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_broker_in(dir.path(), |_| {}).await;
    let names = ["edge-a", "edge-b", "edge-c", "edge-d", "edge-e"];
    for n in names {
        let (mut s, _) = connect_durable_as(b.addr, ProtocolVersion::V5, n, true).await;
        assert_eq!(
            s.subscribe(&format!("ids/{n}"), QoS::AtLeastOnce).await,
            vec![1]
        );
        disconnect(s).await;
    }
    b.shutdown().await;
    // Move the sessions to the edges, as a gateway that ran through millions of
    // connections under the old scheme would have them.
    {
        let db = rusqlite::Connection::open(dir.path().join("holdfast.db")).unwrap();
        let edges: [i64; 5] = [
            (1 << 23) - 2,
            (1 << 23) - 1,
            1 << 23,
            1 << 24,
            i64::MAX >> 1,
        ];
        for (n, sid) in names.iter().zip(edges) {
            let old: i64 = db
                .query_row("SELECT sid FROM session WHERE client_id = ?1", [n], |r| {
                    r.get(0)
                })
                .unwrap();
            db.execute("UPDATE session SET sid = ?2 WHERE sid = ?1", [old, sid])
                .unwrap();
            db.execute(
                "UPDATE subscription SET sid = ?2 WHERE sid = ?1",
                [old, sid],
            )
            .unwrap();
        }
    }
    for round in 0..2 {
        let b = start_broker_in(dir.path(), |_| {}).await;
        // Three more durable sessions after the edge ones.
        for k in 0..3 {
            let id = format!("new-{k}");
            let (mut s, _) = connect_durable_as(b.addr, ProtocolVersion::V5, &id, round == 0).await;
            assert_eq!(
                s.subscribe(&format!("ids/{id}"), QoS::AtLeastOnce).await,
                vec![1]
            );
            disconnect(s).await;
        }
        let all: Vec<String> = names
            .iter()
            .map(|n| n.to_string())
            .chain((0..3).map(|k| format!("new-{k}")))
            .collect();
        for (i, n) in all.iter().enumerate() {
            let base = round * 100 + i as u32 * 10;
            assert_eq!(
                publish_range(b.addr, &format!("ids/{n}"), base..base + 5).await,
                5
            );
        }
        // Restart between publishing and receiving: the rows must come back from disk.
        b.shutdown().await;
        let b = start_broker_in(dir.path(), |_| {}).await;
        for (i, n) in all.iter().enumerate() {
            let base = round * 100 + i as u32 * 10;
            let (mut s, present) = connect_durable_as(b.addr, ProtocolVersion::V5, n, false).await;
            assert!(present, "{n}: session kept");
            let got = drain(&mut s, Duration::from_millis(400)).await;
            assert_eq!(
                got,
                (base..base + 5).collect::<Vec<_>>(),
                "{n} in round {round}"
            );
            disconnect(s).await;
        }
        b.shutdown().await;
    }
}

/// The default disk budget keeps a share of the filesystem free. With the share set above
/// what is free, the database cannot grow: new QoS 1 messages for a durable session are
/// refused with 0x97 once its free pages are used, everything acknowledged before is kept,
/// and after a restart with room the backlog is delivered whole.
#[tokio::test]
async fn the_free_space_reserve_refuses_new_messages_and_keeps_the_acknowledged_ones() {
    assert_eq!(Config::default().store.min_free_percent, 5);
    let dir = tempfile::tempdir().unwrap();
    let (avail, total) = holdfast::store::budget::filesystem_space(dir.path()).unwrap();
    let beyond_free = (100 - avail * 100 / total + 1).min(99) as u8;
    assert!(
        (avail * 100 / total) < u64::from(beyond_free),
        "test needs a filesystem that is not ~100% free"
    );
    let b = start_broker_in(dir.path(), |c| c.store.min_free_percent = beyond_free).await;
    let (mut dash, _) = connect_durable_as(b.addr, ProtocolVersion::V5, "dash", true).await;
    assert_eq!(dash.subscribe("t/#", QoS::AtLeastOnce).await, vec![1]);
    disconnect(dash).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    let mut acked = Vec::new();
    let mut refused = 0;
    let big = vec![b'x'; 2000];
    for i in 0..2000u32 {
        let mut payload = i.to_string().into_bytes();
        payload.push(b' ');
        payload.extend_from_slice(&big);
        p.publish("t/a", &payload, QoS::AtLeastOnce, (i % 60000 + 1) as u16)
            .await;
        match p.recv().await {
            Some(Packet::PubAck(a)) if a.reason_code == 0 => acked.push(i),
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.reason_code, 0x97, "refused as quota exceeded");
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(refused, 5, "the reserve stopped the database from growing");
    b.shutdown().await;
    let b = start_broker_in(dir.path(), |c| c.store.min_free_percent = 0).await;
    let (mut dash, present) = connect_durable_as(b.addr, ProtocolVersion::V5, "dash", false).await;
    assert!(present);
    let mut got = Vec::new();
    while let Ok(Some(Packet::Publish(m))) = dash.recv_timeout(Duration::from_millis(800)).await {
        let text = std::str::from_utf8(&m.payload[..m.payload.len() - 2001]).unwrap();
        got.push(text.parse::<u32>().unwrap());
        dash.puback(m.packet_id).await;
    }
    assert_eq!(got, acked, "every acknowledged message, in order");
    b.shutdown().await;
}

// ----- 7. storage errors -------------------------------------------------------------------

/// A stopped gateway with 2,000 queued 1 KiB messages for the durable session `dash` whose
/// database is then damaged in the middle (one page overwritten, as a failing SD card
/// does), outside what start-up reads.
async fn damaged_backlog(dir: &Path) {
    let b = start_broker_in(dir, |_| {}).await;
    let (mut dash, _) = connect_durable_as(b.addr, ProtocolVersion::V5, "dash", true).await;
    assert_eq!(dash.subscribe("t/#", QoS::AtLeastOnce).await, vec![1]);
    disconnect(dash).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    for i in 0..2000u32 {
        let mut payload = format!("{i}").into_bytes();
        payload.push(b' ');
        payload.resize(1024, b'.');
        p.publish("t/a", &payload, QoS::AtLeastOnce, (i % 60000 + 1) as u16)
            .await;
        match p.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, 0),
            other => panic!("{other:?}"),
        }
    }
    b.shutdown().await; // checkpoints: everything is in the main file
    let db = dir.join("holdfast.db");
    let len = std::fs::metadata(&db).unwrap().len();
    let page = 4096u64;
    let middle = (len / page / 2) * page;
    let mut bytes = std::fs::read(&db).unwrap();
    for b in &mut bytes[middle as usize..(middle + page) as usize] {
        *b = 0xAB;
    }
    std::fs::write(&db, bytes).unwrap();
}

#[tokio::test]
async fn a_database_damaged_inside_is_found_by_the_startup_check() {
    let dir = tempfile::tempdir().unwrap();
    damaged_backlog(dir.path()).await;
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        listener: vec![holdfast::config::ListenerConfig::new("127.0.0.1:0")],
        ..Config::default()
    };
    cfg.store.on_corrupt = holdfast::store::OnCorrupt::Refuse;
    cfg.sys.interval_secs = 0;
    match holdfast::app::Gateway::start(&cfg).await {
        Ok(_) => panic!("a damaged database was served"),
        Err(e) => {
            let text = format!("{e:#}");
            assert!(text.contains("corrupt"), "{text}");
            assert!(text.contains("holdfast.db"), "names the file: {text}");
        }
    }
}

/// Without the start-up check, the damage is found by the read-back: it is retried, never
/// taken as "the queue is empty" (which let newer messages overtake the unread backlog),
/// and `/healthz` says what is wrong.
#[tokio::test]
async fn a_failed_read_back_is_retried_and_reported_not_taken_as_an_empty_queue() {
    let dir = tempfile::tempdir().unwrap();
    damaged_backlog(dir.path()).await;
    let b = start_broker_in(dir.path(), |c| {
        c.store.integrity_check = false;
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await;
    let metrics_at = b.broker.as_ref().unwrap().metrics_addr().expect("metrics");
    let (mut dash, _) = connect_durable_as(b.addr, ProtocolVersion::V5, "dash", false).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p2").await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut published_late = false;
    while tokio::time::Instant::now() < deadline {
        match dash.recv_timeout(Duration::from_millis(300)).await {
            Ok(Some(Packet::Publish(m))) => {
                let text = std::str::from_utf8(&m.payload).unwrap();
                got.push(text.split(' ').next().unwrap().parse::<u32>().unwrap());
                dash.puback(m.packet_id).await;
            }
            Ok(other) => panic!("{other:?}"),
            Err(()) if !published_late => {
                // The backlog stalled at the damage: a new message must wait behind it.
                p.publish("t/a", b"9999 late", QoS::AtLeastOnce, 1).await;
                published_late = true;
            }
            Err(()) => {}
        }
    }
    assert!(
        published_late && got.len() < 2000,
        "the damage stopped the read-back"
    );
    assert_eq!(
        got,
        (0..got.len() as u32).collect::<Vec<_>>(),
        "in order, nothing overtook the backlog"
    );
    let (code, _, body) = metrics::http(metrics_at, "GET", "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("corrupt"), "{body}");
    let (_, _, text) = metrics::http(metrics_at, "GET", "/metrics").await;
    assert!(
        text.contains("holdfast_store_state{state=\"corrupt\"} 1"),
        "{text}"
    );
    b.shutdown().await;
}

/// Another process holds the database lock past SQLite's 5 s busy timeout (a backup, a
/// stray `sqlite3` shell): the commit is retried, the publisher's acknowledgement waits and
/// then succeeds (nothing refused), and meanwhile `/healthz` says the store is locked.
#[tokio::test]
async fn a_lock_held_past_the_busy_timeout_delays_acknowledgements_instead_of_refusing() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_broker_in(dir.path(), |c| c.metrics.bind = Some("127.0.0.1:0".into())).await;
    let metrics_at = b.broker.as_ref().unwrap().metrics_addr().expect("metrics");
    let (mut dash, _) = connect_durable_as(b.addr, ProtocolVersion::V5, "dash", true).await;
    assert_eq!(dash.subscribe("t/#", QoS::AtLeastOnce).await, vec![1]);
    disconnect(dash).await;
    let db = rusqlite::Connection::open(dir.path().join("holdfast.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V5, "p").await;
    p.publish("t/a", b"7", QoS::AtLeastOnce, 1).await;
    assert!(
        p.recv_timeout(Duration::from_millis(6500)).await.is_err(),
        "no acknowledgement while the store is locked"
    );
    let (code, body) = health_until(metrics_at, |code, body| {
        code == 503 && body.contains("locked")
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("locked"), "{body}");
    db.execute_batch("COMMIT").unwrap();
    match p.recv_timeout(Duration::from_secs(8)).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!(a.reason_code, 0, "accepted, not refused"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let (code, body) = health_until(metrics_at, |code, _| code == 200).await;
    assert_eq!(code, 200, "{body}");
    b.shutdown().await;
}

/// `/healthz` until `done` says so or 5 s pass (the writer answers between its retries).
async fn health_until(at: std::net::SocketAddr, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _, body) = metrics::http(at, "GET", "/healthz").await;
        if done(code, &body) || tokio::time::Instant::now() > deadline {
            return (code, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
