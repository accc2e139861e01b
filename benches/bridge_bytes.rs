//! Bytes on the uplink: IP bytes per message between the gateway and the upstream, both
//! directions, TCP/IP headers included, at a low steady rate (the metered-LTE case).
//!
//! `cargo bench --bench bridge_bytes [-- --seconds S] [--rate R] [--reps N]
//! [--mosquitto PATH]` (root, `tcpdump` installed; default 30 s at 10 msg/s, one rep:
//! about 3 minutes)
//!
//! Topology: a local QoS 1 publisher (64-byte payloads on `bench/sensor/0`, one PUBACK
//! awaited at a time) → gateway → bridge (QoS 1) → upstream Mosquitto; a cloud subscriber
//! reads the upstream on a second listener, so the capture (`tcpdump -i lo tcp port
//! <bridge listener>`) sees the bridge's connection only. Counted: every IP packet of that
//! connection from the first publish until 2 s after the last (so what lingers at the end
//! is counted, and so are keep-alive pings), divided by the messages published. Gateways,
//! side by side in each rep: Mosquitto's bridge (3.1.1 and MQTT 5, defaults), Holdfast with
//! defaults (3.1.1, `linger_ms = 0`), and Holdfast with the documented metered-link
//! settings (`protocol = "5"`, `linger_ms = 1000`).
//!
//! Prints a Markdown table (also written to `target/bridge-bytes.md`).

mod loadgen;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use holdfast::protocol::{Packet, QoS};
use loadgen::broker::{free_port, BrokerProc};
use loadgen::client;

const TOPIC: &str = "bench/sensor/0";
const PAYLOAD: usize = 64;

struct Args {
    seconds: u64,
    rate: u64,
    reps: usize,
    mosquitto: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        seconds: 30,
        rate: 10,
        reps: 1,
        mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--seconds" => a.seconds = val("--seconds").parse().expect("--seconds N"),
            "--rate" => a.rate = val("--rate").parse().expect("--rate N"),
            "--reps" => a.reps = val("--reps").parse().expect("--reps N"),
            "--mosquitto" => a.mosquitto = val("--mosquitto").into(),
            other => panic!("unknown argument {other:?} (see the file's doc)"),
        }
    }
    a.seconds = a.seconds.max(1);
    a.rate = a.rate.max(1);
    a.reps = a.reps.max(1);
    a
}

#[derive(Clone, Copy)]
enum Gw {
    Mosquitto311,
    Mosquitto5,
    Holdfast311,
    HoldfastMetered,
}

const GATEWAYS: [Gw; 4] = [
    Gw::Mosquitto311,
    Gw::Mosquitto5,
    Gw::Holdfast311,
    Gw::HoldfastMetered,
];

impl Gw {
    fn name(self) -> &'static str {
        match self {
            Gw::Mosquitto311 => "mosquitto bridge (3.1.1)",
            Gw::Mosquitto5 => "mosquitto bridge (MQTT 5)",
            Gw::Holdfast311 => "holdfast (3.1.1, linger_ms = 0)",
            Gw::HoldfastMetered => "holdfast (protocol = \"5\", linger_ms = 1000)",
        }
    }

    fn start(self, holdfast: &Path, mosquitto: &Path, port: u16) -> BrokerProc {
        let b = match self {
            Gw::Mosquitto311 | Gw::Mosquitto5 => {
                let version = match self {
                    Gw::Mosquitto5 => "mqttv50",
                    _ => "mqttv311",
                };
                BrokerProc::mosquitto_custom(
                    self.name(),
                    mosquitto,
                    0,
                    &format!(
                        "persistence false\n\nconnection up\naddress 127.0.0.1:{port}\n\
                         remote_clientid gw-mq\ncleansession false\nrestart_timeout 1\n\
                         bridge_protocol_version {version}\ntopic bench/# out 1\n"
                    ),
                )
            }
            Gw::Holdfast311 | Gw::HoldfastMetered => {
                let extra = match self {
                    Gw::HoldfastMetered => "protocol = \"5\"\nlinger_ms = 1000\n",
                    _ => "",
                };
                BrokerProc::holdfast_custom(
                    self.name(),
                    holdfast,
                    &format!(
                        "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{port}\"\n\
                         client_id = \"gw-hf\"\nreconnect_min_ms = 500\n{extra}\n\
                         [[bridge.topic]]\npattern = \"bench/#\"\n\n"
                    ),
                    100_000,
                )
            }
        };
        b.unwrap_or_else(|e| panic!("starting {}: {e}", self.name()))
    }
}

/// What one run measured.
struct Bytes2 {
    messages: u64,
    up: u64,
    down: u64,
    segments: u64,
    delivered: u64,
}

/// IP bytes per direction and packets of the capture in `pcap`, between `from` and `to`
/// (wall clock), `port` being the upstream's: (to it, from it, packets).
fn count(pcap: &Path, port: u16, from: SystemTime, to: SystemTime) -> (u64, u64, u64) {
    let data = std::fs::read(pcap).expect("read capture");
    assert!(data.len() >= 24, "empty capture");
    let le = match &data[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] => false,
        m => panic!("not a microsecond pcap file: {m:?}"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let v: [u8; 4] = b[i..i + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let link = u32_at(&data, 20);
    assert_eq!(link, 1, "expected an Ethernet capture (tcpdump -i lo)");
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let (from, to) = (secs(from), secs(to));
    let (mut up, mut down, mut packets) = (0, 0, 0);
    let mut i = 24;
    while i + 16 <= data.len() {
        let ts = f64::from(u32_at(&data, i)) + f64::from(u32_at(&data, i + 4)) / 1e6;
        let incl = u32_at(&data, i + 8) as usize;
        let pkt = &data[i + 16..(i + 16 + incl).min(data.len())];
        i += 16 + incl;
        if ts < from || ts > to || pkt.len() < 14 + 20 + 4 {
            continue;
        }
        let ip = &pkt[14..];
        let ip_len = u64::from(u16::from_be_bytes([ip[2], ip[3]]));
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let sport = u16::from_be_bytes([ip[ihl], ip[ihl + 1]]);
        let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
        packets += 1;
        if dport == port {
            up += ip_len;
        } else if sport == port {
            down += ip_len;
        }
    }
    (up, down, packets)
}

async fn run_one(gw: Gw, args: &Args, holdfast: &Path) -> Bytes2 {
    let (bridge_port, cloud_port) = (free_port().unwrap(), free_port().unwrap());
    let upstream = BrokerProc::mosquitto_custom(
        "upstream",
        &args.mosquitto,
        bridge_port,
        &format!("persistence false\nlistener {cloud_port} 127.0.0.1\n"),
    )
    .expect("upstream");
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("bridge.pcap");
    let mut tcpdump: Child = Command::new("tcpdump")
        .args(["-i", "lo", "-n", "-U", "-s", "128", "-w"])
        .arg(&pcap)
        .arg(format!("tcp port {bridge_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump; run as root)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gateway = gw.start(holdfast, &args.mosquitto, bridge_port);
    let cloud_addr = std::net::SocketAddr::from(([127, 0, 0, 1], cloud_port));
    let (mut cr, mut cw) = client::connect(cloud_addr, "cloud", 60).await.unwrap();
    client::subscribe(&mut cr, &mut cw, "bench/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let topic: Arc<str> = TOPIC.into();
    let (mut pr, mut pw) = client::connect(gateway.addr, "sensor", 60).await.unwrap();
    // The bridge is up once a probe arrives upstream; then the link settles.
    let mut delivered = 0u64;
    let mut id = 0u16;
    let mut publish = |pw: &mut client::Writer| {
        id = id % 65535 + 1;
        pw.push(&client::publish(
            &topic,
            QoS::AtLeastOnce,
            id,
            Bytes::from(vec![0x42; PAYLOAD]),
        ));
    };
    publish(&mut pw);
    pw.flush().await.unwrap();
    while !matches!(pr.next_packet().await.unwrap(), Packet::PubAck(_)) {}
    assert!(
        recv_publish(&mut cr, &mut cw, Duration::from_secs(20)).await,
        "{}: the bridge does not deliver",
        gw.name()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let messages = args.rate * args.seconds;
    let from = SystemTime::now();
    let start = Instant::now();
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let cloud = tokio::spawn(async move {
        let mut n = 0;
        while n < messages {
            if !recv_publish(&mut cr, &mut cw, Duration::from_secs(10)).await {
                break;
            }
            n += 1;
        }
        n
    });
    for k in 0..messages {
        tokio::time::sleep_until((start + every * k as u32).into()).await;
        publish(&mut pw);
        pw.flush().await.unwrap();
        loop {
            if let Packet::PubAck(_) = pr.next_packet().await.unwrap() {
                break;
            }
        }
    }
    delivered += cloud.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let to = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    drop(gateway);
    drop(upstream);
    let (up, down, segments) = count(&pcap, bridge_port, from, to);
    Bytes2 {
        messages,
        up,
        down,
        segments,
        delivered,
    }
}

/// Reads until one PUBLISH arrives (acking it); false after `limit` without one.
async fn recv_publish(r: &mut client::Reader, w: &mut client::Writer, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, r.next_packet()).await {
            Err(_) => return false,
            Ok(Err(e)) => panic!("cloud subscriber: {e}"),
            Ok(Ok(Packet::Publish(p))) => {
                w.push(&client::puback(p.packet_id));
                w.flush().await.unwrap();
                return true;
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn main() {
    let args = parse_args();
    let holdfast = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let rt = loadgen::runtime();
    let mut rows: Vec<Vec<Bytes2>> = GATEWAYS.iter().map(|_| Vec::new()).collect();
    for rep in 0..args.reps {
        for (g, gw) in GATEWAYS.iter().enumerate() {
            eprintln!("rep {}: {} ...", rep + 1, gw.name());
            let r = rt.block_on(run_one(*gw, &args, &holdfast));
            eprintln!(
                "  {} msgs, {} delivered, {:.1} B/msg up, {:.1} B/msg down, {:.2} packets/msg",
                r.messages,
                r.delivered,
                r.up as f64 / r.messages as f64,
                r.down as f64 / r.messages as f64,
                r.segments as f64 / r.messages as f64
            );
            rows[g].push(r);
        }
    }
    let per = |r: &Bytes2| (r.up + r.down) as f64 / r.messages as f64;
    let baseline: Vec<f64> = rows[0].iter().map(per).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Bytes per message at {} msg/s, {}-byte QoS 1 payloads, {} s per run ({}):\n",
        args.rate,
        PAYLOAD,
        args.seconds,
        loadgen::bench_command("bridge_bytes")
    );
    let _ = writeln!(
        out,
        "| gateway | IP bytes/msg up | down | total | packets/msg | × Mosquitto 3.1.1 (same rep) |\n|---|---|---|---|---|---|"
    );
    for (g, gw) in GATEWAYS.iter().enumerate() {
        for (rep, r) in rows[g].iter().enumerate() {
            let n = r.messages as f64;
            let _ = writeln!(
                out,
                "| {}{} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                gw.name(),
                if r.delivered < r.messages {
                    format!(" (only {} delivered!)", r.delivered)
                } else {
                    String::new()
                },
                r.up as f64 / n,
                r.down as f64 / n,
                per(r),
                r.segments as f64 / n,
                per(r) / baseline[rep]
            );
        }
    }
    println!("{out}");
    let _ = std::fs::write("target/bridge-bytes.md", &out);
}
