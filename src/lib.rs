//! Holdfast: an edge MQTT gateway.
//!
//! - `protocol`: MQTT 3.1/3.1.1/5.0 packets and codec (pure, no I/O), and `protocol::framed`,
//!   the one reader of whole packets from any `AsyncRead`.
//! - `config`: typed settings loaded from defaults, a TOML file and `HOLDFAST_*` variables.
//! - `broker`: listeners, connections, sessions, the router (subscriptions, retained
//!   messages, fan-out).
//! - `bridge`: upstream connections with a durable outbox (an internal session).
//! - `serial`: serial sensor ingest (lines formats and Modbus RTU) as internal publishers.
//! - `app`: the one place that starts and stops everything above, in a fixed order.
//! - `admin`: the admin socket (typed requests and replies, both ends) and the operator
//!   commands that use it; `cli`: all the text those commands print.
//! - `clock`: the time line deadlines that outlive a run are kept on (wall clock steps).
//! - `reload`: what SIGHUP changes in a running gateway (configuration re-read).
//! - `probe`: `holdfast pub` / `holdfast sub`, an MQTT client (rumqttc) for operators.

pub mod admin;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod bridge;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod observe;
pub mod probe;
pub mod protocol;
pub mod reload;
pub mod serial;
pub mod store;
