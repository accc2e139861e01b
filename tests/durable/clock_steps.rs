//! Wall clock steps (issue 17, item 4): gateways without a real-time clock boot at 1970 and
//! NTP steps the clock later. The real binary runs with its wall clock shifted by the
//! TEST ONLY variable `HOLDFAST_TEST_WALL_CLOCK_OFFSET_SECS`; no session expiry, will
//! delay or message expiry may fire for time that did not pass, while time that did pass
//! (the broker running) still counts.

use crate::common::{self, daemon};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use daemon::Daemon;
use holdfast::clock::TEST_WALL_CLOCK_OFFSET_ENV;
use holdfast::protocol::{
    ConnAck, Connect, Packet, ProtocolVersion, Publish, QoS, Will, WillProperties,
};

const V5: ProtocolVersion = ProtocolVersion::V5;
const DAY: u32 = 86_400;

/// The offset that puts the wall clock at 1970-01-02T00:00:00Z.
fn offset_to_1970_01_02() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    (i64::from(DAY) - now).to_string()
}

fn set_wall_clock(d: &mut Daemon, offset: Option<String>) {
    d.env.retain(|(k, _)| k != TEST_WALL_CLOCK_OFFSET_ENV);
    if let Some(o) = offset {
        d.env.push((TEST_WALL_CLOCK_OFFSET_ENV.into(), o));
    }
}

fn durable(id: &str, clean_start: bool, expiry: u32) -> Connect {
    let mut c = connect_packet(V5, id, clean_start);
    c.properties.session_expiry_interval = Some(expiry);
    c
}

/// Connects; returns the client and CONNACK's Session Present.
async fn connect(addr: SocketAddr, c: Connect) -> (RawClient, bool) {
    let id = c.client_id.clone();
    match RawClient::connect_with(addr, c).await {
        (
            client,
            Packet::ConnAck(ConnAck {
                reason_code: 0,
                session_present,
                ..
            }),
        ) => (client, session_present),
        (_, other) => panic!("{id}: connect refused: {other:?}"),
    }
}

async fn disconnect(mut c: RawClient) {
    c.send(Packet::Disconnect(Default::default())).await;
    let _ = c.recv_timeout(Duration::from_secs(2)).await;
}

/// An offline durable subscriber `id` on `topic`.
async fn offline_subscriber(d: &Daemon, id: &str, expiry: u32, topic: &str) {
    let (mut c, _) = connect(d.addr, durable(id, true, expiry)).await;
    assert_eq!(c.subscribe(topic, QoS::AtLeastOnce).await, vec![1]);
    disconnect(c).await;
    d.wait_offline_committed(id).await;
}

/// Publishes `n` QoS 1 messages with a Message Expiry Interval, each acknowledged (stored).
async fn publish_expiring(d: &Daemon, topic: &str, n: u16, expiry: u32) {
    let mut p = RawClient::connect(d.addr, V5, "publisher").await;
    for i in 1..=n {
        let mut m: Publish = publish(topic, format!("m{i}").as_bytes(), QoS::AtLeastOnce, i);
        m.properties.message_expiry_interval = Some(expiry);
        p.send(Packet::Publish(m)).await;
        match p.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == i && a.reason_code == 0 => {}
            other => panic!("expected a PUBACK for {i}, got {other:?}"),
        }
    }
    disconnect(p).await;
}

/// `holdfast sessions show <id> --json` against the daemon's config.
async fn show_session(d: &Daemon, id: &str) -> serde_json::Value {
    let args: Vec<String> = vec![
        "sessions".into(),
        "show".into(),
        id.into(),
        "--json".into(),
        "--config".into(),
        d.config.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::common::bin())
            .args(&args)
            .output()
            .expect("run holdfast")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "sessions show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The reproduction: at 1970-01-02 a v5 session (expiry 1 day) goes offline and 10
/// messages (expiry 1 hour) are queued for it; the broker dies; it starts again with the
/// real clock (56 years later). The session and all 10 messages are still there, with
/// (almost) all of their hour left, and a will delayed by an hour is not sent.
#[tokio::test]
async fn a_session_and_its_messages_queued_at_1970_survive_a_restart_at_the_real_time() {
    let mut d = Daemon::new("");
    set_wall_clock(&mut d, Some(offset_to_1970_01_02()));
    d.start().await;
    offline_subscriber(&d, "pi-sensor", DAY, "c/#").await;
    publish_expiring(&d, "c/t", 10, 3600).await;
    // A client with a will delayed by an hour drops off (no DISCONNECT).
    let mut c = durable("pi-will", true, DAY);
    c.will = Some(Will {
        topic: "c/will".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(3600),
            ..Default::default()
        },
    });
    drop(connect(d.addr, c).await);
    d.wait_offline_committed("pi-will").await;

    d.sigkill();
    set_wall_clock(&mut d, None);
    d.start().await;

    // The operator sees wall-clock times, not the 1970 the session was stored at.
    let shown = show_session(&d, "pi-sensor").await;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    let disconnected = shown["session"]["disconnected_at_ms"]
        .as_i64()
        .expect("offline");
    assert!(
        (now_ms - disconnected).abs() < 600_000,
        "disconnected_at shown as {disconnected}, now is {now_ms}"
    );
    let expires = shown["queue"][0]["expires_at_ms"].as_i64().expect("expiry");
    assert!(
        (expires - (now_ms + 3_600_000)).abs() < 600_000,
        "message expiry shown as {expires}, now is {now_ms}"
    );

    let (mut c, present) = connect(d.addr, durable("pi-sensor", false, DAY)).await;
    assert!(
        present,
        "the session expired for 56 years that did not pass\n{}",
        d.log_text()
    );
    for i in 1..=10 {
        let p = c.recv_publish().await;
        assert_eq!(p.payload.as_ref(), format!("m{i}").as_bytes());
        let left = p.properties.message_expiry_interval.expect("expiry kept");
        assert!(left > 3500, "message {i}: {left} s of 3600 left");
        c.puback(p.packet_id).await;
    }
    // Nothing else: in particular not the will, whose hour has not passed.
    c.expect_silence(Duration::from_millis(500)).await;
}

/// With the clock stuck near 1970 in both runs, countdowns still run on the time that
/// passes while the broker runs (a monotonic clock), and a restart neither expires nor
/// resets them: a 3 s session expiry that had 1.5 s left before a restart ends about 1.5 s
/// after it, while a long one survives.
#[tokio::test]
async fn countdowns_run_while_the_broker_runs_whatever_the_wall_clock_says() {
    let mut d = Daemon::new("[store]\nsweep_interval_secs = 1\n");
    set_wall_clock(&mut d, Some(offset_to_1970_01_02()));
    d.start().await;
    offline_subscriber(&d, "short", 3, "s/t").await;
    offline_subscriber(&d, "long", 300, "s/t").await;
    publish_expiring(&d, "s/t", 1, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.sigterm().await;
    // The clock goes back an hour (a fake-hwclock older than the last run).
    set_wall_clock(
        &mut d,
        Some((offset_to_1970_01_02().parse::<i64>().unwrap() - 3600).to_string()),
    );
    d.start().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (c, present) = connect(d.addr, durable("short", false, 3)).await;
    assert!(!present, "a 3 s session lived for 4 s of running broker");
    drop(c);
    let (mut c, present) = connect(d.addr, durable("long", false, 300)).await;
    assert!(present, "the long session was lost\n{}", d.log_text());
    // Its message had a 2 s expiry: gone, by time that did pass.
    c.expect_silence(Duration::from_millis(500)).await;
}

/// A bridge outbox with `max_age_secs = 3600`, filled at 1970-01-02 while the upstream is
/// unreachable, then a crash and a start with the real clock: every message still goes up.
#[tokio::test]
async fn a_bridge_outbox_filled_at_1970_is_not_aged_out_by_the_clock_step() {
    let mut up = Daemon::new("");
    let mut gw = Daemon::new(&format!(
        "[[bridge]]\nname = \"up\"\naddress = \"{}\"\nclient_id = \"gw-clock\"\n\
         reconnect_min_ms = 50\nreconnect_max_ms = 200\nmax_age_secs = 3600\n\
         [[bridge.topic]]\npattern = \"s/#\"\ndirection = \"out\"\n",
        up.addr
    ));
    set_wall_clock(&mut gw, Some(offset_to_1970_01_02()));
    gw.start().await;
    let mut p = RawClient::connect(gw.addr, V5, "sensor").await;
    for i in 1..=5u16 {
        p.publish("s/x", format!("b{i}").as_bytes(), QoS::AtLeastOnce, i)
            .await;
        match p.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == i && a.reason_code == 0 => {}
            other => panic!("expected a PUBACK for {i}, got {other:?}"),
        }
    }
    drop(p);
    gw.sigkill();

    up.start().await;
    let mut sub = RawClient::connect(up.addr, V5, "cloud-app").await;
    assert_eq!(sub.subscribe("s/#", QoS::AtLeastOnce).await, vec![1]);
    set_wall_clock(&mut gw, None);
    gw.start().await;
    for i in 1..=5 {
        let m = sub.recv_publish().await;
        assert_eq!(
            m.payload.as_ref(),
            format!("b{i}").as_bytes(),
            "\n{}",
            gw.log_text()
        );
        sub.puback(m.packet_id).await;
    }
}
