//! Why a bridge connection failed or a connected period ended, typed.
//!
//! [`LinkError`] is what the upstream connection ([`super::link`]) reports: resolving,
//! connecting, TLS, the CONNACK, reading and writing, the upstream's own limits. [`Lost`]
//! is why a connected period ([`super::pump`]) ended while the link was up: a link error,
//! or a verdict of the bridge itself (a dead link under traffic, a quota answer, the router
//! detaching an outbox). Both print the text operators see in the logs and in
//! `holdfast bridge status` (`last_error`), which names the setting to change where one
//! applies.

use std::net::SocketAddr;

use crate::protocol::DecodeError;

/// What went wrong with the upstream connection.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkError {
    #[error("resolving {address}: {source}")]
    Resolve {
        address: String,
        source: std::io::Error,
    },
    #[error("resolving {address}: no answer within {secs} s")]
    ResolveTimeout { address: String, secs: u64 },
    #[error("{address} resolves to no address")]
    NoAddress { address: String },
    #[error("connecting to {address} ({ip}): {source}")]
    Connect {
        address: String,
        ip: SocketAddr,
        source: std::io::Error,
    },
    #[error("{ip}: no CONNACK within connect_timeout_secs ({secs} s)")]
    ConnectTimeout { ip: SocketAddr, secs: u64 },
    /// Every address a name resolved to failed: each one's error, in the order tried.
    #[error("{}", join(.0))]
    EveryAddress(Vec<LinkError>),
    #[error("TLS server name: {0}")]
    ServerName(String),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("expected CONNACK, got {0}")]
    NotConnAck(&'static str),
    /// A CONNACK with a failure reason code.
    #[error("upstream refused the connection: reason code {code:#04x}{}{}{}", with_hint(.hint), paren(.reason), reference(.server_reference))]
    Refused {
        code: u8,
        /// What to change in the configuration, when the code points at the will.
        hint: Option<&'static str>,
        reason: Option<String>,
        server_reference: Option<String>,
    },
    #[error("bad packet from upstream: {0}")]
    Decode(DecodeError),
    #[error("upstream closed the connection")]
    Closed,
    #[error("reading from upstream: {0}")]
    Read(std::io::Error),
    #[error("writing to upstream: {0}")]
    Write(std::io::Error),
    #[error("no PINGRESP within {secs} s: the link is half-open")]
    NoPingResp { secs: u64 },
    #[error("writing to the upstream made no progress for {secs} s")]
    WriteStalled { secs: u64 },
    #[error("writing to the upstream timed out")]
    FlushTimeout,
    #[error("upstream used a topic alias we did not allow")]
    TopicAlias,
    #[error("unexpected {0} from upstream")]
    Unexpected(&'static str),
    #[error(
        "{packet} of {len} bytes is larger than the upstream's Maximum Packet Size ({max} bytes)"
    )]
    TooLarge {
        packet: &'static str,
        len: usize,
        max: usize,
    },
    #[error("no SUBACK from upstream")]
    NoSubAck,
    /// An MQTT 5 DISCONNECT from the upstream.
    #[error("upstream sent DISCONNECT {code:#04x}{}{}", paren(.reason), reference(.server_reference))]
    Disconnected {
        code: u8,
        reason: Option<String>,
        server_reference: Option<String>,
    },
}

/// Why a connected period ended with the link lost (as opposed to shutdown or failback).
#[derive(Debug, thiserror::Error)]
pub(super) enum Lost {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("no acknowledgement from upstream for {secs} s with {in_flight} messages in flight: the link is dead")]
    NoAck { secs: u64, in_flight: usize },
    #[error("upstream answered 0x97 Quota exceeded (packet id {packet_id}); backing off, the message stays queued")]
    Quota { packet_id: u16 },
    #[error("detached by the router")]
    Detached,
    #[error("no outbox to publish a downlink message through")]
    NoOutbox,
}

fn join(errors: &[LinkError]) -> String {
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    all.join("; ")
}

fn with_hint(hint: &Option<&'static str>) -> String {
    hint.map(|h| format!(" ({h})")).unwrap_or_default()
}

fn paren(s: &Option<String>) -> String {
    s.as_ref().map(|s| format!(" ({s})")).unwrap_or_default()
}

fn reference(s: &Option<String>) -> String {
    s.as_ref()
        .map(|s| format!("; server reference: {s}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal text keeps every part the operator needs (tests and runbooks grep it).
    #[test]
    fn a_refusal_reads_as_before() {
        let e = LinkError::Refused {
            code: 0x87,
            hint: Some("if its ACL refuses the will"),
            reason: Some("no".into()),
            server_reference: Some("other:1883".into()),
        };
        assert_eq!(
            e.to_string(),
            "upstream refused the connection: reason code 0x87 (if its ACL refuses the will) (no); server reference: other:1883"
        );
        let e = LinkError::Disconnected {
            code: 0x8e,
            reason: None,
            server_reference: None,
        };
        assert_eq!(e.to_string(), "upstream sent DISCONNECT 0x8e");
        let ip: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e = LinkError::EveryAddress(vec![
            LinkError::ConnectTimeout { ip, secs: 2 },
            LinkError::NoSubAck,
        ]);
        assert_eq!(
            e.to_string(),
            "127.0.0.1:1: no CONNACK within connect_timeout_secs (2 s); no SUBACK from upstream"
        );
    }
}
