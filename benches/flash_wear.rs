//! Flash wear: bytes written to storage per durable message.
//!
//! `cargo bench --bench flash_wear [-- --quick] [--rates 1,20,1000,0] [--store 'KEY = VALUE']...
//! [--settle SECS] [--strace] [--holdfast PATH]`
//!
//! For each rate (messages per second; `0` = full load, the publisher keeps
//! `QOS1_WINDOW` messages unacknowledged), a fresh Holdfast (release binary, temporary data
//! dir, `[store] synchronous = "full"` and `min_free_percent = 0` unless `--store` says
//! otherwise) gets one durable subscriber that subscribes and goes offline, so every
//! message is queued on disk and stays there. One publisher then sends 64-byte QoS 1 messages at the rate and waits for
//! every PUBACK. `write_bytes` of `/proc/PID/io` (bytes the broker process caused to be
//! sent to the block layer, counted in whole 4 KiB pages when they are dirtied) is read
//! before and after; "after" is `--settle` seconds (default 6) after the last PUBACK, so
//! the idle WAL checkpoint (after 5 s without work) is counted too. The same wait comes
//! after the set-up, before "before". `--strace` also counts the broker's fsync /
//! fdatasync calls (`strace -c -f`) during each run. `--holdfast PATH` measures another
//! build (e.g. an older commit) instead of this one.
//!
//! Before the broker runs, the floor is measured in the same temporary file system: a file
//! appended to and `fdatasync`ed once per record, with nothing else (`write_bytes` of
//! `/proc/thread-self/io` of the one thread doing it). One 64-byte record per sync is the
//! least any store that syncs each message before acknowledging it can write; one
//! 1,048-byte record per sync is what SQLite appends for a one-page commit with 1 KiB pages
//! (a page and its 24-byte WAL frame header). `--no-floor` skips it.
//!
//! Prints a Markdown table (also written to `target/flash-wear-results.md`).

mod loadgen;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast::protocol::{Packet, QoS};
use loadgen::broker::BrokerProc;
use loadgen::client;
use loadgen::scenario::{PAYLOAD_LEN, QOS1_WINDOW};
use tokio::sync::Notify;

/// Seconds of publishing per fixed rate (full load: `FULL_LOAD_MESSAGES` messages).
const RUN_SECS: u64 = 30;
const FULL_LOAD_MESSAGES: u64 = 30_000;
/// Queue limit: nothing is dropped.
const MAX_QUEUED: usize = 2_000_000;

struct Args {
    rates: Vec<u64>,
    store: Vec<String>,
    settle: u64,
    quick: bool,
    strace: bool,
    /// Another Holdfast binary to measure (an older build, for before/after).
    holdfast: Option<PathBuf>,
    /// Measure the one-sync-per-record floor first.
    floor: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench flash_wear -- [--quick] [--rates 1,20,1000,0] \
         [--store 'KEY = VALUE']... [--settle SECS] [--strace] [--holdfast PATH] [--no-floor]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        rates: vec![1, 20, 1000, 0],
        store: Vec::new(),
        settle: 6,
        quick: false,
        strace: false,
        holdfast: None,
        floor: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => a.quick = true,
            "--strace" => a.strace = true,
            "--no-floor" => a.floor = false,
            "--rates" => {
                let v = it.next().unwrap_or_else(|| usage());
                a.rates = v
                    .split(',')
                    .map(|r| r.trim().parse().unwrap_or_else(|_| usage()))
                    .collect();
            }
            "--store" => a.store.push(it.next().unwrap_or_else(|| usage())),
            "--holdfast" => a.holdfast = Some(it.next().unwrap_or_else(|| usage()).into()),
            "--settle" => {
                a.settle = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    a
}

/// What one run measured.
struct Run {
    rate: u64,
    messages: u64,
    elapsed: Duration,
    write_bytes: u64,
    wchar: u64,
    /// Median and 99th percentile PUBACK latency.
    p50: Duration,
    p99: Duration,
    fsyncs: Option<u64>,
    db_bytes: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Publishes `n` QoS 1 messages at `rate` per second (0 = as fast as the window allows)
/// and waits for every PUBACK; returns the elapsed time and the PUBACK latencies.
async fn publish(
    addr: std::net::SocketAddr,
    rate: u64,
    n: u64,
) -> std::io::Result<(Duration, Vec<Duration>)> {
    let (mut r, mut w) = client::connect(addr, "wear-pub", 600).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(Notify::new());
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; 65536]));
    let reader = {
        let (acked, notify, sent_at) = (acked.clone(), notify.clone(), sent_at.clone());
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n as usize);
            while acked.load(Ordering::SeqCst) < n {
                match r.next_packet().await? {
                    Packet::PubAck(a) => {
                        let t = sent_at.lock().expect("not poisoned")[a.packet_id as usize].take();
                        if let Some(t) = t {
                            lat.push(t.elapsed());
                        }
                        acked.fetch_add(1, Ordering::SeqCst);
                        notify.notify_one();
                    }
                    other => {
                        return Err(std::io::Error::other(format!(
                            "unexpected {}",
                            other.name()
                        )))
                    }
                }
            }
            Ok::<_, std::io::Error>(lat)
        })
    };
    let topic: Arc<str> = Arc::from("sensors/wear/temperature");
    let payload = Bytes::from(vec![b'x'; PAYLOAD_LEN]);
    let start = Instant::now();
    for i in 0..n {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        while i - acked.load(Ordering::SeqCst) >= QOS1_WINDOW as u64 {
            let _ = tokio::time::timeout(Duration::from_millis(50), notify.notified()).await;
        }
        let pid = (i % 65535) as u16 + 1;
        sent_at.lock().expect("not poisoned")[pid as usize] = Some(Instant::now());
        w.push(&client::publish(
            &topic,
            QoS::AtLeastOnce,
            pid,
            payload.clone(),
        ));
        w.flush().await?;
    }
    let mut lat = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .map_err(|_| std::io::Error::other("PUBACKs stalled"))?
        .map_err(std::io::Error::other)??;
    let elapsed = start.elapsed();
    client::disconnect(w).await?;
    lat.sort();
    Ok((elapsed, lat))
}

fn run_one(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    args: &Args,
    rate: u64,
) -> Result<Run, String> {
    let mut store = String::from("[store]\n");
    // The disk's free space is not what this measures (a shared build machine may be
    // nearly full): only `--store` limits the store.
    for (key, default) in [("synchronous", "\"full\""), ("min_free_percent", "0")] {
        if !args.store.iter().any(|s| s.trim_start().starts_with(key)) {
            let _ = writeln!(store, "{key} = {default}");
        }
    }
    for s in &args.store {
        store.push_str(s);
        store.push('\n');
    }
    store.push('\n');
    let broker = BrokerProc::holdfast_custom("holdfast", bin, &store, MAX_QUEUED)
        .map_err(|e| format!("start: {e}"))?;
    let addr = broker.addr;
    let secs = if args.quick { RUN_SECS / 3 } else { RUN_SECS };
    let n = if rate == 0 {
        if args.quick {
            FULL_LOAD_MESSAGES / 3
        } else {
            FULL_LOAD_MESSAGES
        }
    } else {
        rate * secs
    };
    rt.block_on(async {
        let (mut r, mut w, _) = client::connect_with(addr, "wear-sub", 600, false).await?;
        client::subscribe(&mut r, &mut w, "sensors/#", QoS::AtLeastOnce).await?;
        client::disconnect(w).await
    })
    .map_err(|e| format!("subscriber: {e}"))?;
    std::thread::sleep(Duration::from_secs(args.settle));
    let strace = if args.strace {
        Command::new("strace")
            .args(["-c", "-f", "-e", "trace=fsync,fdatasync", "-p"])
            .arg(broker.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()
    } else {
        None
    };
    if strace.is_some() {
        std::thread::sleep(Duration::from_millis(500));
    }
    let io0 = broker.io().ok_or("no /proc/PID/io")?;
    let (elapsed, lat) = rt
        .block_on(publish(addr, rate, n))
        .map_err(|e| format!("publish: {e}"))?;
    std::thread::sleep(Duration::from_secs(args.settle));
    let io1 = broker.io().ok_or("no /proc/PID/io")?;
    let fsyncs = strace.and_then(|child| {
        // SIGINT makes strace detach and print its summary.
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        Some(
            text.lines()
                .filter(|l| l.ends_with("fsync") || l.ends_with("fdatasync"))
                .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
                .sum(),
        )
    });
    Ok(Run {
        rate,
        messages: n,
        elapsed,
        write_bytes: io1.write_bytes.saturating_sub(io0.write_bytes),
        wchar: io1.wchar.saturating_sub(io0.wchar),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        fsyncs,
        db_bytes: broker.data_bytes(),
    })
}

/// `write_bytes` of the calling thread (`/proc/thread-self/io`).
fn thread_write_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes written per record when a file is appended `records` records of `len` bytes and
/// `fdatasync`ed after each one, in a fresh file in the temporary directory the brokers use.
fn sync_floor(len: usize, records: u64) -> Result<f64, String> {
    use std::io::Write as _;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(dir.path().join("floor.log")).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    let record = vec![b'x'; len];
    let before = thread_write_bytes().ok_or("no /proc/thread-self/io")?;
    for _ in 0..records {
        f.write_all(&record).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
    }
    let after = thread_write_bytes().ok_or("no /proc/thread-self/io")?;
    Ok(after.saturating_sub(before) as f64 / records as f64)
}

fn main() {
    let args = parse_args();
    let bin = args
        .holdfast
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_holdfast")));
    let rt = loadgen::runtime();
    let mut out = String::new();
    let _ = writeln!(out, "Command: `{}`\n", loadgen::bench_command("flash_wear"));
    if args.floor {
        let records = if args.quick { 200 } else { 1000 };
        for (len, what) in [
            (PAYLOAD_LEN, "one 64-byte record per fdatasync"),
            (
                1048,
                "one 1,048-byte record (a 1 KiB page + WAL frame header) per fdatasync",
            ),
        ] {
            let line = match sync_floor(len, records) {
                Ok(per) => format!("Floor, {what}, no SQLite: {per:.0} B written per record"),
                Err(e) => format!("Floor, {what}: failed: {e}"),
            };
            println!("{line}");
            out.push_str(&line);
            out.push('\n');
        }
        out.push('\n');
        println!();
    }
    let _ = writeln!(
        out,
        "| rate (msg/s) | messages | write_bytes/msg | wchar/msg | fsyncs/msg | PUBACK p50 | PUBACK p99 | achieved msg/s | data dir after |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    print!("{out}");
    for &rate in &args.rates {
        let line = match run_one(&rt, &bin, &args, rate) {
            Ok(r) => {
                let per = |b: u64| b as f64 / r.messages as f64;
                format!(
                    "| {} | {} | {:.0} B | {:.0} B | {} | {:.1} ms | {:.1} ms | {:.0} | {:.1} MiB |",
                    if r.rate == 0 {
                        "full load".to_string()
                    } else {
                        r.rate.to_string()
                    },
                    r.messages,
                    per(r.write_bytes),
                    per(r.wchar),
                    r.fsyncs
                        .map(|f| format!("{:.2}", per(f)))
                        .unwrap_or_else(|| "-".into()),
                    r.p50.as_secs_f64() * 1e3,
                    r.p99.as_secs_f64() * 1e3,
                    r.messages as f64 / r.elapsed.as_secs_f64(),
                    r.db_bytes as f64 / (1024.0 * 1024.0),
                )
            }
            Err(e) => format!("| {rate} | failed: {e} | | | | | | | |"),
        };
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/flash-wear-results.md");
    if let Err(e) = std::fs::write(&path, &out) {
        eprintln!("could not write {}: {e}", path.display());
    }
}
