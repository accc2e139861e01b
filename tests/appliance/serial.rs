//! Serial ingest end to end: pseudo-terminals stand in for the devices (the test writes on
//! the master side; the gateway opens the real tokio-serial port on the slave's path, through
//! a symlink like `/dev/serial/by-id/...`), and a real MQTT subscriber on the broker checks
//! what comes out. Every format, partial writes, garbage, unplug/replug, backpressure and a
//! Modbus RTU device simulated with tokio-modbus's server.

use crate::common;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use holdfast::protocol::{Packet, ProtocolVersion, Publish, QoS};
use holdfast::serial::config::{
    Format, ModbusDevice, Register, RegisterKind, RegisterType, SerialConfig, WordOrder,
};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialStream};

/// Creates a pty pair and points `link` at its slave (atomically, like udev would). The
/// returned master is the "device"; dropping it unplugs the device.
fn plug(link: &Path) -> SerialStream {
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let name = slave.name().expect("slave name");
    drop(slave);
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename symlink");
    master
}

fn port(name: &str, link: &Path, format: Format, topic: &str) -> SerialConfig {
    SerialConfig {
        reopen_min_ms: 50,
        reopen_max_ms: 200,
        ..SerialConfig::lines(name, &link.to_string_lossy(), format, topic)
    }
}

async fn subscriber(addr: std::net::SocketAddr, id: &str, filter: &str) -> RawClient {
    let mut c = RawClient::connect(addr, ProtocolVersion::V5, id).await;
    let codes = c.subscribe(filter, QoS::AtLeastOnce).await;
    assert!(codes[0] < 0x80, "{codes:?}");
    c
}

/// The next PUBLISH, acknowledged.
async fn next(c: &mut RawClient) -> Publish {
    loop {
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                if p.qos != QoS::AtMostOnce {
                    c.puback(p.packet_id).await;
                }
                return p;
            }
            Some(_) => continue,
            None => panic!("subscriber connection closed"),
        }
    }
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// Waits for a retained `$SYS/holdfast/serial/<name>/state` equal to `want`.
async fn wait_state(sys: &mut RawClient, name: &str, want: &str) {
    wait_states(sys, &[name], want).await
}

/// Waits until every port in `names` has reported state `want`.
async fn wait_states(sys: &mut RawClient, names: &[&str], want: &str) {
    let mut missing: Vec<String> = names
        .iter()
        .map(|n| format!("$SYS/holdfast/serial/{n}/state"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !missing.is_empty() {
        let p = next(sys).await;
        if &p.payload[..] == want.as_bytes() {
            missing.retain(|t| t != &*p.topic);
        }
    }
    assert!(
        missing.is_empty(),
        "never reached state {want}: {missing:?}"
    );
}

/// Waits for `$SYS/holdfast/serial/<name>/stats` satisfying `ok`, returns it.
async fn wait_stats(sys: &mut RawClient, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("$SYS/holdfast/serial/{name}/stats");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let p = next(sys).await;
        if *p.topic == topic {
            last = serde_json::from_slice(&p.payload).expect("stats are JSON");
            if ok(&last) {
                return last;
            }
        }
    }
    panic!("{name}: stats never matched; last {last}");
}

async fn sys_client(addr: std::net::SocketAddr, id: &str) -> RawClient {
    subscriber(addr, id, "$SYS/holdfast/serial/#").await
}

fn dev_dir() -> (tempfile::TempDir, impl Fn(&str) -> PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().to_path_buf();
    (d, move |n: &str| base.join(n))
}

#[tokio::test]
async fn every_line_format_with_partial_writes_on_four_ports_at_once() {
    let (_d, at) = dev_dir();
    let mut raw = plug(&at("raw"));
    let mut js = plug(&at("json"));
    let mut csv = plug(&at("csv"));
    let mut gps = plug(&at("gps"));
    let (ra, ja, ca, ga) = (at("raw"), at("json"), at("csv"), at("gps"));
    let b = start_broker(move |c| {
        let mut r = port("raw0", &ra, Format::Raw, "lines/{name}");
        r.timestamp = true;
        let mut j = port("json0", &ja, Format::Json, "sensors/{device}/{field.id}");
        j.timestamp = true;
        let mut s = port("csv0", &ca, Format::Csv, "csv/{field.room}");
        s.columns = vec!["room".into(), "temp".into(), "hum".into()];
        s.csv_separator = ";".into();
        s.delimiter = "\r\n".into();
        let g = port("gps0", &ga, Format::Nmea, "gps/{name}/{sentence}");
        c.serial = vec![r, j, s, g];
    })
    .await;
    let mut sys = sys_client(b.addr, "sys").await;
    wait_states(&mut sys, &["raw0", "json0", "csv0", "gps0"], "open").await;
    let mut sub = subscriber(b.addr, "sub", "#").await;

    // raw, split in three writes.
    for part in [&b"hel"[..], b"lo wor", b"ld\r\nsecond\n"] {
        raw.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let p = next(&mut sub).await;
    assert_eq!(
        (&*p.topic, text(&p).as_str()),
        ("lines/raw0", "hello world")
    );
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert!(
        p.properties.user_properties.iter().any(|(k, _)| k == "ts"),
        "raw + timestamp → user property"
    );
    let synced = holdfast::clock::synchronised().to_string();
    assert!(
        p.properties
            .user_properties
            .iter()
            .any(|(k, v)| k == "ts_synced" && *v == synced),
        "raw + timestamp → ts_synced user property: {:?}",
        p.properties.user_properties
    );
    assert_eq!(text(&next(&mut sub).await), "second");

    // json, a field in the topic, split mid-token.
    js.write_all(br#"{"id":"t-1","te"#).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    js.write_all(b"mp\":21.5}\n").await.unwrap();
    let p = next(&mut sub).await;
    assert_eq!(&*p.topic, "sensors/json0/t-1");
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["temp"], 21.5);
    assert!(v["ts"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(
        v["ts_synced"].as_bool(),
        Some(holdfast::clock::synchronised()),
        "the timestamp says whether the clock was synchronised: {v}"
    );

    // csv with CRLF and a custom separator.
    csv.write_all(b"kitchen; 21.5;40\r\n").await.unwrap();
    let p = next(&mut sub).await;
    assert_eq!(&*p.topic, "csv/kitchen");
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"room": "kitchen", "temp": 21.5, "hum": 40})
    );

    // nmea, checksum verified, sentence type in the topic.
    let gga = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
    let rmc = holdfast::serial::format::nmea_with_checksum(
        "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W",
    );
    gps.write_all(format!("{gga}\r\n{rmc}\r\n").as_bytes())
        .await
        .unwrap();
    let p = next(&mut sub).await;
    assert_eq!(&*p.topic, "gps/gps0/GPGGA");
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["raw"], gga);
    assert_eq!(v["fields"][0], "123519");
    assert_eq!(&*next(&mut sub).await.topic, "gps/gps0/GPRMC");

    let st = wait_stats(&mut sys, "gps0", |s| s["delivered"] == 2).await;
    assert_eq!(st["state"], "open");
    assert_eq!(st["inflight"], 0);
    b.shutdown().await;
}

#[tokio::test]
async fn garbage_is_counted_and_dropped_and_valid_lines_still_flow() {
    let (_d, at) = dev_dir();
    let mut js = plug(&at("json"));
    let mut gps = plug(&at("gps"));
    let (ja, ga) = (at("json"), at("gps"));
    let b = start_broker(move |c| {
        let mut j = port("j", &ja, Format::Json, "g/{name}");
        j.max_frame_bytes = 64;
        let g = port("n", &ga, Format::Nmea, "g/{name}/{type}");
        c.serial = vec![j, g];
    })
    .await;
    let mut sys = sys_client(b.addr, "sys").await;
    wait_states(&mut sys, &["j", "n"], "open").await;
    let mut sub = subscriber(b.addr, "sub", "g/#").await;

    let long = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(500));
    js.write_all(long.as_bytes()).await.unwrap(); // over-long
    js.write_all(b"\xff\xfe{}\n").await.unwrap(); // invalid UTF-8
    js.write_all(b"{\"a\":\n").await.unwrap(); // malformed JSON
    js.write_all(b"\x00\x01\x02 binary noise\n").await.unwrap(); // malformed JSON
    js.write_all(b"{\"ok\":1}\n").await.unwrap();
    let p = next(&mut sub).await;
    assert_eq!((&*p.topic, text(&p).as_str()), ("g/j", "{\"ok\":1}"));
    let st = wait_stats(&mut sys, "j", |s| s["delivered"] == 1).await;
    assert_eq!(st["dropped_too_long"], 1, "{st}");
    assert_eq!(st["dropped_utf8"], 1, "{st}");
    assert_eq!(st["dropped_malformed"], 2, "{st}");

    gps.write_all(b"$GPGGA,123519,4807.038,N*00\r\n")
        .await
        .unwrap(); // bad checksum
    gps.write_all(b"GPGGA no dollar\r\n").await.unwrap(); // malformed
    let ok = holdfast::serial::format::nmea_with_checksum("$GPGSA,A,3,04,05");
    gps.write_all(format!("{ok}\r\n").as_bytes()).await.unwrap();
    assert_eq!(&*next(&mut sub).await.topic, "g/n/GSA");
    let st = wait_stats(&mut sys, "n", |s| s["delivered"] == 1).await;
    assert_eq!(st["dropped_checksum"], 1, "{st}");
    assert_eq!(st["dropped_malformed"], 1, "{st}");
    b.shutdown().await;
}

#[tokio::test]
async fn missing_at_start_then_unplugged_and_replugged_at_the_same_path() {
    let (_d, at) = dev_dir();
    let link = at("by-id-sensor");
    let l2 = link.clone();
    let b = start_broker(move |c| {
        c.serial = vec![port("p", &l2, Format::Raw, "u/{name}")];
    })
    .await;
    let mut sys = sys_client(b.addr, "sys").await;
    // Missing at start-up: the daemon runs, the port is retried.
    let st = wait_stats(&mut sys, "p", |s| s["last_error"].is_string()).await;
    assert_eq!(st["state"], "closed");
    assert_eq!(st["opens"], 0);
    let mut sub = subscriber(b.addr, "sub", "u/#").await;

    let mut dev = plug(&link);
    wait_state(&mut sys, "p", "open").await;
    dev.write_all(b"one\ntw").await.unwrap();
    assert_eq!(text(&next(&mut sub).await), "one");

    // Unplug (the partial "tw" goes with it), then plug a new device at the same path.
    drop(dev);
    wait_state(&mut sys, "p", "closed").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut dev = plug(&link);
    wait_state(&mut sys, "p", "open").await;
    dev.write_all(b"two\n").await.unwrap();
    assert_eq!(text(&next(&mut sub).await), "two");
    let st = wait_stats(&mut sys, "p", |s| s["opens"] == 2 && s["delivered"] == 2).await;
    assert_eq!(st["state"], "open");
    b.shutdown().await;
}

#[tokio::test]
async fn backpressure_small_window_loses_nothing_and_keeps_order() {
    let (_d, at) = dev_dir();
    let mut dev = plug(&at("fast"));
    let a = at("fast");
    let b = start_broker(move |c| {
        let mut p = port("fast", &a, Format::Raw, "bp/{name}");
        p.inflight = 4;
        c.serial = vec![p];
    })
    .await;
    let mut sys = sys_client(b.addr, "sys").await;
    wait_state(&mut sys, "fast", "open").await;
    let mut sub = subscriber(b.addr, "sub", "bp/#").await;
    const N: usize = 3000;
    let writer = tokio::spawn(async move {
        let mut all = Vec::new();
        for i in 0..N {
            all.extend_from_slice(format!("line {i:05}\n").as_bytes());
        }
        // Large writes: the pty buffer fills, the writer waits on the reader.
        for chunk in all.chunks(1000) {
            dev.write_all(chunk).await.unwrap();
        }
        dev
    });
    for i in 0..N {
        let p = next(&mut sub).await;
        assert_eq!(text(&p), format!("line {i:05}"), "in order, none lost");
    }
    let _dev = writer.await.unwrap();
    let st = wait_stats(&mut sys, "fast", |s| s["delivered"] == N).await;
    assert_eq!(st["frames"], N);
    b.shutdown().await;
}

#[tokio::test]
async fn serial_client_ids_are_reserved() {
    let b = start_broker(|_| {}).await;
    let (_, ack) = RawClient::connect_with(
        b.addr,
        connect_packet(ProtocolVersion::V5, "$serial/gps0", true),
    )
    .await;
    match ack {
        Packet::ConnAck(a) => assert_eq!(a.reason_code, 0x85, "client id not valid"),
        other => panic!("{other:?}"),
    }
    b.shutdown().await;
}

/// A simulated Modbus bus: unit 1 answers, unit 2 answers with exceptions, unit 3 is silent.
#[derive(Clone)]
struct Bus;

impl tokio_modbus::server::Service for Bus {
    type Request = tokio_modbus::SlaveRequest<'static>;
    type Response = Option<tokio_modbus::Response>;
    type Exception = tokio_modbus::ExceptionCode;
    type Future = std::future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        use tokio_modbus::{ExceptionCode, Request as Q, Response as R};
        let bits = 230.5f32.to_bits();
        let r = match (req.slave, req.request) {
            (1, Q::ReadHoldingRegisters(0, 1)) => {
                Ok(Some(R::ReadHoldingRegisters(vec![(-125i16) as u16])))
            }
            // Little word order: low word first.
            (1, Q::ReadInputRegisters(2, 2)) => Ok(Some(R::ReadInputRegisters(vec![
                bits as u16,
                (bits >> 16) as u16,
            ]))),
            (1, Q::ReadCoils(5, 1)) => Ok(Some(R::ReadCoils(vec![true]))),
            (1, _) | (2, _) => Err(ExceptionCode::IllegalDataAddress),
            _ => Ok(None),
        };
        std::future::ready(r)
    }
}

fn reg(device: &str, name: &str, kind: RegisterKind, address: u16, ty: RegisterType) -> Register {
    Register {
        device: Some(device.into()),
        name: name.into(),
        kind,
        address,
        ty,
        word_order: WordOrder::Big,
        scale: 1.0,
        offset: 0.0,
    }
}

#[tokio::test]
async fn modbus_rtu_devices_polled_on_a_pty() {
    let (_d, at) = dev_dir();
    let master = plug(&at("rs485"));
    let a = at("rs485");
    let b = start_broker(move |c| {
        let mut p = port("bus", &a, Format::ModbusRtu, "meters/{name}/{device}");
        p.baud = 19200;
        p.parity = holdfast::serial::config::Parity::Even;
        p.poll_interval_ms = 200;
        p.response_timeout_ms = 150;
        p.timestamp = true;
        p.device = vec![
            ModbusDevice {
                name: "m1".into(),
                unit_id: 1,
            },
            ModbusDevice {
                name: "m2".into(),
                unit_id: 2,
            },
            ModbusDevice {
                name: "m3".into(),
                unit_id: 3,
            },
        ];
        let mut temp = reg("m1", "temp", RegisterKind::Holding, 0, RegisterType::I16);
        temp.scale = 0.1;
        let mut power = reg("m1", "power", RegisterKind::Input, 2, RegisterType::F32);
        power.word_order = WordOrder::Little;
        p.register = vec![
            temp,
            power,
            reg("m1", "relay", RegisterKind::Coil, 5, RegisterType::Bool),
            reg("m2", "x", RegisterKind::Holding, 9, RegisterType::U16),
            reg("m3", "y", RegisterKind::Holding, 0, RegisterType::U16),
        ];
        c.serial = vec![p];
        c.metrics.bind = Some("127.0.0.1:0".into());
    })
    .await;
    let mut sys = sys_client(b.addr, "sys").await;
    wait_state(&mut sys, "bus", "open").await;
    // Only now: reading the master while no one has the slave open fails with EIO.
    let server = tokio::spawn(tokio_modbus::server::rtu::Server::new(master).serve_forever(Bus));
    let mut sub = subscriber(b.addr, "sub", "meters/#").await;
    for _ in 0..2 {
        let p = next(&mut sub).await;
        assert_eq!(&*p.topic, "meters/bus/m1", "only m1 answers");
        let mut v: Value = serde_json::from_slice(&p.payload).unwrap();
        assert!(v["ts"].as_i64().unwrap() > 1_600_000_000_000);
        v.as_object_mut().unwrap().remove("ts");
        let synced = v.as_object_mut().unwrap().remove("ts_synced");
        assert_eq!(synced, Some(json!(holdfast::clock::synchronised())));
        assert_eq!(
            v,
            json!({"device": "m1", "unit": 1, "temp": -12.5, "power": 230.5, "relay": true})
        );
    }
    let st = wait_stats(&mut sys, "bus", |s| {
        s["devices"]["m2"]["exceptions"].as_u64() >= Some(2)
            && s["devices"]["m3"]["timeouts"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(st["devices"]["m2"]["ok"], 0, "{st}");
    assert_eq!(st["devices"]["m3"]["ok"], 0, "{st}");
    assert!(st["devices"]["m1"]["ok"].as_u64() >= Some(2), "{st}");
    // The same counters per device and result in /metrics (issue 15), strictly parsed.
    let metrics_addr = b.broker.as_ref().unwrap().metrics_addr().unwrap();
    let (_, _, body) = crate::common::metrics::http(metrics_addr, "GET", "/metrics").await;
    let m = crate::common::metrics::parse_prometheus(&body);
    let polls = |device: &str, result: &str| {
        m.get(&format!(
            "holdfast_modbus_polls_total{{port=\"bus\",device=\"{device}\",result=\"{result}\"}}"
        ))
        .copied()
        .unwrap_or(-1.0)
    };
    assert!(polls("m1", "ok") >= 2.0, "{body}");
    assert!(polls("m2", "exception") >= 2.0, "{body}");
    assert!(polls("m3", "timeout") >= 2.0, "{body}");
    assert_eq!(polls("m2", "ok"), 0.0, "{body}");
    assert_eq!(polls("m3", "ok"), 0.0, "{body}");
    server.abort();
    b.shutdown().await;
}
