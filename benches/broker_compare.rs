//! Holdfast vs Mosquitto, side by side in one run on 127.0.0.1.
//!
//! `cargo bench --bench broker_compare [-- --messages N] [--quick] [--window W]
//! [--idle N] [--mosquitto PATH]`
//!
//! Spawns the release `holdfast` binary and `mosquitto` on free ports with equivalent
//! settings, drives both with the same raw MQTT 3.1.1 load generator (built on Holdfast's
//! codec, in this process), and prints Markdown tables (also written to
//! `target/bench-results.md`).

mod loadgen;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use holdfast::protocol::QoS;
use loadgen::broker::{proc_cpu_time, BrokerProc, MAX_INFLIGHT, MAX_QUEUED};
use loadgen::scenario::{self, Outcome, Spec, PAYLOAD_LEN, QOS1_WINDOW};

struct Args {
    messages: u64,
    window: u64,
    idle: usize,
    mosquitto: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench broker_compare -- [--messages N] [--quick] [--window W] \
         [--idle N] [--mosquitto PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        messages: 100_000,
        window: 1000,
        idle: 1000,
        mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--quick" => {
                a.messages = 10_000;
                a.idle = 200;
            }
            "--messages" => a.messages = val("--messages").parse().unwrap_or_else(|_| usage()),
            "--window" => a.window = val("--window").parse().unwrap_or_else(|_| usage()),
            "--idle" => a.idle = val("--idle").parse().unwrap_or_else(|_| usage()),
            "--mosquitto" => a.mosquitto = val("--mosquitto").into(),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    a
}

/// Per broker at the end of the run: name, VmHWM KiB, VmRSS KiB, total CPU time.
type PeakStats = (&'static str, Option<u64>, Option<u64>, Option<Duration>);

/// One row of the throughput table.
struct Row {
    scenario: String,
    broker: &'static str,
    result: Result<Outcome, String>,
    broker_cpu: Option<Duration>,
    /// CPU time of this process (the load generator) during the scenario.
    loadgen_cpu: Option<Duration>,
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn delivered(spec: &Spec, o: &Outcome) -> String {
    let pct = if o.sent > 0 {
        100.0 * o.received as f64 / o.sent as f64
    } else {
        0.0
    };
    let mut s = format!("{}/{} ({pct:.1}%)", o.received, o.sent);
    if spec.qos != QoS::AtMostOnce && o.received != o.sent {
        s.push_str(" **INCOMPLETE**");
    }
    if o.duplicates > 0 {
        let _ = write!(s, ", {} dup", o.duplicates);
    }
    s
}

fn main() {
    let args = parse_args();
    let holdfast_bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let command = loadgen::bench_command("broker_compare");

    let rt = loadgen::runtime();

    // Both brokers stay up for the whole run; the guards kill them on every exit path.
    let mut holdfast = BrokerProc::holdfast(&holdfast_bin).expect("starting holdfast");
    let mut mosquitto = BrokerProc::mosquitto(&args.mosquitto).expect("starting mosquitto");
    eprintln!(
        "holdfast pid {} on {}, mosquitto pid {} on {}",
        holdfast.pid(),
        holdfast.addr,
        mosquitto.pid(),
        mosquitto.addr
    );

    // Scenario 5 runs first, on the freshly started brokers, so that heap memory left over
    // from the throughput scenarios does not hide the per-connection cost. Idle
    // connections: RSS once all are connected. Holdfast first (odd).
    let mut idle_rows = Vec::new();
    for b in [&mut holdfast, &mut mosquitto] {
        eprintln!("connecting {} idle clients to {} ...", args.idle, b.name);
        let before = b.status_kib("VmRSS");
        let t = Instant::now();
        let conns = rt.block_on(scenario::idle_connections(b.addr, args.idle, "idle"));
        let took = t.elapsed();
        let row = match conns {
            Ok(conns) => {
                std::thread::sleep(Duration::from_millis(1000));
                let rss = b.status_kib("VmRSS");
                let _guard = rt.enter();
                drop(conns);
                Ok((before, rss, took))
            }
            Err(e) => Err(e.to_string()),
        };
        idle_rows.push((b.name, row));
        std::thread::sleep(Duration::from_millis(500));
    }
    // Warm-up: 1k messages at QoS 0 (flow-controlled) and 1k at QoS 1 per broker.
    for b in [&holdfast, &mosquitto] {
        for (qos, window) in [
            (QoS::AtMostOnce, Some(args.window)),
            (QoS::AtLeastOnce, None),
        ] {
            let spec = Spec {
                label: "warm-up".into(),
                qos,
                pairs: 1,
                messages: 1000,
                window,
            };
            let tag = format!("warm{}", qos as u8);
            rt.block_on(scenario::run(b.addr, &spec, &tag))
                .unwrap_or_else(|e| panic!("warm-up against {} failed: {e}", b.name));
        }
    }

    let n = args.messages;
    let w = args.window;
    let mk = |label: String, qos, pairs, window| Spec {
        label,
        qos,
        pairs,
        messages: n,
        window,
    };
    // (scenario number, spec): odd numbers run Holdfast first, even Mosquitto first.
    let specs = [
        (
            1,
            mk(
                "1. QoS 0, 1→1, unthrottled".into(),
                QoS::AtMostOnce,
                1,
                None,
            ),
        ),
        (
            1,
            mk(
                format!("1w. QoS 0, 1→1, window {w}"),
                QoS::AtMostOnce,
                1,
                Some(w),
            ),
        ),
        (2, mk("2. QoS 1, 1→1".into(), QoS::AtLeastOnce, 1, None)),
        (
            3,
            mk(
                "3. QoS 0, 4→4, unthrottled".into(),
                QoS::AtMostOnce,
                4,
                None,
            ),
        ),
        (
            3,
            mk(
                format!("3w. QoS 0, 4→4, window {w}"),
                QoS::AtMostOnce,
                4,
                Some(w),
            ),
        ),
        (4, mk("4. QoS 1, 4→4".into(), QoS::AtLeastOnce, 4, None)),
    ];

    let mut rows: Vec<Row> = Vec::new();
    for (idx, (num, spec)) in specs.iter().enumerate() {
        let order: [&mut BrokerProc; 2] = if num % 2 == 1 {
            [&mut holdfast, &mut mosquitto]
        } else {
            [&mut mosquitto, &mut holdfast]
        };
        for b in order {
            eprintln!("running {} against {} ...", spec.label, b.name);
            let cpu0 = b.cpu_time();
            let own0 = proc_cpu_time("self");
            let tag = format!("s{idx}");
            let result = rt
                .block_on(scenario::run(b.addr, spec, &tag))
                .map_err(|e| e.to_string())
                .and_then(|o| b.check_alive().map(|()| o));
            let delta = |a: Option<Duration>, z: Option<Duration>| Some(z?.saturating_sub(a?));
            let broker_cpu = delta(cpu0, b.cpu_time());
            let loadgen_cpu = delta(own0, proc_cpu_time("self"));
            if let Err(e) = &result {
                eprintln!("  {} failed: {e}", b.name);
            }
            rows.push(Row {
                scenario: spec.label.clone(),
                broker: b.name,
                result,
                broker_cpu,
                loadgen_cpu,
            });
            // Let the broker finish tearing down the scenario's connections.
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    let peak: Vec<PeakStats> = [&holdfast, &mosquitto]
        .iter()
        .map(|b| {
            (
                b.name,
                b.status_kib("VmHWM"),
                b.status_kib("VmRSS"),
                b.cpu_time(),
            )
        })
        .collect();

    // ---- report ----
    let mut md = String::new();
    let _ = writeln!(md, "## Holdfast vs Mosquitto\n");
    let _ = writeln!(md, "Command: `{command}`\n");
    let _ = writeln!(
        md,
        "- Both brokers on 127.0.0.1, run one after the other per scenario in one process \
         (odd scenarios Holdfast first, even Mosquitto first), after a 1k-message warm-up.\n\
         - Load generator: raw MQTT 3.1.1 client on Holdfast's codec, tokio multi-thread \
         runtime in the bench process; **it shares the machine's {} cores with the broker**, \
         so absolute numbers understate both brokers.\n\
         - {n} messages per scenario (split evenly over publishers), {PAYLOAD_LEN}-byte payload \
         with an 8-byte send timestamp; latency = receive − send time.\n\
         - QoS 1 publishers keep up to {QOS1_WINDOW} PUBACKs outstanding; subscribers batch \
         PUBACKs per read. Unthrottled QoS 0 publishers write as fast as the socket accepts; \
         \"window {w}\" rows are flow-controlled: a publisher is at most {w} messages ahead of \
         what its subscriber has received.\n\
         - Scenario 5 (idle connections) runs first, on the freshly started brokers; peak \
         RSS is read at the very end.\n\
         - Both brokers: max in-flight {MAX_INFLIGHT}, max queued messages {MAX_QUEUED}, no \
         persistence (Mosquitto `persistence false`), Holdfast log level warn.\n\
         - msg/s = messages received by subscribers / (last receive − first send). Ratio = \
         Holdfast msg/s ÷ Mosquitto msg/s. Broker CPU / loadgen CPU = user+sys CPU time the \
         broker process / the bench process used during the scenario (2 cores = at most \
         2000 ms per wall-clock second for both together).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        md,
        "| scenario | broker | msg/s | p50 µs | p99 µs | delivered | ratio vs mosquitto (msg/s) | broker CPU ms | loadgen CPU ms |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---|---:|---:|---:|");
    for (spec_i, (_, spec)) in specs.iter().enumerate() {
        let pair = &rows[spec_i * 2..spec_i * 2 + 2];
        let mosq_rate = pair
            .iter()
            .find(|r| r.broker == "mosquitto")
            .and_then(|r| r.result.as_ref().ok())
            .map(|o| o.msgs_per_sec());
        // Holdfast row first in the table regardless of run order.
        let mut sorted: Vec<&Row> = pair.iter().collect();
        sorted.sort_by_key(|r| r.broker != "holdfast");
        for r in sorted {
            let ms = |d: Option<Duration>| d.map_or("-".into(), |d| d.as_millis().to_string());
            let cpu = format!("{} | {}", ms(r.broker_cpu), ms(r.loadgen_cpu));
            match &r.result {
                Ok(o) => {
                    let ratio = match mosq_rate {
                        Some(m) if m > 0.0 => format!("{:.2}", o.msgs_per_sec() / m),
                        _ => "-".into(),
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                        r.scenario,
                        r.broker,
                        o.msgs_per_sec(),
                        fmt_us(o.percentile_us(50.0)),
                        fmt_us(o.percentile_us(99.0)),
                        delivered(spec, o),
                        ratio,
                        cpu
                    );
                }
                Err(e) => {
                    let e = e.lines().next().unwrap_or("").replace('|', "/");
                    let _ = writeln!(
                        md,
                        "| {} | {} | ERROR | - | - | {e} | - | {cpu} |",
                        r.scenario, r.broker
                    );
                }
            }
        }
    }
    let mib = |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    let _ = writeln!(md, "\n### Memory\n");
    let _ = writeln!(
        md,
        "| broker | peak RSS (VmHWM) MiB | RSS before idle clients MiB | RSS with {} idle connections MiB | KiB per idle connection | connect time (s) | RSS at end MiB | total broker CPU s |",
        args.idle
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for ((name, hwm, end_rss, cpu), (_, idle)) in peak.iter().zip(&idle_rows) {
        let (before, with, per, took) = match idle {
            Ok((b, w, t)) => {
                let per = match (b, w) {
                    (Some(b), Some(w)) if args.idle > 0 => {
                        format!("{:.1}", (*w as f64 - *b as f64) / args.idle as f64)
                    }
                    _ => "-".into(),
                };
                (mib(*b), mib(*w), per, format!("{:.2}", t.as_secs_f64()))
            }
            Err(e) => ("-".into(), format!("ERROR: {e}"), "-".into(), "-".into()),
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {before} | {with} | {per} | {took} | {} | {} |",
            mib(*hwm),
            mib(*end_rss),
            cpu.map_or("-".into(), |c| format!("{:.2}", c.as_secs_f64()))
        );
    }

    println!("{md}");
    // The bench binary lives in <target>/release/deps/.
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let out = target.join("bench-results.md");
    match std::fs::write(&out, &md) {
        Ok(()) => eprintln!("written to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
    drop(holdfast);
    drop(mosquitto);
}
