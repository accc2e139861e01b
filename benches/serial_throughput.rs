//! Serial ingest throughput: lines per second from one pseudo-terminal through the gateway
//! (tokio-serial port → raw format → router, QoS 1, committed) to a QoS 1 MQTT subscriber,
//! checking that no line is lost or reordered.
//!
//! Two runs: paced at a 115200-baud-equivalent byte rate (8N1: 11,520 bytes/s), and at full
//! speed (the pty and the gateway's backpressure set the rate).
//!
//! `cargo bench --bench serial_throughput` (release build). Options via environment:
//! `SERIAL_BENCH_SECS` (paced run length, default 5), `SERIAL_BENCH_LINES` (full-speed
//! lines, default 50000).

use std::time::{Duration, Instant};

use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use holdfast::serial::config::{Format, SerialConfig};
use holdfast_testkit::*;
use tokio::io::AsyncWriteExt;
use tokio_serial::{SerialPort, SerialStream};

const LINE_LEN: usize = 48; // bytes per line, delimiter included

fn line(i: usize) -> Vec<u8> {
    let mut l = format!("seq={i:010} t=21.50 h=40.1 p=1013.2 ").into_bytes();
    l.resize(LINE_LEN - 1, b'x');
    l.push(b'\n');
    l
}

/// Writes `count` lines, paced at `bytes_per_sec` if given; returns the master.
async fn write_lines(
    mut dev: SerialStream,
    count: usize,
    bytes_per_sec: Option<f64>,
) -> SerialStream {
    let start = Instant::now();
    let mut batch = Vec::new();
    for i in 0..count {
        batch.extend_from_slice(&line(i));
        if batch.len() >= 4096 || i + 1 == count || bytes_per_sec.is_some() {
            if let Some(rate) = bytes_per_sec {
                let due = start + Duration::from_secs_f64(((i + 1) * LINE_LEN) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            dev.write_all(&batch).await.expect("pty write");
            batch.clear();
        }
    }
    dev
}

/// Receives `count` lines in order; returns the time the last one arrived.
async fn receive(sub: &mut RawClient, count: usize) -> Instant {
    let mut next = 0usize;
    while next < count {
        match sub.recv_timeout(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => {
                if p.qos != QoS::AtMostOnce {
                    sub.puback(p.packet_id).await;
                }
                let want = line(next);
                assert_eq!(
                    &p.payload[..],
                    &want[..want.len() - 1],
                    "line {next} lost or out of order"
                );
                next += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("subscriber closed after {next} lines"),
            Err(()) => panic!("stalled: {next} of {count} lines received"),
        }
    }
    Instant::now()
}

fn plug(link: &std::path::Path) -> SerialStream {
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let name = slave.name().expect("slave name");
    drop(slave);
    std::os::unix::fs::symlink(name, link).expect("symlink");
    master
}

async fn run(label: &str, count: usize, rate: Option<f64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("tty");
    let dev = plug(&link);
    let l = link.clone();
    let b = start_broker(move |c| {
        c.serial = vec![SerialConfig::lines(
            "bench",
            &l.to_string_lossy(),
            Format::Raw,
            "bench/serial",
        )];
    })
    .await;
    let mut sys = RawClient::connect(b.addr, ProtocolVersion::V5, "sys").await;
    sys.subscribe("$SYS/holdfast/serial/bench/state", QoS::AtMostOnce)
        .await;
    loop {
        if let Some(Packet::Publish(p)) = sys.recv().await {
            if &p.payload[..] == b"open" {
                break;
            }
        }
    }
    let mut sub = RawClient::connect(b.addr, ProtocolVersion::V5, "sub").await;
    sub.subscribe("bench/serial", QoS::AtLeastOnce).await;
    let t0 = Instant::now();
    let writer = tokio::spawn(write_lines(dev, count, rate));
    let done = receive(&mut sub, count).await;
    let _dev = writer.await.expect("writer");
    let secs = done.duration_since(t0).as_secs_f64();
    println!(
        "{label}: {count} lines ({} bytes each) in {secs:.2} s = {:.0} lines/s ({:.0} bytes/s), 0 lost, in order",
        LINE_LEN,
        count as f64 / secs,
        (count * LINE_LEN) as f64 / secs
    );
    b.shutdown().await;
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let baud_bytes = 115_200.0 / 10.0; // 8N1: 10 bits per byte
        let secs = env("SERIAL_BENCH_SECS", 5);
        let paced = (baud_bytes * secs as f64 / LINE_LEN as f64) as usize;
        run("115200-baud pace", paced, Some(baud_bytes)).await;
        run("full speed", env("SERIAL_BENCH_LINES", 50_000), None).await;
    });
}
