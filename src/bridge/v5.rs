//! MQTT 5 upstream, spoken with Holdfast's own codec (`crate::protocol`).
//!
//! Why not rumqttc's v5 client, as for 3.1.1: its `EventLoop` keeps the network private
//! (the 3.1.1 one exposes it), so requests can only go through its `pending` queue, which
//! costs a timer tick per message (about 1,000 messages/s), or its request channel, where
//! packet ids, DUP and the QoS 2 release are rumqttc's choice rather than the outbox's.
//! And its v5 codec mis-reads DISCONNECT (`e0 00` fails, `e0 01 8e` is silently swallowed:
//! `../shared/research/crates.md` §1), which is exactly how a cloud broker says "session
//! taken over" or "shutting down". Our codec is the broker's, fuzzed and tested both ways.
//!
//! The link keeps no message state: ids, windows, DUP resends and QoS 2 states are the
//! router's (see [`super::upstream`]). It only encodes, decodes, pings and enforces the
//! limits the upstream announced in its CONNACK.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::tokio_rustls::rustls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::upstream::{AckKind, Granted, UpEvent, Upstream};
use super::BridgeConfig;
use crate::protocol::{
    decode, encode, encoded_len, reason, ConnAck, Connect, ConnectProperties, Disconnect, Packet,
    ProtocolVersion, QoS, Subscribe, SubscribeFilter,
};

const V5: ProtocolVersion = ProtocolVersion::V5;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(super) struct V5Link {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Largest packet we accept (our Maximum Packet Size).
    max_in: usize,
    /// Largest packet the upstream accepts (its Maximum Packet Size).
    max_out: usize,
    keepalive: Duration,
    next_ping: Instant,
    awaiting_pingresp: bool,
    write_timeout: Duration,
}

/// Connects (TCP, TLS, CONNECT with Clean Start = false and the configured Session Expiry)
/// and waits for a successful CONNACK, all within `connect_timeout_secs`.
pub(super) async fn connect(
    cfg: &BridgeConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_packet_size: usize,
) -> Result<(V5Link, Granted), String> {
    let limit = Duration::from_secs(cfg.connect_timeout_secs.max(1));
    match tokio::time::timeout(limit, open(cfg, tls, max_packet_size)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no CONNACK within connect_timeout_secs ({} s)",
            limit.as_secs()
        )),
    }
}

async fn open(
    cfg: &BridgeConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_in: usize,
) -> Result<(V5Link, Granted), String> {
    let tcp = TcpStream::connect(&cfg.address)
        .await
        .map_err(|e| format!("connecting to {}: {e}", cfg.address))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(tls) => {
            let (host, _) = super::host_port(&cfg.address);
            let name = cfg.server_name.clone().unwrap_or(host);
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| format!("TLS server name: {e}"))?;
            let stream = rumqttc::tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(stream)
        }
    };
    let keepalive = cfg.keepalive_secs.max(5);
    let mut link = V5Link {
        io,
        rbuf: BytesMut::with_capacity(8 * 1024),
        wbuf: BytesMut::with_capacity(8 * 1024),
        max_in,
        max_out: usize::MAX,
        keepalive: Duration::from_secs(u64::from(keepalive)),
        next_ping: Instant::now(),
        awaiting_pingresp: false,
        write_timeout: Duration::from_secs(cfg.connect_timeout_secs.max(1)),
    };
    let connect = Connect {
        protocol: V5,
        clean_start: false,
        keep_alive: keepalive,
        properties: ConnectProperties {
            session_expiry_interval: Some(cfg.session_expiry_secs.max(1)),
            receive_maximum: Some(cfg.inflight),
            maximum_packet_size: u32::try_from(max_in).ok(),
            ..Default::default()
        },
        client_id: cfg.effective_client_id(),
        will: None,
        username: cfg.username.clone(),
        password: cfg.password.clone().map(Into::into),
    };
    encode(&Packet::Connect(Box::new(connect)), V5, &mut link.wbuf);
    link.flush().await?;
    let ack = match link.read_packet().await? {
        Packet::ConnAck(ack) => ack,
        other => return Err(format!("expected CONNACK, got {}", other.name())),
    };
    link.accept(ack)
}

impl V5Link {
    /// Applies a CONNACK: refusal → `Err`; otherwise the upstream's limits.
    fn accept(mut self, ack: ConnAck) -> Result<(V5Link, Granted), String> {
        let p = &ack.properties;
        if ack.reason_code >= 0x80 {
            let mut e = format!(
                "upstream refused the connection: reason code {:#04x}",
                ack.reason_code
            );
            if let Some(why) = &p.reason_string {
                e.push_str(&format!(" ({why})"));
            }
            if let Some(other) = &p.server_reference {
                e.push_str(&format!("; server reference: {other}"));
            }
            return Err(e);
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
                _ => QoS::ExactlyOnce,
            },
            retain_available: p.retain_available != Some(0),
        };
        Ok((self, granted))
    }

    /// Reads until one whole packet is decoded. Cancel-safe: bytes read stay in `rbuf`.
    async fn read_packet(&mut self) -> Result<Packet, String> {
        loop {
            match decode(&mut self.rbuf, V5, self.max_in) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(format!("bad packet from upstream: {e}")),
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(8 * 1024);
            }
            match self.io.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err("upstream closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading from upstream: {e}")),
            }
        }
    }

    /// Reads the next packet, or queues a PINGREQ when the keep-alive is due (`None`: flush
    /// and come back). A PINGREQ still unanswered a whole keep-alive later means the link is
    /// half-open.
    async fn next_packet(&mut self) -> Result<Option<Packet>, String> {
        let ping_at = self.next_ping;
        tokio::select! {
            p = self.read_packet() => p.map(Some),
            _ = tokio::time::sleep_until(ping_at) => {
                if self.awaiting_pingresp {
                    return Err(format!(
                        "no PINGRESP within {} s: the link is half-open",
                        self.keepalive.as_secs()
                    ));
                }
                encode(&Packet::PingReq, V5, &mut self.wbuf);
                self.awaiting_pingresp = true;
                self.next_ping = Instant::now() + self.keepalive;
                Ok(None)
            }
        }
    }

    fn event(&mut self, packet: Packet) -> Result<UpEvent, String> {
        let ack = |kind, a: crate::protocol::PubAckLike| UpEvent::Ack {
            kind,
            packet_id: a.packet_id,
            reason: a.reason_code,
        };
        Ok(match packet {
            Packet::PubAck(a) => ack(AckKind::Ack, a),
            Packet::PubRec(a) => ack(AckKind::Rec, a),
            Packet::PubComp(a) => ack(AckKind::Comp, a),
            Packet::PubRel(a) => UpEvent::Release(a.packet_id),
            Packet::Publish(p) => {
                if p.topic.is_empty() {
                    // We announce no Topic Alias Maximum, so an alias is a protocol error.
                    self.protocol_error("PUBLISH with a topic alias we did not allow");
                    return Err("upstream used a topic alias we did not allow".into());
                }
                UpEvent::Publish(p)
            }
            Packet::PingResp => {
                self.awaiting_pingresp = false;
                UpEvent::Nothing
            }
            Packet::SubAck(_) | Packet::UnsubAck(_) => UpEvent::Nothing,
            Packet::Disconnect(d) => {
                let mut why = format!("upstream sent DISCONNECT {:#04x}", d.reason_code);
                if let Some(s) = &d.properties.reason_string {
                    why.push_str(&format!(" ({s})"));
                }
                if let Some(s) = &d.properties.server_reference {
                    why.push_str(&format!("; server reference: {s}"));
                }
                UpEvent::Disconnect(why)
            }
            other => {
                self.protocol_error("unexpected packet");
                return Err(format!("unexpected {} from upstream", other.name()));
            }
        })
    }

    /// Queues a DISCONNECT 0x82 Protocol Error (sent by the caller's last flush, if any).
    fn protocol_error(&mut self, why: &str) {
        let mut d = Disconnect {
            reason_code: reason::PROTOCOL_ERROR,
            ..Default::default()
        };
        d.properties.reason_string = Some(why.to_string());
        encode(&Packet::Disconnect(d), V5, &mut self.wbuf);
    }
}

impl Upstream for V5Link {
    async fn next(&mut self) -> Result<UpEvent, String> {
        match self.next_packet().await? {
            None => Ok(UpEvent::Nothing),
            Some(p) => self.event(p),
        }
    }

    fn try_next(&mut self) -> Result<Option<UpEvent>, String> {
        match decode(&mut self.rbuf, V5, self.max_in) {
            Ok(Some(p)) => self.event(p).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(format!("bad packet from upstream: {e}")),
        }
    }

    fn queue(&mut self, packet: Packet) -> Result<(), String> {
        let len = encoded_len(&packet, V5);
        if len > self.max_out {
            return Err(format!(
                "{} of {len} bytes is larger than the upstream's Maximum Packet Size ({} bytes)",
                packet.name(),
                self.max_out
            ));
        }
        encode(&packet, V5, &mut self.wbuf);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let io = &mut self.io;
        let buf = &self.wbuf;
        let work = async {
            io.write_all(buf).await?;
            io.flush().await
        };
        let r = match super::upstream::bounded(self.write_timeout, work).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(format!("writing to upstream: {e}")),
            None => Err("writing to the upstream timed out".into()),
        };
        self.wbuf.clear();
        r
    }

    async fn subscribe(
        &mut self,
        filters: Vec<SubscribeFilter>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<UpEvent>), String> {
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
                Err(_) => return Err("no SUBACK from upstream".into()),
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

    async fn close(&mut self) {
        // Normal disconnection: the upstream keeps the session for its expiry interval.
        encode(
            &Packet::Disconnect(Disconnect::default()),
            V5,
            &mut self.wbuf,
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
    }
}
