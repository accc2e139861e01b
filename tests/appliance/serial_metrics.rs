//! The serial ports' counters in `/metrics` (issue 15): a real tokio-serial port on a
//! pseudo-terminal, a JSON-lines device writing good and bad lines, and the Prometheus
//! exposition read over HTTP with the strict parser.

use crate::common::{self, metrics};
use std::time::Duration;

use common::*;
use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use holdfast::serial::config::{Format, SerialConfig};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialStream};

#[tokio::test]
async fn serial_counters_are_exposed_per_port() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("meter");
    let (mut dev, slave) = SerialStream::pair().expect("pty pair");
    std::os::unix::fs::symlink(slave.name().expect("slave name"), &link).unwrap();
    let path = link.to_string_lossy().to_string();
    let b = start_broker(move |c| {
        c.metrics.bind = Some("127.0.0.1:0".into());
        c.serial = vec![SerialConfig {
            reopen_min_ms: 50,
            reopen_max_ms: 200,
            ..SerialConfig::lines("meter", &path, Format::Json, "m/{name}")
        }];
    })
    .await;
    let addr = b.broker.as_ref().unwrap().metrics_addr().unwrap();
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "sub").await;
    sub.subscribe("m/#", QoS::AtLeastOnce).await;
    // The port opens, then the device talks: two readings, one broken line.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = metrics::http(addr, "GET", "/metrics").await;
        let m = metrics::parse_prometheus(&body);
        if m.get("holdfast_serial_open{port=\"meter\"}") == Some(&1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the port never opened:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dev.write_all(b"{\"kwh\":1}\n{\"kwh\":\n{\"kwh\":2}\n")
        .await
        .unwrap();
    for _ in 0..2 {
        loop {
            if let Some(Packet::Publish(p)) = sub.recv().await {
                sub.puback(p.packet_id).await;
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = metrics::http(addr, "GET", "/metrics").await;
        let m = metrics::parse_prometheus(&body);
        let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
        if get("holdfast_serial_readings_total{port=\"meter\",result=\"delivered\"}") == 2.0 {
            assert_eq!(
                get("holdfast_serial_readings_total{port=\"meter\",result=\"published\"}"),
                2.0
            );
            assert_eq!(
                get("holdfast_serial_dropped_total{port=\"meter\",reason=\"malformed\"}"),
                1.0
            );
            assert_eq!(get("holdfast_serial_opens_total{port=\"meter\"}"), 1.0);
            assert_eq!(get("holdfast_serial_frames_total{port=\"meter\"}"), 3.0);
            assert_eq!(get("holdfast_serial_bytes_total{port=\"meter\"}"), 28.0);
            assert_eq!(
                get("holdfast_serial_readings_in_flight{port=\"meter\"}"),
                0.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "counters never moved:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.shutdown().await;
}
