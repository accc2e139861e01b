//! Durable state across restarts of the real binary (SIGTERM and SIGKILL), seen by raw
//! clients: offline queues drain in order, in-flight messages come back with DUP = 1 and
//! the same packet id, QoS 2 is exactly-once across a crash in the middle of either flow,
//! session and message expiry count across restarts, retained messages and (delayed)
//! wills survive, subscriptions (shared ones too) survive.

use crate::common::{self, daemon};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use daemon::Daemon;
use holdfast::protocol::{
    reason, ConnAck, Connect, Packet, ProtocolVersion, PubAckLike, Publish, QoS, Will,
    WillProperties,
};

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// A durable CONNECT: 3.1.1 clean session 0, or v5 with Session Expiry Interval `expiry`.
fn durable(version: ProtocolVersion, id: &str, clean_start: bool, expiry: u32) -> Connect {
    let mut c = connect_packet(version, id, clean_start);
    if version == V5 {
        c.properties.session_expiry_interval = Some(expiry);
    } else {
        assert!(
            !clean_start,
            "a 3.1.1 durable session needs clean session 0"
        );
    }
    c
}

/// Connects; panics unless accepted with the expected Session Present.
async fn connect_expect(addr: SocketAddr, c: Connect, session_present: bool) -> RawClient {
    let id = c.client_id.clone();
    let (client, ack) = RawClient::connect_with(addr, c).await;
    match ack {
        Packet::ConnAck(ConnAck {
            reason_code: 0,
            session_present: sp,
            ..
        }) => assert_eq!(
            sp, session_present,
            "{id}: CONNACK session present = {sp}, expected {session_present}"
        ),
        other => panic!("{id}: connect refused: {other:?}"),
    }
    client
}

async fn disconnect(mut c: RawClient) {
    c.send(Packet::Disconnect(Default::default())).await;
    let _ = c.recv_timeout(Duration::from_secs(2)).await;
}

/// Publishes QoS 1 messages (at most 4 unacknowledged, below any Receive Maximum used here) and checks every PUBACK is a success
/// (0x10 "no matching subscribers" would mean a subscription was lost).
async fn publish_qos1_all(c: &mut RawClient, topic: &str, payloads: &[Vec<u8>]) {
    let mut next = 0;
    let mut acked = 0;
    while acked < payloads.len() {
        while next < payloads.len() && next - acked < 4 {
            c.publish(topic, &payloads[next], QoS::AtLeastOnce, next as u16 + 1)
                .await;
            next += 1;
        }
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.packet_id, acked as u16 + 1, "PUBACKs out of order");
                assert_eq!(a.reason_code, reason::SUCCESS, "PUBACK {a:?}");
                acked += 1;
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

fn payloads(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("msg-{i:05}").into_bytes()).collect()
}

/// Receives `expected` in order as fresh QoS 1 deliveries, acknowledging each.
async fn drain_in_order(c: &mut RawClient, expected: &[Vec<u8>]) {
    for (i, want) in expected.iter().enumerate() {
        let p = c.recv_publish().await;
        assert_eq!(
            p.payload.as_ref(),
            &want[..],
            "message {i}: got {:?}",
            String::from_utf8_lossy(&p.payload)
        );
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(!p.dup, "message {i} was never sent before, DUP must be 0");
        c.puback(p.packet_id).await;
    }
    c.expect_silence(Duration::from_millis(300)).await;
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Term,
    Kill,
}

async fn restart(d: &mut Daemon, how: Stop) {
    match how {
        Stop::Term => d.term_and_restart().await,
        Stop::Kill => d.kill_and_restart().await,
    }
}

async fn offline_queue_survives(version: ProtocolVersion, how: Stop) {
    let mut d = Daemon::started("").await;
    let n = 200;
    let msgs = payloads(n);
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), false).await;
    assert_eq!(sub.subscribe("q/t", QoS::AtLeastOnce).await, vec![1]);
    disconnect(sub).await;

    let mut publisher = RawClient::connect(d.addr, version, "pub").await;
    publish_qos1_all(&mut publisher, "q/t", &msgs).await;
    drop(publisher);

    restart(&mut d, how).await;
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), true).await;
    drain_in_order(&mut sub, &msgs).await;
    disconnect(sub).await;

    // The acknowledgements were made durable too: nothing comes back after another restart.
    d.term_and_restart().await;
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), true).await;
    sub.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn offline_queue_drains_in_order_after_sigterm_v311() {
    offline_queue_survives(V3, Stop::Term).await;
}

#[tokio::test]
async fn offline_queue_drains_in_order_after_sigkill_v311() {
    offline_queue_survives(V3, Stop::Kill).await;
}

#[tokio::test]
async fn offline_queue_drains_in_order_after_sigterm_v5() {
    offline_queue_survives(V5, Stop::Term).await;
}

#[tokio::test]
async fn offline_queue_drains_in_order_after_sigkill_v5() {
    offline_queue_survives(V5, Stop::Kill).await;
}

/// Window 5: 5 messages in flight (received, not acknowledged) and 5 queued behind them.
/// After SIGKILL the 5 come back first with DUP = 1 and their packet ids, then the 5 others.
async fn inflight_redelivered(version: ProtocolVersion) {
    let mut d = Daemon::started("[mqtt]\nmax_inflight = 5\n").await;
    let msgs = payloads(10);
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), false).await;
    assert_eq!(sub.subscribe("f/t", QoS::AtLeastOnce).await, vec![1]);
    let mut publisher = RawClient::connect(d.addr, version, "pub").await;
    publish_qos1_all(&mut publisher, "f/t", &msgs).await;
    let mut first = Vec::new();
    for want in &msgs[..5] {
        let p = sub.recv_publish().await;
        assert_eq!(p.payload.as_ref(), &want[..]);
        assert!(!p.dup);
        first.push(p.packet_id);
    }
    sub.expect_silence(Duration::from_millis(200)).await; // window full, nothing acked

    restart(&mut d, Stop::Kill).await;
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), true).await;
    for (i, want) in msgs[..5].iter().enumerate() {
        let p = sub.recv_publish().await;
        assert_eq!(p.payload.as_ref(), &want[..], "redelivery {i} out of order");
        assert!(
            p.dup,
            "redelivery {i} of a message already sent must have DUP = 1"
        );
        assert_eq!(
            p.packet_id, first[i],
            "redelivery {i} must keep its packet id"
        );
        assert_eq!(p.qos, QoS::AtLeastOnce);
    }
    for id in &first {
        sub.puback(*id).await;
    }
    drain_in_order(&mut sub, &msgs[5..]).await;
}

#[tokio::test]
async fn inflight_redelivered_with_dup_and_same_packet_id_after_sigkill_v311() {
    inflight_redelivered(V3).await;
}

#[tokio::test]
async fn inflight_redelivered_with_dup_and_same_packet_id_after_sigkill_v5() {
    inflight_redelivered(V5).await;
}

fn qos2(topic: &str, payload: &[u8], packet_id: u16, dup: bool) -> Packet {
    let mut p = publish(topic, payload, QoS::ExactlyOnce, packet_id);
    p.dup = dup;
    Packet::Publish(p)
}

async fn expect_ack(c: &mut RawClient, kind: &str, packet_id: u16) -> PubAckLike {
    let got = c.recv().await;
    let a = match (&got, kind) {
        (Some(Packet::PubRec(a)), "PUBREC")
        | (Some(Packet::PubRel(a)), "PUBREL")
        | (Some(Packet::PubComp(a)), "PUBCOMP")
        | (Some(Packet::PubAck(a)), "PUBACK") => a.clone(),
        _ => panic!("expected {kind} {packet_id}, got {got:?}"),
    };
    assert_eq!(a.packet_id, packet_id, "{kind}");
    assert_eq!(a.reason_code, reason::SUCCESS, "{kind} {a:?}");
    a
}

/// Incoming QoS 2: PUBREC received, broker SIGKILLed before PUBREL. The publisher resends
/// the PUBLISH with DUP: PUBREC again, not routed again; PUBREL gets PUBCOMP; the durable
/// subscriber receives the message exactly once.
async fn qos2_incoming_exactly_once(version: ProtocolVersion) {
    let mut d = Daemon::started("").await;
    let mut sub = connect_expect(d.addr, durable(V5, "sub", true, 300), false).await;
    assert_eq!(sub.subscribe("x/t", QoS::ExactlyOnce).await, vec![2]);
    disconnect(sub).await;

    let mut publisher = connect_expect(d.addr, durable(version, "pub", false, 300), false).await;
    publisher.send(qos2("x/t", b"once", 7, false)).await;
    expect_ack(&mut publisher, "PUBREC", 7).await;

    restart(&mut d, Stop::Kill).await;
    let mut publisher = connect_expect(d.addr, durable(version, "pub", false, 300), true).await;
    publisher.send(qos2("x/t", b"once", 7, true)).await;
    expect_ack(&mut publisher, "PUBREC", 7).await;
    publisher.send(Packet::PubRel(PubAckLike::new(7))).await;
    expect_ack(&mut publisher, "PUBCOMP", 7).await;

    let mut sub = connect_expect(d.addr, durable(V5, "sub", false, 300), true).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"once");
    assert_eq!(p.qos, QoS::ExactlyOnce);
    sub.send(Packet::PubRec(PubAckLike::new(p.packet_id))).await;
    expect_ack(&mut sub, "PUBREL", p.packet_id).await;
    sub.send(Packet::PubComp(PubAckLike::new(p.packet_id)))
        .await;
    sub.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn qos2_incoming_exactly_once_across_sigkill_between_pubrec_and_pubrel_v311() {
    qos2_incoming_exactly_once(V3).await;
}

#[tokio::test]
async fn qos2_incoming_exactly_once_across_sigkill_between_pubrec_and_pubrel_v5() {
    qos2_incoming_exactly_once(V5).await;
}

/// Outgoing QoS 2: the subscriber sent PUBREC and got PUBREL, the broker is SIGKILLed before
/// PUBCOMP. After the restart the subscriber gets PUBREL again, never the PUBLISH.
async fn qos2_outgoing_pubrel_resent(version: ProtocolVersion) {
    let mut d = Daemon::started("").await;
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), false).await;
    assert_eq!(sub.subscribe("y/t", QoS::ExactlyOnce).await, vec![2]);
    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    publisher.send(qos2("y/t", b"two", 3, false)).await;
    expect_ack(&mut publisher, "PUBREC", 3).await;
    publisher.send(Packet::PubRel(PubAckLike::new(3))).await;
    expect_ack(&mut publisher, "PUBCOMP", 3).await;

    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"two");
    assert_eq!(p.qos, QoS::ExactlyOnce);
    let id = p.packet_id;
    sub.send(Packet::PubRec(PubAckLike::new(id))).await;
    expect_ack(&mut sub, "PUBREL", id).await;

    restart(&mut d, Stop::Kill).await;
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), true).await;
    match sub.recv().await {
        Some(Packet::PubRel(a)) => assert_eq!(a.packet_id, id),
        other => panic!("expected PUBREL {id} after the restart, got {other:?}"),
    }
    sub.send(Packet::PubComp(PubAckLike::new(id))).await;
    sub.expect_silence(Duration::from_millis(300)).await;
    disconnect(sub).await;

    // The PUBCOMP was committed: nothing is left after a graceful restart.
    d.term_and_restart().await;
    let mut sub = connect_expect(d.addr, durable(version, "sub", false, 300), true).await;
    sub.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn qos2_outgoing_pubrel_resent_after_sigkill_before_pubcomp_v311() {
    qos2_outgoing_pubrel_resent(V3).await;
}

#[tokio::test]
async fn qos2_outgoing_pubrel_resent_after_sigkill_before_pubcomp_v5() {
    qos2_outgoing_pubrel_resent(V5).await;
}

/// v5 Session Expiry 2 s: counted from the disconnect across restarts, whether the time
/// passes while the broker runs again or while it is down. A session with a long expiry
/// next to it shows the restart itself kept sessions.
#[tokio::test]
async fn v5_session_expiry_counts_across_restarts() {
    let mut d = Daemon::started("").await;
    async fn create(addr: SocketAddr, id: &str, expiry: u32) {
        let mut c = connect_expect(addr, durable(V5, id, true, expiry), false).await;
        assert_eq!(c.subscribe("e/t", QoS::AtLeastOnce).await, vec![1]);
        disconnect(c).await;
    }
    create(d.addr, "long", 300).await;
    create(d.addr, "short-term", 2).await;
    // Time passes after a graceful restart.
    d.term_and_restart().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(connect_expect(d.addr, durable(V5, "short-term", false, 2), false).await);
    disconnect(connect_expect(d.addr, durable(V5, "long", false, 300), true).await).await;

    // Time passes while the broker is down after SIGKILL.
    create(d.addr, "short-kill", 2).await;
    // (Had the broker died before committing the disconnect, the session would count as
    // online at the crash, and its expiry would start at the restart.)
    d.wait_offline_committed("short-kill").await;
    d.sigkill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.start().await;
    drop(connect_expect(d.addr, durable(V5, "short-kill", false, 2), false).await);
    drop(connect_expect(d.addr, durable(V5, "long", false, 300), true).await);
}

/// `mqtt.v3_session_expiry_secs` applies to 3.1.1 persistent sessions across a restart,
/// and their queued messages go with the session.
#[tokio::test]
async fn v311_session_expiry_applies_across_restart() {
    let mut d = Daemon::started("[mqtt]\nv3_session_expiry_secs = 2\n").await;
    let mut c = connect_expect(d.addr, durable(V3, "v3", false, 0), false).await;
    assert_eq!(c.subscribe("e/t", QoS::AtLeastOnce).await, vec![1]);
    disconnect(c).await;
    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    publish_qos1_all(&mut publisher, "e/t", &payloads(3)).await;

    // Before the expiry the session and its queue survive a SIGKILL.
    d.kill_and_restart().await;
    let mut c = connect_expect(d.addr, durable(V3, "v3", false, 0), true).await;
    drain_in_order(&mut c, &payloads(3)).await;
    disconnect(c).await;
    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    publish_qos1_all(&mut publisher, "e/t", &payloads(3)).await;

    d.kill_and_restart().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut c = connect_expect(d.addr, durable(V3, "v3", false, 0), false).await;
    c.expect_silence(Duration::from_millis(300)).await;
}

/// Queued messages with a Message Expiry Interval: expired ones are never delivered after a
/// restart, the others carry the remaining interval.
#[tokio::test]
async fn message_expiry_of_queued_messages_counts_across_restart() {
    let mut d = Daemon::started("").await;
    let mut sub = connect_expect(d.addr, durable(V5, "sub", true, 300), false).await;
    assert_eq!(sub.subscribe("m/t", QoS::AtLeastOnce).await, vec![1]);
    disconnect(sub).await;

    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    let t0 = Instant::now();
    for (i, (payload, expiry)) in [
        (&b"short"[..], Some(2)),
        (&b"long"[..], Some(10)),
        (&b"forever"[..], None),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p: Publish = publish("m/t", payload, QoS::AtLeastOnce, i as u16 + 1);
        p.properties.message_expiry_interval = expiry;
        publisher.send(Packet::Publish(p)).await;
        expect_ack(&mut publisher, "PUBACK", i as u16 + 1).await;
    }

    d.kill_and_restart().await;
    let wait = Duration::from_millis(2500).saturating_sub(t0.elapsed());
    tokio::time::sleep(wait).await;
    let mut sub = connect_expect(d.addr, durable(V5, "sub", false, 300), true).await;
    let p = sub.recv_publish().await;
    assert_eq!(
        p.payload.as_ref(),
        b"long",
        "the expired message must not be delivered"
    );
    let left = p
        .properties
        .message_expiry_interval
        .expect("remaining expiry");
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(
        left >= 1 && f64::from(left) <= 10.0 - elapsed + 1.0,
        "remaining expiry {left} s after {elapsed:.1} s of 10 s"
    );
    sub.puback(p.packet_id).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"forever");
    assert_eq!(p.properties.message_expiry_interval, None);
    sub.puback(p.packet_id).await;
    sub.expect_silence(Duration::from_millis(300)).await;
}

async fn expect_retained(addr: SocketAddr, topic: &str, payload: Option<&[u8]>) {
    let mut c = RawClient::connect(addr, V5, "retained-reader").await;
    assert_eq!(c.subscribe(topic, QoS::AtLeastOnce).await, vec![1]);
    match payload {
        Some(want) => {
            let p = c.recv_publish().await;
            assert_eq!(p.payload.as_ref(), want);
            assert!(p.retain, "a retained message is delivered with RETAIN = 1");
            c.puback(p.packet_id).await;
        }
        None => c.expect_silence(Duration::from_millis(300)).await,
    }
    disconnect(c).await;
}

#[tokio::test]
async fn retained_messages_survive_sigkill_and_sigterm() {
    let mut d = Daemon::started("").await;
    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    for (i, topic) in ["r/keep", "r/gone"].into_iter().enumerate() {
        let mut p = publish(topic, topic.as_bytes(), QoS::AtLeastOnce, i as u16 + 1);
        p.retain = true;
        publisher.send(Packet::Publish(p)).await;
        let got = publisher.recv().await;
        assert!(
            matches!(&got, Some(Packet::PubAck(a)) if a.packet_id == i as u16 + 1 && a.reason_code < 0x80),
            "{got:?}"
        );
    }
    d.kill_and_restart().await;
    expect_retained(d.addr, "r/keep", Some(b"r/keep")).await;
    expect_retained(d.addr, "r/gone", Some(b"r/gone")).await;

    // Clearing a retained message is durable too.
    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    let mut p = publish("r/gone", b"", QoS::AtLeastOnce, 9);
    p.retain = true;
    publisher.send(Packet::Publish(p)).await;
    let got = publisher.recv().await;
    assert!(
        matches!(&got, Some(Packet::PubAck(a)) if a.packet_id == 9),
        "{got:?}"
    );
    d.kill_and_restart().await;
    expect_retained(d.addr, "r/gone", None).await;
    d.term_and_restart().await;
    expect_retained(d.addr, "r/keep", Some(b"r/keep")).await;
    expect_retained(d.addr, "r/gone", None).await;
}

fn with_will(mut c: Connect, topic: &str, payload: &[u8], delay: Option<u32>) -> Connect {
    c.will = Some(Will {
        topic: topic.into(),
        payload: bytes::Bytes::copy_from_slice(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: delay,
            ..Default::default()
        },
    });
    c
}

/// A durable watcher for will topics; returns it disconnected-and-durable if `offline`.
async fn will_watcher(addr: SocketAddr, filter: &str) -> RawClient {
    let mut w = connect_expect(addr, durable(V5, "watcher", true, 300), false).await;
    assert_eq!(w.subscribe(filter, QoS::AtLeastOnce).await, vec![1]);
    w
}

/// Will Delay 2 s on a durable v5 session; the client drops and the broker is SIGTERMed
/// right away. After the restart the will is published once the delay has passed (counted
/// from the drop), not before.
#[tokio::test]
async fn delayed_will_survives_graceful_restart_and_fires_after_the_delay() {
    let mut d = Daemon::started("").await;
    let w = will_watcher(d.addr, "will/#").await;
    disconnect(w).await;
    let c = with_will(
        durable(V5, "dying", true, 60),
        "will/dying",
        b"gone",
        Some(2),
    );
    let c = connect_expect(d.addr, c, false).await;
    let dropped = Instant::now();
    drop(c); // no DISCONNECT: the will is due after its delay
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.term_and_restart().await;
    let mut w = connect_expect(d.addr, durable(V5, "watcher", false, 300), true).await;
    let p = w.recv_publish().await;
    let at = dropped.elapsed();
    assert_eq!(p.payload.as_ref(), b"gone");
    assert_eq!(p.topic.as_ref(), "will/dying");
    assert!(
        at >= Duration::from_millis(1500),
        "will published {at:?} after the drop, its delay is 2 s"
    );
    w.puback(p.packet_id).await;
    w.expect_silence(Duration::from_millis(300)).await;
}

/// Same, but the client reconnects (resuming its session) before the delay ends: the will
/// is cancelled, also across the restart.
#[tokio::test]
async fn delayed_will_cancelled_by_reconnect_after_restart() {
    let mut d = Daemon::started("").await;
    let w = will_watcher(d.addr, "will/#").await;
    disconnect(w).await;
    let c = with_will(
        durable(V5, "dying", true, 60),
        "will/dying",
        b"gone",
        Some(2),
    );
    drop(connect_expect(d.addr, c, false).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.term_and_restart().await;
    let _back = connect_expect(d.addr, durable(V5, "dying", false, 60), true).await;
    let mut w = connect_expect(d.addr, durable(V5, "watcher", false, 300), true).await;
    w.expect_silence(Duration::from_secs(3)).await;
}

/// Sessions that were online when the broker was SIGKILLed did not disconnect normally:
/// their wills are published after the restart (v5 with and without delay, 3.1.1).
#[tokio::test]
async fn wills_of_online_durable_sessions_published_after_sigkill() {
    let mut d = Daemon::started("").await;
    let w = will_watcher(d.addr, "will/#").await;
    disconnect(w).await;
    let _a = connect_expect(
        d.addr,
        with_will(durable(V5, "a", true, 60), "will/a", b"a", None),
        false,
    )
    .await;
    let _b = connect_expect(
        d.addr,
        with_will(durable(V5, "b", true, 60), "will/b", b"b", Some(1)),
        false,
    )
    .await;
    let _c = connect_expect(
        d.addr,
        with_will(durable(V3, "c", false, 0), "will/c", b"c", None),
        false,
    )
    .await;
    d.kill_and_restart().await;
    let mut w = connect_expect(d.addr, durable(V5, "watcher", false, 300), true).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let p = w.recv_publish().await;
        w.puback(p.packet_id).await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
    w.expect_silence(Duration::from_millis(1500)).await;
}

/// Subscriptions, a shared one included, survive SIGKILL (subscriber online at the time)
/// and SIGTERM (subscriber offline).
#[tokio::test]
async fn subscriptions_survive_restarts_including_shared() {
    let mut d = Daemon::started("").await;
    let mut sub = connect_expect(d.addr, durable(V5, "sub", true, 300), false).await;
    assert_eq!(sub.subscribe("s/+/plain", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(
        sub.subscribe("$share/g/s/+/shared", QoS::AtLeastOnce).await,
        vec![1]
    );
    let mut sub3 = connect_expect(d.addr, durable(V3, "sub3", false, 0), false).await;
    assert_eq!(
        sub3.subscribe("$share/g3/s/#", QoS::AtLeastOnce).await,
        vec![1]
    );

    for round in 0..2 {
        if round == 0 {
            d.kill_and_restart().await;
        } else {
            disconnect(sub).await;
            disconnect(sub3).await;
            d.term_and_restart().await;
        }
        sub = connect_expect(d.addr, durable(V5, "sub", false, 300), true).await;
        sub3 = connect_expect(d.addr, durable(V3, "sub3", false, 0), true).await;
        let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
        for (i, topic) in ["s/a/plain", "s/b/shared", "s/c/other"].iter().enumerate() {
            publisher
                .publish(topic, topic.as_bytes(), QoS::AtLeastOnce, i as u16 + 1)
                .await;
            expect_ack(&mut publisher, "PUBACK", i as u16 + 1).await;
        }
        for want in ["s/a/plain", "s/b/shared"] {
            let p = sub.recv_publish().await;
            assert_eq!(p.topic.as_ref(), want, "round {round}");
            sub.puback(p.packet_id).await;
        }
        sub.expect_silence(Duration::from_millis(200)).await;
        for want in ["s/a/plain", "s/b/shared", "s/c/other"] {
            let p = sub3.recv_publish().await;
            assert_eq!(p.topic.as_ref(), want, "round {round}");
            sub3.puback(p.packet_id).await;
        }
        sub3.expect_silence(Duration::from_millis(200)).await;
    }
}

/// A session created without expiry (v5 expiry 0 / 3.1.1 clean session 1) and taken over,
/// while still connected, by a connection that resumes it (clean start 0) with a Session
/// Expiry Interval > 0 is a durable session from then on: what is queued for it while it is
/// offline is acknowledged to publishers, so it must survive a SIGKILL.
async fn session_made_durable_by_takeover(version: ProtocolVersion) {
    let mut d = Daemon::started("").await;
    let first = if version == V5 {
        durable(V5, "dev", true, 0)
    } else {
        connect_packet(V3, "dev", true)
    };
    let mut old = connect_expect(d.addr, first, false).await;
    assert_eq!(old.subscribe("t/u", QoS::AtLeastOnce).await, vec![1]);
    // Two messages in flight (received, not acknowledged) when the session is taken over.
    let msgs = payloads(5);
    let mut publisher = RawClient::connect(d.addr, V5, "pub").await;
    publish_qos1_all(&mut publisher, "t/u", &msgs[..2]).await;
    let mut ids = Vec::new();
    for want in &msgs[..2] {
        let p = old.recv_publish().await;
        assert_eq!(p.payload.as_ref(), &want[..]);
        ids.push(p.packet_id);
    }
    let mut new = connect_expect(d.addr, durable(version, "dev", false, 300), true).await;
    let _ = old.expect_closed().await;
    for (want, id) in msgs[..2].iter().zip(&ids) {
        let p = new.recv_publish().await;
        assert_eq!(
            (p.payload.as_ref(), p.packet_id, p.dup),
            (&want[..], *id, true)
        );
    }
    disconnect(new).await;
    // Three more queued while it is offline.
    publish_qos1_all(&mut publisher, "t/u", &msgs[2..]).await;

    d.kill_and_restart().await;
    let mut c = connect_expect(d.addr, durable(version, "dev", false, 300), true).await;
    for (want, id) in msgs[..2].iter().zip(&ids) {
        let p = c.recv_publish().await;
        assert_eq!(
            (p.payload.as_ref(), p.packet_id, p.dup),
            (&want[..], *id, true)
        );
        c.puback(*id).await;
    }
    drain_in_order(&mut c, &msgs[2..]).await;
}

#[tokio::test]
async fn session_made_durable_by_takeover_survives_sigkill_v5() {
    session_made_durable_by_takeover(V5).await;
}

#[tokio::test]
async fn session_made_durable_by_takeover_survives_sigkill_v311() {
    session_made_durable_by_takeover(V3).await;
}
