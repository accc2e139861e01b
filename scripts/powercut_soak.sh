#!/usr/bin/env bash
# Power-cut soak: runs tests/durable/power_cut.rs with many more rounds than CI does, for
# store.synchronous = "full" and "normal", and prints one summary line per setting.
#
# The broker runs with the TEST ONLY power-cut VFS (HOLDFAST_TEST_POWERCUT_VFS=1, see
# src/store/powercut/): every SIGKILL is a power cut that loses each write to the
# database or its WAL not covered by an fsync/fdatasync; a kill inside a sync leaves a
# torn sync. Each round streams QoS 1 messages into the real binary (a durable subscriber
# sometimes receiving) and kills it after a random 0..300 ms (a quarter within 30 ms, during
# start-up and recovery); every 10th round ("full") or 5th ("normal") the broker stays up
# and everything acknowledged must be delivered.
#
# Expected: "full" loses nothing (the test fails otherwise); "normal" loses acknowledged
# messages (all rounds are run here, and the losses counted).
#
# Usage:
#   scripts/powercut_soak.sh                 # 80 rounds per setting, random seed
#   ROUNDS=20 scripts/powercut_soak.sh       # fewer rounds
#   SEED=1234 scripts/powercut_soak.sh       # replay a seed printed by a failing run
#
# Summary fields: rounds, kills (rounds + one after each drain), power_cuts (starts that
# found unsynced writes to undo), cuts_inside_sync, torn_syncs (some of the sync's writes
# durable, some not), acknowledged, lost (acknowledged, never delivered), anomalies
# (order / DUP rule breaks, counted only for "normal"), WAL frames lost per cut.
# Uses a release build (the first run compiles it).
set -euo pipefail
cd "$(dirname "$0")/.."

export HOLDFAST_TEST_POWERCUT_ROUNDS="${ROUNDS:-80}"
export HOLDFAST_TEST_POWERCUT_ALL_ROUNDS=1
if [[ -n "${SEED:-}" ]]; then
    export HOLDFAST_TEST_POWERCUT_SEED="$SEED"
fi

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
# --test-threads=1: one setting at a time, so the kill timing is not distorted by the other.
cargo test --release --test durable power_cut:: -- --nocapture --test-threads=1 2>&1 | tee "$out" || status=$?
echo
echo "===== power-cut soak summary ====="
grep '^POWERCUT SUMMARY' "$out" || echo "(no summary: the run failed before the end; see above)"
exit "$status"
