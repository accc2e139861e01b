//! Interoperability with Debian's `mosquitto_pub` / `mosquitto_sub` (MQTT 3.1, 3.1.1 and
//! 5.0). Skipped loudly when the tools are missing, failing instead with HOLDFAST_INTEROP=1.

use crate::common;
use std::process::{Output, Stdio};

use std::time::Duration;
use tokio::process::{Child, Command};

use common::*;
use holdfast::protocol::{ProtocolVersion, QoS};

fn sub(port: u16, args: &[&str]) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-W", "10"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mosquitto_sub")
}

async fn publ(port: u16, args: &[&str]) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("spawn mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn finish(child: Child) -> Output {
    child
        .wait_with_output()
        .await
        .expect("wait for mosquitto_sub")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "mosquitto_sub failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Gives a freshly started mosquitto_sub time to connect and subscribe.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

#[tokio::test]
async fn mosquitto_clients_exchange_qos_0_1_2_in_all_versions() {
    if !have_mosquitto_tools() {
        return;
    }
    let b = start_broker(|_| {}).await;
    let port = b.addr.port();
    for v in ["mqttv31", "mqttv311", "mqttv5"] {
        let s = sub(port, &["-V", v, "-q", "2", "-t", "io/#", "-C", "3", "-v"]);
        settle().await;
        for q in ["0", "1", "2"] {
            publ(
                port,
                &[
                    "-V",
                    v,
                    "-q",
                    q,
                    "-t",
                    &format!("io/q{q}"),
                    "-m",
                    &format!("{v}-{q}"),
                ],
            )
            .await;
        }
        let out = stdout(&finish(s).await);
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            vec![
                format!("io/q0 {v}-0"),
                format!("io/q1 {v}-1"),
                format!("io/q2 {v}-2")
            ],
            "{v}"
        );
    }
    b.shutdown().await;
}

#[tokio::test]
async fn mosquitto_clients_see_retained_messages_and_deletion() {
    if !have_mosquitto_tools() {
        return;
    }
    let b = start_broker(|_| {}).await;
    let port = b.addr.port();
    publ(port, &["-r", "-q", "1", "-t", "ret/a", "-m", "kept"]).await;
    let s = sub(port, &["-t", "ret/#", "-C", "1", "-F", "%r %t %p"]);
    assert_eq!(stdout(&finish(s).await).trim(), "1 ret/a kept");
    publ(port, &["-r", "-q", "1", "-t", "ret/a", "-n"]).await;
    let s = sub(port, &["-t", "ret/#", "-C", "1", "-W", "1"]);
    let o = finish(s).await;
    assert!(o.stdout.is_empty(), "retained message was deleted");
    b.shutdown().await;
}

#[tokio::test]
async fn mosquitto_v5_properties_pass_through() {
    if !have_mosquitto_tools() {
        return;
    }
    let b = start_broker(|_| {}).await;
    let port = b.addr.port();
    let s = sub(
        port,
        &[
            "-V",
            "mqttv5",
            "-t",
            "props",
            "-C",
            "1",
            "-F",
            "%t|%p|%C|%R|%E|%P",
        ],
    );
    settle().await;
    publ(
        port,
        &[
            "-V",
            "mqttv5",
            "-t",
            "props",
            "-m",
            "body",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "response-topic",
            "answers",
            "-D",
            "publish",
            "message-expiry-interval",
            "300",
            "-D",
            "publish",
            "user-property",
            "site",
            "north",
        ],
    )
    .await;
    let out = stdout(&finish(s).await);
    let line = out.trim();
    let parts: Vec<&str> = line.split('|').collect();
    assert_eq!(
        &parts[..4],
        ["props", "body", "text/plain", "answers"],
        "{line}"
    );
    let expiry: u32 = parts[4].parse().unwrap_or(0);
    assert!((298..=300).contains(&expiry), "{line}");
    assert!(
        parts[5].contains("site") && parts[5].contains("north"),
        "{line}"
    );
    b.shutdown().await;
}

#[tokio::test]
async fn mosquitto_sub_will_is_published_when_it_is_killed() {
    if !have_mosquitto_tools() {
        return;
    }
    let b = start_broker(|_| {}).await;
    let mut watcher = RawClient::connect(b.addr, ProtocolVersion::V311, "watcher").await;
    watcher.subscribe("lwt/#", QoS::AtMostOnce).await;
    let mut victim = sub(
        b.addr.port(),
        &[
            "-t",
            "anything",
            "--will-topic",
            "lwt/victim",
            "--will-payload",
            "offline",
            "-W",
            "30",
        ],
    );
    settle().await;
    victim.kill().await.expect("kill mosquitto_sub");
    let p = watcher.recv_publish().await;
    assert_eq!((&*p.topic, &p.payload[..]), ("lwt/victim", &b"offline"[..]));
    b.shutdown().await;
}

#[tokio::test]
async fn mosquitto_shared_subscription_and_persistent_session() {
    if !have_mosquitto_tools() {
        return;
    }
    let b = start_broker(|_| {}).await;
    let port = b.addr.port();
    // A persistent v3.1.1 session: subscribe, go away, messages queue, come back.
    let s = sub(
        port,
        &["-c", "-i", "persist", "-q", "1", "-t", "pq/#", "-C", "1"],
    );
    settle().await;
    publ(port, &["-q", "1", "-t", "pq/a", "-m", "first"]).await;
    assert_eq!(stdout(&finish(s).await).trim(), "first");
    for m in ["m1", "m2", "m3"] {
        publ(port, &["-q", "1", "-t", "pq/a", "-m", m]).await;
    }
    let s = sub(
        port,
        &["-c", "-i", "persist", "-q", "1", "-t", "pq/#", "-C", "3"],
    );
    assert_eq!(
        stdout(&finish(s).await).lines().collect::<Vec<_>>(),
        ["m1", "m2", "m3"]
    );

    // Shared subscription: two v5 members split four messages.
    let a = sub(port, &["-V", "mqttv5", "-t", "$share/g/sh", "-C", "2"]);
    let c = sub(port, &["-V", "mqttv5", "-t", "$share/g/sh", "-C", "2"]);
    settle().await;
    for i in 0..4 {
        publ(port, &["-t", "sh", "-m", &i.to_string()]).await;
    }
    let mut all: Vec<String> = stdout(&finish(a).await).lines().map(String::from).collect();
    all.extend(stdout(&finish(c).await).lines().map(String::from));
    all.sort();
    assert_eq!(all, ["0", "1", "2", "3"]);
    b.shutdown().await;
}
