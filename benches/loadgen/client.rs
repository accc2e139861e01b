//! A minimal raw MQTT 3.1.1 client on tokio, built on Holdfast's own codec.
//!
//! Deliberately thin: no background task, no per-packet allocation beyond what the codec
//! does, packets are batched into one buffer per `write_all`. That keeps the load generator
//! from being the bottleneck when comparing brokers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use holdfast::protocol::framed::FramedReader;
use holdfast::protocol::{
    encode, Connect, Packet, ProtocolVersion, PubAckLike, Publish, QoS, Subscribe, SubscribeFilter,
    SubscriptionOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub const V: ProtocolVersion = ProtocolVersion::V311;
/// Largest packet we accept from a broker.
pub const MAX_PACKET: usize = 1 << 20;

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reading side: a socket half read with Holdfast's own framed reader (its buffer grows
/// while reads fill it and shrinks back when the socket is quiet).
pub struct Reader {
    rd: FramedReader<OwnedReadHalf>,
}

impl Reader {
    /// Decodes the next complete packet already in the buffer, if any.
    pub fn next_buffered(&mut self) -> io::Result<Option<Packet>> {
        self.rd
            .next_buffered(V)
            .map_err(|e| proto_err(format!("decode: {e}")))
    }

    /// Reads more bytes from the socket; `Ok(0)` means EOF.
    pub async fn fill(&mut self) -> io::Result<usize> {
        self.rd.fill().await
    }

    /// Waits for one whole packet.
    pub async fn next_packet(&mut self) -> io::Result<Packet> {
        loop {
            if let Some(p) = self.next_buffered()? {
                return Ok(p);
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "broker closed the connection",
                ));
            }
        }
    }
}

/// Writing side: a socket half plus an encode buffer that is flushed in one write.
pub struct Writer {
    wr: OwnedWriteHalf,
    pub buf: BytesMut,
}

impl Writer {
    pub fn push(&mut self, p: &Packet) {
        encode(p, V, &mut self.buf);
    }

    /// Writes out everything pushed so far.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Connects, sends CONNECT (3.1.1, clean session) and waits for a successful CONNACK.
pub async fn connect(
    addr: SocketAddr,
    client_id: &str,
    keep_alive: u16,
) -> io::Result<(Reader, Writer)> {
    connect_with(addr, client_id, keep_alive, true)
        .await
        .map(|(r, w, _)| (r, w))
}

/// Like [`connect`], with the clean-session flag given (`false` = a durable 3.1.1 session).
/// Also returns the CONNACK's session-present flag.
pub async fn connect_with(
    addr: SocketAddr,
    client_id: &str,
    keep_alive: u16,
    clean: bool,
) -> io::Result<(Reader, Writer, bool)> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut r = Reader {
        rd: FramedReader::new(rd, MAX_PACKET),
    };
    let mut w = Writer {
        wr,
        buf: BytesMut::with_capacity(4096),
    };
    w.push(&Packet::Connect(Box::new(Connect {
        protocol: V,
        clean_start: clean,
        keep_alive,
        client_id: client_id.to_string(),
        ..Default::default()
    })));
    w.flush().await?;
    let ack = tokio::time::timeout(Duration::from_secs(10), r.next_packet())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no CONNACK within 10 s"))??;
    match ack {
        Packet::ConnAck(a) if a.reason_code == 0 => Ok((r, w, a.session_present)),
        Packet::ConnAck(a) => Err(proto_err(format!(
            "CONNACK refused (code {:#04x})",
            a.reason_code
        ))),
        other => Err(proto_err(format!("expected CONNACK, got {}", other.name()))),
    }
}

/// Subscribes to one filter and waits for the SUBACK.
pub async fn subscribe(r: &mut Reader, w: &mut Writer, filter: &str, qos: QoS) -> io::Result<()> {
    w.push(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: filter.to_string(),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        }],
        ..Default::default()
    }));
    w.flush().await?;
    loop {
        match r.next_packet().await? {
            Packet::SubAck(a) if a.packet_id == 1 => {
                return match a.reason_codes.first() {
                    Some(&c) if c < 0x80 => Ok(()),
                    c => Err(proto_err(format!("SUBACK refused: {c:?}"))),
                };
            }
            Packet::SubAck(_) => return Err(proto_err("SUBACK with the wrong packet id")),
            // Anything else before the SUBACK (there should be nothing) is ignored.
            _ => {}
        }
    }
}

/// Builds a PUBLISH packet.
pub fn publish(topic: &Arc<str>, qos: QoS, packet_id: u16, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: topic.clone(),
        packet_id,
        payload,
        ..Default::default()
    })
}

/// Sends DISCONNECT (normal) and closes the connection.
pub async fn disconnect(mut w: Writer) -> io::Result<()> {
    w.push(&Packet::Disconnect(Default::default()));
    w.flush().await?;
    w.wr.shutdown().await
}

pub fn puback(packet_id: u16) -> Packet {
    Packet::PubAck(PubAckLike::new(packet_id))
}
