//! Durable sessions: the SQLite store, restarts, crashes, power cuts, store faults, clock steps.
//!
//! One test binary per subsystem; shared helpers in `tests/kit` (crate `holdfast_testkit`). Run one part with
//! `cargo test --test durable <module>::`.

// The shared test kit (`tests/kit`): `common::daemon`, `common::proxy`, ...
use holdfast_testkit as common;

mod clock_steps;
mod crash_loop;
mod fan_in;
mod power_cut;
mod queue_model;
mod restart;
mod store;
mod store_faults;
