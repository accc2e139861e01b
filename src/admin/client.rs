//! The CLI's side of the admin socket: asks the running gateway, or reports that none
//! runs on the data directory (nothing listens on the socket: no file, or a stale one).
//! Any other failure (permission denied, no answer) is an error, and commands that would
//! otherwise edit the database leave it alone.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::wire::{BridgeReport, Reply, Request};
use super::{socket_path, REQUEST_TIMEOUT};
use crate::broker::client::is_reserved;
use crate::observe::status::GatewayStatus;
use crate::store::inspect::{self, InspectError};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the broker's admin socket {}", path.display())]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the broker on {}", path.display())]
    Talk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the broker closed {} without answering", path.display())]
    NoAnswer { path: PathBuf },
    #[error("the broker answered: {0}")]
    Refused(String),
    #[error("the broker's answer on {} is not understood ({message}); is it a different version of holdfast?", path.display())]
    BadReply { path: PathBuf, message: String },
    #[error("the broker refused to drop session {client_id:?}: {message}")]
    DropRefused { client_id: String, message: String },
    #[error("{}", internal_refusal(client_id))]
    Internal { client_id: String },
    #[error(transparent)]
    Store(#[from] InspectError),
}

/// How `sessions drop` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropOutcome {
    /// The running broker dropped it (disconnecting the client, publishing its will).
    DroppedByBroker,
    /// No broker was running; the rows were deleted from the database.
    DeletedOffline { queued: u64, had_will: bool },
    /// No such session (on the running broker, or in the database).
    NotFound { broker_running: bool },
}

/// The reason an internal session (a bridge outbox, a serial port) cannot be dropped:
/// dropping an outbox would silently stop the uplink until a restart.
pub(super) fn internal_refusal(client_id: &str) -> String {
    format!(
        "{client_id:?} is an internal session of the gateway (a bridge outbox or a serial port), not a client's: it cannot be dropped; to discard a bridge's backlog, remove the bridge or its rules from the configuration and restart"
    )
}

/// Sends `request` to the gateway listening on `socket`; None when no gateway listens.
fn ask(socket: &Path, request: &Request) -> Result<Option<Reply>, AdminError> {
    use std::io::ErrorKind;
    let path = socket.to_path_buf();
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(source) => return Err(AdminError::Unreachable { path, source }),
    };
    let mut talk = || -> std::io::Result<String> {
        stream.set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        stream.write_all(request.to_line().as_bytes())?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        Ok(line.trim_end_matches('\n').to_string())
    };
    let line = match talk() {
        Ok(l) => l,
        Err(source) => return Err(AdminError::Talk { path, source }),
    };
    if line.is_empty() {
        return Err(AdminError::NoAnswer { path });
    }
    Reply::from_line(&line)
        .map(Some)
        .map_err(|message| AdminError::BadReply { path, message })
}

/// A reply other than the one expected: the gateway's error, or a protocol mismatch.
fn unexpected(socket: &Path, reply: Reply) -> AdminError {
    match reply {
        Reply::Error { message } => AdminError::Refused(message),
        other => AdminError::BadReply {
            path: socket.to_path_buf(),
            message: format!("unexpected {other:?}"),
        },
    }
}

/// The running gateway's status (see `observe::status`), or None when no gateway is
/// running on this data directory.
pub fn gateway_status(data_dir: &Path) -> Result<Option<GatewayStatus>, AdminError> {
    gateway_status_at(&socket_path(data_dir))
}

/// [`gateway_status`], asking the admin socket at `socket`.
pub fn gateway_status_at(socket: &Path) -> Result<Option<GatewayStatus>, AdminError> {
    match ask(socket, &Request::Status)? {
        None => Ok(None),
        Some(Reply::Status { status }) => Ok(Some(*status)),
        Some(other) => Err(unexpected(socket, other)),
    }
}

/// Bridge status from the running gateway, or None when no gateway is running.
pub fn bridge_status(data_dir: &Path) -> Result<Option<Vec<BridgeReport>>, AdminError> {
    bridge_status_at(&socket_path(data_dir))
}

/// [`bridge_status`], asking the admin socket at `socket`.
pub fn bridge_status_at(socket: &Path) -> Result<Option<Vec<BridgeReport>>, AdminError> {
    match ask(socket, &Request::Bridges)? {
        None => Ok(None),
        Some(Reply::Bridges { bridges }) => Ok(Some(bridges)),
        Some(other) => Err(unexpected(socket, other)),
    }
}

/// Drops a session: through the running gateway when there is one, else directly in the
/// database. Internal sessions are refused.
pub fn drop_session(data_dir: &Path, client_id: &str) -> Result<DropOutcome, AdminError> {
    drop_session_at(data_dir, &socket_path(data_dir), client_id)
}

/// [`drop_session`], asking the admin socket at `socket`.
pub fn drop_session_at(
    data_dir: &Path,
    socket: &Path,
    client_id: &str,
) -> Result<DropOutcome, AdminError> {
    if is_reserved(client_id) {
        return Err(AdminError::Internal {
            client_id: client_id.to_string(),
        });
    }
    let request = Request::Drop {
        client_id: client_id.to_string(),
    };
    match ask(socket, &request)? {
        Some(Reply::Dropped) => Ok(DropOutcome::DroppedByBroker),
        Some(Reply::NotFound) => Ok(DropOutcome::NotFound {
            broker_running: true,
        }),
        Some(Reply::Error { message }) => Err(AdminError::DropRefused {
            client_id: client_id.to_string(),
            message,
        }),
        Some(other) => Err(unexpected(socket, other)),
        None => Ok(match inspect::delete_session(data_dir, client_id)? {
            Some(d) => DropOutcome::DeletedOffline {
                queued: d.queued,
                had_will: d.had_will,
            },
            None => DropOutcome::NotFound {
                broker_running: false,
            },
        }),
    }
}
