//! What the bridge needs from an upstream connection, whatever MQTT version it speaks
//! ([`super::link`] speaks both, with our own codec).
//!
//! Both are thin relays. Packet ids, in-flight windows, resends with DUP and the QoS 2
//! states live in the router's internal session (`$bridge/<name>`, stored like any durable
//! session), so an upstream connection keeps no message state of its own: after a drop it
//! is simply thrown away, and the router resends what was in flight on the next one.

use std::time::Duration;

use super::error::LinkError;
use crate::protocol::{Packet, Publish, QoS, SubscribeFilter};

/// An event from the upstream broker.
pub(super) enum UpEvent {
    /// PUBACK (`Ack`), PUBREC (`Rec`) or PUBCOMP (`Comp`) for one of our messages.
    Ack {
        kind: AckKind,
        packet_id: u16,
        reason: u8,
    },
    /// PUBREL for a QoS 2 downlink message.
    Release(u16),
    /// A downlink message (remote topic).
    Publish(Publish),
    /// The upstream closed the session (v5 DISCONNECT): why, for the logs and status.
    Disconnect(LinkError),
    /// Nothing for the bridge (PINGRESP, a ping to send, ...): flush and wait again.
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckKind {
    Ack,
    Rec,
    Comp,
}

/// What the upstream granted in its CONNACK.
#[derive(Debug, Clone, Copy)]
pub(super) struct Granted {
    pub session_present: bool,
    /// Most QoS 1/2 messages it accepts in flight (v5 Receive Maximum).
    pub receive_maximum: u16,
    /// Highest QoS it accepts from us (v5 Maximum QoS).
    pub maximum_qos: QoS,
    /// Whether it accepts retained messages (v5 Retain Available).
    pub retain_available: bool,
    /// Most topic aliases it accepts from us (v5 Topic Alias Maximum; 0 = none).
    pub topic_alias_maximum: u16,
}

/// One connected upstream session.
pub(super) trait Upstream {
    /// Waits for the next event. Cancel-safe once [`Upstream::flush`] has returned (the
    /// bridge races it with the router's output only then).
    async fn next(&mut self) -> Result<UpEvent, LinkError>;
    /// The next event if one is already read and decoded (no waiting, no I/O): lets the
    /// bridge handle a burst of acknowledgements in one pass.
    fn try_next(&mut self) -> Result<Option<UpEvent>, LinkError>;
    /// Queues a packet (PUBLISH with the remote topic, or PUBACK/PUBREC/PUBREL/PUBCOMP) to
    /// be written by the next `flush`. `Err` if the upstream cannot take it at all (too
    /// large for its Maximum Packet Size): the caller decides what happens to the message.
    fn queue(&mut self, packet: Packet) -> Result<(), LinkError>;
    /// Bytes queued and not yet written.
    fn pending(&self) -> usize;
    /// Writes everything queued, reading what arrives meanwhile (for `try_next`); fails
    /// when nothing moved either way for `ack_timeout_secs` (a black-holed link cannot
    /// stall it for ever, a slow one that keeps moving is fine).
    async fn flush(&mut self) -> Result<(), LinkError>;
    /// Whether the upstream ended the connection (EOF, reset, DISCONNECT) rather than a
    /// timeout on our side.
    fn closed_by_peer(&self) -> bool;
    /// Subscribes the `in` rules and waits for the SUBACK: the reason code per filter,
    /// and the events that came before it (a resumed session delivers what it queued, and
    /// releases QoS 2 messages, right after CONNACK; they must be handled, not dropped).
    async fn subscribe(
        &mut self,
        filters: Vec<SubscribeFilter>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<UpEvent>), LinkError>;
    /// Ends the session politely (DISCONNECT, session kept upstream), best effort;
    /// `offline`: the state notification goes to `0` too (see `link`).
    async fn close(&mut self, offline: bool);
}
