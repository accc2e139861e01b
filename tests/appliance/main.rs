//! The appliance around the broker: admin CLI, the binary, observability, packaging, probe, serial ingest,
//! the wiring (`app`: start and stop order) and the broker core's client API.
//!
//! One test binary per subsystem; shared helpers in `tests/kit` (crate `holdfast_testkit`). Run one part with
//! `cargo test --test appliance <module>::`.

// The shared test kit (`tests/kit`): `common::daemon`, `common::proxy`, ...
use holdfast_testkit as common;

mod admin;
mod binary;
mod observe;
mod packaging;
mod probe;
mod serial;
mod serial_metrics;
mod wiring;
