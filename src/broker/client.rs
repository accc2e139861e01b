//! The broker core's client API: the one typed handle through which the gateway's
//! internal clients (a bridge's outboxes, the serial ports) connect, publish, subscribe
//! and acknowledge, the way rumqttd's `link/local.rs` gives its router a typed client.
//! Nothing outside `broker` builds router events by hand.
//!
//! - [`BrokerHandle`]: cheap to clone; attaches sessions ([`BrokerHandle::connect`]),
//!   publishes `$SYS` status, asks for session figures, drops sessions (admin).
//! - [`ClientTx`] / [`ClientRx`]: one attached session's two halves. `ClientTx` sends
//!   what a client would send (PUBLISH, acknowledgements, SUBSCRIBE, DISCONNECT);
//!   `ClientRx` yields what the router sends back ([`Outgoing`]), exactly as a network
//!   connection gets it, in order.
//! - [`DeliveryPolicy`]: how the router treats one session where it differs from a
//!   network client. Every exception to the durability contract that internal clients
//!   get is named here, and nowhere else outside the router.
//! - [`Reserved`]: the client-id prefixes of internal clients; network clients may not
//!   use them (checked at CONNECT with [`is_reserved`]).
//!
//! Invariant: an internal client acknowledges exactly like a network client: the
//! router's PUBACK to its PUBLISH comes only after the message is committed for every
//! durable target (see `router`), and a row it receives is deleted only on its PUBACK /
//! PUBCOMP (or, for relay sessions, its [`ClientTx::upstream_ack`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use super::connection::Outgoing;
use super::connection::{ConnId, ConnLink, LinkRx, Shared, TryRecvError};
use super::router::{ConnectRequest, RouterEvent, WillAction};
pub use super::router::{RouterSnapshot, SessionStats};
use super::session::ClientParams;
pub use super::session::QueueLimits;
use crate::config::MqttConfig;
use crate::protocol::{ConnAck, ProtocolVersion, Publish, Subscribe, SubscribeFilter};

/// The client-id prefixes reserved for internal clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// A bridge's outbox: `$bridge/<name>` (priority 0) or `$bridge/<name>/p<N>`.
    Bridge,
    /// A serial port: `$serial/<name>`.
    Serial,
}

impl Reserved {
    pub const ALL: [Reserved; 2] = [Reserved::Bridge, Reserved::Serial];

    pub fn prefix(self) -> &'static str {
        match self {
            Reserved::Bridge => "$bridge/",
            Reserved::Serial => "$serial/",
        }
    }

    /// The client id `<prefix><name>`.
    pub fn client_id(self, name: &str) -> Arc<str> {
        format!("{}{name}", self.prefix()).into()
    }

    /// The name after this prefix, if `client_id` has it.
    pub fn strip(self, client_id: &str) -> Option<&str> {
        client_id.strip_prefix(self.prefix())
    }
}

/// True if `client_id` belongs to an internal client (network clients are refused with
/// 0x85 Client Identifier not valid, and admin commands leave such sessions alone).
pub fn is_reserved(client_id: &str) -> bool {
    Reserved::ALL
        .iter()
        .any(|r| client_id.starts_with(r.prefix()))
}

/// How the router delivers to one session where it differs from a network client's.
///
/// The default is a network client's policy. A *relay* session (a bridge outbox) hands
/// each message to a next hop that acknowledges it, and gets these exceptions to the
/// durability contract (enforced in `router::publish` and `router::store_io`):
/// - its QoS 1 deliveries go out before their row is committed (the row is written
///   anyway; a crash before the commit resends the message upstream as a duplicate,
///   which QoS 1 allows);
/// - when its only durable copy of a publisher's QoS 1 message is the relay's row and
///   the next hop accepts the message first ([`ClientTx::upstream_ack`]), the
///   publisher's PUBACK goes without waiting for that commit (the next hop holds it);
/// - its bookkeeping that nothing waits for (rows the next hop acknowledged) may wait a
///   little for a commit to ride along with;
/// - QoS 0 messages while it is detached are dropped and counted
///   (`dropped_qos0_bridge_offline`) unless their filter is in `queue_qos0`;
/// - it is not owned by a network identity (ACL ownership checks skip it).
#[derive(Debug, Clone, Default)]
pub struct DeliveryPolicy {
    /// Relay semantics as above (bridge outboxes).
    pub relay: bool,
    /// Hand out the smallest free packet id (1..=window) instead of cycling through all
    /// 65535: a bridge maps each outbox's ids into its own range of upstream ids.
    pub compact_packet_ids: bool,
    /// Filters whose QoS 0 messages the session keeps like QoS 1 (a bridge rule's
    /// `queue_qos0`).
    pub queue_qos0: Vec<String>,
    /// Own queue limits instead of the `[mqtt]` ones.
    pub limits: Option<QueueLimits>,
}

/// A durable session the router keeps from start-up, whether or not its owner is
/// attached (a bridge outbox: messages are kept from the first moment).
#[derive(Debug, Clone)]
pub struct StandingSession {
    pub client_id: Arc<str>,
    /// Exactly these subscriptions (others left from an earlier configuration are removed).
    pub filters: Vec<SubscribeFilter>,
    pub policy: DeliveryPolicy,
}

/// What an internal client asks for when it attaches.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub client_id: Arc<str>,
    pub clean_start: bool,
    /// Session Expiry Interval, seconds (`u32::MAX` = never).
    pub expiry_interval: u32,
    /// MQTT 5 semantics give refusals a reason code.
    pub protocol: ProtocolVersion,
    /// The router's outgoing window for this session (messages in flight).
    pub window: u16,
    /// See [`DeliveryPolicy::compact_packet_ids`]. The rest of a session's delivery
    /// policy belongs to its [`StandingSession`] (the router keeps it from start-up).
    pub compact_packet_ids: bool,
}

/// The listeners' connection figures (`BrokerHandle::connections`).
#[derive(Debug, Clone, Default)]
pub struct ConnectionFigures {
    /// Connections past CONNECT, counted against `max_connections`.
    pub connected: u64,
    /// Of those, plain-TCP clients idle long enough to wait without a task
    /// (`mqtt.park_idle_ms`).
    pub idle: u64,
    /// Sockets refused by the per-address connection rate limit.
    pub rate_limited: u64,
    /// CONNECTs refused by `auth.max_connections_per_user`.
    pub user_limited: u64,
    /// Per listener: `(bind, bytes received, bytes sent)`.
    pub traffic: Vec<(String, u64, u64)>,
}

/// The router has stopped (the gateway is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the broker is shutting down")]
pub struct Closed;

/// The broker core as internal clients and the gateway's wiring see it.
#[derive(Clone)]
pub struct BrokerHandle {
    shared: Arc<Shared>,
}

impl BrokerHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> BrokerHandle {
        BrokerHandle { shared }
    }

    /// The `[mqtt]` settings in force.
    pub fn mqtt(&self) -> &MqttConfig {
        &self.shared.cfg
    }

    /// Cancelled when a graceful shutdown starts.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Attaches to the session `opts.client_id`, as a CONNECT that was accepted would.
    /// The CONNACK arrives on the returned [`ClientRx`] like any other packet.
    pub async fn connect(&self, opts: ClientOptions) -> Result<(ClientTx, ClientRx), Closed> {
        let conn = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (link, rx) = ConnLink::new(conn);
        let request = ConnectRequest {
            link,
            client_id: opts.client_id,
            clean_start: opts.clean_start,
            expiry_interval: opts.expiry_interval,
            will: None,
            params: ClientParams {
                protocol: opts.protocol,
                window: opts.window,
                max_packet_size: u32::MAX,
                compact_packet_ids: opts.compact_packet_ids,
            },
            connack: ConnAck::default(),
        };
        let router = self.shared.router.clone();
        router
            .send(RouterEvent::Connect(Box::new(request)))
            .await
            .map_err(|_| Closed)?;
        Ok((ClientTx { conn, router }, ClientRx { rx }))
    }

    /// Publishes a retained QoS 0 status message (`$SYS/...`), kept in memory only so an
    /// idle gateway does not write to its disk for status. Empty payloads are ignored.
    pub async fn sys(&self, topic: String, payload: impl Into<bytes::Bytes>) -> Result<(), Closed> {
        self.shared
            .router
            .send(RouterEvent::sys(topic, payload))
            .await
            .map_err(|_| Closed)
    }

    /// The listeners' connection figures at this moment.
    pub fn connections(&self) -> ConnectionFigures {
        let s = &self.shared;
        ConnectionFigures {
            connected: s.connected.load(Ordering::Relaxed) as u64,
            idle: s.parking.as_ref().map_or(0, |l| l.parked() as u64),
            rate_limited: s.rate_limit.refused(),
            user_limited: s.user_limit.refused(),
            traffic: s
                .traffic
                .iter()
                .map(|t| (t.name.clone(), t.received(), t.sent()))
                .collect(),
        }
    }

    /// Queue figures of a session, by client id (None: no such session, or no router).
    pub async fn session_stats(&self, client_id: &str) -> Option<SessionStats> {
        let (reply, rx) = oneshot::channel();
        let ask = RouterEvent::SessionStats {
            client_id: client_id.to_string(),
            reply,
        };
        self.shared.router.send(ask).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Drops a session (`holdfast sessions drop`): an online client is disconnected with
    /// 0x98, its will published, the session and its queue deleted once committed. True
    /// if it existed.
    pub async fn drop_session(&self, client_id: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let ev = RouterEvent::DropSession {
            client_id: client_id.to_string(),
            reply,
        };
        if self.shared.router.send(ev).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The router's counters and session figures (None if it stopped answering).
    pub async fn snapshot(&self) -> Option<RouterSnapshot> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .router
            .send(RouterEvent::Stats { reply })
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// The sending half of an attached internal client: everything a client sends. Cheap to
/// clone; every clone speaks for the same connection.
#[derive(Debug, Clone)]
pub struct ClientTx {
    conn: ConnId,
    router: mpsc::Sender<RouterEvent>,
}

impl ClientTx {
    async fn send(&self, ev: RouterEvent) -> Result<(), Closed> {
        self.router.send(ev).await.map_err(|_| Closed)
    }

    /// A PUBLISH, as a client sends it (QoS 1/2 need a packet id of the client's own).
    pub async fn publish(&self, publish: Publish) -> Result<(), Closed> {
        let conn = self.conn;
        let received = Instant::now();
        self.send(RouterEvent::Publish {
            conn,
            publish,
            received,
        })
        .await
    }

    /// PUBACK for a QoS 1 message the router delivered: its row may be deleted.
    pub async fn puback(&self, packet_id: u16) -> Result<(), Closed> {
        let conn = self.conn;
        self.send(RouterEvent::PubAck { conn, packet_id }).await
    }

    /// A relay session's next hop accepted QoS 1 message `packet_id`: as
    /// [`ClientTx::puback`], and the publisher's acknowledgement need not wait for the
    /// relay's copy to be committed (see [`DeliveryPolicy`]).
    pub async fn upstream_ack(&self, packet_id: u16) -> Result<(), Closed> {
        let conn = self.conn;
        self.send(RouterEvent::UpstreamAck { conn, packet_id })
            .await
    }

    /// PUBREC for a QoS 2 message the router delivered (a failure `reason` ends it).
    pub async fn pubrec(&self, packet_id: u16, reason: u8) -> Result<(), Closed> {
        let conn = self.conn;
        let ev = RouterEvent::PubRec {
            conn,
            packet_id,
            reason,
        };
        self.send(ev).await
    }

    /// PUBREL for a QoS 2 message this client published.
    pub async fn pubrel(&self, packet_id: u16) -> Result<(), Closed> {
        let conn = self.conn;
        self.send(RouterEvent::PubRel { conn, packet_id }).await
    }

    /// PUBCOMP for a QoS 2 message the router delivered and released.
    pub async fn pubcomp(&self, packet_id: u16) -> Result<(), Closed> {
        let conn = self.conn;
        self.send(RouterEvent::PubComp { conn, packet_id }).await
    }

    /// A SUBSCRIBE; the SUBACK comes back on the [`ClientRx`].
    pub async fn subscribe(&self, subscribe: Subscribe) -> Result<(), Closed> {
        let conn = self.conn;
        self.send(RouterEvent::Subscribe { conn, subscribe }).await
    }

    /// A normal DISCONNECT: the session stays (if it is durable), without a will.
    pub async fn disconnect(&self) {
        let conn = self.conn;
        let _ = self
            .send(RouterEvent::Disconnected {
                conn,
                will: WillAction::Discard,
                session_expiry: None,
            })
            .await;
    }
}

/// The receiving half of an attached internal client: what the router sends it, in order.
/// `None` once the router let go of the connection.
#[derive(Debug)]
pub struct ClientRx {
    rx: LinkRx,
}

impl ClientRx {
    pub async fn recv(&mut self) -> Option<Outgoing> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Result<Outgoing, TryRecvError> {
        self.rx.try_recv()
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router drops QoS 0 messages for a connection whose backlog (sent, not yet taken)
    /// reached `max(max_queued_messages, 1000)`; an internal client that takes every packet
    /// has no backlog (it used to grow forever, so after 1000 QoS 0 deliveries an internal
    /// client got none).
    #[test]
    fn an_internal_client_that_takes_its_packets_has_no_backlog() {
        let (link, rx) = ConnLink::new(7);
        let mut rx = ClientRx { rx };
        for _ in 0..5 {
            link.send(Outgoing::Disconnect(0));
            assert!(rx.try_recv().is_ok());
        }
        assert_eq!(link.backlog(), 0);
    }
}
