//! Holdfast's test kit, shared by every test binary (`tests/<subsystem>/main.rs`: broker,
//! durable, bridge, security, appliance) and the benches:
//!
//! - `start_broker*`: an in-process broker on 127.0.0.1:0 with a temp data dir;
//! - [`RawClient`]: a raw MQTT client on our codec (send exactly the bytes a test wants, see
//!   exactly what comes back); `daemon::Conn` is its fallible twin for a broker that may be
//!   SIGKILLed at any moment;
//! - [`bin`] and `daemon::Daemon`: the real `holdfast` binary; [`free_port`]: the one port
//!   picker;
//! - `mosquitto` (a real Mosquitto, `HOLDFAST_INTEROP`), `proxy` (the fault-injecting TCP
//!   proxy), `pki` (test CAs), `metrics` (HTTP + Prometheus text), `seq` (sequence-numbered
//!   publishers and subscribers for the bridge), `crash` (the crash and power-cut loop).
#![allow(dead_code)]

pub mod crash;
pub mod daemon;
pub mod metrics;
pub mod mosquitto;
pub mod pki;
pub mod proxy;
pub mod seq;

/// The `holdfast` binary cargo built for these tests: `CARGO_BIN_EXE_holdfast` is only
/// defined when an integration test itself is compiled, so the kit finds it next to the
/// test binary (`target/<profile>/deps/<test>` → `target/<profile>/holdfast`).
/// `HOLDFAST_TEST_BIN` runs the tests against another build of the binary.
pub fn bin() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HOLDFAST_TEST_BIN") {
            return p.into();
        }
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test binary under target/<profile>/deps");
        let bin = profile_dir.join("holdfast");
        assert!(
            bin.exists(),
            "{} not built (cargo test builds it)",
            bin.display()
        );
        bin
    })
}

/// A port that was free a moment ago (for configs that must name their port). The one
/// port picker of the test suite.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768 by
/// default): `bind(0)` and outgoing connections never take those, so the port stays free
/// until the test's broker binds it, and a process-wide counter never hands the same port
/// to two tests of one binary (two daemons on one port would silently share clients).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static EPHEMERAL_LOW: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let ephemeral_low = *EPHEMERAL_LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768)
    });
    const LOW: u32 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        let span = ephemeral_low - LOW;
        let start = std::process::id() * 97 % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (LOW + (start + n) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use holdfast::app::Gateway;
use holdfast::config::{Config, ListenerConfig};
use holdfast::protocol::framed::{FrameError, FramedReader};
use holdfast::protocol::{
    self, Connect, ConnectProperties, Packet, ProtocolVersion, PubAckLike, Publish, QoS, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TIMEOUT: Duration = Duration::from_secs(5);

pub struct TestBroker {
    pub broker: Option<Gateway>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn shutdown(mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
    }
}

/// Starts a broker on 127.0.0.1:0 with a temp data dir; `tweak` adjusts the config.
pub async fn start_broker(tweak: impl FnOnce(&mut Config)) -> TestBroker {
    // RUST_LOG=holdfast=debug shows the broker's logs in failing tests.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        listener: vec![ListenerConfig::new("127.0.0.1:0")],
        ..Config::default()
    };
    cfg.mqtt.shutdown_timeout_secs = 2;
    // No `$SYS/holdfast/...` traffic unless a test asks for it (tests/appliance/observe.rs).
    cfg.sys.interval_secs = 0;
    tweak(&mut cfg);
    let broker = Gateway::start(&cfg).await.expect("broker starts");
    let addr = broker.local_addrs()[0];
    TestBroker {
        broker: Some(broker),
        addr,
        dir,
    }
}

/// Starts an in-process broker whose data lives in `dir` (so it can be restarted on it),
/// with `synchronous = "normal"` (tests that need power-loss durability use the binary).
pub async fn start_broker_in(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> TestBroker {
    let dir = dir.to_path_buf();
    start_broker(move |c| {
        c.data_dir = dir;
        c.store.synchronous = holdfast::store::Synchronous::Normal;
        tweak(c);
    })
    .await
}

/// Connects a durable session: v5 with Session Expiry 1 h, or 3.1.1 with Clean Session 0
/// (when `clean` is false). Returns the client and Session Present; panics if refused.
pub async fn connect_durable_as(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    clean: bool,
) -> (RawClient, bool) {
    let mut c = connect_packet(version, id, clean);
    if version == ProtocolVersion::V5 {
        c.properties.session_expiry_interval = Some(3600);
    }
    let (c, ack) = RawClient::connect_with(addr, c).await;
    match ack {
        Packet::ConnAck(a) if a.reason_code == 0 => (c, a.session_present),
        other => panic!("connect refused: {other:?}"),
    }
}

/// A normal DISCONNECT, then waits (briefly) for the close.
pub async fn disconnect(mut c: RawClient) {
    c.send(Packet::Disconnect(protocol::Disconnect {
        reason_code: 0,
        properties: Default::default(),
    }))
    .await;
    let _ = c.recv_timeout(Duration::from_secs(2)).await;
}

/// Receives and acknowledges messages until `quiet` passes without one; `index` of each,
/// in arrival order. Anything but a PUBLISH, or the connection closing, fails the test.
pub async fn drain_acking<T>(
    c: &mut RawClient,
    quiet: Duration,
    index: impl Fn(&Publish) -> T,
) -> Vec<T> {
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(quiet).await {
            Ok(Some(Packet::Publish(p))) => {
                got.push(index(&p));
                if p.qos != QoS::AtMostOnce {
                    c.send(Packet::PubAck(PubAckLike::new(p.packet_id))).await;
                }
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("connection closed while draining"),
            Err(()) => return got,
        }
    }
}

/// A bare MQTT client: sends packets, returns what the broker sends, nothing hidden. Over
/// TCP by default; `RawClient::from_stream` wraps any other byte stream (e.g. TLS).
pub struct RawClient<S = TcpStream> {
    /// The crate's framed reader (the one the broker reads its clients with) over the stream.
    reader: FramedReader<S>,
    pub version: ProtocolVersion,
}

/// Largest packet a test client accepts from the broker.
const MAX_PACKET: usize = 1 << 28;

impl RawClient {
    pub async fn tcp(addr: SocketAddr, version: ProtocolVersion) -> RawClient {
        RawClient::try_tcp(addr, version)
            .await
            .expect("tcp connect")
    }

    /// TCP connect (no MQTT yet) whose failure is a value: the `try_*` methods are for a
    /// broker that may be SIGKILLed at any moment, where a test must tell "the broker died"
    /// from "the broker misbehaved".
    pub async fn try_tcp(addr: SocketAddr, version: ProtocolVersion) -> std::io::Result<RawClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true).ok();
        Ok(RawClient::from_stream(stream, version))
    }

    /// Connects with the given CONNECT and returns the CONNACK packet.
    pub async fn connect_with(addr: SocketAddr, c: Connect) -> (RawClient, Packet) {
        let mut client = RawClient::tcp(addr, c.protocol).await;
        client.send(Packet::Connect(Box::new(c))).await;
        let ack = client.recv().await.expect("CONNACK");
        (client, ack)
    }

    /// Connects with a client id and clean start; panics unless accepted.
    pub async fn connect(addr: SocketAddr, version: ProtocolVersion, id: &str) -> RawClient {
        let (c, ack) = RawClient::connect_with(addr, connect_packet(version, id, true)).await;
        match ack {
            Packet::ConnAck(a) if a.reason_code == 0 => c,
            other => panic!("connect refused: {other:?}"),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Wraps a stream the test opened itself.
    pub fn from_stream(stream: S, version: ProtocolVersion) -> RawClient<S> {
        RawClient {
            reader: FramedReader::new(stream, MAX_PACKET),
            version,
        }
    }

    /// The stream, to read or write bytes past the MQTT codec (bytes the reader already
    /// took in stay in its buffer).
    pub fn stream(&mut self) -> &mut S {
        self.reader.get_mut()
    }

    pub fn stream_ref(&self) -> &S {
        self.reader.get_ref()
    }

    pub async fn send(&mut self, p: Packet) {
        self.try_send(&p).await.expect("write");
    }

    pub async fn try_send(&mut self, p: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        protocol::encode(p, self.version, &mut out);
        self.stream().write_all(&out).await?;
        self.stream().flush().await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream().write_all(bytes).await.expect("write");
    }

    /// Next packet, or None if the connection closed. Panics after TIMEOUT.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_timeout(TIMEOUT)
            .await
            .expect("timed out waiting for a packet")
    }

    /// Ok(None) on close, Err(()) on timeout.
    pub async fn recv_timeout(&mut self, t: Duration) -> Result<Option<Packet>, ()> {
        self.recv_until(tokio::time::Instant::now() + t).await
    }

    /// Next packet before `deadline`: `Ok(Some)`, `Ok(None)` when the connection is closed
    /// or reset, `Err(())` on timeout. Panics on bytes that do not decode.
    pub async fn recv_until(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Packet>, ()> {
        match tokio::time::timeout_at(deadline, self.reader.read_packet(self.version)).await {
            Err(_) => Err(()),
            Ok(Ok(p)) => Ok(p),
            Ok(Err(FrameError::Decode(e))) => panic!("broker sent an undecodable packet: {e}"),
            // Closed or reset, also in the middle of a packet.
            Ok(Err(_)) => Ok(None),
        }
    }

    /// Asserts nothing arrives within `t`.
    pub async fn expect_silence(&mut self, t: Duration) {
        if let Ok(p) = self.recv_timeout(t).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Waits for the broker to close the connection, returning packets seen before.
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<u8> {
        self.subscribe_opts(
            filter,
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
            None,
        )
        .await
    }

    pub async fn subscribe_opts(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> Vec<u8> {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscription_identifier: id,
            user_properties: vec![],
            filters: vec![SubscribeFilter {
                filter: filter.into(),
                options,
            }],
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => a.reason_codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, packet_id: u16) {
        self.send(Packet::Publish(publish(topic, payload, qos, packet_id)))
            .await;
    }

    /// Receives the next PUBLISH (panics on anything else).
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    pub async fn puback(&mut self, packet_id: u16) {
        self.send(Packet::PubAck(PubAckLike::new(packet_id))).await;
    }
}

pub fn connect_packet(version: ProtocolVersion, id: &str, clean: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start: clean,
        keep_alive: 60,
        properties: ConnectProperties::default(),
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
    }
}

pub fn publish(topic: &str, payload: &[u8], qos: QoS, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
        properties: Default::default(),
        payload: bytes::Bytes::copy_from_slice(payload),
    }
}

/// True when Mosquitto's tools are installed. Without them interop tests skip loudly,
/// unless HOLDFAST_INTEROP=1, where their absence fails the test.
pub fn have_mosquitto_tools() -> bool {
    let ok = std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_ok();
    if !ok {
        if std::env::var("HOLDFAST_INTEROP").as_deref() == Ok("1") {
            panic!("HOLDFAST_INTEROP=1 but mosquitto-clients are not installed");
        }
        eprintln!(
            "\n*** SKIPPED: mosquitto_pub/mosquitto_sub not installed \
             (apt-get install mosquitto mosquitto-clients); set HOLDFAST_INTEROP=1 to make this fail ***\n"
        );
    }
    ok
}
