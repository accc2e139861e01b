//! Operator commands against a gateway's data directory, by layer:
//!
//! - `wire`: the admin socket's typed [`Request`]s and [`Reply`]s (serde, one JSON line
//!   each way), shared by both ends;
//! - `server`: the gateway's end, the socket itself ([`AdminSocket`], served by `app`);
//! - `client`: the CLI's end ([`gateway_status`], [`bridge_status`], [`drop_session`]);
//! - the SQL lives in `store::inspect` (`sessions list|show`, offline drop, `backup`), the
//!   text formatting in `crate::cli`.
//!
//! # Dropping a session
//! A running gateway owns its sessions in memory, so editing the database under it would
//! desynchronise the two. `sessions drop` therefore asks the gateway over the admin socket
//! (`admin_socket`, default `<data_dir>/holdfast.sock`; the packaged configuration puts it
//! in systemd's runtime directory, `/run/holdfast/holdfast.sock`). When nothing listens
//! (no socket file, or a stale one: connection refused) no gateway runs on this data
//! directory, and the command deletes the session's rows itself in one transaction. Any
//! other failure (permission denied, no answer) is an error and the database is left
//! alone. Internal sessions (bridge outboxes, serial ports) are refused either way.

mod client;
mod server;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::{
    bridge_status, bridge_status_at, drop_session, drop_session_at, gateway_status,
    gateway_status_at, AdminError, DropOutcome,
};
pub use server::{AdminHandle, AdminSocket, AdminSocketError};
pub use wire::{BridgeReport, Reply, Request};

// What the CLI reads from the store directly (the SQL is in `store::inspect`).
pub use crate::store::inspect::{
    backup, list_sessions, show_session, BackupReport, SessionDetail, SessionSummary,
};

/// File name of the admin socket inside the data directory.
pub const SOCKET_NAME: &str = "holdfast.sock";

/// How long one admin request may take on either side.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the gateway listens for admin requests by default.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}
