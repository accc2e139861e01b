//! One client connection: the CONNECT handshake, then a loop that reads packets, checks
//! them, forwards them to the router, and writes what the router sends back.
//!
//! The connection owns its socket, its read and write buffers, keep-alive, topic aliases in
//! both directions and the count of the client's unacknowledged QoS 1/2 publishes (our
//! Receive Maximum). Everything about the session (subscriptions, in-flight messages,
//! queues) lives in the router, so a connection can die at any point without losing state.
//!
//! Reads are cancel-safe (`protocol::framed::FramedReader`: one read into an owned buffer,
//! whole packets decoded from it, small payloads copied out of a grown buffer; no buffer at
//! all while nothing is buffered, so an idle connection holds none); writes go through `write_buf`, so the loop keeps reading while a slow client
//! drains, and stops taking new outgoing packets once `WRITE_HIGH_WATER` bytes are
//! buffered. The write buffer is given back whenever it has been emptied, so 10,000 idle
//! connections cost a few KiB each, not the largest burst each one ever wrote.
//!
//! Memory per connected client (issue 17 item 1): the task's future is sized by the main
//! loop alone (the handshake and the goodbye run boxed; nothing large is held across the
//! loop's awaits; pinned by a size test), what the router sends waits in a `link` queue of
//! one small allocation, and rarely used state (topic aliases, denied subscriptions) is
//! allocated on first use. An active plain-TCP client holds its task (~0.9 KiB with tokio's
//! header, 128-byte aligned), tokio's registration of its socket (`ScheduledIo`, 256 B), the
//! `Arc` its two halves share (48 B), the link queue (~80 B) and its client id; no read or
//! write buffer while nothing is in flight. After `mqtt.park_idle_ms` of quiet it gives the
//! task, the registration and the `Arc` up and waits in `park` (~0.3 KiB in all).
//!
//! Before the client is authenticated it costs little: the socket holds a place under
//! `mqtt.max_handshaking` (taken at accept, given back once the CONNECT is answered), the
//! whole handshake is bounded by `mqtt.connect_timeout_secs`, the CONNECT may be at most
//! `mqtt.max_connect_packet_size` bytes (a larger one is refused from its fixed header), and
//! the password check waits at most `auth.hash_queue_timeout_ms` for a hashing slot.
//!
//! Authorization here covers the client's own packets: publishes (ACL, and never to
//! `$SYS`), subscriptions and the will at CONNECT. The rules are re-derived when a SIGHUP
//! reloaded the ACL file. What the client receives, and its will when it is published, are
//! checked by the router (`router::security`).
//!
//! When the server closes a connection (a DISCONNECT with a reason code, a refused
//! CONNACK), it half-closes: writes what it has, shuts its sending side and reads (and
//! discards) for up to `CLOSE_DRAIN`, so a client still writing does not get a reset that
//! would lose the reason code before it read it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

mod handshake;
mod incoming;
mod link;
pub(crate) mod park;

pub use link::{ConnLink, LinkRx, TryRecvError};

use handshake::Attached;
use incoming::{apply_out_alias, strip_problem_info, valid_topic};

use super::router::{ConnectRequest, RouterEvent, WillAction};
use super::session::ClientParams;
use crate::config::MqttConfig;
use crate::protocol::framed::FramedReader;
use crate::protocol::{
    self, reason, topic, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect,
    DisconnectProperties, Packet, ProtocolVersion, Publish, QoS,
};

pub type ConnId = u64;

/// Stop taking outgoing packets from the router while this many bytes wait for the socket.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// An emptied write buffer larger than this is given back: 0 = always (an idle connection
/// holds no write buffer; a busy one pays one allocation per socket write).
const WRITE_KEEP: usize = 0;
/// How long a closing connection may spend flushing its last bytes.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// After a server-initiated close: how long the half-closed socket keeps reading (and
/// discarding) what the client still sends, waiting for its end of stream.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// What the router sends to a connection. Packets are boxed so that each connection's
/// channel blocks stay small (an idle connection costs a few KiB, not tens).
#[derive(Debug)]
pub enum Outgoing {
    Packet(Box<Packet>),
    /// Close the connection; v5 clients get a DISCONNECT with this reason code first.
    Disconnect(u8),
}

/// What every connection shares.
pub struct Shared {
    pub cfg: Arc<MqttConfig>,
    pub router: mpsc::Sender<RouterEvent>,
    pub shutdown: CancellationToken,
    pub next_conn_id: AtomicU64,
    /// Connections that completed CONNECT and are counted against `max_connections`.
    pub connected: AtomicUsize,
    /// Per-source-address connection rate limit, asked right after accept.
    pub rate_limit: super::ratelimit::RateLimiter,
    /// `auth.max_connections_per_user`.
    pub user_limit: Arc<super::ratelimit::UserLimit>,
    /// Bytes in/out of every listener, in configuration order.
    pub traffic: Vec<Arc<super::traffic::ListenerTraffic>>,
    /// Sockets in the handshake (`mqtt.max_handshaking`).
    pub handshakes: Handshakes,
    /// Where idle plain-TCP connections wait without a task (`mqtt.park_idle_ms`); `None`
    /// when that is off.
    pub parking: Option<Arc<park::Lot>>,
}

/// Counts sockets accepted and not yet past CONNECT (`mqtt.max_handshaking`).
#[derive(Debug, Default)]
pub struct Handshakes {
    count: Arc<AtomicUsize>,
    /// Sockets closed at accept because the limit was reached.
    pub refused: AtomicU64,
    /// A refusal episode is being logged (cleared when the count falls to half the limit).
    episode: std::sync::atomic::AtomicBool,
}

impl Handshakes {
    /// A place for a new socket, or None (logged once per episode) when `max` are in use.
    pub fn try_claim(&self, max: usize, peer: SocketAddr) -> Option<HandshakeSlot> {
        let claimed = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match claimed {
            Ok(n) => {
                if n < max / 2 {
                    self.episode.store(false, Ordering::Relaxed);
                }
                Some(HandshakeSlot(Some(self.count.clone())))
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if !self.episode.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%peer, max, "too many sockets in the handshake (mqtt.max_handshaking): closing new ones (logged once per episode)");
                }
                None
            }
        }
    }
}

/// One socket's place under `mqtt.max_handshaking`, given back on [`HandshakeSlot::release`]
/// or drop.
#[derive(Debug)]
pub struct HandshakeSlot(Option<Arc<AtomicUsize>>);

impl HandshakeSlot {
    pub fn release(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// What a connection knows about the listener that accepted it.
pub struct ListenerContext {
    /// `bind` as configured, for logs.
    pub name: String,
    /// Clients without a user name (or client certificate) may connect.
    pub allow_anonymous: bool,
    /// Password file and ACL (shared by all listeners).
    pub auth: Arc<crate::auth::Auth>,
    /// `Some(path)` on a WebSocket listener: the socket is upgraded (`super::ws`) before
    /// MQTT starts.
    pub websocket: Option<String>,
    /// This listener's byte counters.
    pub traffic: Arc<super::traffic::ListenerTraffic>,
}

/// How the main loop ended.
#[derive(Debug)]
enum Ended {
    /// The connection is over.
    Closed(Close),
    /// Quiet for `mqtt.park_idle_ms` with nothing buffered either way: it may wait
    /// without a task (`park`). Only a connection built `parkable` ends so.
    Idle,
}

/// Why the loop ended.
#[derive(Debug)]
enum Close {
    /// The peer closed the socket or it failed.
    Socket,
    /// We close because of the client's error; v5 clients get DISCONNECT with the code.
    Protocol(u8, &'static str),
    /// The client sent DISCONNECT.
    ClientDisconnect { reason: u8, expiry: Option<u32> },
    /// The router told us to close (takeover, shutdown).
    Server(u8),
    /// No packet within 1.5 × keep-alive.
    KeepAlive,
    /// The router refused the connection after all (a CONNACK with a failure code: its
    /// session could not be stored). No DISCONNECT follows, and no will: the connection
    /// was never accepted.
    Refused,
}

/// Serves one accepted socket until it closes. `cert_user` is the name from a verified TLS
/// client certificate; it becomes the user name (the CONNECT's user name and password are
/// then not checked). `slot` is the socket's place under `mqtt.max_handshaking`, given
/// back once its CONNECT is answered.
///
/// A plain function that returns the task's future: a task is as large as its largest
/// state, and an `async fn`'s arguments stay in every state of its future. Here the
/// connection is built at once and its handshake boxed, so the future that lives for the
/// connection's life holds the main loop's state and little else (pinned by the
/// `connection::tests` size test).
pub fn serve<R, W>(
    reader: R,
    writer: W,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
    cert_user: Option<String>,
    slot: HandshakeSlot,
) -> impl std::future::Future<Output = ()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let conn = Connection::new(reader, writer, peer, shared, ctx, cert_user, false);
    served(Box::pin(conn.handshake(slot)))
}

/// [`serve`] for a plain TCP socket: the same connection, but one that waits without a task
/// while it is idle (`park`), if `mqtt.park_idle_ms` is on.
pub fn serve_tcp(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
    slot: HandshakeSlot,
) -> impl std::future::Future<Output = ()> {
    let (reader, writer) = stream.into_split();
    let parkable = shared.parking.is_some();
    let conn = Connection::new(reader, writer, peer, shared, ctx, None, parkable);
    park::served(Box::pin(conn.handshake(slot)))
}

/// The connection after its (boxed) handshake: the main loop, inline, then the goodbye,
/// boxed (its state is on the heap only while it runs).
async fn served<R, W>(handshake: Pin<Box<impl Future<Output = Option<Attached<R, W>>>>>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(mut live) = handshake.await else {
        return;
    };
    let close = loop {
        // Not parkable: the loop never ends idle.
        if let Ended::Closed(close) = live.run().await {
            break close;
        }
    };
    Box::pin(live.goodbye(close)).await;
}

struct Connection<R, W> {
    /// Bytes read and written, flushed to the listener's counters now and then.
    meter: super::traffic::Meter,
    /// The socket's reading half and its buffer: whole packets out.
    reader: FramedReader<R>,
    writer: W,
    wbuf: BytesMut,
    version: ProtocolVersion,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
    cert_user: Option<String>,
    /// The main loop ends [`Ended::Idle`] after `mqtt.park_idle_ms` of quiet (plain TCP).
    parkable: bool,
}

impl<R: AsyncRead + Unpin, W> Connection<R, W> {
    /// A connection on `reader`/`writer`, speaking 3.1.1 until its CONNECT says otherwise.
    fn new(
        reader: R,
        writer: W,
        peer: SocketAddr,
        shared: Arc<Shared>,
        ctx: Arc<ListenerContext>,
        cert_user: Option<String>,
        parkable: bool,
    ) -> Self {
        let max_in = shared.cfg.max_packet_size as usize;
        Connection {
            meter: super::traffic::Meter::new(ctx.traffic.clone()),
            reader: FramedReader::new(reader, max_in),
            writer,
            wbuf: BytesMut::new(),
            version: ProtocolVersion::V311,
            peer,
            shared,
            ctx,
            cert_user,
            parkable,
        }
    }
}

/// Per-connection protocol state after CONNECT.
struct State {
    client_id: Arc<str>,
    /// Authenticated user name (password file or client certificate), or the CONNECT's
    /// unchecked one when no password file is configured.
    username: Option<Arc<str>>,
    /// The ACL rules for this client; `None` = no ACL file, everything allowed.
    acl: Option<Arc<crate::auth::ClientAcl>>,
    /// `Auth::generation` when `acl` was derived: a SIGHUP since makes it stale.
    acl_generation: u64,
    /// Topic aliases and ACL-denied subscriptions: most clients use neither, so they are
    /// allocated on first use (three empty maps inline would cost every connection 144 B).
    rare: Option<Box<Rare>>,
    /// 1.5 × the keep-alive, in milliseconds (at most 65,535 s × 1.5); `None`: none.
    keep_alive_ms: Option<std::num::NonZeroU32>,
    /// v5 Session Expiry Interval from CONNECT (0 forbids raising it on DISCONNECT).
    connect_expiry: u32,
    in_alias_max: u16,
    out_alias_max: u16,
    /// Packet ids of the client's QoS 1/2 publishes not yet fully acknowledged by us.
    incoming_unacked: Unacked,
    request_problem_info: bool,
    /// The connection waits `mqtt.park_idle_ms << park_shift` of quiet before it parks: one
    /// that is woken soon after it parked waits longer the next time (`park`).
    park_shift: u8,
}

/// The parts of [`State`] few connections use.
#[derive(Default)]
struct Rare {
    /// SUBSCRIBEs sent to the router with ACL-denied filters removed: packet id → the
    /// original positions of the denied filters, spliced back into the router's SUBACK.
    denied_subs: HashMap<u16, Vec<usize>>,
    /// Incoming topic aliases (index = alias).
    in_aliases: HashMap<u16, Arc<str>>,
    /// Outgoing topic aliases we assigned.
    out_aliases: HashMap<Arc<str>, u16>,
}

/// The packet ids of a v5 client's unacknowledged publishes: allocated on its first QoS 1/2
/// publish (most connected clients are subscribers that never publish one), given back when
/// it parks empty.
#[derive(Default)]
// Boxed on purpose: 8 bytes in every connection instead of the set's 48 (its hasher and table).
#[allow(clippy::box_collection)]
struct Unacked(Option<Box<HashSet<u16>>>);

impl Unacked {
    /// Adds `id`; returns how many are unacknowledged now.
    fn insert(&mut self, id: u16) -> usize {
        let set = self.0.get_or_insert_with(Default::default);
        set.insert(id);
        set.len()
    }

    fn remove(&mut self, id: u16) {
        if let Some(set) = &mut self.0 {
            set.remove(&id);
        }
    }

    /// Gives the set back if it is empty.
    fn shrink(&mut self) {
        if self.0.as_ref().is_some_and(|s| s.is_empty()) {
            self.0 = None;
        }
    }
}

impl State {
    /// How long the connection may stay quiet (1.5 × the keep-alive), if it has one.
    fn keep_alive(&self) -> Option<Duration> {
        self.keep_alive_ms
            .map(|ms| Duration::from_millis(u64::from(ms.get())))
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("no CONNECT within the connect timeout")]
    Timeout,
    #[error("first packet was {0}, not CONNECT")]
    NotConnect(&'static str),
    #[error("bad CONNECT: {0}")]
    Decode(#[from] DecodeError),
    #[error("CONNECT refused with reason {0:#04x}")]
    Refused(u8),
    #[error("server shutting down")]
    Shutdown,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Reads the first packet, which must be CONNECT, within the connect timeout.
    async fn read_connect(&mut self) -> Result<Option<Box<Connect>>, HandshakeError> {
        let timeout = Duration::from_secs(self.shared.cfg.connect_timeout_secs);
        let deadline = Instant::now() + timeout;
        // The only packet read from an unauthenticated client: small.
        let cfg = &self.shared.cfg;
        let max = cfg.max_connect_packet_size.min(cfg.max_packet_size) as usize;
        self.reader.set_max_packet_size(max);
        loop {
            if self.reader.buffered().first().is_some_and(|&b| b != 0x10) {
                // Not a CONNECT fixed header: no need to wait for the rest.
                return Err(HandshakeError::NotConnect("a non-CONNECT packet"));
            }
            match self.reader.next_buffered(ProtocolVersion::V311) {
                Ok(Some(Packet::Connect(c))) => return Ok(Some(c)),
                Ok(Some(other)) => return Err(HandshakeError::NotConnect(other.name())),
                Ok(None) => {}
                Err(DecodeError::UnsupportedProtocolVersion(level)) => {
                    // MQTT-3.1.2-2: answer with return code 0x01 (3.1.1 form) and close.
                    debug!(peer = %self.peer, level, "unsupported protocol level");
                    self.wbuf.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
                    self.flush_and_close().await;
                    return Err(DecodeError::UnsupportedProtocolVersion(level).into());
                }
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                r = self.reader.fill() => {
                    let n = r?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.meter.read(n, Instant::now());
                }
                _ = tokio::time::sleep_until(deadline) => return Err(HandshakeError::Timeout),
                _ = self.shared.shutdown.cancelled() => return Err(HandshakeError::Shutdown),
            }
        }
    }

    /// The handshake: the CONNECT read, checked, authenticated and handed to the router.
    /// `None`: the connection ended there (refused and answered, closed, timed out).
    async fn handshake(mut self, slot: HandshakeSlot) -> Option<Attached<R, W>> {
        let connect = match self.read_connect().await {
            Ok(Some(c)) => c,
            Ok(None) => return None,
            Err(e) => {
                debug!(peer = %self.peer, cause = %e, "connection closed before CONNECT completed");
                return None;
            }
        };
        let (conn_id, state, rx, _user_slot) = self.attach(connect, slot).await?;
        Some(Attached {
            conn: self,
            conn_id,
            state,
            rx,
            _user_slot,
            last_read: Instant::now(),
        })
    }

    /// Checks and authenticates the CONNECT and hands the session request to the router.
    /// `None`: refused (answered here) or the router is gone.
    async fn attach(
        &mut self,
        mut connect: Box<Connect>,
        mut handshake: HandshakeSlot,
    ) -> Option<(
        ConnId,
        State,
        LinkRx,
        Option<Box<crate::broker::ratelimit::UserSlot>>,
    )> {
        self.version = connect.protocol;
        let password = connect.password.take();
        let accepted = match self.accept(connect) {
            Ok((request, mut state)) => match Box::pin(self.authenticate(&state, password)).await {
                Ok(()) => {
                    state.acl_generation = self.ctx.auth.generation();
                    state.acl = self
                        .ctx
                        .auth
                        .acl_for(state.username.as_deref(), &state.client_id);
                    self.check_will(&state, &request)
                        .and_then(|()| self.claim_user_slot(&state))
                        .map(|slot| (request, state, slot))
                }
                Err(code) => Err(code),
            },
            Err(code) => Err(code),
        };
        handshake.release();
        // Held until the connection ends: its place under `max_connections_per_user`.
        let (request, state, _user_slot) = match accepted {
            Ok(x) => x,
            Err(code) => {
                // Refused: CONNACK with the reason, then close (MQTT-3.2.2-5).
                let ack = Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason_code: code,
                    properties: ConnAckProperties::default(),
                });
                protocol::encode(&ack, self.version, &mut self.wbuf);
                Box::pin(self.flush_and_drain()).await;
                debug!(peer = %self.peer, cause = %HandshakeError::Refused(code), "connection refused");
                return None;
            }
        };
        let shared = self.shared.clone();
        shared.connected.fetch_add(1, Ordering::Relaxed);
        let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (link, rx) = ConnLink::new(conn_id);
        let request = ConnectRequest {
            link,
            client_id: request.client_id,
            clean_start: request.clean_start,
            expiry_interval: request.expiry_interval,
            will: request.will,
            params: request.params,
            connack: request.connack,
        };
        let client_id = state.client_id.clone();
        debug!(peer = %self.peer, client_id = %client_id, version = ?self.version, "client connected");
        let identity = crate::auth::Identity {
            owner: crate::auth::SessionOwner::from_username(state.username.as_deref()),
            acl: state.acl.clone(),
        };
        if shared
            .router
            .send(RouterEvent::ClientConnect {
                request: Box::new(request),
                identity,
            })
            .await
            .is_err()
        {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some((conn_id, state, rx, _user_slot))
    }
}

impl<R, W> Attached<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The main loop, once.
    async fn run(&mut self) -> Ended {
        self.conn
            .main_loop(
                self.conn_id,
                &mut self.state,
                &mut self.rx,
                &mut self.last_read,
            )
            .await
    }

    /// After the main loop: the router is told, the socket closed.
    async fn goodbye(self, close: Close) {
        let Attached {
            conn: mut this,
            conn_id,
            state,
            rx: _rx,
            _user_slot,
            last_read: _,
        } = self;
        this.say_goodbye(conn_id, state, close).await;
    }
}

/// What the router is told when a connection ends, and the reason code a v5 client gets.
fn farewell(client_id: &str, close: &Close) -> (WillAction, Option<u32>, Option<u8>) {
    debug!(client_id = %client_id, ?close, "connection closing");
    let (will, expiry) = match close {
        Close::ClientDisconnect { reason, expiry } => (
            if *reason == reason::NORMAL_DISCONNECTION {
                WillAction::Discard
            } else {
                WillAction::Publish
            },
            *expiry,
        ),
        Close::Refused => (WillAction::Discard, None),
        _ => (WillAction::Publish, None),
    };
    let reason_code = match close {
        Close::Protocol(code, why) => {
            info!(client_id = %client_id, reason = code, why, "closing connection after a protocol violation");
            Some(*code)
        }
        Close::Server(code) => Some(*code),
        Close::KeepAlive => {
            info!(client_id = %client_id, "keep-alive timeout");
            Some(reason::KEEP_ALIVE_TIMEOUT)
        }
        Close::Socket | Close::ClientDisconnect { .. } | Close::Refused => None,
    };
    (will, expiry, reason_code)
}

/// Tells the router that connection `conn` is gone (its will as `will`) and stops counting it.
async fn tell_router_gone(shared: &Shared, conn: ConnId, will: WillAction, expiry: Option<u32>) {
    let _ = shared
        .router
        .send(RouterEvent::Disconnected {
            conn,
            will,
            session_expiry: expiry,
        })
        .await;
    shared.connected.fetch_sub(1, Ordering::Relaxed);
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn say_goodbye(&mut self, conn_id: ConnId, state: State, close: Close) {
        let shared = self.shared.clone();
        let (will, expiry, reason_code) = farewell(&state.client_id, &close);
        drop(state);
        if let (Some(code), true) = (reason_code, self.version.is_v5()) {
            let d = Packet::Disconnect(Disconnect {
                reason_code: code,
                properties: DisconnectProperties::default(),
            });
            protocol::encode(&d, self.version, &mut self.wbuf);
        }
        tell_router_gone(&shared, conn_id, will, expiry).await;
        match close {
            Close::Socket => {}
            // Shutdown: every client is told at once; no time for draining.
            Close::Server(reason::SERVER_SHUTTING_DOWN) | Close::ClientDisconnect { .. } => {
                self.flush_and_close().await
            }
            _ => self.flush_and_drain().await,
        }
    }

    /// Reads, forwards and writes until the connection closes or, if it is `parkable`, has
    /// been quiet for `mqtt.park_idle_ms`. `last_read` (the keep-alive clock) carries over
    /// a wait without a task.
    async fn main_loop(
        &mut self,
        conn: ConnId,
        st: &mut State,
        rx: &mut LinkRx,
        last_read: &mut Instant,
    ) -> Ended {
        use Ended::Closed;
        self.reader
            .set_max_packet_size(self.shared.cfg.max_packet_size as usize);
        let park_idle = self
            .parkable
            .then(|| Duration::from_millis(self.shared.cfg.park_idle_ms << st.park_shift));
        let mut last_active = Instant::now();
        // The earlier of the keep-alive and the park deadline. Activity does not move the
        // timer (re-arming it per packet would cost every packet a timer-wheel update):
        // when it fires, the real deadlines are worked out from `last_read` and
        // `last_active`, and it is set again for the next one.
        let keep_alive = st.keep_alive();
        let next = move |last_read: Instant, last_active: Instant| {
            let keep_alive = keep_alive.map(|k| last_read + k);
            match (keep_alive, park_idle.map(|d| last_active + d)) {
                (Some(k), Some(p)) => Some(k.min(p)),
                (k, p) => k.or(p),
            }
        };
        let first = next(*last_read, last_active);
        let timed = first.is_some();
        let timer = tokio::time::sleep_until(first.unwrap_or(last_active));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                r = self.writer.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => {
                    match r {
                        Ok(0) | Err(_) => return Closed(Close::Socket),
                        Ok(n) => {
                            self.meter.wrote(n);
                            if self.wbuf.is_empty() && self.wbuf.capacity() > WRITE_KEEP {
                                self.wbuf = BytesMut::new();
                            }
                        }
                    }
                }
                out = rx.recv(), if self.wbuf.len() < WRITE_HIGH_WATER => {
                    let Some(mut out) = out else {
                        return Closed(Close::Server(reason::SERVER_SHUTTING_DOWN));
                    };
                    last_active = Instant::now();
                    loop {
                        if let Some(close) = self.on_outgoing(st, out) {
                            return Closed(close);
                        }
                        if self.wbuf.len() >= WRITE_HIGH_WATER {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(next) => out = next,
                            Err(_) => break,
                        }
                    }
                }
                r = self.reader.fill() => {
                    let n = match r {
                        Ok(0) | Err(_) => return Closed(Close::Socket),
                        Ok(n) => n,
                    };
                    *last_read = Instant::now();
                    last_active = *last_read;
                    self.meter.read(n, *last_read);
                    loop {
                        // No temporary of these matches lives across the await below (a
                        // packet or an event held there would size every connection task).
                        let waiting = match self.reader.next_buffered(self.version) {
                            Ok(Some(p)) => match self.on_incoming(conn, st, p, *last_read) {
                                Ok(None) => continue,
                                // The router's channel is full: wait for room (backpressure),
                                // in a box, so the send's state is not in every task either.
                                Ok(Some(ev)) => Box::pin(self.shared.router.send(ev)),
                                Err(close) => return Closed(close),
                            },
                            Ok(None) => break,
                            Err(e) => {
                                debug!(client_id = %st.client_id, cause = %e, "undecodable packet");
                                return Closed(Close::Protocol(e.reason_code(), "malformed packet"));
                            }
                        };
                        if waiting.await.is_err() {
                            return Closed(Close::Server(reason::SERVER_SHUTTING_DOWN));
                        }
                    }
                }
                () = &mut timer, if timed => {
                    let now = Instant::now();
                    if keep_alive.is_some_and(|k| now >= *last_read + k) {
                        return Closed(Close::KeepAlive);
                    }
                    let quiet = park_idle.is_some_and(|d| now >= last_active + d);
                    if quiet {
                        if self.wbuf.is_empty() && self.reader.buffered().is_empty() {
                            return Ended::Idle;
                        }
                        // Still writing (or a packet half read): quiet only once that is done.
                        last_active = now;
                    }
                    if let Some(at) = next(*last_read, last_active) {
                        timer.as_mut().reset(at);
                    }
                }
            }
        }
    }

    /// Encodes one packet from the router; returns `Some` if the connection must close.
    fn on_outgoing(&mut self, st: &mut State, out: Outgoing) -> Option<Close> {
        let mut packet = match out {
            Outgoing::Disconnect(code) => return Some(Close::Server(code)),
            Outgoing::Packet(p) => *p,
        };
        match &mut packet {
            Packet::Publish(p) if st.out_alias_max > 0 => apply_out_alias(st, p),
            Packet::PubAck(a) | Packet::PubComp(a) => {
                st.incoming_unacked.remove(a.packet_id);
            }
            Packet::PubRec(a) if a.reason_code >= 0x80 => {
                st.incoming_unacked.remove(a.packet_id);
            }
            Packet::SubAck(a) if st.rare.as_ref().is_some_and(|r| !r.denied_subs.is_empty()) => {
                if let Some(denied) = st.rare().denied_subs.remove(&a.packet_id) {
                    for i in denied {
                        let at = i.min(a.reason_codes.len());
                        a.reason_codes.insert(at, reason::NOT_AUTHORIZED);
                    }
                }
            }
            _ => {}
        }
        if !st.request_problem_info {
            strip_problem_info(&mut packet);
        }
        protocol::encode(&packet, self.version, &mut self.wbuf);
        match packet {
            // MQTT-3.2.2-7 / 3.2.2.2: after a refusing CONNACK the server closes.
            Packet::ConnAck(a) if a.reason_code >= 0x80 => Some(Close::Refused),
            _ => None,
        }
    }

    /// [`Self::flush_and_close`], then reads and discards what the client still sends until
    /// it closes its side or `CLOSE_DRAIN` passes: closing with unread data would reset the
    /// connection, and a client still writing could lose the reason code we just sent.
    async fn flush_and_drain(&mut self) {
        self.flush_and_close().await;
        let _ = tokio::time::timeout(CLOSE_DRAIN, async {
            // On the heap: an array here would be part of every connection task's state.
            let mut sink = vec![0u8; 4096];
            loop {
                match self.reader.get_mut().read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.meter.read(n, Instant::now()),
                }
            }
        })
        .await;
    }

    /// Writes what is buffered (bounded in time) and shuts the socket's sending side down.
    async fn flush_and_close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            while !self.wbuf.is_empty() {
                match self.writer.write_buf(&mut self.wbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.meter.wrote(n),
                }
            }
            let _ = self.writer.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests;
