//! The bridge upstream: store-and-forward, faults on the link, TLS, MQTT 5.
//!
//! One test binary per subsystem; shared helpers in `tests/kit` (crate `holdfast_testkit`). Run one part with
//! `cargo test --test bridge <module>::`.

// The shared test kit (`tests/kit`): `common::daemon`, `common::proxy`, ...
use holdfast_testkit as common;

mod basics;
mod faults;
mod links;
mod tls;
mod v5;
