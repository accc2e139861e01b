//! Fan-in into many offline durable sessions: a publisher with many messages in flight
//! spread over many sessions, so the store stages them (`store::staging`: a few rows per
//! session in a group go to the staging log, merged into the queue later). A SIGKILL while
//! rows are staged, and another one as soon as the restarted broker listens, lose none of the
//! acknowledged messages and duplicate none; each session gets its own in order.

use crate::common;
use std::time::Duration;

use common::daemon::Daemon;
use common::*;
use holdfast::protocol::{Packet, ProtocolVersion, PubAckLike, QoS};

const SESSIONS: usize = 64;
const ROUNDS: usize = 6;
const PUBLISHERS: usize = 8;

fn topic(session: usize) -> String {
    format!("fan/{session}")
}

fn staged(d: &Daemon) -> i64 {
    rusqlite::Connection::open_with_flags(d.db_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|db| db.query_row("SELECT count(*) FROM queue_log", [], |r| r.get(0)))
        .expect("read the staging log")
}

/// Rounds `first..first + ROUNDS` (one message per session each), all in flight at once.
async fn publish_rounds(addr: std::net::SocketAddr, first: usize) {
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|j| {
            tokio::spawn(async move {
                let id = format!("fan-pub-{j}");
                let mut p = RawClient::connect(addr, ProtocolVersion::V311, &id).await;
                let mut pid = 0u16;
                for round in first..first + ROUNDS {
                    for s in (j..SESSIONS).step_by(PUBLISHERS) {
                        pid += 1;
                        let body = round.to_string();
                        p.publish(&topic(s), body.as_bytes(), QoS::AtLeastOnce, pid)
                            .await;
                    }
                }
                for acked in 0..pid {
                    match p.recv_timeout(Duration::from_secs(10)).await {
                        Ok(Some(Packet::PubAck(_))) => {}
                        other => panic!("{id}: expected PUBACK {acked}, got {other:?}"),
                    }
                }
                disconnect(p).await;
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
}

#[tokio::test]
async fn staged_messages_survive_a_sigkill_and_one_at_restart_once_each_and_in_order() {
    let mut d = Daemon::started("").await;
    for s in 0..SESSIONS {
        let id = format!("fan-{s}");
        let (mut c, _) = connect_durable_as(d.addr, ProtocolVersion::V311, &id, false).await;
        assert_eq!(c.subscribe(&topic(s), QoS::AtLeastOnce).await, vec![1]);
        disconnect(c).await;
        d.wait_offline_committed(&id).await;
    }
    // Every message in flight at once: 8 publishers, each for its own sessions (so each
    // session's messages come from one publisher, in order), round by round (3.1.1: no
    // Receive Maximum to wait for), then every PUBACK. Until some rows are staged (the
    // writer stages only groups of 32 appends or more, which depends on timing); before
    // the writer's idle merge (5 s).
    let mut rounds = 0;
    for _ in 0..10 {
        publish_rounds(d.addr, rounds).await;
        rounds += ROUNDS;
        if staged(&d) > 0 {
            break;
        }
    }
    assert!(staged(&d) > 0, "no message was staged in {rounds} rounds");
    d.kill_and_restart().await;
    // Killed again as soon as it listens (the listener is bound before the store recovers):
    // this kill lands during or just after the start-up merge of the log (here, with a
    // few dozen rows staged, mostly after; `store::merge_tests` cuts the start-up merge
    // after each of its commits).
    d.kill_and_restart().await;
    // Every session at once; each gets exactly its messages, in order, and then nothing.
    let addr = d.addr;
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|s| {
            tokio::spawn(async move {
                let id = format!("fan-{s}");
                let (mut c, present) =
                    connect_durable_as(addr, ProtocolVersion::V311, &id, false).await;
                assert!(present, "{id} survived");
                let mut got = Vec::new();
                while got.len() < rounds {
                    match c.recv_timeout(Duration::from_secs(10)).await {
                        Ok(Some(Packet::Publish(m))) => {
                            assert_eq!(&*m.topic, topic(s).as_str());
                            got.push(String::from_utf8_lossy(&m.payload).into_owned());
                            c.send(Packet::PubAck(PubAckLike::new(m.packet_id))).await;
                        }
                        other => panic!("{id}: after {got:?}: {other:?}"),
                    }
                }
                let want: Vec<String> = (0..rounds).map(|r| r.to_string()).collect();
                assert_eq!(got, want, "{id}: every acknowledged message, in order");
                c.expect_silence(Duration::from_millis(500)).await;
                disconnect(c).await;
            })
        })
        .collect();
    for s in sessions {
        s.await.expect("session");
    }
}
