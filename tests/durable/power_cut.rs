//! Power cuts: the crash loop of `tests/durable/crash_loop.rs` (`tests/kit/src/crash.rs`) with the
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
//! - An admin command run after a cut applies it first and sees what the broker will see.
//!
//! Environment: `HOLDFAST_TEST_POWERCUT_ROUNDS` (default 20; for `normal` the most rounds
//! before a loss must be seen, unless `HOLDFAST_TEST_POWERCUT_ALL_ROUNDS=1` runs them all,
//! as the soak does), `HOLDFAST_TEST_POWERCUT_SEED` (default: from the clock; always
//! printed). `scripts/powercut_soak.sh` runs many rounds and prints the summary lines.

use crate::common::{crash, daemon};
use crash::{connect_packet, crash_loop, env_u64, open, seed_from_env, LoopOptions, Outcome};
use daemon::Daemon;
use holdfast::protocol::Packet;
use holdfast::store::powercut::ENV_VAR;

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

/// `holdfast sessions list` on the power-cut installation: the client ids it lists.
fn listed_sessions(d: &Daemon, power_cut: bool) -> Vec<String> {
    let mut cmd = std::process::Command::new(crate::common::bin());
    cmd.args(["sessions", "list", "--config"]).arg(&d.config);
    if power_cut {
        cmd.env(ENV_VAR, "1");
    } else {
        cmd.env_remove(ENV_VAR);
    }
    let out = cmd.output().expect("run holdfast sessions list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| *id == "kept" || *id == "cut")
        .map(String::from)
        .collect()
}

/// Connects `id` as a durable session and leaves; returns CONNACK's Session Present.
async fn durable_visit(d: &Daemon, id: &str) -> bool {
    let (mut c, ack) = open(d.addr, connect_packet(id, false, 3600))
        .await
        .expect("connect");
    c.try_send(&Packet::Disconnect(Default::default()))
        .await
        .expect("disconnect");
    d.wait_offline_committed(id).await;
    ack.session_present
}

/// Admin commands open the database through the same VFS: after a power cut they apply
/// the cut first and show what survived, as the broker will, not the lost page cache.
#[tokio::test]
async fn admin_commands_and_the_broker_see_the_same_store_after_a_power_cut() {
    let mut d = Daemon::new("[store]\nsynchronous = \"normal\"\n");
    d.env.push((ENV_VAR.into(), "1".into()));
    d.start().await;
    durable_visit(&d, "kept").await;
    d.sigterm().await; // a clean stop checkpoints: "kept" is synced
    d.start().await;
    durable_visit(&d, "cut").await; // committed, but with `normal` not synced
    d.sigkill();
    // What a SIGKILL alone leaves (read without the VFS: no cut applied).
    assert_eq!(listed_sessions(&d, false), ["cut", "kept"]);
    // The power cut, applied by the first process that opens the store with the VFS on.
    assert_eq!(listed_sessions(&d, true), ["kept"]);
    d.start().await;
    assert!(durable_visit(&d, "kept").await, "kept survives");
    assert!(
        !durable_visit(&d, "cut").await,
        "cut is gone for the broker too"
    );
    d.sigterm().await;
}
