#!/usr/bin/env bash
# Crash soak: runs tests/durable/crash_loop.rs with many more rounds than CI does.
#
# Each round starts the real `holdfast` binary on the same data dir, streams QoS 1
# messages into it from a publisher that resends its unacknowledged messages after every
# reconnect (sometimes with a durable subscriber receiving at the same time), and SIGKILLs
# it after a random 0..300 ms (a quarter of the kills within 30 ms of the start, i.e.
# during start-up and store recovery). Every 10th round the broker stays up, the
# subscriber drains, and every acknowledged message must have been delivered, in order,
# repeats only as DUP = 1 redeliveries (or because the publisher resent them).
# Both store.synchronous = "full" and "normal" are run (a process kill must not lose
# anything with either).
#
# Usage:
#   scripts/soak.sh                       # 500 rounds per variant, random seed
#   ROUNDS=2000 scripts/soak.sh           # more rounds
#   SEED=1234 scripts/soak.sh             # replay a seed printed by a failing run
#   scripts/soak.sh crash_loop_synchronous_full   # one variant (test name filter)
#
# Uses a release build (the first run compiles it). Output: one line per round with the
# kill delay and the counts (sent, resent, acknowledged, delivered, DUP redeliveries); on
# failure the seed and the broker's log are printed. 500 rounds take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

export HOLDFAST_CRASH_ROUNDS="${ROUNDS:-500}"
if [[ -n "${SEED:-}" ]]; then
    export HOLDFAST_CRASH_SEED="$SEED"
fi

# --test-threads=1: one variant at a time, so the kill timing is not distorted by the other.
exec cargo test --release --test durable crash_loop:: -- --nocapture --test-threads=1 "$@"
