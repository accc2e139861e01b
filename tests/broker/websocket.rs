//! MQTT over WebSocket listeners (`websocket = true`): rumqttc's WebSocket transport (v3.1.1
//! and v5) as a real third-party client, a raw tokio-tungstenite client for frame-level
//! cases (split and batched packets, text frames, ping, close), plain HTTP for refused
//! upgrades, and `wss://` with client certificates on the real binary.

use crate::common::{self, daemon, pki};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use futures_util::{SinkExt, StreamExt};
use holdfast::config::ListenerConfig;
use holdfast::protocol::framed::FramedReader;
use holdfast::protocol::{self, reason, Connect, Packet, ProtocolVersion, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

fn ws_listener() -> ListenerConfig {
    ListenerConfig {
        websocket: true,
        ..ListenerConfig::new("127.0.0.1:0")
    }
}

async fn ws_broker(tweak: impl FnOnce(&mut holdfast::config::Config)) -> TestBroker {
    start_broker(|c| {
        c.listener = vec![ws_listener()];
        tweak(c);
    })
    .await
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/mqtt")
}

/// The WebSocket handshake on `stream`, offering `protocols` (none: no header).
async fn handshake<S>(
    stream: S,
    url: &str,
    protocols: Option<&str>,
) -> Result<WebSocketStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = url.into_client_request()?;
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().expect("header value"));
    }
    let (ws, response) =
        tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("handshake in time")?;
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    assert!(
        chosen.is_some_and(|c| protocols.unwrap_or("").contains(c)),
        "server chose {chosen:?} from {protocols:?}"
    );
    Ok(ws)
}

/// A raw MQTT client over a WebSocket: exact packets and frames in, everything seen out.
struct WsClient<S> {
    ws: WebSocketStream<S>,
    version: ProtocolVersion,
    /// MQTT bytes from WebSocket messages, framed by the crate's own reader (the messages
    /// are pushed in; there is no byte stream under it).
    frames: FramedReader<tokio::io::Empty>,
}

impl WsClient<TcpStream> {
    async fn open(addr: SocketAddr, version: ProtocolVersion) -> WsClient<TcpStream> {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let ws = handshake(tcp, &ws_url(addr), Some("mqtt"))
            .await
            .expect("upgrade");
        WsClient::new(ws, version)
    }

    /// Opens and connects (clean start, optional user and password); panics unless accepted.
    async fn connected(addr: SocketAddr, version: ProtocolVersion, id: &str) -> Self {
        let mut c = WsClient::open(addr, version).await;
        assert_eq!(c.connect(connect_packet(version, id, true)).await, 0);
        c
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    fn new(ws: WebSocketStream<S>, version: ProtocolVersion) -> WsClient<S> {
        WsClient {
            ws,
            version,
            frames: FramedReader::new(tokio::io::empty(), 1 << 28),
        }
    }

    fn encode(&self, packets: &[Packet]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for p in packets {
            protocol::encode(p, self.version, &mut out);
        }
        out.to_vec()
    }

    async fn send_frame(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .expect("send frame");
    }

    async fn send(&mut self, p: Packet) {
        let bytes = self.encode(&[p]);
        self.send_frame(&bytes).await;
    }

    /// The next WebSocket message; `None` once the connection is closed or failed.
    async fn next_message(&mut self) -> Option<Message> {
        match tokio::time::timeout(TIMEOUT, self.ws.next())
            .await
            .expect("timed out waiting for a WebSocket message")
        {
            Some(Ok(m)) => Some(m),
            Some(Err(_)) | None => None,
        }
    }

    /// The next MQTT packet; `None` when the connection closed.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            match self.frames.next_buffered(self.version) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(e) => panic!("broker sent an undecodable packet: {e}"),
            }
            match self.next_message().await? {
                Message::Binary(b) => self.frames.push_read(&b),
                Message::Close(_) => return None,
                Message::Text(t) => panic!("broker sent a text frame: {t}"),
                _ => {}
            }
        }
    }

    /// CONNECT; returns the CONNACK reason code.
    async fn connect(&mut self, c: Connect) -> u8 {
        self.send(Packet::Connect(Box::new(c))).await;
        match self.recv().await {
            Some(Packet::ConnAck(a)) => a.reason_code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str) -> u8 {
        self.send(Packet::Subscribe(holdfast::protocol::Subscribe {
            packet_id: 1,
            subscription_identifier: None,
            user_properties: vec![],
            filters: vec![holdfast::protocol::SubscribeFilter {
                filter: filter.into(),
                options: holdfast::protocol::SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            }],
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => a.reason_codes[0],
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// A QoS 1 publish; returns the PUBACK reason code (0x10 No matching subscribers → 0).
    async fn publish_qos1(&mut self, topic: &str, payload: &[u8], pid: u16) -> u8 {
        self.send(Packet::Publish(publish(
            topic,
            payload,
            QoS::AtLeastOnce,
            pid,
        )))
        .await;
        match self.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == pid && a.reason_code == 0x10 => 0,
            Some(Packet::PubAck(a)) if a.packet_id == pid => a.reason_code,
            other => panic!("expected PUBACK {pid}, got {other:?}"),
        }
    }

    /// Sends `m`, then expects the broker to close without sending MQTT packets; returns
    /// the code of its close frame.
    async fn send_and_expect_close(&mut self, m: Message) -> Option<CloseCode> {
        self.ws.send(m).await.expect("send");
        let (packets, close) = self.until_closed().await;
        assert!(packets.is_empty(), "{packets:?}");
        close.map(|f| f.code)
    }

    /// Reads until the broker closes; returns the MQTT packets and close frame seen.
    async fn until_closed(&mut self) -> (Vec<Packet>, Option<CloseFrame>) {
        let mut packets = Vec::new();
        loop {
            match self.next_message().await {
                None => return (packets, None),
                Some(Message::Close(frame)) => {
                    // The close handshake ends the stream right after.
                    assert!(self.next_message().await.is_none(), "data after close");
                    return (packets, frame);
                }
                Some(Message::Binary(b)) => {
                    self.frames.push_read(&b);
                    while let Ok(Some(p)) = self.frames.next_buffered(self.version) {
                        packets.push(p);
                    }
                }
                Some(_) => {}
            }
        }
    }
}

/// What a rumqttc event loop reported (v3.1.1 and v5 alike).
#[derive(Debug)]
enum Seen {
    ConnAck,
    SubAck(Vec<String>),
    Publish(String, Vec<u8>),
    Error(String),
}

/// Passes `seen` on; false when the event loop should stop (an error, or nobody listens).
fn forward(tx: &mpsc::UnboundedSender<Seen>, seen: Seen) -> bool {
    let stop = matches!(seen, Seen::Error(_));
    tx.send(seen).is_ok() && !stop
}

/// Drives a rumqttc v3.1.1 event loop in a task; what it sees comes out of the channel.
fn drive_v4(mut el: rumqttc::EventLoop) -> mpsc::UnboundedReceiver<Seen> {
    use rumqttc::{Event, Packet as P};
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = match el.poll().await {
                Ok(Event::Incoming(P::ConnAck(_))) => Seen::ConnAck,
                Ok(Event::Incoming(P::SubAck(a))) => {
                    Seen::SubAck(a.return_codes.iter().map(|c| format!("{c:?}")).collect())
                }
                Ok(Event::Incoming(P::Publish(p))) => Seen::Publish(p.topic, p.payload.to_vec()),
                Ok(_) => continue,
                Err(e) => Seen::Error(format!("{e:?}")),
            };
            if !forward(&tx, seen) {
                return;
            }
        }
    });
    rx
}

/// Drives a rumqttc v5 event loop in a task (see [`drive_v4`]).
fn drive_v5(mut el: rumqttc::v5::EventLoop) -> mpsc::UnboundedReceiver<Seen> {
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    use rumqttc::v5::Event;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = match el.poll().await {
                Ok(Event::Incoming(P::ConnAck(_))) => Seen::ConnAck,
                Ok(Event::Incoming(P::SubAck(a))) => {
                    Seen::SubAck(a.return_codes.iter().map(|c| format!("{c:?}")).collect())
                }
                Ok(Event::Incoming(P::Publish(p))) => Seen::Publish(
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                ),
                Ok(_) => continue,
                Err(e) => Seen::Error(format!("{e:?}")),
            };
            if !forward(&tx, seen) {
                return;
            }
        }
    });
    rx
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .expect("timed out waiting for the rumqttc event loop")
        .expect("event loop task ended")
}

/// Waits for the next PUBLISH; panics on an error.
async fn next_publish(rx: &mut mpsc::UnboundedReceiver<Seen>) -> (String, Vec<u8>) {
    loop {
        match next_seen(rx).await {
            Seen::Publish(t, p) => return (t, p),
            Seen::Error(e) => panic!("connection failed: {e}"),
            _ => {}
        }
    }
}

/// A QoS 1 publish from a v5 client.
async fn publish_v5(c: &rumqttc::v5::AsyncClient, topic: &str, payload: &'static str) {
    c.publish(
        topic,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        payload,
    )
    .await
    .expect("publish");
}

async fn expect_publish(rx: &mut mpsc::UnboundedReceiver<Seen>, topic: &str, payload: &[u8]) {
    assert_eq!(
        next_publish(rx).await,
        (topic.to_string(), payload.to_vec())
    );
}

/// The next event must be a SUBACK; returns its codes as rumqttc names them.
async fn expect_suback(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Vec<String> {
    match next_seen(rx).await {
        Seen::SubAck(codes) => codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn v4_client(
    id: &str,
    url: &str,
    transport: rumqttc::Transport,
    creds: Option<(&str, &str)>,
) -> (rumqttc::AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    // The port argument is ignored for WebSocket transports: the URL has it.
    let mut o = rumqttc::MqttOptions::new(id, url, 0);
    o.set_transport(transport);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    let (client, el) = rumqttc::AsyncClient::new(o, 100);
    (client, drive_v4(el))
}

fn v5_client(
    id: &str,
    url: &str,
    transport: rumqttc::Transport,
    creds: Option<(&str, &str)>,
) -> (rumqttc::v5::AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    let mut o = rumqttc::v5::MqttOptions::new(id, url, 0);
    o.set_transport(transport);
    o.set_max_packet_size(Some(1 << 20));
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    let (client, el) = rumqttc::v5::AsyncClient::new(o, 100);
    (client, drive_v5(el))
}

#[tokio::test]
async fn rumqttc_v311_and_v5_clients_publish_and_subscribe_over_websocket() {
    let b = ws_broker(|_| {}).await;
    let url = ws_url(b.addr);
    let (c4, mut rx4) = v4_client("ws-v4", &url, rumqttc::Transport::Ws, None);
    let (c5, mut rx5) = v5_client("ws-v5", &url, rumqttc::Transport::Ws, None);
    assert!(matches!(next_seen(&mut rx4).await, Seen::ConnAck));
    assert!(matches!(next_seen(&mut rx5).await, Seen::ConnAck));
    c4.subscribe("to4/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    c5.subscribe("to5/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    expect_suback(&mut rx4).await;
    expect_suback(&mut rx5).await;

    publish_v5(&c5, "to4/a", "from v5").await;
    expect_publish(&mut rx4, "to4/a", b"from v5").await;
    // Larger than one outgoing frame (64 KiB) and than rumqttc's default 10 KiB limit.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    c4.publish("to5/big", rumqttc::QoS::AtLeastOnce, false, big.clone())
        .await
        .expect("publish");
    c4.publish("to5/b", rumqttc::QoS::ExactlyOnce, false, "from v3.1.1")
        .await
        .expect("publish");
    expect_publish(&mut rx5, "to5/big", &big).await;
    expect_publish(&mut rx5, "to5/b", b"from v3.1.1").await;
    b.shutdown().await;
}

#[tokio::test]
async fn websocket_and_tcp_clients_exchange_messages() {
    let b = start_broker(|c| {
        c.listener = vec![ListenerConfig::new("127.0.0.1:0"), ws_listener()];
    })
    .await;
    let addrs = b.broker.as_ref().expect("running").local_addrs().to_vec();
    let (tcp_addr, ws_addr) = (addrs[0], addrs[1]);

    let mut tcp = RawClient::connect(tcp_addr, ProtocolVersion::V311, "tcp").await;
    assert_eq!(tcp.subscribe("to-tcp", QoS::AtLeastOnce).await, vec![1]);
    let mut ws = WsClient::connected(ws_addr, ProtocolVersion::V5, "ws").await;
    assert_eq!(ws.subscribe("to-ws").await, 1);

    assert_eq!(ws.publish_qos1("to-tcp", b"hello tcp", 7).await, 0);
    let p = tcp.recv_publish().await;
    assert_eq!((&*p.topic, &p.payload[..]), ("to-tcp", &b"hello tcp"[..]));
    tcp.puback(p.packet_id).await;

    tcp.publish("to-ws", b"hello ws", QoS::AtMostOnce, 0).await;
    match ws.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!((&*p.topic, &p.payload[..]), ("to-ws", &b"hello ws"[..]))
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // The plain listener does not speak WebSocket (bare MQTT on the WebSocket listener:
    // `requests_that_are_not_mqtt_upgrades_get_http_errors`).
    assert!(handshake(
        TcpStream::connect(tcp_addr).await.expect("tcp"),
        &ws_url(tcp_addr),
        Some("mqtt")
    )
    .await
    .is_err());
    b.shutdown().await;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[tokio::test]
async fn passwords_and_the_acl_apply_over_websocket() {
    let files = tempfile::tempdir().expect("tempdir");
    let hash = holdfast::auth::password::hash_password("s3cret").expect("hash");
    let passwd = write(files.path(), "passwd", &format!("alice:{hash}\n"));
    let acl = write(files.path(), "acl", "user alice\ntopic readwrite alice/#\n");
    let b = ws_broker(|c| {
        c.auth.password_file = Some(passwd);
        c.auth.acl_file = Some(acl);
        c.mqtt.allow_anonymous = false;
    })
    .await;
    let url = ws_url(b.addr);
    let ws = rumqttc::Transport::Ws;

    let (_c, mut rx) = v4_client("a4", &url, ws.clone(), Some(("alice", "s3cret")));
    assert!(matches!(next_seen(&mut rx).await, Seen::ConnAck));
    let (_c, mut rx) = v4_client("b4", &url, ws.clone(), Some(("alice", "wrong")));
    match next_seen(&mut rx).await {
        Seen::Error(e) => assert!(e.contains("ConnectionRefused(BadUserNamePassword)"), "{e}"),
        other => panic!("bad password accepted: {other:?}"),
    }
    let (_c, mut rx) = v5_client("b5", &url, ws.clone(), Some(("alice", "wrong")));
    match next_seen(&mut rx).await {
        Seen::Error(e) => assert!(e.contains("ConnectionRefused(BadUserNamePassword)"), "{e}"),
        other => panic!("bad password accepted: {other:?}"),
    }
    let (_c, mut rx) = v5_client("anon5", &url, ws, None);
    match next_seen(&mut rx).await {
        Seen::Error(e) => assert!(e.contains("ConnectionRefused(NotAuthorized)"), "{e}"),
        other => panic!("anonymous client accepted: {other:?}"),
    }

    // The ACL: alice may publish under alice/ only (v5 PUBACK 0x87 otherwise).
    let mut c = WsClient::open(b.addr, ProtocolVersion::V5).await;
    let mut login = connect_packet(ProtocolVersion::V5, "a5", true);
    login.username = Some("alice".into());
    login.password = Some(bytes::Bytes::from_static(b"s3cret"));
    assert_eq!(c.connect(login).await, 0);
    assert_eq!(c.publish_qos1("alice/x", b"ok", 1).await, 0);
    assert_eq!(
        c.publish_qos1("bob/x", b"no", 2).await,
        reason::NOT_AUTHORIZED
    );
    b.shutdown().await;
}

/// Sends `request` on a fresh socket and returns everything the server sent before closing.
async fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("server closed in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn upgrade_request(path: &str, protocol: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
}

#[tokio::test]
async fn requests_that_are_not_mqtt_upgrades_get_http_errors() {
    let b = ws_broker(|c| c.mqtt.connect_timeout_secs = 30).await;
    let cases: [(Vec<u8>, &str); 5] = [
        (
            b"GET /mqtt HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            "HTTP/1.1 426 ",
        ),
        (
            upgrade_request("/mqtt", "chat").into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (upgrade_request("/", "mqtt").into_bytes(), "HTTP/1.1 404 "),
        (
            upgrade_request("/mqtt", "mqtt")
                .replacen("GET", "PUT", 1)
                .into_bytes(),
            "HTTP/1.1 405 ",
        ),
        // Bare MQTT CONNECT bytes.
        (
            b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04bare".to_vec(),
            "HTTP/1.1 400 ",
        ),
    ];
    for (request, status) in cases {
        // The server answers and closes at once (connect timeout is 30 s).
        let t0 = Instant::now();
        let answer = http_exchange(b.addr, &request).await;
        assert!(answer.starts_with(status), "{answer:?}");
        assert!(answer.contains("Connection: close\r\n"), "{answer:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    // A WebSocket client that does not offer `mqtt` is refused with 400.
    let tcp = TcpStream::connect(b.addr).await.expect("tcp");
    match handshake(tcp, &ws_url(b.addr), Some("chat, superchat")).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 400),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade without the mqtt subprotocol"),
    }
    let tcp = TcpStream::connect(b.addr).await.expect("tcp");
    assert!(handshake(tcp, &ws_url(b.addr), None).await.is_err());
    // The legacy subprotocol name is accepted, and the listener still serves.
    let tcp = TcpStream::connect(b.addr).await.expect("tcp");
    let ws = handshake(tcp, &ws_url(b.addr), Some("mqttv3.1"))
        .await
        .expect("mqttv3.1 accepted");
    let mut c = WsClient::new(ws, ProtocolVersion::V311);
    let connect = connect_packet(ProtocolVersion::V311, "legacy", true);
    assert_eq!(c.connect(connect).await, 0);
    b.shutdown().await;
}

#[tokio::test]
async fn a_text_frame_closes_the_connection() {
    let b = ws_broker(|_| {}).await;
    let mut c = WsClient::connected(b.addr, ProtocolVersion::V311, "texter").await;
    let text = Message::Text("{\"hello\": 1}".into());
    assert_eq!(
        c.send_and_expect_close(text).await,
        Some(CloseCode::Unsupported)
    );
    // Before CONNECT too.
    let mut c = WsClient::open(b.addr, ProtocolVersion::V5).await;
    let text = Message::Text("CONNECT".into());
    assert_eq!(
        c.send_and_expect_close(text).await,
        Some(CloseCode::Unsupported)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn packets_may_span_frames_and_frames_may_carry_several_packets() {
    let b = ws_broker(|_| {}).await;
    let mut c = WsClient::open(b.addr, ProtocolVersion::V311).await;
    // CONNECT one byte per frame.
    let connect = c.encode(&[Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V311,
        "splitter",
        true,
    )))]);
    for byte in &connect {
        c.send_frame(std::slice::from_ref(byte)).await;
    }
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == 0));

    // SUBSCRIBE, PUBLISH and PINGREQ in one frame.
    let subscribe = Packet::Subscribe(holdfast::protocol::Subscribe {
        packet_id: 1,
        subscription_identifier: None,
        user_properties: vec![],
        filters: vec![holdfast::protocol::SubscribeFilter {
            filter: "s/#".into(),
            options: Default::default(),
        }],
    });
    let batch = c.encode(&[
        subscribe,
        Packet::Publish(publish("s/one", b"batched", QoS::AtMostOnce, 0)),
        Packet::PingReq,
    ]);
    c.send_frame(&batch).await;
    // PINGRESP comes from the connection, SUBACK and the PUBLISH through the router: the
    // PUBLISH follows the SUBACK, the PINGRESP may come anywhere.
    let mut seen = Vec::new();
    for _ in 0..3 {
        match c.recv().await {
            Some(Packet::SubAck(_)) => seen.push("suback"),
            Some(Packet::Publish(p)) if &p.payload[..] == b"batched" => seen.push("publish"),
            Some(Packet::PingResp) => seen.push("pingresp"),
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.retain(|&s| s != "pingresp");
    assert_eq!(seen, ["suback", "publish"]);

    // A 100 KiB PUBLISH cut at odd places, with the next packet's first byte in its last
    // frame; it comes back across several frames.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let mut bytes = c.encode(&[Packet::Publish(publish(
        "s/big",
        &payload,
        QoS::AtLeastOnce,
        9,
    ))]);
    let ping = c.encode(&[Packet::PingReq]);
    bytes.push(ping[0]);
    c.send_frame(&bytes[..3]).await;
    c.send_frame(&bytes[3..40_001]).await;
    c.send_frame(&bytes[40_001..]).await;
    c.send_frame(&ping[1..]).await;
    let mut got_ack = false;
    let mut got_publish = false;
    let mut got_pong = false;
    for _ in 0..3 {
        match c.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == 9 => got_ack = true,
            Some(Packet::Publish(p)) if &*p.topic == "s/big" => {
                assert_eq!(&p.payload[..], &payload[..]);
                got_publish = true;
            }
            Some(Packet::PingResp) => got_pong = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got_ack && got_publish && got_pong);
    b.shutdown().await;
}

#[tokio::test]
async fn ping_is_answered_and_a_close_frame_ends_the_session() {
    let b = ws_broker(|_| {}).await;
    let mut c = WsClient::connected(b.addr, ProtocolVersion::V5, "pinger").await;
    c.ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    loop {
        match c.next_message().await {
            Some(Message::Pong(p)) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Some(Message::Ping(_)) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    // MQTT still works after the ping.
    assert_eq!(c.publish_qos1("p", b"x", 3).await, 0);
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }));
    assert_eq!(
        c.send_and_expect_close(close).await,
        Some(CloseCode::Normal)
    );
    b.shutdown().await;
}

/// The 1 s connect timeout, not sooner and not much later.
fn assert_about_one_second(since: Instant) {
    let waited = since.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test]
async fn an_unfinished_upgrade_is_closed_within_the_connect_timeout() {
    let b = ws_broker(|c| c.mqtt.connect_timeout_secs = 1).await;
    // Half a request head, then silence.
    let t0 = Instant::now();
    let answer = http_exchange(b.addr, b"GET /mqtt HTTP/1.1\r\nHost: gw\r\n").await;
    assert_eq!(answer, "", "nothing is answered to an incomplete request");
    assert_about_one_second(t0);
    // Upgraded, but no CONNECT: closed by the connection's own connect timeout.
    let mut c = WsClient::open(b.addr, ProtocolVersion::V5).await;
    let t0 = Instant::now();
    let (packets, _) = c.until_closed().await;
    assert!(packets.is_empty(), "{packets:?}");
    assert_about_one_second(t0);
    b.shutdown().await;
}

#[tokio::test]
async fn the_maximum_packet_size_applies_over_websocket() {
    let b = ws_broker(|c| c.mqtt.max_packet_size = 1024).await;
    // A 4 KiB PUBLISH in small frames: DISCONNECT 0x95 Packet too large, then closed.
    let mut c = WsClient::connected(b.addr, ProtocolVersion::V5, "big").await;
    let bytes = c.encode(&[Packet::Publish(publish(
        "t",
        &[7u8; 4096],
        QoS::AtMostOnce,
        0,
    ))]);
    for chunk in bytes.chunks(512) {
        if c.ws
            .send(Message::Binary(chunk.to_vec().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (packets, _) = c.until_closed().await;
    assert!(
        matches!(packets.as_slice(), [Packet::Disconnect(d)] if d.reason_code == reason::PACKET_TOO_LARGE),
        "{packets:?}"
    );
    // One WebSocket message beyond max_packet_size + 64 KiB is refused by the WebSocket
    // layer before it is buffered.
    let mut c = WsClient::connected(b.addr, ProtocolVersion::V311, "huge").await;
    let _ =
        c.ws.send(Message::Binary(vec![0u8; 200 * 1024].into()))
            .await;
    let (packets, _) = c.until_closed().await;
    assert!(packets.is_empty(), "{packets:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn wss_with_client_certificates_on_the_real_binary() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = pki::Ca::new("Holdfast test CA");
    let (cert, key, client_ca) =
        pki::write_server_files(files.path(), &ca, &pki::server_leaf(&ca, "holdfast"));
    let acl = write(
        files.path(),
        "acl",
        "topic readwrite public/#\nuser alice\ntopic readwrite alice/#\n",
    );
    let port = crate::common::free_port();
    let mut d = daemon::Daemon::started(&format!(
        "[[listener]]\nbind = \"127.0.0.1:{port}\"\nwebsocket = true\nwebsocket_path = \"/secure/mqtt\"\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n[auth]\nacl_file = \"{}\"\n",
        cert.display(),
        key.display(),
        client_ca.display(),
        acl.display()
    ))
    .await;
    let url = format!("wss://localhost:{port}/secure/mqtt");
    let tls = |leaf: Option<&pki::Leaf>| {
        rumqttc::Transport::Wss(rumqttc::TlsConfiguration::Rustls(Arc::new(
            pki::client_config(&ca, leaf),
        )))
    };

    // Certificate CN=alice: user alice, so alice/# may be subscribed and published.
    let alice = ca.leaf("alice", &[], false);
    let (c5, mut rx5) = v5_client("alice-dash", &url, tls(Some(&alice)), None);
    assert!(matches!(next_seen(&mut rx5).await, Seen::ConnAck));
    c5.subscribe("alice/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert_eq!(expect_suback(&mut rx5).await, ["Success(AtLeastOnce)"]);
    // Without a certificate (optional here): anonymous rules, alice/# is denied.
    let (c4, mut rx4) = v4_client("anon-dash", &url, tls(None), None);
    assert!(matches!(next_seen(&mut rx4).await, Seen::ConnAck));
    c4.subscribe("alice/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert_eq!(expect_suback(&mut rx4).await, ["Failure"]);
    publish_v5(&c5, "alice/temp", "21.5").await;
    expect_publish(&mut rx5, "alice/temp", b"21.5").await;

    // A raw client over TLS with the wrong path gets 404 through TLS; plain ws gets nothing.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls_stream = pki::connector(&ca, None)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    match handshake(
        tls_stream,
        &format!("wss://localhost:{port}/mqtt"),
        Some("mqtt"),
    )
    .await
    {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 404),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade on the wrong path"),
    }
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    assert!(handshake(
        tcp,
        &format!("ws://127.0.0.1:{port}/secure/mqtt"),
        Some("mqtt")
    )
    .await
    .is_err());
    assert!(d.is_running());
    d.sigterm().await;
}

/// Messages per second from a rumqttc QoS 1 publisher to a rumqttc QoS 1 subscriber.
async fn rumqttc_rate(
    url_or_host: &str,
    port: u16,
    transport: rumqttc::Transport,
    n: usize,
) -> f64 {
    let options = |id: &str| {
        let mut o = rumqttc::MqttOptions::new(id, url_or_host, port);
        o.set_transport(transport.clone());
        o.set_inflight(100);
        o
    };
    let (sub, el) = rumqttc::AsyncClient::new(options("rate-sub"), 100);
    let mut sub_rx = drive_v4(el);
    assert!(matches!(next_seen(&mut sub_rx).await, Seen::ConnAck));
    sub.subscribe("rate", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    expect_suback(&mut sub_rx).await;
    let (publisher, el) = rumqttc::AsyncClient::new(options("rate-pub"), 1000);
    let _pub_rx = drive_v4(el);
    let t0 = Instant::now();
    tokio::spawn(async move {
        for _ in 0..n {
            let sent = publisher
                .publish("rate", rumqttc::QoS::AtLeastOnce, false, vec![7u8; 64])
                .await;
            if sent.is_err() {
                return;
            }
        }
    });
    for _ in 0..n {
        next_publish(&mut sub_rx).await;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: cargo test --release --test broker websocket::throughput -- --ignored --nocapture"]
async fn throughput_over_websocket_and_tcp() {
    let b = start_broker(|c| {
        c.listener = vec![ListenerConfig::new("127.0.0.1:0"), ws_listener()];
    })
    .await;
    let addrs = b.broker.as_ref().expect("running").local_addrs().to_vec();
    let n = 50_000;
    for round in 1..=3 {
        let tcp = rumqttc_rate("127.0.0.1", addrs[0].port(), rumqttc::Transport::Tcp, n).await;
        let ws = rumqttc_rate(&ws_url(addrs[1]), 0, rumqttc::Transport::Ws, n).await;
        println!(
            "round {round}: {n} x 64 B, QoS 1, rumqttc 1 -> 1: tcp {tcp:.0} msg/s, ws {ws:.0} msg/s, ws/tcp {:.2}",
            ws / tcp
        );
    }
    b.shutdown().await;
}
