//! MQTT over WebSocket (MQTT 5.0 §6, also used by 3.1.1 clients): the HTTP upgrade, and
//! [`WsStream`], which turns the WebSocket back into a byte stream so that
//! [`connection::serve`] runs on it exactly as on TCP or TLS.
//!
//! Invariants kept here:
//! - The upgrade (and, on `wss`, the TLS handshake before it) finishes before the connect
//!   deadline, or the socket is closed. A request that is not an upgrade to the `mqtt`
//!   (or legacy `mqttv3.1`) subprotocol on the configured path gets an HTTP error status and
//!   is closed; nothing reaches the MQTT layer.
//! - Only binary frames carry MQTT. Their payloads are one byte stream: a packet may span
//!   frames and a frame may hold several packets; packet boundaries and the maximum packet
//!   size are the connection's business, as on TCP. A text frame closes the connection
//!   (close code 1003). Ping is answered with pong, close with close (by tungstenite).
//! - Memory per connection is bounded: the HTTP request head by [`MAX_REQUEST_HEAD`], one
//!   incoming message by `mqtt.max_packet_size` plus [`MESSAGE_SLACK`], and at most one
//!   outgoing frame waits in the WebSocket layer (a write is accepted only once the previous
//!   frame has been flushed), so the connection's own write buffer keeps its backpressure.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::connection::{serve as serve_mqtt, ListenerContext, Shared};

/// Largest HTTP request head accepted for the upgrade.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Most header lines in the upgrade request.
const MAX_HEADERS: usize = 32;
/// Subprotocols we speak, preferred first: `mqtt` (MQTT 3.1.1 and 5.0 §6) and `mqttv3.1`
/// (older Paho clients; Mosquitto accepts it too).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// An incoming WebSocket message may exceed `mqtt.max_packet_size` by this much, so that a
/// largest packet can share its frame with a few small ones.
pub const MESSAGE_SLACK: usize = 64 * 1024;
/// Largest binary frame we send; bigger writes are split (MQTT packets may span frames).
const MAX_OUT_FRAME: usize = 64 * 1024;
/// Read chunk of the WebSocket layer (tungstenite allocates it per connection up front).
const READ_BUFFER: usize = 8 * 1024;

/// Upgrades an accepted socket (plain or TLS) before `deadline` and serves MQTT on it.
/// `ctx.websocket` is the upgrade path.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
    cert_user: Option<String>,
    deadline: Instant,
    slot: super::connection::HandshakeSlot,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = ctx
        .websocket
        .as_deref()
        .unwrap_or(crate::config::DEFAULT_WEBSOCKET_PATH);
    let max_message = (shared.cfg.max_packet_size as usize).saturating_add(MESSAGE_SLACK);
    let upgraded = tokio::select! {
        r = tokio::time::timeout_at(deadline, upgrade(stream, path, max_message)) => r,
        _ = shared.shutdown.cancelled() => return,
    };
    let ws = match upgraded {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%peer, cause = %e, "WebSocket upgrade refused");
            return;
        }
        Err(_) => {
            debug!(%peer, "WebSocket upgrade timed out");
            return;
        }
    };
    let (r, w) = tokio::io::split(ws);
    serve_mqtt(r, w, peer, shared, ctx, cert_user, slot).await;
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("closed before the request was complete")]
    Eof,
    #[error("answered {status}: {reason}")]
    Refused { status: u16, reason: &'static str },
}

/// Reads the HTTP upgrade request, answers it, and returns the WebSocket as a byte stream.
/// Refusals are answered with an HTTP status before the error is returned.
pub async fn upgrade<S>(
    mut stream: S,
    path: &str,
    max_message: usize,
) -> Result<WsStream<S>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::with_capacity(1024);
    let (accepted, used) = loop {
        match parse_request(&head, path) {
            Parsed::Partial if head.len() < MAX_REQUEST_HEAD => {}
            Parsed::Partial => {
                let refusal = Refusal::new(431, "Request Header Fields Too Large", "");
                return Err(refuse(stream, refusal).await);
            }
            Parsed::Refused(refusal) => return Err(refuse(stream, refusal).await),
            Parsed::Upgrade(accepted, used) => break (accepted, used),
        }
        let mut chunk = [0u8; 1024];
        let room = (MAX_REQUEST_HEAD - head.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(UpgradeError::Eof);
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        derive_accept_key(accepted.key.as_bytes()),
        accepted.protocol
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await?;
    // Bytes after the request head are already WebSocket frames.
    let rest = head.split_off(used);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Each message goes to the socket at once; WsStream flushes after every frame.
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(config)).await;
    Ok(WsStream::new(ws))
}

/// An HTTP error answer.
#[derive(Debug, PartialEq)]
struct Refusal {
    status: u16,
    reason: &'static str,
    /// Extra header lines, each ending in CRLF.
    headers: &'static str,
}

impl Refusal {
    fn new(status: u16, reason: &'static str, headers: &'static str) -> Refusal {
        Refusal {
            status,
            reason,
            headers,
        }
    }
}

/// Writes the refusal (bounded by the caller's deadline), closes, and returns the error.
async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, r: Refusal) -> UpgradeError {
    let body = format!(
        "{} {}: this is an MQTT over WebSocket endpoint (subprotocol \"mqtt\")\n",
        r.status, r.reason
    );
    let text = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n{}\r\n{}",
        r.status,
        r.reason,
        body.len(),
        r.headers,
        body
    );
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
    UpgradeError::Refused {
        status: r.status,
        reason: r.reason,
    }
}

/// A valid upgrade request.
#[derive(Debug, PartialEq)]
struct Accepted {
    key: String,
    protocol: &'static str,
}

#[derive(Debug, PartialEq)]
enum Parsed {
    /// More bytes needed.
    Partial,
    Refused(Refusal),
    /// The request and the length of its head.
    Upgrade(Accepted, usize),
}

/// Checks an upgrade request (RFC 6455 §4.2.1 plus the MQTT subprotocol). Pure.
fn parse_request(buf: &[u8], path: &str) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refused(Refusal::new(431, "Request Header Fields Too Large", ""))
        }
        Err(_) => return Parsed::Refused(Refusal::new(400, "Bad Request", "")),
    };
    if req.method != Some("GET") {
        return Parsed::Refused(Refusal::new(405, "Method Not Allowed", "Allow: GET\r\n"));
    }
    if req.version != Some(1) {
        return Parsed::Refused(Refusal::new(400, "Bad Request", ""));
    }
    let request_path = req.path.unwrap_or("");
    let request_path = request_path.split('?').next().unwrap_or(request_path);
    if request_path != path {
        return Parsed::Refused(Refusal::new(404, "Not Found", ""));
    }
    let header = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    };
    let tokens = |name: &'static str| {
        header(name)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let upgrade = tokens("upgrade")
        .iter()
        .any(|t| t.eq_ignore_ascii_case("websocket"));
    let connection = tokens("connection")
        .iter()
        .any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !upgrade || !connection {
        return Parsed::Refused(Refusal::new(
            426,
            "Upgrade Required",
            "Upgrade: websocket\r\nConnection: Upgrade\r\n",
        ));
    }
    if !tokens("sec-websocket-version").contains(&"13") {
        return Parsed::Refused(Refusal::new(
            426,
            "Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
        ));
    }
    let mut keys = header("sec-websocket-key").map(str::trim);
    let key = match (keys.next(), keys.next()) {
        // 16 random bytes in base64.
        (Some(k), None) if k.len() == 24 => k.to_string(),
        _ => return Parsed::Refused(Refusal::new(400, "Bad Request", "")),
    };
    let offered = tokens("sec-websocket-protocol");
    let Some(protocol) = SUBPROTOCOLS.into_iter().find(|p| offered.contains(p)) else {
        return Parsed::Refused(Refusal::new(400, "Bad Request", ""));
    };
    Parsed::Upgrade(Accepted { key, protocol }, used)
}

/// A WebSocket seen as a byte stream of binary-frame payloads (see the module notes).
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the current binary message.
    pending: Bytes,
    /// A frame was handed to the WebSocket and not yet flushed to the socket.
    unflushed: bool,
    /// The WebSocket was closed (or failed): reads return end of stream.
    read_done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            ws,
            pending: Bytes::new(),
            unflushed: false,
            read_done: false,
        }
    }

    /// Completes the flush of the last frame, if one is pending.
    fn poll_flush_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(io_error)?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Queues a close frame with `code` and tries once to send it.
    fn start_close(&mut self, cx: &mut Context<'_>, code: CloseCode, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let mut ws = Pin::new(&mut self.ws);
        if ws.as_mut().start_send(Message::Close(Some(frame))).is_ok() {
            let _ = ws.poll_flush(cx);
        }
    }
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The connection writes only when it has new bytes, but it always reads: a frame
        // whose flush was blocked goes out from here once the socket is writable.
        if let Poll::Ready(Err(e)) = this.poll_flush_frame(cx) {
            return Poll::Ready(Err(e));
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    this.read_done = true;
                    this.start_close(cx, CloseCode::Unsupported, "MQTT needs binary frames");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )));
                }
                // Pongs and close replies are queued by tungstenite and sent on the next
                // read, which follows right away.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) => {}
                Some(Err(e)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(io_error(e)));
                }
                None => this.read_done = true,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_flush_frame(cx))?;
        let mut ws = Pin::new(&mut this.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(MAX_OUT_FRAME);
        ws.start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io_error)?;
        this.unflushed = true;
        // Push it out now; if the socket is full, the next read or write finishes it.
        if let Poll::Ready(Err(e)) = this.poll_flush_frame(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_frame(cx)
    }

    /// Sends a close frame (1000) after what is buffered, then shuts the socket down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_frame(cx))?;
        // An error here means the WebSocket is already closed: shut the socket anyway.
        let _ = ready!(Pin::new(&mut this.ws).poll_close(cx));
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(p: Parsed) -> u16 {
        match p {
            Parsed::Refused(r) => r.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn accepts_mqtt_and_legacy_subprotocols() {
        let text = request("/mqtt?client=1", "Sec-WebSocket-Protocol: chat, mqtt\r\n");
        let parsed = parse_request(text.as_bytes(), "/mqtt");
        let accepted = Accepted {
            key: KEY.to_string(),
            protocol: "mqtt",
        };
        assert_eq!(parsed, Parsed::Upgrade(accepted, text.len()));
        let text = request("/mqtt", "Sec-WebSocket-Protocol: mqttv3.1\r\n");
        match parse_request(text.as_bytes(), "/mqtt") {
            Parsed::Upgrade(a, _) => assert_eq!(a.protocol, "mqttv3.1"),
            other => panic!("{other:?}"),
        }
        // "mqtt" wins when both are offered, in any order or header line.
        let text = request(
            "/mqtt",
            "Sec-WebSocket-Protocol: mqttv3.1\r\nSec-WebSocket-Protocol: mqtt\r\n",
        );
        match parse_request(text.as_bytes(), "/mqtt") {
            Parsed::Upgrade(a, _) => assert_eq!(a.protocol, "mqtt"),
            other => panic!("{other:?}"),
        }
        // The RFC 6455 example key.
        assert_eq!(
            derive_accept_key(KEY.as_bytes()),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn refuses_what_is_not_an_mqtt_upgrade() {
        let proto = "Sec-WebSocket-Protocol: mqtt\r\n";
        let cases = [
            (request("/mqtt", ""), 400),
            (request("/mqtt", "Sec-WebSocket-Protocol: chat\r\n"), 400),
            (request("/other", proto), 404),
            (request("/mqtt", proto).replacen("GET", "POST", 1), 405),
            (
                request("/mqtt", proto).replacen("Version: 13", "Version: 8", 1),
                426,
            ),
            (request("/mqtt", proto).replacen(KEY, "short", 1), 400),
            ("GET /mqtt HTTP/1.1\r\nHost: gw\r\n\r\n".to_string(), 426),
            ("GET /mqtt HTTP/1.0\r\n\r\n".to_string(), 400),
            (
                "\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00".to_string(),
                400,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                status(parse_request(text.as_bytes(), "/mqtt")),
                expected,
                "{text:?}"
            );
        }
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(parse_request(request("/mqtt", &many).as_bytes(), "/mqtt")),
            431
        );
    }

    /// The connection hands its bytes over and then only reads: a frame that did not fit
    /// into the socket must still go out, driven by the reads.
    #[tokio::test]
    async fn a_blocked_frame_is_sent_while_the_connection_only_reads() {
        use futures_util::StreamExt;
        let (server_io, client_io) = tokio::io::duplex(256);
        let config = WebSocketConfig::default().write_buffer_size(0);
        let ws = WebSocketStream::from_raw_socket(server_io, Role::Server, Some(config)).await;
        let mut server = WsStream::new(ws);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // Accepted although the pipe holds 256 bytes.
        server.write_all(&data).await.expect("write");
        let receive = async {
            let mut got = Vec::new();
            while got.len() < data.len() {
                match client.next().await {
                    Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                    other => panic!("expected binary frames, got {other:?}"),
                }
            }
            got
        };
        let mut byte = [0u8; 1];
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::select! {
                r = server.read(&mut byte) => panic!("the client sent nothing, read gave {r:?}"),
                got = receive => got,
            }
        })
        .await
        .expect("the frame was not sent");
        assert_eq!(got, data);
    }

    #[test]
    fn waits_for_the_whole_head() {
        let text = request("/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n");
        for cut in [0, 1, 10, text.len() - 1] {
            assert_eq!(
                parse_request(&text.as_bytes()[..cut], "/mqtt"),
                Parsed::Partial
            );
        }
    }
}
