//! Memory at scale: Holdfast (durable sessions in SQLite) vs Mosquitto (in memory,
//! `persistence false`), side by side in one run on 127.0.0.1.
//!
//! `cargo bench --bench scale_memory [-- --sessions N] [--per-session 1,100,1000]
//! [--fill-publishers N] [--mosquitto PATH] [--holdfast PATH] [--before PATH]
//! [--holdfast-only] [--hold SECS] [--pause SECS]`
//!
//! `--pause SECS` waits that long between the fill and the drain, so Holdfast's writer goes
//! idle and merges its staging log then (after 5 s without work); "peak before the drain"
//! is the peak RSS up to the end of the pause.
//!
//! `--hold SECS` keeps each broker running that long after its reading, every session still
//! connected (to read `/proc/PID/smaps` or attach a profiler).
//!
//! `--holdfast PATH` measures another build instead of this one; `--before PATH` adds a row
//! for a second build (e.g. the one before a change), run in the same session.
//!
//! For each `--per-session` value P, against freshly started brokers, one after the other:
//! 1. `--sessions` durable sessions (3.1.1 clean session 0) subscribe to a topic of their
//!    own at QoS 1 and go offline;
//! 2. `--fill-publishers` (8) publishers put P 64-byte QoS 1 messages on every topic (each
//!    topic has one publisher, so each session's messages have rising sequence numbers;
//!    more publishers fill 10,000 × 1,000 faster: the broker commits bigger groups);
//! 3. every session reconnects at once and drains its queue, acking each message; the
//!    order is checked;
//! 4. with every session still connected, the broker's resident memory is read.
//!
//! Reported: peak RSS over the broker's whole life (`VmHWM`: fill and drain included), RSS
//! with all sessions connected after the drain, per connected session above idle, and the
//! drain rate with the broker's CPU time per 1,000 messages drained (less sensitive than
//! the rate to other load on the machine). Prints a Markdown table (also written to
//! `target/scale-memory-results.md`).

mod loadgen;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use loadgen::broker::BrokerProc;
use loadgen::durable;

/// Publishers used to fill the queues, unless `--fill-publishers` says otherwise.
const FILL_PUBLISHERS: usize = 8;
/// Settling time before a resident-memory reading (freed pages go back, timers run).
const SETTLE: Duration = Duration::from_secs(2);

struct Args {
    sessions: usize,
    per_session: Vec<u64>,
    fill_publishers: usize,
    mosquitto: PathBuf,
    holdfast: PathBuf,
    before: Option<PathBuf>,
    holdfast_only: bool,
    /// Seconds to keep every broker running after its drain reading (inspect it then).
    hold: u64,
    /// Seconds to wait between the fill and the drain (Holdfast's idle merge runs then).
    pause: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench scale_memory -- [--sessions N] [--per-session 1,100,1000] \
         [--fill-publishers N] [--mosquitto PATH] [--holdfast PATH] [--before PATH] [--holdfast-only] [--hold SECS] [--pause SECS]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        sessions: 10_000,
        per_session: vec![1, 100],
        fill_publishers: FILL_PUBLISHERS,
        mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
        holdfast: PathBuf::from(env!("CARGO_BIN_EXE_holdfast")),
        before: None,
        holdfast_only: false,
        hold: 0,
        pause: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--sessions" => a.sessions = val("--sessions").parse().unwrap_or_else(|_| usage()),
            "--per-session" => {
                a.per_session = val("--per-session")
                    .split(',')
                    .map(|v| v.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--fill-publishers" => {
                a.fill_publishers = val("--fill-publishers")
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage())
            }
            "--mosquitto" => a.mosquitto = val("--mosquitto").into(),
            "--holdfast" => a.holdfast = val("--holdfast").into(),
            "--before" => a.before = Some(val("--before").into()),
            "--holdfast-only" => a.holdfast_only = true,
            "--hold" => a.hold = val("--hold").parse().unwrap_or_else(|_| usage()),
            "--pause" => a.pause = val("--pause").parse().unwrap_or_else(|_| usage()),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    a
}

/// One broker's figures for one P.
struct Row {
    broker: &'static str,
    per_session: u64,
    idle_kib: u64,
    /// Peak RSS up to the start of the drain (fill and `--pause`).
    filled_kib: u64,
    peak_kib: u64,
    connected_kib: u64,
    drained: durable::Held,
    /// Broker CPU time (user + system) during the drain, per 1,000 messages drained.
    drain_cpu_ms_per_k: Option<f64>,
    fill_rate: f64,
    error: Option<String>,
}

fn run_one(
    rt: &tokio::runtime::Runtime,
    mut b: BrokerProc,
    sessions: usize,
    per_session: u64,
    fill_publishers: usize,
    (hold, pause): (u64, u64),
) -> Row {
    std::thread::sleep(SETTLE);
    let kib = |b: &BrokerProc, f: &str| b.status_kib(f).unwrap_or(0);
    let mut row = Row {
        broker: b.name,
        per_session,
        idle_kib: kib(&b, "VmRSS"),
        filled_kib: 0,
        peak_kib: 0,
        connected_kib: 0,
        drained: Default::default(),
        drain_cpu_ms_per_k: None,
        fill_rate: 0.0,
        error: None,
    };
    let tag = format!("p{per_session}");
    let ids: Vec<String> = (0..sessions).map(|i| format!("{tag}-s{i}")).collect();
    let topics: Vec<String> = (0..sessions).map(|i| format!("scale/{tag}/{i}")).collect();
    let result = (|| -> Result<(), String> {
        eprintln!("  {}: preparing {sessions} sessions", b.name);
        rt.block_on(durable::prepare_sessions(b.addr, &ids, &topics))
            .map_err(|e| format!("preparing sessions: {e}"))?;
        eprintln!("  {}: filling {} × {per_session}", b.name, sessions);
        let (sent, took) = rt
            .block_on(durable::fill(
                b.addr,
                &tag,
                &topics,
                per_session,
                fill_publishers,
                None,
            ))
            .map_err(|e| format!("filling: {e}"))?;
        row.fill_rate = sent as f64 / took.as_secs_f64();
        if pause > 0 {
            eprintln!("  {}: pausing {pause} s before the drain", b.name);
            std::thread::sleep(Duration::from_secs(pause));
        }
        row.filled_kib = kib(&b, "VmHWM");
        eprintln!("  {}: draining", b.name);
        let cpu0 = b.cpu_time();
        let (held, conns) = rt
            .block_on(durable::drain_and_hold(b.addr, &ids, per_session))
            .map_err(|e| format!("draining: {e}"))?;
        if let (Some(c0), Some(c1)) = (cpu0, b.cpu_time()) {
            if held.drained.received > 0 {
                row.drain_cpu_ms_per_k =
                    Some(c1.saturating_sub(c0).as_secs_f64() * 1e6 / held.drained.received as f64);
            }
        }
        row.drained = held;
        std::thread::sleep(SETTLE);
        row.connected_kib = kib(&b, "VmRSS");
        row.peak_kib = kib(&b, "VmHWM");
        if hold > 0 {
            eprintln!(
                "  {}: pid {} held {hold} s with every session connected",
                b.name,
                b.pid()
            );
            std::thread::sleep(Duration::from_secs(hold));
        }
        drop(conns);
        b.check_alive()
    })();
    if let Err(e) = result {
        eprintln!("  {} failed: {e}\n{}", b.name, b.log_tail());
        row.peak_kib = kib(&b, "VmHWM");
        row.error = Some(e);
    }
    row
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn main() {
    let args = parse_args();
    let rt = loadgen::runtime();
    let holdfast_bin = args.holdfast.clone();
    let mut rows = Vec::new();
    for &p in &args.per_session {
        eprintln!("{} sessions × {p} queued", args.sessions);
        let run = |b: BrokerProc| {
            run_one(
                &rt,
                b,
                args.sessions,
                p,
                args.fill_publishers,
                (args.hold, args.pause),
            )
        };
        if let Some(before) = &args.before {
            let mut hf = BrokerProc::holdfast(before).expect("start holdfast (before)");
            hf.name = "holdfast (before)";
            rows.push(run(hf));
        }
        rows.push(run(
            BrokerProc::holdfast(&holdfast_bin).expect("start holdfast")
        ));
        if !args.holdfast_only {
            rows.push(run(
                BrokerProc::mosquitto(&args.mosquitto).expect("start mosquitto")
            ));
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "Command: `{}`  \n{} durable sessions (3.1.1, QoS 1, 64-byte payloads, window 64), filled \
         while offline, then all reconnect and drain; Mosquitto 2.0.11 in memory (`persistence \
         false`). Peak = VmHWM over the broker's life, \"before the drain\" up to the end of the fill \
         (and of `--pause`); \"connected\" = VmRSS with every session connected after its drain.\n",
        loadgen::bench_command("scale_memory"),
        args.sessions
    );
    let _ = writeln!(
        md,
        "| queued per session | broker | idle RSS MiB | peak before the drain MiB | peak RSS MiB | peak ratio vs mosquitto | RSS all connected MiB | KiB per connected session | drain msg/s | drain CPU ms/1k | out of order | fill msg/s | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let peer = rows
            .iter()
            .find(|m| m.broker == "mosquitto" && m.per_session == r.per_session);
        let ratio = match peer {
            Some(m) if m.peak_kib > 0 && r.peak_kib > 0 => {
                format!("{:.2}", r.peak_kib as f64 / m.peak_kib as f64)
            }
            _ => "–".into(),
        };
        let per_conn = if r.connected_kib > 0 {
            format!(
                "{:.2}",
                r.connected_kib.saturating_sub(r.idle_kib) as f64 / args.sessions as f64
            )
        } else {
            "–".into()
        };
        let d = &r.drained.drained;
        let rate = if d.elapsed > Duration::ZERO {
            format!("{:.0}", d.received as f64 / d.elapsed.as_secs_f64())
        } else {
            "–".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            r.per_session,
            r.broker,
            mib(r.idle_kib),
            mib(r.filled_kib),
            mib(r.peak_kib),
            ratio,
            mib(r.connected_kib),
            per_conn,
            rate,
            r.drain_cpu_ms_per_k
                .map_or_else(|| "–".into(), |c| format!("{c:.1}")),
            r.drained.out_of_order,
            r.fill_rate,
            r.error.as_deref().unwrap_or("")
        );
    }
    println!("{md}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/scale-memory-results.md");
    if let Err(e) = std::fs::write(&out, &md) {
        eprintln!("could not write {}: {e}", out.display());
    }
}
