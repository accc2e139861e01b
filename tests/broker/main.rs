//! Local broker: MQTT 3.1.1/5.0 over TCP, TLS and WebSocket, limits, malformed input, third-party clients.
//!
//! One test binary per subsystem; shared helpers in `tests/kit` (crate `holdfast_testkit`). Run one part with
//! `cargo test --test broker <module>::`.

// The shared test kit (`tests/kit`): `common::daemon`, `common::proxy`, ...
use holdfast_testkit as common;

mod connect;
mod connection_limits;
mod idle;
mod limits;
mod malformed;
mod mosquitto_clients;
mod pubsub;
mod retain_will;
mod tls;
mod v5_features;
mod websocket;
