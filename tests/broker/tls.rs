//! TLS listeners: server certificates, client-certificate authentication (CN as user name,
//! then the ACL applies), and certificate reload on SIGHUP with the real binary.

use crate::common::{self, daemon, pki};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use holdfast::config::ListenerConfig;
use holdfast::protocol::{reason, Connect, Packet, ProtocolVersion, QoS};
use pki::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

fn tls_listener(dir: &Path, ca: &Ca, require: bool) -> ListenerConfig {
    let (cert, key, client_ca) = write_server_files(dir, ca, &server_leaf(ca, "holdfast"));
    ListenerConfig {
        tls_cert: Some(cert),
        tls_key: Some(key),
        tls_client_ca: Some(client_ca),
        require_client_cert: require,
        ..ListenerConfig::new("127.0.0.1:0")
    }
}

/// The kit's raw MQTT client over TLS.
type TlsClient = RawClient<TlsStream<TcpStream>>;

async fn open(addr: SocketAddr, connector: &TlsConnector) -> std::io::Result<TlsClient> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))??;
    Ok(RawClient::from_stream(stream, ProtocolVersion::V5))
}

/// What these tests ask of a TLS client beyond the kit's raw client.
trait TlsClientExt {
    fn server_cert(&self) -> CertificateDer<'static>;
    /// CONNECT; returns the CONNACK reason code, or None if the server closed the link
    /// (e.g. rejected the client certificate after the handshake).
    async fn mqtt_connect(&mut self, id: &str, user: Option<&str>) -> Option<u8>;
    async fn publish_code(&mut self, topic: &str, pid: u16) -> u8;
}

impl TlsClientExt for TlsClient {
    fn server_cert(&self) -> CertificateDer<'static> {
        self.stream_ref()
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .clone()
    }

    async fn mqtt_connect(&mut self, id: &str, user: Option<&str>) -> Option<u8> {
        let mut c: Connect = connect_packet(ProtocolVersion::V5, id, true);
        c.username = user.map(Into::into);
        c.password = user.map(|_| bytes::Bytes::from_static(b"ignored"));
        self.try_send(&Packet::Connect(Box::new(c))).await.ok()?;
        match self.recv().await? {
            Packet::ConnAck(a) => Some(a.reason_code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn publish_code(&mut self, topic: &str, pid: u16) -> u8 {
        self.send(Packet::Publish(publish(topic, b"m", QoS::AtLeastOnce, pid)))
            .await;
        match self.recv().await {
            // 0x10 No matching subscribers is a success too.
            Some(Packet::PubAck(a)) if a.reason_code == 0x10 => 0,
            Some(Packet::PubAck(a)) => a.reason_code,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// Connects (TLS + MQTT) and expects to be accepted.
async fn connected(addr: SocketAddr, c: &TlsConnector, id: &str, user: Option<&str>) -> TlsClient {
    let mut client = open(addr, c).await.expect("TLS handshake");
    assert_eq!(client.mqtt_connect(id, user).await, Some(0), "{id}");
    client
}

/// True if the server refused this client: handshake error, or closed right after.
async fn refused(addr: SocketAddr, c: &TlsConnector) -> bool {
    match open(addr, c).await {
        Err(_) => true,
        Ok(mut client) => client.mqtt_connect("x", None).await.is_none(),
    }
}

#[tokio::test]
async fn client_certificate_name_is_the_user_name_and_the_acl_applies() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Holdfast test CA");
    let listener = tls_listener(files.path(), &ca, false);
    let acl = files.path().join("acl");
    std::fs::write(
        &acl,
        "topic readwrite public/#\nuser alice\ntopic readwrite alice/#\n",
    )
    .expect("write");
    let b = start_broker(|c| {
        c.listener = vec![listener];
        c.auth.acl_file = Some(acl);
    })
    .await;

    // No client certificate (optional here): anonymous rules.
    let anon = connector(&ca, None);
    let mut c = connected(b.addr, &anon, "anon", None).await;
    assert_eq!(c.publish_code("public/x", 1).await, 0);
    assert_eq!(c.publish_code("alice/x", 2).await, reason::NOT_AUTHORIZED);

    // Certificate CN=alice: user alice, whatever the CONNECT says.
    let alice = ca.leaf("alice", &[], false);
    let with_cert = connector(&ca, Some(&alice));
    let mut c = connected(b.addr, &with_cert, "dev1", Some("mallory")).await;
    assert_eq!(c.publish_code("alice/x", 1).await, 0);
    assert_eq!(c.publish_code("public/x", 2).await, reason::NOT_AUTHORIZED);

    // A certificate from another CA is refused.
    let other = Ca::new("Someone else");
    let stranger = other.leaf("alice", &[], false);
    assert!(refused(b.addr, &connector(&ca, Some(&stranger))).await);

    // Plain MQTT on the TLS port goes nowhere.
    let mut raw = RawClient::tcp(b.addr, ProtocolVersion::V5).await;
    raw.send(Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V5,
        "p",
        true,
    ))))
    .await;
    let mut seen = Vec::new();
    tokio::time::timeout(TIMEOUT, raw.stream().read_to_end(&mut seen))
        .await
        .expect("closed in time")
        .ok();
    // At most a TLS alert (content type 0x15), never a CONNACK.
    assert!(seen.first().is_none_or(|&b| b == 0x15), "{seen:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn required_client_certificate() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Holdfast test CA");
    let listener = tls_listener(files.path(), &ca, true);
    let b = start_broker(|c| c.listener = vec![listener]).await;
    assert!(refused(b.addr, &connector(&ca, None)).await);
    // A certificate with no CN: the first SAN is the user name.
    let device = ca.leaf("", &["sensor-7.local"], false);
    let mut c = connected(b.addr, &connector(&ca, Some(&device)), "s7", None).await;
    assert_eq!(c.publish_code("any/topic", 1).await, 0);
    b.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Holdfast test CA");
    let first = server_leaf(&ca, "holdfast-first");
    let (cert, key, _) = write_server_files(files.path(), &ca, &first);
    let port = crate::common::free_port();
    let mut d = daemon::Daemon::started(&format!(
        "[[listener]]\nbind = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    ))
    .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let conn = connector(&ca, None);

    let mut old = connected(addr, &conn, "old", None).await;
    assert_eq!(old.server_cert(), first.der);
    old.send(Packet::Subscribe(holdfast::protocol::Subscribe {
        packet_id: 1,
        subscription_identifier: None,
        user_properties: vec![],
        filters: vec![holdfast::protocol::SubscribeFilter {
            filter: "t".into(),
            options: Default::default(),
        }],
    }))
    .await;
    assert!(matches!(old.recv().await, Some(Packet::SubAck(_))));

    // New certificate and key in place, then SIGHUP.
    let second = server_leaf(&ca, "holdfast-second");
    std::fs::write(&cert, &second.cert_pem).expect("write");
    std::fs::write(&key, &second.key_pem).expect("write");
    d.sighup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut new = loop {
        // A fresh client config each time: a resumed TLS session would not show the
        // server's certificate again.
        let c = connected(addr, &connector(&ca, None), "new", None).await;
        if c.server_cert() == second.der {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate not reloaded\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The old connection is still up and served.
    new.send(Packet::Publish(publish(
        "t",
        b"after reload",
        QoS::AtMostOnce,
        0,
    )))
    .await;
    match old.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"after reload"),
        other => panic!("expected PUBLISH on the old connection, got {other:?}"),
    }
    old.send(Packet::PingReq).await;
    assert_eq!(old.recv().await, Some(Packet::PingResp));

    // A broken certificate file: reload fails loudly, the previous certificate stays.
    std::fs::write(&cert, "not a certificate").expect("write");
    d.sighup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = connected(addr, &connector(&ca, None), "third", None).await;
    assert_eq!(c.server_cert(), second.der);
    assert!(d.is_running());
    d.sigterm().await;
}
