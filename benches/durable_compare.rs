//! Durable sessions: Holdfast (SQLite store) vs Mosquitto (`persistence true`), side by
//! side on 127.0.0.1.
//!
//! `cargo bench --bench durable_compare [-- --quick] [--messages N] [--reps N]
//! [--sessions N] [--per-session N] [--big N] [--mosquitto-big N] [--mosquitto PATH]`
//!
//! Scenarios (each against freshly started brokers):
//! 1. durable QoS 1 publish rate, 1→1 and 4→4 (subscribers are durable sessions, online,
//!    acking), Holdfast at `synchronous = "full"` and `"normal"`;
//! 2. restart with `--sessions` offline durable sessions × `--per-session` queued messages,
//!    then all reconnect and drain;
//! 3. restart with `--big` messages queued for one offline session: start time and RSS;
//! 4. the scenario-1 publish rate with an empty store vs with `--big` messages queued;
//! 5. bytes written per message during scenario 1 (`/proc/PID/io`).
//!
//! `--fanout 100x10000,10000x100` runs only the fan-in scenario instead
//! (`loadgen::fanout`): QoS 1 publishers into that many offline durable sessions, msg/s
//! per slice as the stored backlog grows, Holdfast `full` and Mosquitto back to back;
//! `--holdfast PATH` measures another build (before/after).
//!
//! Prints Markdown tables (also written to `target/durable-results.md`).

mod loadgen;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use holdfast::protocol::QoS;
use loadgen::broker::{BrokerProc, DurableOpts, IoCounters, Restart, MAX_INFLIGHT};
use loadgen::durable;
use loadgen::scenario::{self, Outcome, Spec, PAYLOAD_LEN, QOS1_WINDOW};

/// Queue limit for both brokers (so that nothing is dropped even with `--big` queued).
const MAX_QUEUED: usize = 2_000_000;
/// Publishers used to fill queues (more in flight = bigger group commits, faster fill).
const FILL_PUBLISHERS: usize = 8;
/// Messages the big session drains after the restart before RSS is read again.
const BIG_DRAIN: u64 = 10_000;
/// Limit for a broker to stop or to become ready.
const RESTART_LIMIT: Duration = Duration::from_secs(300);

struct Args {
    messages: u64,
    reps: usize,
    sessions: usize,
    per_session: u64,
    big: u64,
    mosquitto_big: Option<u64>,
    mosquitto: PathBuf,
    /// Profiling aid: only run scenario 1 (1→1, `--pairs` pairs) against this broker.
    attach: Option<std::net::SocketAddr>,
    pairs: usize,
    /// Seconds to wait after filling the big queue before measuring the loaded rate.
    settle: u64,
    /// Only the fan-in scenario (`loadgen::fanout`), for these shapes.
    fanout: Vec<loadgen::fanout::Shape>,
    /// Holdfast binary to measure instead of this build's (before/after).
    holdfast: Option<PathBuf>,
    /// Fan-in publishers.
    publishers: usize,
    /// Fan-in without Mosquitto.
    no_mosquitto: bool,
    /// Fan-in: more `[store]` lines for Holdfast (`--store 'page_size = 1024'`).
    store: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench durable_compare -- [--quick] [--messages N] [--reps N] \
         [--sessions N] [--per-session N] [--big N] [--mosquitto-big N] [--mosquitto PATH] \
         [--attach HOST:PORT [--pairs N]] [--settle SECS] \
         [--fanout SESSIONSxMESSAGES[,...] [--publishers N] [--no-mosquitto] [--store 'KEY = VALUE']...] [--holdfast PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        messages: 50_000,
        reps: 3,
        sessions: 1000,
        per_session: 100,
        big: 1_000_000,
        mosquitto_big: None,
        mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
        attach: None,
        pairs: 1,
        settle: 0,
        fanout: Vec::new(),
        holdfast: None,
        publishers: FILL_PUBLISHERS,
        no_mosquitto: false,
        store: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        let mut num = |name: &str| -> u64 { val(name).parse().unwrap_or_else(|_| usage()) };
        match arg.as_str() {
            "--bench" => {}
            "--settle" => a.settle = num("--settle"),
            "--quick" => {
                a.messages = 5_000;
                a.reps = 1;
                a.sessions = 100;
                a.per_session = 20;
                a.big = 50_000;
            }
            "--messages" => a.messages = num("--messages"),
            "--reps" => a.reps = num("--reps").max(1) as usize,
            "--sessions" => a.sessions = num("--sessions") as usize,
            "--per-session" => a.per_session = num("--per-session"),
            "--big" => a.big = num("--big"),
            "--mosquitto-big" => a.mosquitto_big = Some(num("--mosquitto-big")),
            "--mosquitto" => a.mosquitto = val("--mosquitto").into(),
            "--attach" => a.attach = Some(val("--attach").parse().unwrap_or_else(|_| usage())),
            "--pairs" => a.pairs = num("--pairs").max(1) as usize,
            "--fanout" => {
                a.fanout = val("--fanout")
                    .split(',')
                    .map(|s| s.parse().unwrap_or_else(|e| panic!("--fanout: {e}")))
                    .collect()
            }
            "--publishers" => a.publishers = num("--publishers").max(1) as usize,
            "--no-mosquitto" => a.no_mosquitto = true,
            "--store" => a.store.push(val("--store")),
            "--holdfast" => a.holdfast = Some(val("--holdfast").into()),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    a
}

/// Which broker configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    HoldfastFull,
    HoldfastNormal,
    Mosquitto,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::HoldfastFull => "holdfast (full)",
            Kind::HoldfastNormal => "holdfast (normal)",
            Kind::Mosquitto => "mosquitto (persistence)",
        }
    }

    fn start(self, holdfast: &Path, mosquitto: &Path) -> BrokerProc {
        let opts = |synchronous| DurableOpts {
            synchronous,
            max_queued: MAX_QUEUED,
        };
        let b = match self {
            Kind::HoldfastFull => {
                BrokerProc::holdfast_durable(self.name(), holdfast, &opts("full"))
            }
            Kind::HoldfastNormal => {
                BrokerProc::holdfast_durable(self.name(), holdfast, &opts("normal"))
            }
            Kind::Mosquitto => BrokerProc::mosquitto_durable(self.name(), mosquitto, &opts("")),
        };
        b.unwrap_or_else(|e| panic!("starting {}: {e}", self.name()))
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// "median (min–max)" of some samples.
struct Stat {
    samples: Vec<f64>,
}

impl Stat {
    fn new(samples: Vec<f64>) -> Self {
        Stat { samples }
    }
    fn median(&self) -> Option<f64> {
        median(&mut self.samples.clone())
    }
    fn fmt(&self, prec: usize) -> String {
        let Some(m) = self.median() else {
            return "-".into();
        };
        if self.samples.len() == 1 {
            return format!("{m:.prec$}");
        }
        let lo = self.samples.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self
            .samples
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        format!("{m:.prec$} ({lo:.prec$}–{hi:.prec$})")
    }
}

/// Results of repeated runs of one throughput scenario against one broker.
#[derive(Default)]
struct Runs {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    errors: Vec<String>,
    incomplete: u64,
    /// Per run: (messages, write_bytes delta, wchar delta).
    io: Vec<(u64, u64, u64)>,
    cpu_ms_per_kmsg: Vec<f64>,
}

impl Runs {
    fn push(&mut self, r: Result<Outcome, String>) {
        match r {
            Ok(o) => {
                self.rate.push(o.msgs_per_sec());
                if let Some(v) = o.percentile_us(50.0) {
                    self.p50.push(v);
                }
                if let Some(v) = o.percentile_us(99.0) {
                    self.p99.push(v);
                }
                self.incomplete += o.sent.saturating_sub(o.received);
            }
            Err(e) => self.errors.push(e),
        }
    }
    fn rate(&self) -> Stat {
        Stat::new(self.rate.clone())
    }
}

fn io_delta(a: Option<IoCounters>, b: Option<IoCounters>) -> Option<(u64, u64)> {
    let (a, b) = (a?, b?);
    Some((
        b.write_bytes.saturating_sub(a.write_bytes),
        b.wchar.saturating_sub(a.wchar),
    ))
}

/// One durable QoS 1 run; records rate, latency, CPU and bytes written.
fn measure(
    rt: &tokio::runtime::Runtime,
    b: &mut BrokerProc,
    spec: &Spec,
    tag: &str,
    runs: &mut Runs,
) {
    eprintln!("  {} against {} ({tag}) ...", spec.label, b.name);
    let io0 = b.io();
    let cpu0 = b.cpu_time();
    let r = rt
        .block_on(scenario::run_opts(b.addr, spec, tag, true))
        .map_err(|e| e.to_string())
        .and_then(|o| b.check_alive().map(|()| o));
    let io1 = b.io();
    if let (Some(c0), Some(c1), Ok(o)) = (cpu0, b.cpu_time(), &r) {
        let ms = c1.saturating_sub(c0).as_secs_f64() * 1000.0;
        runs.cpu_ms_per_kmsg
            .push(ms / (o.received.max(1) as f64 / 1000.0));
    }
    if let (Some((wb, wc)), Ok(o)) = (io_delta(io0, io1), &r) {
        runs.io.push((o.received, wb, wc));
    }
    if let Err(e) = &r {
        eprintln!("    failed: {e}");
    }
    runs.push(r);
    // Let the broker tear the scenario's connections down.
    std::thread::sleep(Duration::from_millis(300));
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn mib(k: Option<u64>) -> String {
    k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

struct DrainRow {
    kind: Kind,
    sessions: usize,
    per_session: u64,
    fill: Result<(u64, Duration), String>,
    data_bytes: u64,
    restart: Result<Restart, String>,
    drain: Result<durable::Drained, String>,
}

struct BigRow {
    kind: Kind,
    queued: u64,
    fill: Result<(u64, Duration), String>,
    data_bytes: u64,
    rss_before: Option<u64>,
    restart: Result<Restart, String>,
    rss_start: Option<u64>,
    drain: Result<durable::Drained, String>,
    rss_drained: Option<u64>,
    empty: Runs,
    loaded: Runs,
}

/// `--attach`: scenario 1 only, against a broker started by hand (for profiling it).
fn attach(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr, args: &Args) {
    let spec = Spec {
        label: format!("durable QoS 1, {0}→{0}", args.pairs),
        qos: QoS::AtLeastOnce,
        pairs: args.pairs,
        messages: args.messages,
        window: None,
    };
    let pid = std::process::id();
    for rep in 0..args.reps {
        match rt.block_on(scenario::run_opts(
            addr,
            &spec,
            &format!("att{pid}r{rep}"),
            true,
        )) {
            Ok(o) => println!(
                "{}: {:.0} msg/s, p50 {} µs, p99 {} µs, {}/{} delivered",
                spec.label,
                o.msgs_per_sec(),
                o.percentile_us(50.0).map_or(0.0, |v| v.round()),
                o.percentile_us(99.0).map_or(0.0, |v| v.round()),
                o.received,
                o.sent
            ),
            Err(e) => println!("{}: ERROR {e}", spec.label),
        }
    }
}

fn main() {
    let args = parse_args();
    let holdfast_bin = args
        .holdfast
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_holdfast")));
    let command = loadgen::bench_command("durable_compare");
    let rt = loadgen::runtime();
    if !args.fanout.is_empty() {
        let runs = loadgen::fanout::compare(
            &rt,
            &holdfast_bin,
            &args.mosquitto,
            &loadgen::fanout::Plan {
                shapes: &args.fanout,
                publishers: args.publishers,
                max_queued: MAX_QUEUED,
                with_mosquitto: !args.no_mosquitto,
                store: &args.store,
            },
        );
        let md = loadgen::fanout::report(&runs, args.publishers, &command);
        println!("{md}");
        let _ = std::fs::write("target/fanout-results.md", &md);
        return;
    }
    if let Some(addr) = args.attach {
        attach(&rt, addr, &args);
        return;
    }
    let started = Instant::now();
    let n = args.messages;
    let kinds = [Kind::HoldfastFull, Kind::HoldfastNormal, Kind::Mosquitto];

    // ---- Scenario 1 (+5): durable QoS 1 publish rate, bytes written ----
    let mut brokers: Vec<BrokerProc> = kinds
        .iter()
        .map(|k| k.start(&holdfast_bin, &args.mosquitto))
        .collect();
    for b in &brokers {
        eprintln!("{} pid {} on {}", b.name, b.pid(), b.addr);
    }
    // Warm-up: 1k durable QoS 1 messages per broker.
    for b in &brokers {
        let spec = Spec {
            label: "warm-up".into(),
            qos: QoS::AtLeastOnce,
            pairs: 1,
            messages: 1000,
            window: None,
        };
        rt.block_on(scenario::run_opts(b.addr, &spec, "warm", true))
            .unwrap_or_else(|e| panic!("warm-up against {} failed: {e}", b.name));
    }
    let io_start: Vec<Option<IoCounters>> = brokers.iter().map(|b| b.io()).collect();
    let specs = [
        Spec {
            label: "1. durable QoS 1, 1→1".into(),
            qos: QoS::AtLeastOnce,
            pairs: 1,
            messages: n,
            window: None,
        },
        Spec {
            label: "1b. durable QoS 1, 4→4".into(),
            qos: QoS::AtLeastOnce,
            pairs: 4,
            messages: n,
            window: None,
        },
    ];
    // runs[spec][broker]
    let mut runs: Vec<Vec<Runs>> = specs
        .iter()
        .map(|_| kinds.iter().map(|_| Runs::default()).collect())
        .collect();
    for (si, spec) in specs.iter().enumerate() {
        for rep in 0..args.reps {
            // Rotate the order per repetition so no broker always runs first.
            for k in 0..kinds.len() {
                let bi = (k + rep + si) % kinds.len();
                let tag = format!("s{si}r{rep}");
                measure(&rt, &mut brokers[bi], spec, &tag, &mut runs[si][bi]);
            }
        }
    }
    // Holdfast checkpoints its WAL into the database file after 5 s without work; count
    // that too.
    std::thread::sleep(Duration::from_secs(6));
    let io_total: Vec<Option<(u64, u64)>> = brokers
        .iter()
        .zip(&io_start)
        .map(|(b, s)| io_delta(*s, b.io()))
        .collect();
    let s1_messages: Vec<u64> = (0..kinds.len())
        .map(|bi| {
            runs.iter()
                .map(|r| r[bi].io.iter().map(|x| x.0).sum::<u64>())
                .sum()
        })
        .collect();
    drop(brokers);

    // ---- Scenario 2: restart with many sessions × queued messages, then drain ----
    let mut drain_rows = Vec::new();
    for kind in [Kind::HoldfastFull, Kind::Mosquitto] {
        let mut b = kind.start(&holdfast_bin, &args.mosquitto);
        eprintln!(
            "scenario 2 against {}: {} sessions × {} messages",
            b.name, args.sessions, args.per_session
        );
        let ids: Vec<String> = (0..args.sessions).map(|i| format!("drain{i}")).collect();
        let topics: Vec<String> = (0..args.sessions).map(|i| format!("drain/{i}")).collect();
        let row = (|| -> Result<DrainRow, String> {
            rt.block_on(durable::prepare_sessions(b.addr, &ids, &topics))
                .map_err(|e| format!("preparing sessions: {e}"))?;
            let fill = rt
                .block_on(durable::fill(
                    b.addr,
                    "s2",
                    &topics,
                    args.per_session,
                    FILL_PUBLISHERS,
                    None,
                ))
                .map_err(|e| e.to_string());
            let restart = b.restart(RESTART_LIMIT).map_err(|e| e.to_string());
            let data_bytes = b.data_bytes();
            let drain = if restart.is_ok() {
                rt.block_on(durable::drain(b.addr, &ids, args.per_session))
                    .map_err(|e| e.to_string())
            } else {
                Err("no restart".into())
            };
            Ok(DrainRow {
                kind,
                sessions: args.sessions,
                per_session: args.per_session,
                fill,
                data_bytes,
                restart,
                drain,
            })
        })();
        match row {
            Ok(r) => drain_rows.push(r),
            Err(e) => {
                eprintln!("  failed: {e}");
                drain_rows.push(DrainRow {
                    kind,
                    sessions: args.sessions,
                    per_session: args.per_session,
                    fill: Err(e.clone()),
                    data_bytes: 0,
                    restart: Err(e.clone()),
                    drain: Err(e),
                });
            }
        }
    }

    // ---- Scenarios 3 + 4: a big queue: publish cost, restart time, RSS ----
    let mut big_rows = Vec::new();
    for kind in [Kind::HoldfastFull, Kind::Mosquitto] {
        let queued = match kind {
            Kind::Mosquitto => args.mosquitto_big.unwrap_or(args.big),
            _ => args.big,
        };
        let mut b = kind.start(&holdfast_bin, &args.mosquitto);
        eprintln!("scenarios 3+4 against {}: {queued} queued", b.name);
        let spec = Spec {
            label: "4. durable QoS 1, 1→1".into(),
            qos: QoS::AtLeastOnce,
            pairs: 1,
            messages: n,
            window: None,
        };
        let mut empty = Runs::default();
        let mut loaded = Runs::default();
        rt.block_on(scenario::run_opts(
            b.addr,
            &Spec {
                messages: 1000,
                ..spec.clone()
            },
            "warm",
            true,
        ))
        .unwrap_or_else(|e| panic!("warm-up against {} failed: {e}", b.name));
        for rep in 0..args.reps {
            measure(&rt, &mut b, &spec, &format!("empty{rep}"), &mut empty);
        }
        let ids = vec!["big".to_string()];
        let topics = vec!["big/q".to_string()];
        let fill = rt
            .block_on(durable::prepare_sessions(b.addr, &ids, &topics))
            .and_then(|()| {
                rt.block_on(durable::fill(
                    b.addr,
                    "s3",
                    &topics,
                    queued,
                    FILL_PUBLISHERS,
                    None,
                ))
            })
            .map_err(|e| e.to_string());
        if let Err(e) = &fill {
            eprintln!("  fill failed: {e}");
        }
        eprintln!("  filled: {fill:?}");
        std::thread::sleep(Duration::from_secs(args.settle));
        for rep in 0..args.reps {
            measure(&rt, &mut b, &spec, &format!("loaded{rep}"), &mut loaded);
        }
        let rss_before = b.status_kib("VmRSS");
        let restart = b.restart(RESTART_LIMIT).map_err(|e| e.to_string());
        let data_bytes = b.data_bytes();
        let rss_start = b.status_kib("VmRSS");
        let drain = if restart.is_ok() {
            rt.block_on(durable::drain(b.addr, &ids, BIG_DRAIN.min(queued)))
                .map_err(|e| e.to_string())
        } else {
            Err("no restart".into())
        };
        std::thread::sleep(Duration::from_millis(200));
        let rss_drained = b.status_kib("VmRSS");
        big_rows.push(BigRow {
            kind,
            queued,
            fill,
            data_bytes,
            rss_before,
            restart,
            rss_start,
            drain,
            rss_drained,
            empty,
            loaded,
        });
    }
    let took = started.elapsed();

    // ---- report ----
    let mut md = String::new();
    let _ = writeln!(md, "## Durable sessions: Holdfast vs Mosquitto\n");
    let _ = writeln!(
        md,
        "Command: `{command}` (took {:.0} s)\n",
        took.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "- Both brokers on 127.0.0.1, driven by the raw MQTT 3.1.1 load generator in the \
         bench process (it shares the machine's {} cores with the brokers). Subscribers are \
         durable sessions (clean session 0, QoS 1 subscription); publishers are clean.\n\
         - **Mosquitto** runs with `persistence true` and the default `autosave_interval \
         1800`: it acknowledges QoS 1 messages from memory and writes its database every 30 \
         minutes (and at a clean shutdown), so a crash or power loss loses everything since \
         the last save. **Holdfast** sends a PUBACK only after the message is committed to \
         SQLite (WAL): `full` = fsync per group commit (survives power loss), `normal` = no \
         fsync per commit (survives a process crash).\n\
         - {PAYLOAD_LEN}-byte payloads; publishers keep up to {QOS1_WINDOW} PUBACKs \
         outstanding; max in-flight {MAX_INFLIGHT}, max queued messages {MAX_QUEUED} on \
         both brokers. Throughput rows: {n} messages per run, {} runs per broker, order \
         rotated per run; shown as median (min–max). msg/s = received / (last receive − \
         first send); latency = receive − send time; p50/p99 are medians over runs. Ratio = \
         median msg/s ÷ Mosquitto's median msg/s.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.reps
    );

    let _ = writeln!(md, "### 1. Durable QoS 1 publish rate\n");
    let _ = writeln!(
        md,
        "| scenario | broker | msg/s median (min–max) | p50 µs | p99 µs | ratio vs mosquitto | broker CPU ms / 1k msg | errors |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---|");
    let mosq_i = kinds.iter().position(|k| *k == Kind::Mosquitto).unwrap();
    let mut s1_ratio: Vec<Vec<Option<f64>>> = Vec::new();
    for (si, spec) in specs.iter().enumerate() {
        let mosq = runs[si][mosq_i].rate().median();
        let mut ratios = Vec::new();
        for (bi, kind) in kinds.iter().enumerate() {
            let r = &runs[si][bi];
            let rate = r.rate().median();
            let ratio = match (rate, mosq) {
                (Some(a), Some(m)) if m > 0.0 => Some(a / m),
                _ => None,
            };
            ratios.push(ratio);
            let mut errs = r
                .errors
                .iter()
                .map(|e| e.lines().next().unwrap_or("").replace('|', "/"))
                .collect::<Vec<_>>()
                .join("; ");
            if r.incomplete > 0 {
                let _ = write!(errs, " **{} not delivered**", r.incomplete);
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                spec.label,
                kind.name(),
                r.rate().fmt(0),
                Stat::new(r.p50.clone())
                    .median()
                    .map_or("-".into(), |v| format!("{v:.0}")),
                Stat::new(r.p99.clone())
                    .median()
                    .map_or("-".into(), |v| format!("{v:.0}")),
                ratio.map_or("-".into(), |v| format!("{v:.2}")),
                Stat::new(r.cpu_ms_per_kmsg.clone()).fmt(1),
                errs
            );
        }
        s1_ratio.push(ratios);
    }

    let _ = writeln!(md, "\n### 5. Bytes written per message (scenario 1)\n");
    let _ = writeln!(
        md,
        "`/proc/PID/io` of the broker process: `write_bytes` = bytes the process caused to be \
         sent to the block layer (page-cache pages dirtied; a page re-dirtied before \
         writeback counts once, so with `normal`, which does not fsync per commit, it can \
         undercount what reaches the device), `wchar` = bytes passed to write()/pwrite() \
         (files and sockets alike, so it includes the MQTT traffic: ~{} bytes per message \
         for PUBLISH out + PUBACK out). \"During runs\" = median over the 1→1 runs; \"all of \
         scenario 1\" = every 1→1 and 4→4 run plus 6 s idle afterwards (Holdfast's idle WAL \
         checkpoint) ÷ all messages.\n",
        PAYLOAD_LEN + 2 + 7 + 2 + 4
    );
    let _ = writeln!(
        md,
        "| broker | write_bytes/msg during 1→1 runs | wchar/msg during 1→1 runs | write_bytes/msg all of scenario 1 | wchar/msg all of scenario 1 |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (bi, kind) in kinds.iter().enumerate() {
        let per = |f: fn(&(u64, u64, u64)) -> u64| {
            Stat::new(
                runs[0][bi]
                    .io
                    .iter()
                    .filter(|x| x.0 > 0)
                    .map(|x| f(x) as f64 / x.0 as f64)
                    .collect(),
            )
            .fmt(0)
        };
        let tot = |sel: fn((u64, u64)) -> u64| match io_total[bi] {
            Some(t) if s1_messages[bi] > 0 => {
                format!("{:.0}", sel(t) as f64 / s1_messages[bi] as f64)
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            kind.name(),
            per(|x| x.1),
            per(|x| x.2),
            tot(|t| t.0),
            tot(|t| t.1)
        );
    }

    let _ = writeln!(md, "\n### 2. Restart with queued messages, then drain\n");
    let _ = writeln!(
        md,
        "Offline durable sessions each with the given messages queued (filled by {FILL_PUBLISHERS} \
         QoS 1 publishers); then SIGTERM (graceful stop), start again, and all sessions \
         reconnect at once and drain, acking every message. Restart times count from process \
         spawn; \"TCP accept\" = first TCP connect that succeeded, \"CONNACK\" = first probe \
         client served (Holdfast binds its listeners before loading the store, so a TCP \
         connect succeeds before it serves clients). Drain msg/s = messages received ÷ (first \
         reconnect → last message).\n"
    );
    let _ = writeln!(
        md,
        "| broker | sessions × queued | fill msg/s | data on disk MiB | stop ms | restart: TCP accept ms | restart: CONNACK ms | all reconnected ms | drain s | drain msg/s | delivered |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &drain_rows {
        let fill = match &r.fill {
            Ok((m, d)) => format!("{:.0}", *m as f64 / d.as_secs_f64()),
            Err(e) => format!("ERROR {}", e.replace('|', "/")),
        };
        let (stop, tcp, ack) = match &r.restart {
            Ok(x) => (ms(x.stop), ms(x.tcp), ms(x.connack)),
            Err(e) => (
                "-".into(),
                "-".into(),
                format!("ERROR {}", e.lines().next().unwrap_or("")),
            ),
        };
        let (conn, secs, rate, delivered) = match &r.drain {
            Ok(d) => (
                ms(d.connected),
                format!("{:.2}", d.elapsed.as_secs_f64()),
                format!(
                    "{:.0}",
                    d.received as f64 / d.elapsed.as_secs_f64().max(1e-9)
                ),
                format!(
                    "{}/{} ({} of {} sessions complete)",
                    d.received,
                    r.sessions as u64 * r.per_session,
                    d.complete,
                    r.sessions
                ),
            ),
            Err(e) => (
                "-".into(),
                "-".into(),
                "-".into(),
                format!("ERROR {}", e.lines().next().unwrap_or("").replace('|', "/")),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {} × {} | {fill} | {:.1} | {stop} | {tcp} | {ack} | {conn} | {secs} | {rate} | {delivered} |",
            r.kind.name(),
            r.sessions,
            r.per_session,
            r.data_bytes as f64 / 1048576.0
        );
    }

    let _ = writeln!(md, "\n### 3. Restart time and RSS with a big queue\n");
    let _ = writeln!(
        md,
        "One offline durable session with the given number of messages queued (filled by \
         {FILL_PUBLISHERS} QoS 1 publishers), then SIGTERM and start again; RSS (VmRSS) right \
         after the broker serves clients, and after the session reconnected and drained (and \
         acked) its first {BIG_DRAIN} messages.\n"
    );
    let _ = writeln!(
        md,
        "| broker | queued | fill msg/s | data on disk MiB | RSS before restart MiB | stop ms | restart: TCP accept ms | restart: CONNACK ms | RSS after start MiB | first {BIG_DRAIN} drained in ms | RSS after drain MiB |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &big_rows {
        let fill = match &r.fill {
            Ok((m, d)) => format!("{:.0}", *m as f64 / d.as_secs_f64()),
            Err(e) => format!("ERROR {}", e.replace('|', "/")),
        };
        let (stop, tcp, ack) = match &r.restart {
            Ok(x) => (ms(x.stop), ms(x.tcp), ms(x.connack)),
            Err(e) => (
                "-".into(),
                "-".into(),
                format!("ERROR {}", e.lines().next().unwrap_or("")),
            ),
        };
        let drained = match &r.drain {
            Ok(d) => ms(d.elapsed),
            Err(e) => format!("ERROR {}", e.lines().next().unwrap_or("").replace('|', "/")),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {fill} | {:.1} | {} | {stop} | {tcp} | {ack} | {} | {drained} | {} |",
            r.kind.name(),
            r.queued,
            r.data_bytes as f64 / 1048576.0,
            mib(r.rss_before),
            mib(r.rss_start),
            mib(r.rss_drained)
        );
    }

    let _ = writeln!(md, "\n### 4. Publish cost vs stored data\n");
    let _ = writeln!(
        md,
        "Scenario 1 (durable QoS 1, 1→1, {n} messages, Holdfast `full`) on the same broker \
         process: first with an empty store, then with the big queue of scenario 3 stored for \
         another, offline, session. Ratio = loaded ÷ empty median msg/s (target ≥ 0.8).\n"
    );
    let _ = writeln!(
        md,
        "| broker | queued for another session | empty: msg/s | empty: p99 µs | loaded: msg/s | loaded: p99 µs | ratio |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    let mut cost_ratio = None;
    for r in &big_rows {
        let ratio = match (r.loaded.rate().median(), r.empty.rate().median()) {
            (Some(l), Some(e)) if e > 0.0 => Some(l / e),
            _ => None,
        };
        if r.kind == Kind::HoldfastFull {
            cost_ratio = ratio;
        }
        let p99 = |x: &Runs| {
            Stat::new(x.p99.clone())
                .median()
                .map_or("-".into(), |v| format!("{v:.0}"))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.kind.name(),
            r.queued,
            r.empty.rate().fmt(0),
            p99(&r.empty),
            r.loaded.rate().fmt(0),
            p99(&r.loaded),
            ratio.map_or("-".into(), |v| format!("{v:.2}"))
        );
    }

    // ---- targets ----
    let _ = writeln!(md, "\n### Targets\n");
    let _ = writeln!(md, "| target | measured | met? |");
    let _ = writeln!(md, "|---|---:|---|");
    let verdict = |v: Option<f64>, ok: &dyn Fn(f64) -> bool| match v {
        Some(v) if ok(v) => "yes",
        Some(_) => "**no**",
        None => "-",
    };
    let full_i = kinds.iter().position(|k| *k == Kind::HoldfastFull).unwrap();
    let normal_i = kinds
        .iter()
        .position(|k| *k == Kind::HoldfastNormal)
        .unwrap();
    for (si, spec) in specs.iter().enumerate() {
        let f = s1_ratio[si][full_i];
        let nr = s1_ratio[si][normal_i];
        let _ = writeln!(
            md,
            "| {}: full ≥ 0.50 × mosquitto | {} | {} |",
            spec.label,
            f.map_or("-".into(), |v| format!("{v:.2}")),
            verdict(f, &|v| v >= 0.5)
        );
        let _ = writeln!(
            md,
            "| {}: normal ≥ 1.00 × mosquitto | {} | {} |",
            spec.label,
            nr.map_or("-".into(), |v| format!("{v:.2}")),
            verdict(nr, &|v| v >= 1.0)
        );
    }
    let hf_big = big_rows.iter().find(|r| r.kind == Kind::HoldfastFull);
    let start_s = hf_big.and_then(|r| r.restart.as_ref().ok().map(|x| x.connack.as_secs_f64()));
    let _ = writeln!(
        md,
        "| restart with {} queued serves clients < 2 s | {} | {} |",
        args.big,
        start_s.map_or("-".into(), |v| format!("{v:.2} s")),
        verdict(start_s, &|v| v < 2.0)
    );
    let _ = writeln!(
        md,
        "| publish cost ratio (loaded ÷ empty) ≥ 0.8 | {} | {} |",
        cost_ratio.map_or("-".into(), |v| format!("{v:.2}")),
        verdict(cost_ratio, &|v| v >= 0.8)
    );

    println!("{md}");
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let out = target.join("durable-results.md");
    match std::fs::write(&out, &md) {
        Ok(()) => eprintln!("written to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}
