//! The bridge over TLS to Debian's Mosquitto, with a CA and certificates generated in the
//! test (rcgen): server verification against `ca_file`, a client certificate required by
//! the upstream, a refused connection when the CA does not match, and MQTT 5 over TLS by
//! IP address with `server_name` naming the certificate.

use crate::common;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use holdfast::bridge::{BridgeConfig, BridgeProtocol, Direction, TopicRule};
use holdfast::protocol::{Packet, ProtocolVersion, QoS};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};

struct Mosquitto(Child);
impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn named(mut p: CertificateParams, cn: &str) -> CertificateParams {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p
}

/// A CA, a server certificate for "localhost" and a client certificate, as PEM files.
fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = named(
        CertificateParams::new(Vec::<String>::new()).unwrap(),
        "Test CA",
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let write = |name: &str, body: String| std::fs::write(dir.path().join(name), body).unwrap();
    write("ca.pem", ca.pem());
    let srv_key = KeyPair::generate().unwrap();
    let srv = named(
        CertificateParams::new(vec!["localhost".to_string()]).unwrap(),
        "localhost",
    )
    .signed_by(&srv_key, &ca)
    .unwrap();
    write("server.pem", srv.pem());
    write("server.key", srv_key.serialize_pem());
    let cli_key = KeyPair::generate().unwrap();
    let cli = named(
        CertificateParams::new(vec!["gateway".to_string()]).unwrap(),
        "gateway",
    )
    .signed_by(&cli_key, &ca)
    .unwrap();
    write("client.pem", cli.pem());
    write("client.key", cli_key.serialize_pem());
    // An unrelated CA, for the negative test.
    let mut other = named(
        CertificateParams::new(Vec::<String>::new()).unwrap(),
        "Other CA",
    );
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = CertifiedIssuer::self_signed(other, KeyPair::generate().unwrap()).unwrap();
    write("other-ca.pem", other.pem());
    Pki { dir }
}

/// Mosquitto with a TLS listener that requires client certificates from our CA.
fn start_mosquitto_tls(pki: &Pki, port: u16) -> Mosquitto {
    let conf = pki.path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuser root\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display()
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    Mosquitto(child)
}

fn tls_bridge(pki: &Pki, port: u16, ca: &str) -> BridgeConfig {
    BridgeConfig {
        name: "tls".into(),
        address: format!("localhost:{port}"),
        client_id: Some("gw-tls".into()),
        username: None,
        password: None,
        reconnect_min_ms: 50,
        reconnect_max_ms: 300,
        tls: true,
        ca_file: Some(pki.path(ca)),
        system_roots: Some(false),
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client.key")),
        topic: vec![TopicRule {
            pattern: "up/#".into(),
            direction: Direction::Out,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: "gw/".into(),
            priority: 0,
            queue_qos0: false,
        }],
        ..BridgeConfig::example()
    }
}

/// Subscribes on the TLS Mosquitto with mosquitto_sub and returns it (prints `topic payload`).
fn mosquitto_sub_tls(pki: &Pki, port: u16, count: usize) -> Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-t",
            "gw/#",
            "-q",
            "1",
            "-v",
        ])
        .args(["-C", &count.to_string(), "-W", "15"])
        .arg("--cafile")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_connects_over_tls_with_a_client_certificate() {
    tls_roundtrip(|pki, port| tls_bridge(pki, port, "ca.pem")).await;
}

/// MQTT 5 over TLS, connecting by IP address: the certificate names "localhost" only, so
/// the connection verifies only because `server_name` says which name to expect (the
/// negative side: `an_ip_address_without_server_name_does_not_verify`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_bridge_over_tls_by_ip_address_with_server_name() {
    tls_roundtrip(|pki, port| BridgeConfig {
        address: format!("127.0.0.1:{port}"),
        protocol: BridgeProtocol::V5,
        server_name: Some("localhost".into()),
        ..tls_bridge(pki, port, "ca.pem")
    })
    .await;
}

/// The same through rumqttc (MQTT 3.1.1): the verifier, not the connector, checks the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_bridge_over_tls_by_ip_address_with_server_name() {
    tls_roundtrip(|pki, port| BridgeConfig {
        address: format!("127.0.0.1:{port}"),
        server_name: Some("localhost".into()),
        ..tls_bridge(pki, port, "ca.pem")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_without_server_name_does_not_verify() {
    if !have_mosquitto_tools() {
        return;
    }
    let pki = make_pki();
    let port = crate::common::free_port();
    let _m = start_mosquitto_tls(&pki, port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = BridgeConfig {
        address: format!("127.0.0.1:{port}"),
        protocol: BridgeProtocol::V5,
        ..tls_bridge(&pki, port, "ca.pem")
    };
    let gw = start_broker(|c| c.bridge = vec![cfg]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_refused_certificate(&gw);
    gw.shutdown().await;
}

/// The bridge is down, with a certificate error as its last error.
fn assert_refused_certificate(gw: &TestBroker) {
    let status = gw
        .broker
        .as_ref()
        .map(|b| b.bridge_status())
        .unwrap_or_default();
    assert!(!status.is_empty());
    assert!(!status[0].connected, "{status:?}");
    let err = status[0].last_error.clone().unwrap_or_default();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// 20 messages through a TLS bridge configured by `cfg`, checked with mosquitto_sub.
async fn tls_roundtrip(cfg: impl FnOnce(&Pki, u16) -> BridgeConfig) {
    if !have_mosquitto_tools() {
        return;
    }
    let pki = make_pki();
    let port = crate::common::free_port();
    let _m = start_mosquitto_tls(&pki, port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sub = mosquitto_sub_tls(&pki, port, 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = cfg(&pki, port);
    let gw = start_broker(|c| c.bridge = vec![cfg]).await;
    let mut p = RawClient::connect(gw.addr, ProtocolVersion::V311, "sensor").await;
    for i in 0..20u16 {
        p.publish("up/x", format!("m{i}").as_bytes(), QoS::AtLeastOnce, i + 1)
            .await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let want: Vec<String> = (0..20).map(|i| format!("gw/up/x m{i}")).collect();
    assert_eq!(
        lines,
        want,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_signed_by_another_ca_is_refused_and_nothing_is_lost() {
    if !have_mosquitto_tools() {
        return;
    }
    let pki = make_pki();
    let port = crate::common::free_port();
    let _m = start_mosquitto_tls(&pki, port);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sub = mosquitto_sub_tls(&pki, port, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = tls_bridge(&pki, port, "other-ca.pem");
    let gw = start_broker(|c| c.bridge = vec![cfg]).await;
    let mut p = RawClient::connect(gw.addr, ProtocolVersion::V311, "sensor").await;
    p.publish("up/x", b"kept", QoS::AtLeastOnce, 1).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Nothing went up: the server certificate did not verify.
    assert_refused_certificate(&gw);
    gw.shutdown().await;
    let _ = sub.kill();
    let _ = sub.wait();
}
