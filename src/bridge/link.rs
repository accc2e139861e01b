//! The upstream connection, MQTT 3.1.1 or 5, spoken with Holdfast's own codec
//! (`crate::protocol`, the broker's, fuzzed and tested both ways).
//!
//! Why not rumqttc (used here up to session 3 for 3.1.1): its state machine refuses
//! acknowledgements for packet ids above its in-flight limit, so a gateway restarted with a
//! lower `inflight` and messages in flight reconnected for ever ("unsolicited ack"); its
//! framed network cannot read while it writes, so on a slow uplink the acknowledgements
//! waited behind a whole window of writing; and its v5 client hides its network and
//! mis-reads DISCONNECT (`../shared/research/crates.md` §1).
//!
//! The link keeps no message state: ids, windows, DUP resends and QoS 2 states are the
//! router's (see [`super::upstream`]). It only encodes, decodes, pings and enforces the
//! limits the upstream announced in its CONNACK.
//!
//! Writing never stops reading: while the socket does not take more bytes, [`Link::flush`]
//! reads what the upstream sent (acknowledgements) into the read buffer, and it gives up
//! only when *neither* direction moved for `ack_timeout_secs` (a progress timeout, not a
//! bound on the whole batch: a window that takes a minute on a 200 kB/s uplink is fine as
//! long as bytes keep moving).

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls;

use super::error::LinkError;
use super::upstream::{AckKind, Granted, UpEvent, Upstream};
use super::{BridgeConfig, BridgeProtocol};
use crate::protocol::framed::FramedReader;
use crate::protocol::{
    encode, encoded_len, reason, ConnAck, Connect, ConnectProperties, Disconnect, Packet,
    ProtocolVersion, Publish, QoS, Subscribe, SubscribeFilter, Will,
};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Most bytes read ahead while a write is blocked (beyond that, reading waits for the
/// bridge to handle what was read).
const READ_AHEAD: usize = 1 << 20;

pub(super) struct Link {
    version: ProtocolVersion,
    /// The upstream connection, read as whole packets (`protocol::framed`, the reader the
    /// broker's own connections use); written through `get_mut`.
    reader: FramedReader<Box<dyn Io>>,
    wbuf: BytesMut,
    /// Largest packet the upstream accepts (its Maximum Packet Size).
    max_out: usize,
    keepalive: Duration,
    next_ping: Instant,
    awaiting_pingresp: bool,
    /// A flush fails when no byte moved either way for this long.
    idle_timeout: Duration,
    /// The upstream ended the connection (EOF, reset, DISCONNECT), as opposed to a timeout
    /// on our side: see [`Upstream::closed_by_peer`].
    closed_by_peer: bool,
    /// Reads while a write is blocked land here first (allocated once, not per flush).
    scratch: Box<[u8]>,
    /// The state topic when `notifications` is on.
    notify: Option<String>,
    /// The upstream's Maximum QoS (for the state message).
    maximum_qos: QoS,
    /// With `linger_ms`: the TCP socket, whose quick-ACK mode is switched off after each
    /// read (see [`Link::delay_acks`]).
    delayed_ack_fd: Option<std::os::fd::RawFd>,
}

/// Packet id of the state notification (`notifications`): never an outbox's (config
/// validation keeps `inflight` × priorities below it), and its PUBACK is consumed here.
pub(super) const NOTIFY_ID: u16 = u16::MAX;

/// Connects to `address` (TCP, TLS, CONNECT with Clean Start / Clean Session = false and,
/// over MQTT 5, the configured Session Expiry) and waits for a successful CONNACK. A host
/// name is resolved and every address it resolves to is tried in turn, each within
/// `connect_timeout_secs`. With `notifications`, the CONNECT carries the will (retained
/// `0` on the state topic) and the retained `1` is queued right after the CONNACK (sent by
/// the first flush; its PUBACK is consumed by the link).
pub(super) async fn connect(
    cfg: &BridgeConfig,
    address: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_packet_size: usize,
) -> Result<(Link, Granted), LinkError> {
    let limit = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    let ips: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(limit, tokio::net::lookup_host(address)).await {
            Ok(Ok(ips)) => ips.collect(),
            Ok(Err(source)) => {
                return Err(LinkError::Resolve {
                    address: address.to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(LinkError::ResolveTimeout {
                    address: address.to_string(),
                    secs: limit.as_secs(),
                })
            }
        };
    connect_resolved(cfg, address, &ips, tls, max_packet_size).await
}

/// [`connect`] to the addresses `address` resolved to, in turn, until one answers.
async fn connect_resolved(
    cfg: &BridgeConfig,
    address: &str,
    ips: &[std::net::SocketAddr],
    tls: Option<Arc<rustls::ClientConfig>>,
    max_packet_size: usize,
) -> Result<(Link, Granted), LinkError> {
    let limit = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    let mut errors = Vec::new();
    for ip in ips {
        match tokio::time::timeout(limit, open(cfg, address, *ip, tls.clone(), max_packet_size))
            .await
        {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(LinkError::ConnectTimeout {
                ip: *ip,
                secs: limit.as_secs(),
            }),
        }
    }
    match errors.len() {
        0 => Err(LinkError::NoAddress {
            address: address.to_string(),
        }),
        1 => Err(errors.remove(0)),
        _ => Err(LinkError::EveryAddress(errors)),
    }
}

/// The will / state message: retained, QoS 1 (at most the upstream's maximum).
fn state_message(cfg: &BridgeConfig, online: bool) -> (String, bytes::Bytes) {
    let payload: &'static [u8] = if online { b"1" } else { b"0" };
    (cfg.state_topic(), bytes::Bytes::from_static(payload))
}

async fn open(
    cfg: &BridgeConfig,
    address: &str,
    ip: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_in: usize,
) -> Result<(Link, Granted), LinkError> {
    let tcp = TcpStream::connect(ip)
        .await
        .map_err(|source| LinkError::Connect {
            address: address.to_string(),
            ip,
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let delayed_ack_fd = (cfg.linger_ms > 0).then(|| std::os::fd::AsRawFd::as_raw_fd(&tcp));
    let io: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(tls) => {
            let (host, _) = super::host_port(address);
            let name = cfg.server_name.clone().unwrap_or(host);
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| LinkError::ServerName(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(LinkError::Tls)?;
            Box::new(stream)
        }
    };
    let version = match cfg.protocol {
        BridgeProtocol::V311 => ProtocolVersion::V311,
        BridgeProtocol::V5 => ProtocolVersion::V5,
    };
    let keepalive = cfg.keepalive_secs.max(5);
    let mut link = Link {
        version,
        // Largest packet we accept (our Maximum Packet Size), checked from each header.
        reader: FramedReader::new(io, max_in),
        wbuf: BytesMut::with_capacity(8 * 1024),
        max_out: usize::MAX,
        keepalive: Duration::from_secs(u64::from(keepalive)),
        next_ping: Instant::now(),
        awaiting_pingresp: false,
        idle_timeout: Duration::from_secs(cfg.ack_timeout_secs.max(1)),
        closed_by_peer: false,
        scratch: vec![0; 8 * 1024].into_boxed_slice(),
        notify: None,
        maximum_qos: QoS::AtLeastOnce,
        delayed_ack_fd,
    };
    let will = cfg.notifications.then(|| {
        let (topic, payload) = state_message(cfg, false);
        Will {
            topic: topic.into(),
            payload,
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
        }
    });
    let connect = Connect {
        protocol: version,
        clean_start: false,
        keep_alive: keepalive,
        // Encoded over MQTT 5 only.
        properties: ConnectProperties {
            session_expiry_interval: Some(cfg.session_expiry_secs.max(1)),
            receive_maximum: Some(cfg.inflight),
            maximum_packet_size: u32::try_from(max_in).ok(),
            ..Default::default()
        },
        client_id: cfg.effective_client_id(),
        will,
        username: cfg.username.clone(),
        password: cfg.password.clone().map(Into::into),
    };
    encode(&Packet::Connect(Box::new(connect)), version, &mut link.wbuf);
    link.flush().await?;
    let ack = match link.read_packet().await? {
        Packet::ConnAck(ack) => ack,
        other => return Err(LinkError::NotConnAck(other.name())),
    };
    let (mut link, mut granted) = link.accept(ack, cfg.notifications)?;
    if cfg.notifications {
        link.notify = Some(cfg.state_topic());
        // The state message takes one of the upstream's Receive Maximum slots until its
        // PUBACK: the outboxes get one fewer. With a single slot it goes at QoS 0 instead
        // (the will, QoS 1, still covers a gateway that dies).
        link.maximum_qos = if granted.receive_maximum > 1 {
            granted.receive_maximum -= 1;
            granted.maximum_qos
        } else {
            QoS::AtMostOnce
        };
        link.queue_state(true);
    }
    Ok((link, granted))
}

impl Link {
    fn v5(&self) -> bool {
        self.version.is_v5()
    }

    /// Applies a CONNACK: refusal → `Err`; otherwise the upstream's limits (MQTT 5; a
    /// 3.1.1 upstream announces none and takes QoS 0 and 1 from the bridge).
    fn accept(mut self, ack: ConnAck, with_will: bool) -> Result<(Link, Granted), LinkError> {
        let p = &ack.properties;
        if ack.reason_code >= 0x80 {
            let hint = match ack.reason_code {
                0x9a | 0x9b if with_will => Some(
                    "it refuses the retained QoS 1 will of `notifications`: set notifications = false",
                ),
                reason::NOT_AUTHORIZED if with_will => Some(
                    "if its ACL refuses the will on the state topic: allow notification_topic for this client, change it, or set notifications = false",
                ),
                _ => None,
            };
            return Err(LinkError::Refused {
                code: ack.reason_code,
                hint,
                reason: p.reason_string.clone(),
                server_reference: p.server_reference.clone(),
            });
        }
        if let Some(ka) = p.server_keep_alive {
            // The upstream decides (MQTT-3.2.2-21); 0 would mean no pings at all, which
            // would leave a half-open link undetected: keep ours then.
            if ka > 0 {
                self.keepalive = Duration::from_secs(u64::from(ka));
            }
        }
        if let Some(max) = p.maximum_packet_size {
            self.max_out = max as usize;
        }
        self.next_ping = Instant::now() + self.keepalive;
        let granted = Granted {
            session_present: ack.session_present,
            receive_maximum: p.receive_maximum.unwrap_or(u16::MAX).max(1),
            maximum_qos: match p.maximum_qos {
                Some(0) => QoS::AtMostOnce,
                Some(1) => QoS::AtLeastOnce,
                _ if !self.v5() => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            retain_available: p.retain_available != Some(0),
            topic_alias_maximum: if self.v5() {
                p.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
        };
        Ok((self, granted))
    }

    /// Reads until one whole packet is decoded. Cancel-safe: bytes read stay in the reader.
    async fn read_packet(&mut self) -> Result<Packet, LinkError> {
        loop {
            if let Some(p) = self.decode()? {
                return Ok(p);
            }
            match self.reader.fill().await {
                Ok(0) => return Err(self.peer_closed(LinkError::Closed)),
                Ok(_) => self.delay_acks(),
                Err(e) => return Err(self.peer_closed(LinkError::Read(e))),
            }
        }
    }

    /// `linger_ms` (metered links): leaves Linux's quick-ACK mode after a read, so the
    /// kernel delays its ACK (up to its delayed-ACK timeout, 40 ms or more) instead of
    /// answering each of the upstream's PUBACK segments with a bare 52-byte ACK; the
    /// upstream's Nagle then coalesces the rest of a burst of PUBACKs into one segment.
    /// The flag is not sticky (the kernel re-enters quick-ACK mode by itself), hence after
    /// every read. Plain TCP; nothing changes on the wire but the number of segments.
    fn delay_acks(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(fd) = self.delayed_ack_fd {
            let off: libc::c_int = 0;
            // SAFETY: `fd` is the TCP socket owned by `self.reader`, open while `self` lives;
            // the option value is a valid c_int of the size given.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    std::ptr::addr_of!(off).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    fn decode(&mut self) -> Result<Option<Packet>, LinkError> {
        self.reader
            .next_buffered(self.version)
            .map_err(LinkError::Decode)
    }

    fn peer_closed(&mut self, why: LinkError) -> LinkError {
        self.closed_by_peer = true;
        why
    }

    /// Reads the next packet, or queues a PINGREQ when the keep-alive is due (`None`: flush
    /// and come back). A PINGREQ still unanswered a whole keep-alive later means the link is
    /// half-open.
    async fn next_packet(&mut self) -> Result<Option<Packet>, LinkError> {
        let ping_at = self.next_ping;
        tokio::select! {
            p = self.read_packet() => p.map(Some),
            _ = tokio::time::sleep_until(ping_at) => {
                if self.awaiting_pingresp {
                    return Err(LinkError::NoPingResp {
                        secs: self.keepalive.as_secs(),
                    });
                }
                encode(&Packet::PingReq, self.version, &mut self.wbuf);
                self.awaiting_pingresp = true;
                self.next_ping = Instant::now() + self.keepalive;
                Ok(None)
            }
        }
    }

    fn event(&mut self, packet: Packet) -> Result<UpEvent, LinkError> {
        let ack = |kind, a: crate::protocol::PubAckLike| UpEvent::Ack {
            kind,
            packet_id: a.packet_id,
            reason: a.reason_code,
        };
        Ok(match packet {
            // The state notification's (its id is never an outbox's).
            Packet::PubAck(a) if a.packet_id == NOTIFY_ID && self.notify.is_some() => {
                UpEvent::Nothing
            }
            Packet::PubAck(a) => ack(AckKind::Ack, a),
            Packet::PubRec(a) => ack(AckKind::Rec, a),
            Packet::PubComp(a) => ack(AckKind::Comp, a),
            Packet::PubRel(a) => UpEvent::Release(a.packet_id),
            Packet::Publish(p) => {
                if p.topic.is_empty() {
                    // We announce no Topic Alias Maximum, so an alias is a protocol error.
                    self.protocol_error("PUBLISH with a topic alias we did not allow");
                    return Err(LinkError::TopicAlias);
                }
                UpEvent::Publish(p)
            }
            Packet::PingResp => {
                self.awaiting_pingresp = false;
                UpEvent::Nothing
            }
            Packet::SubAck(_) | Packet::UnsubAck(_) => UpEvent::Nothing,
            Packet::Disconnect(d) => {
                self.closed_by_peer = true;
                UpEvent::Disconnect(LinkError::Disconnected {
                    code: d.reason_code,
                    reason: d.properties.reason_string,
                    server_reference: d.properties.server_reference,
                })
            }
            other => {
                self.protocol_error("unexpected packet");
                return Err(LinkError::Unexpected(other.name()));
            }
        })
    }

    /// Queues the state message (`1` online, `0` offline): retained, QoS 1 with
    /// [`NOTIFY_ID`] (or the upstream's Maximum QoS if lower).
    fn queue_state(&mut self, online: bool) {
        let Some(topic) = self.notify.clone() else {
            return;
        };
        let qos = self.maximum_qos.min(QoS::AtLeastOnce);
        let p = Publish {
            dup: false,
            qos,
            retain: true,
            topic: topic.into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { NOTIFY_ID },
            properties: Default::default(),
            payload: bytes::Bytes::from_static(if online { b"1" } else { b"0" }),
        };
        encode(&Packet::Publish(p), self.version, &mut self.wbuf);
    }

    /// Queues a DISCONNECT 0x82 Protocol Error over MQTT 5 (sent by the caller's last
    /// flush, if any); a 3.1.1 client just closes.
    fn protocol_error(&mut self, why: &str) {
        if !self.v5() {
            return;
        }
        let mut d = Disconnect {
            reason_code: reason::PROTOCOL_ERROR,
            ..Default::default()
        };
        d.properties.reason_string = Some(why.to_string());
        encode(&Packet::Disconnect(d), self.version, &mut self.wbuf);
    }

    /// Writes `wbuf` from `pos`: the bytes written, or the bytes read meanwhile (the
    /// write is blocked), whichever comes first.
    fn poll_progress(
        &mut self,
        cx: &mut std::task::Context<'_>,
        pos: usize,
    ) -> Poll<Result<Progress, LinkError>> {
        let io = Pin::new(self.reader.get_mut());
        match io.poll_write(cx, &self.wbuf[pos..]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(self.peer_closed(LinkError::Closed))),
            Poll::Ready(Ok(n)) => return Poll::Ready(Ok(Progress::Wrote(n))),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(self.peer_closed(LinkError::Write(e)))),
            Poll::Pending => {}
        }
        if self.reader.buffered().len() >= READ_AHEAD {
            return Poll::Pending;
        }
        let mut rb = ReadBuf::new(&mut self.scratch);
        match Pin::new(self.reader.get_mut()).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                Poll::Ready(Err(self.peer_closed(LinkError::Closed)))
            }
            Poll::Ready(Ok(())) => {
                self.reader.push_read(rb.filled());
                self.delay_acks();
                Poll::Ready(Ok(Progress::Read))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.peer_closed(LinkError::Read(e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The write loop of [`Upstream::flush`], reading while the socket is full.
    async fn write_out(&mut self) -> Result<(), LinkError> {
        let mut pos = 0;
        let mut idle_since: Option<Instant> = None;
        let idle_timeout = self.idle_timeout;
        while pos < self.wbuf.len() {
            // The usual case, a socket that takes the whole batch, arms no timer.
            let step = std::future::poll_fn(|cx| self.poll_progress(cx, pos));
            let mut step = std::pin::pin!(step);
            let progress = match futures_util::FutureExt::now_or_never(step.as_mut()) {
                Some(r) => r?,
                None => {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    match tokio::time::timeout_at(since + idle_timeout, step).await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(LinkError::WriteStalled {
                                secs: idle_timeout.as_secs(),
                            })
                        }
                    }
                }
            };
            idle_since = None;
            if let Progress::Wrote(n) = progress {
                pos += n;
            }
        }
        let flush = std::future::poll_fn(|cx| Pin::new(self.reader.get_mut()).poll_flush(cx));
        match tokio::time::timeout(self.idle_timeout, flush).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.peer_closed(LinkError::Write(e))),
            Err(_) => Err(LinkError::FlushTimeout),
        }
    }
}

enum Progress {
    Wrote(usize),
    Read,
}

impl Upstream for Link {
    async fn next(&mut self) -> Result<UpEvent, LinkError> {
        match self.next_packet().await? {
            None => Ok(UpEvent::Nothing),
            Some(p) => self.event(p),
        }
    }

    fn try_next(&mut self) -> Result<Option<UpEvent>, LinkError> {
        match self.decode()? {
            Some(p) => self.event(p).map(Some),
            None => Ok(None),
        }
    }

    fn queue(&mut self, packet: Packet) -> Result<(), LinkError> {
        let len = encoded_len(&packet, self.version);
        if len > self.max_out {
            return Err(LinkError::TooLarge {
                packet: packet.name(),
                len,
                max: self.max_out,
            });
        }
        encode(&packet, self.version, &mut self.wbuf);
        Ok(())
    }

    fn pending(&self) -> usize {
        self.wbuf.len()
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = self.write_out().await;
        self.wbuf.clear();
        r
    }

    fn closed_by_peer(&self) -> bool {
        self.closed_by_peer
    }

    async fn subscribe(
        &mut self,
        filters: Vec<SubscribeFilter>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<UpEvent>), LinkError> {
        // Packet id 1 cannot clash: nothing of ours is in flight before the internal
        // session is attached, which happens after the SUBACK.
        let sub = Subscribe {
            packet_id: 1,
            filters,
            ..Default::default()
        };
        self.queue(Packet::Subscribe(sub))?;
        self.flush().await?;
        let deadline = Instant::now() + timeout;
        let mut early = Vec::new();
        loop {
            let packet = match tokio::time::timeout_at(deadline, self.next_packet()).await {
                Err(_) => return Err(LinkError::NoSubAck),
                Ok(r) => r?,
            };
            match packet {
                None => self.flush().await?,
                Some(Packet::SubAck(ack)) if ack.packet_id == 1 => {
                    return Ok((ack.reason_codes, early))
                }
                Some(p) => match self.event(p)? {
                    UpEvent::Disconnect(why) => return Err(why),
                    UpEvent::Nothing => {}
                    ev => early.push(ev),
                },
            }
        }
    }

    async fn close(&mut self, offline: bool) {
        // Normal disconnection: the upstream keeps the session (for its expiry interval
        // over MQTT 5). `offline` with notifications: the state goes to `0` first (MQTT 5:
        // DISCONNECT 0x04 has the upstream publish the will; 3.1.1 discards the will on
        // DISCONNECT, so the `0` is published before it).
        let mut d = Disconnect::default();
        if offline && self.notify.is_some() {
            if self.v5() {
                d.reason_code = 0x04;
            } else {
                self.queue_state(false);
            }
        }
        encode(&Packet::Disconnect(d), self.version, &mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name that resolves to several addresses is tried on each: the first refuses the
    /// connection, the second is a real broker.
    #[tokio::test]
    async fn every_resolved_address_is_tried_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::Config {
            data_dir: dir.path().to_path_buf(),
            listener: vec![crate::config::ListenerConfig::new("127.0.0.1:0")],
            ..Default::default()
        };
        let broker = crate::app::Gateway::start(&cfg).await.unwrap();
        let live = broker.local_addrs()[0];
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let bridge = BridgeConfig {
            connect_timeout_secs: 2,
            ..BridgeConfig::example()
        };
        let r = connect_resolved(&bridge, "upstream.test:1883", &[dead, live], None, 1 << 20).await;
        assert!(r.is_ok(), "{:?}", r.err());
        let r = connect_resolved(&bridge, "upstream.test:1883", &[dead], None, 1 << 20).await;
        let e = r.err().expect("refused");
        assert!(
            matches!(e, LinkError::Connect { ip, .. } if ip == dead),
            "{e}"
        );
        assert!(e.to_string().contains(&dead.to_string()), "{e}");
        broker.shutdown().await;
    }
}
