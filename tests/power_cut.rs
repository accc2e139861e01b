//! Power cuts: the crash loop of `tests/crash_loop.rs` (`tests/common/crash.rs`) with the
//! broker's TEST ONLY power-cut VFS on (`HOLDFAST_TEST_POWERCUT_VFS=1`, see
//! `src/store/powercut/`), so that every SIGKILL is a power cut: every write to the
//! database or its WAL that no `fsync`/`fdatasync` covered is undone before the next start,
//! and a kill inside a sync leaves a torn sync (some of its writes durable, in a random
//! order).
//!
//! - `synchronous = "full"`: no acknowledged message is lost and the store always opens
//!   (strict checks, as in the crash loop).
//! - `synchronous = "normal"`: the same harness loses acknowledged messages (the WAL is
//!   synced only at checkpoints), which shows that it really cuts.
//!
//! Environment: `HOLDFAST_TEST_POWERCUT_ROUNDS` (default 20; for `normal` the most rounds
//! before a loss must be seen, unless `HOLDFAST_TEST_POWERCUT_ALL_ROUNDS=1` runs them all,
//! as the soak does), `HOLDFAST_TEST_POWERCUT_SEED` (default: from the clock; always
//! printed). `scripts/powercut_soak.sh` runs many rounds and prints the summary lines.

#[path = "common/crash.rs"]
mod crash;
#[path = "common/daemon.rs"]
mod daemon;

use crash::{crash_loop, env_u64, seed_from_env, LoopOptions, Outcome};

/// Bytes of one WAL frame: a 24-byte frame header and a 4096-byte page (the default page
/// size, which Holdfast keeps).
const WAL_FRAME: u64 = 24 + 4096;

/// What the broker's log says about the cuts (one `power cut applied` line per file that
/// lost writes, at the start after the kill).
#[derive(Debug, Default)]
struct Cuts {
    /// Starts that found writes to undo.
    cuts: u64,
    /// Of those, cuts that landed inside a sync.
    inside_sync: u64,
    /// Of those, torn syncs: some of the sync's writes reached the disk, others not.
    torn: u64,
    /// WAL frames lost per cut.
    wal_frames: Vec<u64>,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
}

fn cuts_in(log: &str) -> Cuts {
    let mut c = Cuts::default();
    for start in log.split("----- test: start #").skip(1) {
        let lines: Vec<&str> = start
            .lines()
            .filter(|l| l.contains("power cut applied"))
            .collect();
        if lines.is_empty() {
            continue;
        }
        c.cuts += 1;
        if lines
            .iter()
            .any(|l| field(l, "inside_sync") == Some("true"))
        {
            c.inside_sync += 1;
        }
        let number = |l: &&str, name| field(l, name).and_then(|v| v.parse::<u64>().ok());
        if lines.iter().any(|l| {
            number(l, "persisted_of_sync").unwrap_or(0) > 0
                && number(l, "reverted_writes").unwrap_or(0) > 0
        }) {
            c.torn += 1;
        }
        let wal: u64 = lines
            .iter()
            .filter(|l| field(l, "file").is_some_and(|f| f.ends_with("-wal")))
            .filter_map(|l| field(l, "reverted_bytes")?.parse::<u64>().ok())
            .sum();
        c.wal_frames.push(wal.div_ceil(WAL_FRAME));
    }
    c
}

fn summary(synchronous: &str, seed: u64, o: &Outcome, c: &Cuts) {
    let max = c.wal_frames.iter().max().copied().unwrap_or(0);
    let mean = c.wal_frames.iter().sum::<u64>() as f64 / c.wal_frames.len().max(1) as f64;
    println!(
        "POWERCUT SUMMARY synchronous={synchronous} seed={seed} rounds={} kills={} power_cuts={} \
         cuts_inside_sync={} torn_syncs={} acknowledged={} lost={} lost_per_kill_round={:.1} \
         drains_with_loss={} anomalies={} wal_frames_lost_per_cut_mean={mean:.0} \
         wal_frames_lost_per_cut_max={max}",
        o.rounds,
        o.kills,
        c.cuts,
        c.inside_sync,
        c.torn,
        o.publisher.acked,
        o.lost,
        o.lost as f64 / o.rounds_checked.max(1) as f64,
        o.drains_with_loss,
        o.subscriber.anomalies,
    );
}

fn options(synchronous: &'static str) -> (u64, u64) {
    let rounds = env_u64("HOLDFAST_TEST_POWERCUT_ROUNDS").unwrap_or(20);
    let seed = seed_from_env("HOLDFAST_TEST_POWERCUT_SEED");
    println!(
        "power-cut loop (synchronous = {synchronous}): HOLDFAST_TEST_POWERCUT_SEED={seed} \
         HOLDFAST_TEST_POWERCUT_ROUNDS={rounds}"
    );
    (rounds, seed)
}

#[tokio::test]
async fn power_cuts_lose_no_acknowledged_message_with_synchronous_full() {
    let (rounds, seed) = options("full");
    let o = crash_loop(LoopOptions {
        synchronous: "full",
        power_cut: true,
        rounds,
        seed,
        drain_every: 10,
        strict: true,
        stop_at_loss: false,
    })
    .await;
    let c = cuts_in(&o.log);
    summary("full", seed, &o, &c);
    assert_eq!(o.lost, 0);
    assert!(
        c.cuts > 0,
        "no kill found unsynced writes to undo: the power-cut VFS is not on (seed {seed})"
    );
}

#[tokio::test]
async fn power_cuts_lose_acknowledged_messages_with_synchronous_normal() {
    let (rounds, seed) = options("normal");
    let all = env_u64("HOLDFAST_TEST_POWERCUT_ALL_ROUNDS") == Some(1);
    let o = crash_loop(LoopOptions {
        synchronous: "normal",
        power_cut: true,
        rounds,
        seed,
        drain_every: 5,
        strict: false,
        stop_at_loss: !all,
    })
    .await;
    let c = cuts_in(&o.log);
    summary("normal", seed, &o, &c);
    assert!(
        o.lost > 0,
        "{} rounds of power cuts with synchronous = normal lost no acknowledged message: the \
         harness does not cut (seed {seed})",
        o.rounds
    );
}
