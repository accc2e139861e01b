//! Fan-in to offline durable sessions (`durable_compare -- --fanout ...`): how fast a
//! broker accepts QoS 1 messages for many offline durable sessions, and whether that rate
//! stays flat as the stored backlog grows. Holdfast acknowledges each message only after
//! its commit (`synchronous = "full"`: fsynced); Mosquitto acknowledges from memory.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::broker::BrokerProc;
use super::durable;

/// One fan-out measurement: `sessions` offline durable sessions, each getting
/// `per_session` messages, sent in `slices` equal rounds (every round sends the same
/// number of messages to every session, so the last round runs with the most stored).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub sessions: usize,
    pub per_session: u64,
    pub slices: u64,
}

impl std::str::FromStr for Shape {
    type Err = String;
    /// `SESSIONSxPER_SESSION`, e.g. `10000x100`.
    fn from_str(s: &str) -> Result<Shape, String> {
        let (a, b) = s.split_once('x').ok_or("expected SESSIONSxPER_SESSION")?;
        let sessions = a.parse().map_err(|_| format!("bad session count {a:?}"))?;
        let per_session: u64 = b.parse().map_err(|_| format!("bad message count {b:?}"))?;
        Ok(Shape {
            sessions,
            per_session,
            slices: per_session.clamp(1, 10),
        })
    }
}

/// What one broker did for one shape.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub broker: &'static str,
    pub shape: Shape,
    /// msg/s of each slice, in order (stored before slice i: i × sessions × per_slice).
    pub slices: Vec<f64>,
    /// msg/s over the whole fill.
    pub overall: f64,
    /// Broker CPU (user + system) per 1,000 messages, ms.
    pub cpu_per_k: Option<f64>,
    /// PUBLISH → PUBACK time over every message, µs: p50, p99, p99.9, max.
    pub ack_us: [u32; 4],
    /// Holdfast's staging-log merges seen in its log (`RUST_LOG=warn,holdfast::store=debug`):
    /// how many, and the longest `took_ms`. None without the debug lines.
    pub merges: Option<(usize, u64)>,
}

/// p50, p99, p99.9 and max of `v` (sorted in place).
fn percentiles(v: &mut [u32]) -> [u32; 4] {
    if v.is_empty() {
        return [0; 4];
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), at(0.999), v[v.len() - 1]]
}

/// The staging-log merges in a Holdfast log: (count, longest `took_ms`).
fn merges_in(log: &str) -> Option<(usize, u64)> {
    let took: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("staging log merged"))
        .filter_map(|l| {
            let rest = &l[l.find("took_ms=")? + 8..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!took.is_empty()).then(|| (took.len(), took.iter().copied().max().unwrap_or(0)))
}

/// Prepares the sessions, then fills them slice by slice.
pub fn run(
    rt: &tokio::runtime::Runtime,
    b: &BrokerProc,
    shape: Shape,
    publishers: usize,
    tag: &str,
) -> Result<Fanout, String> {
    let ids: Vec<String> = (0..shape.sessions).map(|i| format!("{tag}-s{i}")).collect();
    let topics: Vec<String> = (0..shape.sessions)
        .map(|i| format!("{tag}/t/{i}"))
        .collect();
    rt.block_on(durable::prepare_sessions(b.addr, &ids, &topics))
        .map_err(|e| format!("preparing sessions: {e}"))?;
    let per_slice = (shape.per_session / shape.slices).max(1);
    let mut slices = Vec::new();
    let (mut sent_all, mut took_all) = (0u64, Duration::ZERO);
    let cpu0 = cpu_ms(b.pid());
    let mut acks = Vec::new();
    for i in 0..shape.slices {
        let (sent, took) = rt
            .block_on(durable::fill(
                b.addr,
                &format!("{tag}-{i}"),
                &topics,
                per_slice,
                publishers,
                Some(&mut acks),
            ))
            .map_err(|e| format!("filling: {e}"))?;
        let expect = per_slice * shape.sessions as u64;
        if sent != expect {
            return Err(format!("slice {i}: {sent} of {expect} acknowledged"));
        }
        slices.push(sent as f64 / took.as_secs_f64());
        sent_all += sent;
        took_all += took;
    }
    let cpu_per_k = match (cpu0, cpu_ms(b.pid())) {
        (Some(a), Some(c)) if sent_all > 0 => Some((c - a) * 1000.0 / sent_all as f64),
        _ => None,
    };
    Ok(Fanout {
        broker: b.name,
        shape,
        slices,
        overall: sent_all as f64 / took_all.as_secs_f64(),
        cpu_per_k,
        ack_us: percentiles(&mut acks),
        merges: merges_in(&b.log_text()),
    })
}

/// User + system CPU of a process, ms (from `/proc/PID/stat`, 100 ticks per second).
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// The Markdown table of all runs.
pub fn report(runs: &[Result<Fanout, String>], publishers: usize, command: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Fan-in to offline durable sessions\n");
    let _ = writeln!(
        md,
        "`{command}`\n\n{publishers} QoS 1 publishers ({} in flight each), 64-byte payloads, \
         topics in turn over every session; Holdfast `synchronous = \"full\"` (each message \
         fsynced before its PUBACK), Mosquitto from memory. msg/s per slice: the first slice \
         starts with an empty store, the last with (slices - 1) / slices of the total stored. \
         PUBACK µs: each message's PUBLISH → PUBACK time at the publisher. Merges: \
         Holdfast's staging-log merges and the longest (with `RUST_LOG=warn,holdfast::store=debug`).\n",
        super::scenario::QOS1_WINDOW
    );
    let _ = writeln!(
        md,
        "| broker | sessions × messages | msg/s overall | first slice | last slice | last ÷ first | CPU ms / 1k msg | PUBACK µs p50 / p99 / p99.9 / max | merges (longest ms) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        match r {
            Ok(f) => {
                let first = f.slices.first().copied().unwrap_or(0.0);
                let last = f.slices.last().copied().unwrap_or(0.0);
                let _ = writeln!(
                    md,
                    "| {} | {} × {} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} / {} / {} / {} | {} |",
                    f.broker,
                    f.shape.sessions,
                    f.shape.per_session,
                    f.overall,
                    first,
                    last,
                    if first > 0.0 { last / first } else { 0.0 },
                    f.cpu_per_k.map_or("—".into(), |c| format!("{c:.1}")),
                    f.ack_us[0],
                    f.ack_us[1],
                    f.ack_us[2],
                    f.ack_us[3],
                    f.merges
                        .map_or("—".into(), |(n, ms)| format!("{n} ({ms})")),
                );
            }
            Err(e) => {
                let _ = writeln!(md, "| failed: {e} | | | | | | | | |");
            }
        }
    }
    let _ = writeln!(md);
    for f in runs.iter().flatten() {
        let s: Vec<String> = f.slices.iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(
            md,
            "- {} {}×{}: slices {}",
            f.broker,
            f.shape.sessions,
            f.shape.per_session,
            s.join(", ")
        );
    }
    md
}

/// What `compare` runs.
pub struct Plan<'a> {
    pub shapes: &'a [Shape],
    pub publishers: usize,
    pub max_queued: usize,
    pub with_mosquitto: bool,
    /// More lines for Holdfast's `[store]` table (`page_size = 1024`).
    pub store: &'a [String],
}

/// Starts a Holdfast (`full`, plus the plan's `[store]` lines) and a Mosquitto per shape,
/// back to back.
pub fn compare(
    rt: &tokio::runtime::Runtime,
    holdfast: &Path,
    mosquitto: &Path,
    plan: &Plan,
) -> Vec<Result<Fanout, String>> {
    let Plan {
        shapes,
        publishers,
        max_queued,
        with_mosquitto,
        store,
    } = *plan;
    let mut runs = Vec::new();
    let extra = format!("[store]\nsynchronous = \"full\"\n{}\n\n", store.join("\n"));
    for (i, shape) in shapes.iter().enumerate() {
        let opts = super::broker::DurableOpts {
            synchronous: "full",
            max_queued,
        };
        let b = BrokerProc::holdfast_custom("holdfast (full)", holdfast, &extra, max_queued);
        if let Ok(b) = &b {
            eprintln!("fan-in {shape:?}: holdfast pid {}", b.pid());
        }
        runs.push(
            b.map_err(|e| e.to_string())
                .and_then(|b| run(rt, &b, *shape, publishers, &format!("f{i}h"))),
        );
        eprintln!("{:?}", runs.last());
        if with_mosquitto {
            let m = BrokerProc::mosquitto_durable("mosquitto (memory)", mosquitto, &opts);
            runs.push(
                m.map_err(|e| e.to_string())
                    .and_then(|m| run(rt, &m, *shape, publishers, &format!("f{i}m"))),
            );
            eprintln!("{:?}", runs.last());
        }
    }
    runs
}
