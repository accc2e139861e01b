//! `holdfast pub` / `holdfast sub`: the operator's MQTT client (rumqttc) against a real
//! broker on 127.0.0.1, checked from the other side with a raw client.

use crate::common;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use holdfast::protocol::{ProtocolVersion, QoS};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn holdfast_pub_publishes_and_waits_for_the_acknowledgement() {
    let b = start_broker(|_| {}).await;
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "watcher").await;
    assert_eq!(sub.subscribe("probe/#", QoS::AtLeastOnce).await, vec![1]);
    let port = b.addr.port().to_string();
    let out = tokio::process::Command::new(crate::common::bin())
        .args([
            "pub", "-p", &port, "-t", "probe/x", "-m", "hello", "-q", "1",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = sub.recv_publish().await;
    assert_eq!((&*p.topic, &p.payload[..]), ("probe/x", &b"hello"[..]));
    b.shutdown().await;
}

#[tokio::test]
async fn holdfast_sub_prints_what_arrives_and_stops_after_count() {
    let b = start_broker(|_| {}).await;
    let port = b.addr.port().to_string();
    let mut child = tokio::process::Command::new(crate::common::bin())
        .args(["sub", "-p", &port, "-t", "probe/#", "-C", "1", "-W", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut publisher = RawClient::connect(b.addr, ProtocolVersion::V311, "sensor").await;
    // Publish until the subscriber (a separate process) is subscribed and takes one.
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let read = async {
        stdout.read_to_string(&mut out).await.unwrap();
    };
    let publish = async {
        for _ in 0..50 {
            publisher
                .publish("probe/y", b"world", QoS::AtMostOnce, 0)
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = read => {}
        _ = publish => panic!("holdfast sub never printed a message"),
    }
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert_eq!(out, "probe/y world\n");
    b.shutdown().await;
}

#[tokio::test]
async fn holdfast_pub_to_a_refusing_broker_fails_with_the_reason() {
    let b = start_broker(|c| c.mqtt.allow_anonymous = false).await;
    let port = b.addr.port().to_string();
    let out = tokio::process::Command::new(crate::common::bin())
        .args(["pub", "-p", &port, "-t", "probe/x", "-m", "no"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused") || err.contains("Refused"), "{err}");
    b.shutdown().await;
}
