//! The bridge: Holdfast vs Mosquitto as the gateway, side by side on 127.0.0.1.
//!
//! `cargo bench --bench bridge_compare [-- --quick] [--messages N] [--backlog N]
//! [--reps N] [--drain-reps N] [--rate R] [--seconds S] [--mosquitto PATH]
//! [--rows 1,2,3] [--gateways hff,hfn,hf5,mq]` (hff/hfn = Holdfast at `synchronous`
//! full/normal with an MQTT 3.1.1 bridge, hf5 = full with an MQTT 5 bridge, mq = Mosquitto;
//! the full run takes about 4 minutes on 2 cores)
//!
//! Topology: local publisher → gateway (Holdfast with `[[bridge]]`, or Mosquitto with a
//! `connection` section) → bridge (QoS 1, 64 in flight) → upstream ("cloud": a plain
//! Mosquitto) → cloud subscriber (QoS 1). Rows:
//! 1. steady-state uplink throughput (QoS 1 publisher, window 64, as fast as acks allow);
//! 2. drain of a backlog: `--backlog` messages published and acknowledged locally while
//!    the upstream is down, then the upstream starts and the time until the cloud
//!    subscriber has all of them is measured (order and loss checked per publisher);
//! 3. added latency at a fixed rate: the same messages received by a local subscriber on
//!    the gateway and by the cloud subscriber.
//!
//! Prints Markdown tables (also written to `target/bridge-results.md`).

mod loadgen;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loadgen::bridge::{self, Received};
use loadgen::broker::BrokerProc;
use loadgen::client;
use loadgen::durable;
use loadgen::scenario::{PAYLOAD_LEN, QOS1_WINDOW};

/// Publishers (one topic each) that fill the backlog.
const FILL_PUBLISHERS: usize = 4;
/// Broker start/stop limit.
const LIMIT: Duration = Duration::from_secs(30);
/// Bridge in-flight window on both gateways (Holdfast `inflight`, Mosquitto
/// `max_inflight_messages`).
const INFLIGHT: u16 = 64;
/// Queue limits, high enough that nothing is dropped anywhere.
const MAX_QUEUED: usize = 1_000_000;
/// Durable session on the drain upstream that receives the backlog.
const CLOUD_DRAIN_ID: &str = "cloud-drain";

struct Args {
    messages: u64,
    backlog: u64,
    reps: usize,
    drain_reps: usize,
    rate: u64,
    seconds: u64,
    mosquitto: PathBuf,
    /// Rows to run (1, 2, 3).
    rows: Vec<u8>,
    /// Gateways to run (indices into `GATEWAYS`).
    gateways: Vec<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench bridge_compare -- [--quick] [--messages N] [--backlog N] \
         [--reps N] [--drain-reps N] [--rate R] [--seconds S] [--mosquitto PATH] \
         [--rows 1,2,3] [--gateways hff,hfn,mq]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        messages: 50_000,
        backlog: 100_000,
        reps: 5,
        drain_reps: 3,
        rate: 1000,
        seconds: 10,
        mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
        rows: vec![1, 2, 3],
        gateways: (0..GATEWAYS.len()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        let mut num = |name: &str| -> u64 { val(name).parse().unwrap_or_else(|_| usage()) };
        match arg.as_str() {
            "--bench" => {}
            "--quick" => {
                a.messages = 5_000;
                a.backlog = 10_000;
                a.reps = 1;
                a.drain_reps = 1;
                a.seconds = 2;
            }
            "--messages" => a.messages = num("--messages").max(1),
            "--backlog" => a.backlog = num("--backlog").max(FILL_PUBLISHERS as u64),
            "--reps" => a.reps = num("--reps").max(1) as usize,
            "--drain-reps" => a.drain_reps = num("--drain-reps").max(1) as usize,
            "--rate" => a.rate = num("--rate").max(1),
            "--seconds" => a.seconds = num("--seconds").max(1),
            "--mosquitto" => a.mosquitto = val("--mosquitto").into(),
            "--rows" => {
                a.rows = val("--rows")
                    .split(',')
                    .map(|r| r.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--gateways" => {
                a.gateways = val("--gateways")
                    .split(',')
                    .map(|g| {
                        GATEWAYS
                            .iter()
                            .position(|k| k.short() == g.trim())
                            .unwrap_or_else(|| usage())
                    })
                    .collect();
                a.gateways.sort_unstable();
                a.gateways.dedup();
            }
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    a
}

/// Which gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Gw {
    HoldfastFull,
    HoldfastNormal,
    HoldfastV5,
    Mosquitto,
}

const GATEWAYS: [Gw; 4] = [
    Gw::HoldfastFull,
    Gw::HoldfastNormal,
    Gw::HoldfastV5,
    Gw::Mosquitto,
];
/// Index of Mosquitto in `GATEWAYS` (the ratios' denominator).
const MOSQUITTO: usize = 3;

impl Gw {
    fn name(self) -> &'static str {
        match self {
            Gw::HoldfastFull => "holdfast (full)",
            Gw::HoldfastNormal => "holdfast (normal)",
            Gw::HoldfastV5 => "holdfast (full, MQTT 5 bridge)",
            Gw::Mosquitto => "mosquitto",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Gw::HoldfastFull => "hff",
            Gw::HoldfastNormal => "hfn",
            Gw::HoldfastV5 => "hf5",
            Gw::Mosquitto => "mq",
        }
    }

    /// Starts this gateway with its bridge pointed at 127.0.0.1:`upstream_port`.
    fn start(self, holdfast: &Path, mosquitto: &Path, upstream_port: u16, run: &str) -> BrokerProc {
        let client_id = format!("gw-{}-{run}", self.short());
        let b = match self {
            Gw::HoldfastFull | Gw::HoldfastNormal | Gw::HoldfastV5 => {
                let (sync, protocol) = match self {
                    Gw::HoldfastNormal => ("normal", "3.1.1"),
                    Gw::HoldfastV5 => ("full", "5"),
                    _ => ("full", "3.1.1"),
                };
                BrokerProc::holdfast_custom(
                    self.name(),
                    holdfast,
                    &holdfast_bridge(sync, protocol, upstream_port, &client_id),
                    MAX_QUEUED,
                )
            }
            Gw::Mosquitto => BrokerProc::mosquitto_custom(
                self.name(),
                mosquitto,
                0,
                &mosquitto_bridge(upstream_port, &client_id),
            ),
        };
        b.unwrap_or_else(|e| panic!("starting gateway {}: {e}", self.name()))
    }
}

fn holdfast_bridge(sync: &str, protocol: &str, port: u16, client_id: &str) -> String {
    format!(
        "[store]\nsynchronous = \"{sync}\"\n\n\
         [[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\n\
         client_id = \"{client_id}\"\ninflight = {INFLIGHT}\n\
         reconnect_min_ms = 500\nreconnect_max_ms = 1000\n\n\
         [[bridge.topic]]\npattern = \"bench/#\"\ndirection = \"out\"\nqos = 1\n\n"
    )
}

/// Mosquitto gateway: persistence on (as root, so it can write its temporary directory)
/// for parity with Holdfast's durable outbox; it writes only at autosave/shutdown.
fn mosquitto_bridge(port: u16, client_id: &str) -> String {
    format!(
        "persistence true\npersistence_location {{dir}}/\nautosave_interval 1800\nuser root\n\
         max_queued_messages {MAX_QUEUED}\nmax_inflight_messages {INFLIGHT}\n\n\
         connection up\naddress 127.0.0.1:{port}\nremote_clientid {client_id}\n\
         cleansession false\nrestart_timeout 1\ntopic bench/# out 1\n"
    )
}

/// The upstream ("cloud") broker for rows 1 and 3: plain Mosquitto, no persistence.
fn upstream_plain() -> String {
    format!(
        "persistence false\nmax_queued_messages {MAX_QUEUED}\nmax_inflight_messages {INFLIGHT}\n"
    )
}

/// The upstream for row 2: the same, but with persistence so that the cloud subscriber's
/// durable session survives the stop before the backlog is built (autosave 1800 s: it
/// writes only when stopped, never during a measurement).
fn upstream_durable() -> String {
    format!(
        "persistence true\npersistence_location {{dir}}/\nautosave_interval 1800\nuser root\n\
         max_queued_messages {MAX_QUEUED}\nmax_inflight_messages {INFLIGHT}\n"
    )
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// "median (min–max)".
fn stat(v: &[f64], prec: usize) -> String {
    let Some(m) = median(v) else {
        return "-".into();
    };
    if v.len() == 1 {
        return format!("{m:.prec$}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.prec$} ({lo:.prec$}–{hi:.prec$})")
}

fn cpu_ms(b: &BrokerProc) -> Option<f64> {
    b.cpu_time().map(|d| d.as_secs_f64() * 1000.0)
}

/// Delivery figures summed over runs.
#[derive(Default)]
struct Tally {
    expected: u64,
    received: u64,
    duplicates: u64,
    reordered: u64,
    strays: u64,
}

impl Tally {
    fn add(&mut self, r: &Received) {
        self.expected += r.expected;
        self.received += r.received;
        self.duplicates += r.duplicates;
        self.reordered += r.reordered;
        self.strays += r.strays;
    }

    fn fmt(&self) -> String {
        let mut s = format!("{}/{}", self.received, self.expected);
        if self.received != self.expected {
            s.push_str(" **LOSS**");
        }
        if self.duplicates > 0 {
            let _ = write!(s, ", {} dup", self.duplicates);
        }
        if self.reordered > 0 {
            let _ = write!(s, ", **{} out of order**", self.reordered);
        } else if self.received > 0 {
            s.push_str(", in order");
        }
        s
    }
}

/// Row 1 per gateway.
#[derive(Default)]
struct Steady {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    gw_cpu: Vec<f64>,
    up_cpu: Vec<f64>,
    tally: Tally,
    errors: Vec<String>,
}

/// Row 2 per gateway.
#[derive(Default)]
struct Drain {
    fill_rate: Vec<f64>,
    /// First to last message at the cloud subscriber.
    rate: Vec<f64>,
    /// Upstream accepting connections → first message / → all messages, seconds.
    to_first: Vec<f64>,
    to_all: Vec<f64>,
    gw_cpu: Vec<f64>,
    tally: Tally,
    errors: Vec<String>,
}

/// Row 3 per gateway.
#[derive(Default)]
struct Latency {
    local_p50: Vec<f64>,
    local_p99: Vec<f64>,
    cloud_p50: Vec<f64>,
    cloud_p99: Vec<f64>,
    local: Tally,
    cloud: Tally,
    errors: Vec<String>,
}

/// The gateways in run order for repetition `rep` (rotated, so no gateway always goes
/// first).
fn order(rep: usize, sel: &[usize]) -> Vec<usize> {
    (0..sel.len()).map(|i| sel[(i + rep) % sel.len()]).collect()
}

/// Starts the selected gateways, bridged to 127.0.0.1:`port` (`None` for the others).
fn start_gateways(args: &Args, holdfast: &Path, port: u16, run: &str) -> Vec<Option<BrokerProc>> {
    GATEWAYS
        .iter()
        .enumerate()
        .map(|(i, g)| {
            args.gateways
                .contains(&i)
                .then(|| g.start(holdfast, &args.mosquitto, port, run))
        })
        .collect()
}

fn one_line(e: &str) -> String {
    e.lines().next().unwrap_or("").replace('|', "/")
}

fn main() {
    let args = parse_args();
    let holdfast_bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let command = loadgen::bench_command("bridge_compare");
    let rt = loadgen::runtime();
    let started = Instant::now();
    let run = format!("{}", std::process::id());

    let sel = args.gateways.clone();
    let mut steady: Vec<Steady> = GATEWAYS.iter().map(|_| Steady::default()).collect();
    let mut latency: Vec<Latency> = GATEWAYS.iter().map(|_| Latency::default()).collect();
    let mut drain: Vec<Drain> = GATEWAYS.iter().map(|_| Drain::default()).collect();
    let lat_n = args.rate * args.seconds;
    let each = args.backlog / FILL_PUBLISHERS as u64;
    let backlog = each * FILL_PUBLISHERS as u64;
    let mut mosq_log = None;

    // ---- Rows 1 and 3: steady state, the gateways bridged to one upstream ----
    if args.rows.contains(&1) || args.rows.contains(&3) {
        let upstream =
            BrokerProc::mosquitto_custom("upstream", &args.mosquitto, 0, &upstream_plain())
                .expect("starting the upstream mosquitto");
        let mut gws = start_gateways(&args, &holdfast_bin, upstream.addr.port(), &run);
        eprintln!(
            "upstream pid {} on {}; gateways: {}",
            upstream.pid(),
            upstream.addr,
            gws.iter()
                .flatten()
                .map(|g| format!("{} pid {} on {}", g.name, g.pid(), g.addr))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (g, b) in GATEWAYS.iter().zip(&gws) {
            let Some(b) = b else { continue };
            let tag = format!("w{}", g.short());
            let took = rt
                .block_on(bridge::wait_path(b.addr, upstream.addr, &tag, LIMIT))
                .unwrap_or_else(|e| panic!("bridge of {} not working: {e}", g.name()));
            eprintln!("{}: bridge path up after {took:?}; warming up", g.name());
            rt.block_on(bridge::steady(b.addr, upstream.addr, &tag, 2000))
                .unwrap_or_else(|e| panic!("warm-up through {} failed: {e}", g.name()));
        }

        for rep in 0..args.reps {
            if !args.rows.contains(&1) {
                break;
            }
            for i in order(rep, &sel) {
                let (g, b) = (GATEWAYS[i], gws[i].as_mut().expect("selected"));
                eprintln!("row 1 rep {rep}: {} ...", g.name());
                let tag = format!("s{rep}{}", g.short());
                let (c0, u0) = (cpu_ms(b), cpu_ms(&upstream));
                let r = rt.block_on(bridge::steady(b.addr, upstream.addr, &tag, args.messages));
                let (c1, u1) = (cpu_ms(b), cpu_ms(&upstream));
                let s = &mut steady[i];
                match r
                    .map_err(|e| e.to_string())
                    .and_then(|r| b.check_alive().map(|()| r))
                {
                    Ok((_sent, got, t0)) => {
                        if let Some(last) = got.last {
                            s.rate.push(got.received as f64 / (last - t0).as_secs_f64());
                        }
                        s.p50.extend(got.percentile_us(50.0));
                        s.p99.extend(got.percentile_us(99.0));
                        let k = got.received.max(1) as f64 / 1000.0;
                        if let (Some(c0), Some(c1)) = (c0, c1) {
                            s.gw_cpu.push((c1 - c0) / k);
                        }
                        if let (Some(u0), Some(u1)) = (u0, u1) {
                            s.up_cpu.push((u1 - u0) / k);
                        }
                        s.tally.add(&got);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e}");
                        s.errors.push(e);
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }

        for rep in 0..args.reps.min(2) {
            if !args.rows.contains(&3) {
                break;
            }
            for i in order(rep, &sel) {
                let (g, b) = (GATEWAYS[i], gws[i].as_mut().expect("selected"));
                eprintln!("row 3 rep {rep}: {} at {} msg/s ...", g.name(), args.rate);
                let tag = format!("l{rep}{}", g.short());
                let r = rt.block_on(bridge::added_latency(
                    b.addr,
                    upstream.addr,
                    &tag,
                    args.rate,
                    lat_n,
                ));
                let l = &mut latency[i];
                match r
                    .map_err(|e| e.to_string())
                    .and_then(|r| b.check_alive().map(|()| r))
                {
                    Ok((_sent, local, cloud)) => {
                        l.local_p50.extend(local.percentile_us(50.0));
                        l.local_p99.extend(local.percentile_us(99.0));
                        l.cloud_p50.extend(cloud.percentile_us(50.0));
                        l.cloud_p99.extend(cloud.percentile_us(99.0));
                        l.local.add(&local);
                        l.cloud.add(&cloud);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e}");
                        l.errors.push(e);
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        drop(gws);
        drop(upstream);
    }

    // ---- Row 2: drain of a backlog built while the upstream was down ----
    if args.rows.contains(&2) {
        let mut up = BrokerProc::mosquitto_custom(
            "upstream (drain)",
            &args.mosquitto,
            0,
            &upstream_durable(),
        )
        .expect("starting the drain upstream");
        // The cloud subscriber's durable session exists before any bridge can connect, so it
        // gets everything whichever of the two connects first after the restart.
        rt.block_on(durable::prepare_sessions(
            up.addr,
            &[CLOUD_DRAIN_ID.to_string()],
            &["bench/#".to_string()],
        ))
        .expect("creating the cloud subscriber's durable session");
        up.stop(LIMIT).expect("stopping the drain upstream");
        let mut gws = start_gateways(&args, &holdfast_bin, up.addr.port(), &run);
        for rep in 0..args.drain_reps {
            for i in order(rep, &sel) {
                let (g, b) = (GATEWAYS[i], gws[i].as_mut().expect("selected"));
                let d = &mut drain[i];
                let tag = format!("d{rep}{}", g.short());
                let topics: Vec<String> = (0..FILL_PUBLISHERS)
                    .map(|p| format!("bench/{tag}/{p}"))
                    .collect();
                eprintln!("row 2 rep {rep}: {} filling {backlog} ...", g.name());
                match rt.block_on(durable::fill(
                    b.addr,
                    &tag,
                    &topics,
                    each,
                    FILL_PUBLISHERS,
                    None,
                )) {
                    Ok((acked, took)) if acked == backlog => {
                        d.fill_rate.push(acked as f64 / took.as_secs_f64())
                    }
                    Ok((acked, _)) => {
                        d.errors
                            .push(format!("fill: only {acked}/{backlog} acknowledged"));
                        continue;
                    }
                    Err(e) => {
                        eprintln!("  fill failed: {e}");
                        d.errors.push(format!("fill: {e}"));
                        continue;
                    }
                }
                let c0 = cpu_ms(b);
                let t_up0 = Instant::now();
                if let Err(e) = up.start(LIMIT) {
                    panic!("restarting the drain upstream: {e}");
                }
                let t_up = Instant::now();
                eprintln!("  upstream up after {:?}; draining ...", t_up - t_up0);
                let r = rt.block_on(async {
                    let (r, w, present) =
                        client::connect_with(up.addr, CLOUD_DRAIN_ID, 600, false).await?;
                    if !present {
                        return Err(std::io::Error::other(
                            "the cloud subscriber's durable session was not kept",
                        ));
                    }
                    bridge::collect(r, w, &topics, each).await
                });
                let c1 = cpu_ms(b);
                match r
                    .map_err(|e| e.to_string())
                    .and_then(|r| b.check_alive().map(|()| r))
                {
                    Ok(got) => {
                        if let (Some(first), Some(last)) = (got.first, got.last) {
                            d.rate
                                .push(got.received as f64 / (last - first).as_secs_f64());
                            d.to_first.push((first - t_up).as_secs_f64());
                            d.to_all.push((last - t_up).as_secs_f64());
                        }
                        if let (Some(c0), Some(c1)) = (c0, c1) {
                            d.gw_cpu
                                .push((c1 - c0) / (got.received.max(1) as f64 / 1000.0));
                        }
                        if got.timed_out {
                            eprintln!(
                                "  incomplete: {}/{} after {:?} without a new message",
                                got.received,
                                got.expected,
                                bridge::IDLE
                            );
                        }
                        d.tally.add(&got);
                    }
                    Err(e) => {
                        eprintln!("  failed: {e}");
                        d.errors.push(e);
                    }
                }
                // Let the bridge get its last PUBACKs before the upstream goes away.
                std::thread::sleep(Duration::from_millis(1000));
                up.stop(LIMIT).expect("stopping the drain upstream");
            }
        }
        mosq_log = gws[MOSQUITTO].as_ref().map(|b| b.log_tail());
        drop(gws);
        drop(up);
    }
    let total = started.elapsed();

    // ---- report ----
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "## Bridge: Holdfast vs Mosquitto as the gateway\n");
    let _ = writeln!(
        md,
        "Command: `{command}` (took {:.0} s)\n",
        total.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "- Topology on 127.0.0.1: publisher → gateway → bridge (QoS 1, {INFLIGHT} in flight) → \
         upstream Mosquitto → cloud subscriber (QoS 1). Everything, load generator included, \
         shares the machine's {cores} cores, so absolute numbers understate all parties; \
         values are median (min–max) over repetitions, gateways run in rotated order.\n\
         - Holdfast gateway: `[[bridge]]` with `inflight = {INFLIGHT}`, \
         `reconnect_min_ms = 500`, `reconnect_max_ms = 1000`, one `[[bridge.topic]] pattern \
         = \"bench/#\", direction = \"out\", qos = 1`; `[store] synchronous` full or normal \
         (the outbox is a durable session in SQLite: each message is committed before the \
         publisher's PUBACK).\n\
         - Mosquitto gateway: `connection up`, `topic bench/# out 1`, `cleansession false`, \
         `restart_timeout 1`, `max_inflight_messages {INFLIGHT}`, `max_queued_messages \
         {MAX_QUEUED}`, `persistence true` with `user root` and `autosave_interval 1800` \
         (parity of configuration only: Mosquitto keeps the bridge queue in memory and \
         writes it at autosave/shutdown, so it is **not** durable per message like Holdfast's \
         outbox).\n\
         - Upstream: Mosquitto, `persistence false` (row 2: `persistence true`, autosave \
         1800, so the cloud subscriber's durable session survives the stop; nothing is \
         written during a measurement), `max_queued_messages {MAX_QUEUED}`, \
         `max_inflight_messages {INFLIGHT}`.\n\
         - Messages: {PAYLOAD_LEN}-byte payload with send timestamp and per-topic sequence \
         number; the subscriber checks loss, duplicates and order per topic. QoS 1 \
         publishers keep up to {QOS1_WINDOW} PUBACKs outstanding. CPU = user+sys ms of the \
         process per 1000 delivered messages.\n"
    );

    let mosq_rate = median(&steady[MOSQUITTO].rate);
    let _ = writeln!(
        md,
        "### 1. Steady-state uplink throughput ({} messages × {} reps, 1 publisher → 1 cloud subscriber)\n",
        args.messages, args.reps
    );
    let _ = writeln!(
        md,
        "| gateway | msg/s | p50 µs | p99 µs | delivered (all reps) | ratio vs mosquitto | gateway CPU ms/1k | upstream CPU ms/1k |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|---:|---:|---:|");
    for (g, s) in GATEWAYS.iter().zip(&steady) {
        if s.rate.is_empty() && s.errors.is_empty() {
            continue;
        }
        let ratio = match (median(&s.rate), mosq_rate) {
            (Some(h), Some(m)) if m > 0.0 => format!("{:.2}", h / m),
            _ => "-".into(),
        };
        let mut delivered = s.tally.fmt();
        for e in &s.errors {
            let _ = write!(delivered, "; ERROR {}", one_line(e));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {delivered} | {ratio} | {} | {} |",
            g.name(),
            stat(&s.rate, 0),
            stat(&s.p50, 0),
            stat(&s.p99, 0),
            stat(&s.gw_cpu, 0),
            stat(&s.up_cpu, 0)
        );
    }

    let _ = writeln!(
        md,
        "\n### 2. Drain of a backlog ({backlog} messages from {FILL_PUBLISHERS} publishers, \
         published and acknowledged while the upstream was down; × {} reps; target ≥ 10,000 msg/s)\n",
        args.drain_reps
    );
    let _ = writeln!(
        md,
        "| gateway | fill msg/s | drain msg/s (first → last) | upstream up → first msg s | upstream up → all delivered s | delivered / order | gateway CPU ms/1k (drain) | target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---|---:|---|");
    for (g, d) in GATEWAYS.iter().zip(&drain) {
        if d.rate.is_empty() && d.errors.is_empty() {
            continue;
        }
        let mut delivered = d.tally.fmt();
        for e in &d.errors {
            let _ = write!(delivered, "; ERROR {}", one_line(e));
        }
        let ok = median(&d.rate).is_some_and(|r| r >= 10_000.0)
            && d.errors.is_empty()
            && d.tally.received == d.tally.expected
            && d.tally.reordered == 0;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {delivered} | {} | {} |",
            g.name(),
            stat(&d.fill_rate, 0),
            stat(&d.rate, 0),
            stat(&d.to_first, 2),
            stat(&d.to_all, 2),
            stat(&d.gw_cpu, 0),
            if ok { "met" } else { "**missed**" }
        );
    }
    if let Some(log) = &mosq_log {
        let dropped = log
            .lines()
            .filter(|l| l.contains("dropped") || l.contains("Dropped"))
            .count();
        let _ = writeln!(
            md,
            "\nMosquitto gateway log lines mentioning dropped messages: {dropped}."
        );
    }

    let _ = writeln!(
        md,
        "\n### 3. Added latency when healthy ({} msg/s for {} s, QoS 1; the same messages \
         received by a local subscriber on the gateway and by the cloud subscriber; × {} reps)\n",
        args.rate,
        args.seconds,
        args.reps.min(2)
    );
    let _ = writeln!(
        md,
        "| gateway | local p50 µs | local p99 µs | cloud p50 µs | cloud p99 µs | added p50 µs | added p99 µs | delivered local / cloud |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
    for (g, l) in GATEWAYS.iter().zip(&latency) {
        if l.local_p50.is_empty() && l.errors.is_empty() {
            continue;
        }
        let diff = |a: &[f64], b: &[f64]| match (median(a), median(b)) {
            (Some(a), Some(b)) => format!("{:.0}", b - a),
            _ => "-".into(),
        };
        let mut delivered = format!("{} / {}", l.local.fmt(), l.cloud.fmt());
        for e in &l.errors {
            let _ = write!(delivered, "; ERROR {}", one_line(e));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {delivered} |",
            g.name(),
            stat(&l.local_p50, 0),
            stat(&l.local_p99, 0),
            stat(&l.cloud_p50, 0),
            stat(&l.cloud_p99, 0),
            diff(&l.local_p50, &l.cloud_p50),
            diff(&l.local_p99, &l.cloud_p99),
        );
    }

    println!("{md}");
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let out = target.join("bridge-results.md");
    match std::fs::write(&out, &md) {
        Ok(()) => eprintln!("written to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}
