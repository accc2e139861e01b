//! The admin socket's protocol, shared by both ends: one request per connection, as one
//! line of JSON ([`Request`]), answered by one line of JSON ([`Reply`]). Serde does the
//! escaping, so any client id (spaces, newlines, any UTF-8) travels intact.
//!
//! ```text
//! {"cmd":"ping"}                          -> {"reply":"pong","version":"0.1.0"}
//! {"cmd":"bridges"}                       -> {"reply":"bridges","bridges":[...]}
//! {"cmd":"status"}                        -> {"reply":"status","status":{...}}
//! {"cmd":"drop","client_id":"sensor-1"}   -> {"reply":"dropped"} | {"reply":"not_found"}
//! anything                                -> {"reply":"error","message":"..."}
//! ```
//!
//! `dropped` is sent once the deletion is committed to the database (or after a few
//! seconds if the commit is slow).

use serde::{Deserialize, Serialize};

use crate::bridge::BridgeStatus;
use crate::broker::client::SessionStats;
use crate::observe::status::GatewayStatus;

/// Longest request line the admin socket accepts (a 65535-byte client id, every byte
/// escaped as `\uXXXX`, plus the command).
pub const MAX_REQUEST: u64 = 6 * 65_535 + 64;

/// What the CLI asks the running gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Every bridge's live status (`holdfast bridge status`).
    Bridges,
    /// The gateway's figures (`holdfast status`).
    Status,
    /// Drop a session (`holdfast sessions drop`).
    Drop {
        client_id: String,
    },
}

/// What the gateway answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong { version: String },
    Bridges { bridges: Vec<BridgeReport> },
    Status { status: Box<GatewayStatus> },
    Dropped,
    NotFound,
    Error { message: String },
}

/// One bridge as `holdfast bridge status` shows it: its live status, its outboxes'
/// figures (summed over its priorities) and when the oldest message still queued was
/// enqueued (Unix ms).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BridgeReport {
    #[serde(flatten)]
    pub status: BridgeStatus,
    pub outbox: Option<SessionStats>,
    pub oldest_enqueued_ms: Option<i64>,
}

impl Request {
    /// The request line, newline included.
    pub fn to_line(&self) -> String {
        // A plain enum of strings: serializing cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    pub fn from_line(line: &str) -> Result<Request, String> {
        serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
    }
}

impl Reply {
    /// The reply line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({"reply": "error", "message": format!("cannot encode the reply: {e}")})
                .to_string()
        });
        line.push('\n');
        line
    }

    pub fn from_line(line: &str) -> Result<Reply, String> {
        serde_json::from_str(line).map_err(|e| format!("bad reply: {e}"))
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error {
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_client_id_survives_the_request_line() {
        for id in [
            "",
            "plain-id_1.2~",
            "with space",
            "new\nline",
            "100%",
            "üñí©ødé ✓",
            "drop x\n",
            "\"quoted\" \\ back",
        ] {
            let req = Request::Drop {
                client_id: id.to_string(),
            };
            let line = req.to_line();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert!(line.ends_with('\n'));
            assert_eq!(Request::from_line(line.trim_end()).unwrap(), req);
        }
    }

    #[test]
    fn the_longest_client_id_fits_the_request_limit() {
        // Control characters are the worst case: `\u0001` is 6 bytes for 1.
        let req = Request::Drop {
            client_id: "\u{1}".repeat(65_535),
        };
        assert!(req.to_line().len() as u64 <= MAX_REQUEST);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(Request::from_line("drop x")
            .unwrap_err()
            .contains("bad request"));
        assert!(Request::from_line(r#"{"cmd":"format_disk"}"#).is_err());
        assert!(Reply::from_line("ok dropped").is_err());
    }
}
