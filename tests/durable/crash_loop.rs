//! Kill-the-child crash test (in the style of sled's): the real binary is SIGKILLed at a
//! random moment, again and again, while a publisher streams QoS 1 messages and a durable
//! subscriber sometimes receives; every acknowledged message must be delivered, in order,
//! repeats only as DUP = 1 redeliveries. The loop and its checks are in
//! `tests/kit/src/crash.rs` (shared with `tests/durable/power_cut.rs`).
//!
//! A SIGKILL loses no write the process made (the kernel keeps them), synced or not, so
//! both `synchronous` settings must pass here; `tests/durable/power_cut.rs` tells them apart.
//!
//! Environment: `HOLDFAST_CRASH_ROUNDS` (default 20), `HOLDFAST_CRASH_SEED` (default: from
//! the clock; always printed, so a failure can be replayed). `scripts/soak.sh` runs many
//! more rounds.

use crate::common::crash;
use crash::{crash_loop, env_u64, seed_from_env, LoopOptions};

async fn sigkill_loop(synchronous: &'static str) {
    let rounds = env_u64("HOLDFAST_CRASH_ROUNDS").unwrap_or(20);
    let seed = seed_from_env("HOLDFAST_CRASH_SEED");
    println!("crash loop (synchronous = {synchronous}): HOLDFAST_CRASH_SEED={seed} HOLDFAST_CRASH_ROUNDS={rounds}");
    crash_loop(LoopOptions {
        synchronous,
        power_cut: false,
        rounds,
        seed,
        drain_every: 10,
        strict: true,
        stop_at_loss: false,
    })
    .await;
}

#[tokio::test]
async fn crash_loop_synchronous_full() {
    sigkill_loop("full").await;
}

#[tokio::test]
async fn crash_loop_synchronous_normal() {
    sigkill_loop("normal").await;
}
