//! Authentication and authorization: the password file and `holdfast passwd`, per-listener
//! anonymous access and the network-exposure rule, and the ACL (v5 and 3.1.1 behaviour).

use crate::common;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use holdfast::config::ListenerConfig;
use holdfast::protocol::{
    reason, Packet, ProtocolVersion, PubAckLike, QoS, Subscribe, SubscribeFilter,
    SubscriptionOptions,
};
use tokio::io::AsyncReadExt;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn passwd_file(dir: &Path) -> PathBuf {
    let alice = holdfast::auth::password::hash_password("s3cret").expect("hash");
    let bob = holdfast::auth::password::hash_password("hunter2").expect("hash");
    write(
        dir,
        "passwd",
        &format!("# test users\nalice:{alice}\n\nbob:{bob}\n"),
    )
}

fn login(
    version: ProtocolVersion,
    id: &str,
    user: Option<&str>,
    pw: Option<&str>,
) -> holdfast::protocol::Connect {
    let mut c = connect_packet(version, id, true);
    c.username = user.map(Into::into);
    c.password = pw.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    c
}

async fn connack_code(addr: std::net::SocketAddr, c: holdfast::protocol::Connect) -> u8 {
    let (_client, ack) = RawClient::connect_with(addr, c).await;
    match ack {
        Packet::ConnAck(a) => a.reason_code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The 3.1.1 CONNACK as bytes on the wire.
async fn v311_connack_bytes(addr: std::net::SocketAddr, c: holdfast::protocol::Connect) -> [u8; 4] {
    let mut client = RawClient::tcp(addr, ProtocolVersion::V311).await;
    client.send(Packet::Connect(Box::new(c))).await;
    let mut raw = [0u8; 4];
    tokio::time::timeout(TIMEOUT, client.stream().read_exact(&mut raw))
        .await
        .expect("timely")
        .expect("CONNACK bytes");
    raw
}

#[tokio::test]
async fn password_file_accepts_good_and_refuses_bad_credentials() {
    let files = tempfile::tempdir().expect("tempdir");
    let path = passwd_file(files.path());
    let b = start_broker(|c| {
        c.auth.password_file = Some(path.clone());
        c.mqtt.allow_anonymous = false;
    })
    .await;
    use ProtocolVersion::*;
    assert_eq!(
        connack_code(b.addr, login(V5, "a", Some("alice"), Some("s3cret"))).await,
        0
    );
    assert_eq!(
        connack_code(b.addr, login(V311, "b", Some("bob"), Some("hunter2"))).await,
        0
    );
    for (user, pw) in [
        (Some("alice"), Some("wrong")),
        (Some("alice"), None),
        (Some("alice"), Some("hunter2")),
        (Some("mallory"), Some("s3cret")),
    ] {
        assert_eq!(
            connack_code(b.addr, login(V5, "x", user, pw)).await,
            reason::BAD_USER_NAME_OR_PASSWORD,
            "{user:?}/{pw:?}"
        );
        // 3.1.1: return code 4, on the wire.
        assert_eq!(
            v311_connack_bytes(b.addr, login(V311, "x", user, pw)).await,
            [0x20, 0x02, 0x00, 0x04],
            "{user:?}/{pw:?}"
        );
    }
    // No user name at all: not authorized (v5 0x87, 3.1.1 return code 5).
    assert_eq!(
        connack_code(b.addr, login(V5, "x", None, None)).await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        v311_connack_bytes(b.addr, login(V311, "x", None, None)).await,
        [0x20, 0x02, 0x00, 0x05]
    );
    b.shutdown().await;
}

#[tokio::test]
async fn password_checks_do_not_block_other_connections() {
    let files = tempfile::tempdir().expect("tempdir");
    let path = passwd_file(files.path());
    let b = start_broker(|c| c.auth.password_file = Some(path.clone())).await;
    // Several logins in flight while an anonymous client keeps pinging.
    let logins: Vec<_> = (0..4)
        .map(|i| {
            let addr = b.addr;
            tokio::spawn(async move {
                connack_code(
                    addr,
                    login(
                        ProtocolVersion::V5,
                        &format!("l{i}"),
                        Some("alice"),
                        Some("s3cret"),
                    ),
                )
                .await
            })
        })
        .collect();
    let mut c = RawClient::connect(b.addr, ProtocolVersion::V5, "pinger").await;
    for _ in 0..5 {
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
    }
    for l in logins {
        assert_eq!(l.await.expect("join"), 0);
    }
    b.shutdown().await;
}

#[tokio::test]
async fn bad_password_file_stops_start_up_naming_file_and_line() {
    let files = tempfile::tempdir().expect("tempdir");
    let path = write(files.path(), "passwd", "# ok\nalice:plaintext\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = holdfast::config::Config {
        data_dir: dir.path().to_path_buf(),
        listener: vec![ListenerConfig::new("127.0.0.1:0")],
        ..Default::default()
    };
    cfg.auth.password_file = Some(path.clone());
    let err = match holdfast::app::Gateway::start(&cfg).await {
        Ok(_) => panic!("started with a bad password file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("{}:2:", path.display())), "{err}");
    assert!(err.contains("alice"), "{err}");
}

fn run_passwd(file: &Path, user: &str, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(crate::common::bin())
        .args(["passwd", "--stdin"])
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holdfast passwd");
    // The command may refuse before reading (bad user name): a broken pipe is fine.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("wait")
}

#[tokio::test]
async fn passwd_command_writes_argon2id_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwd");
    let out = run_passwd(&file, "alice", "first\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_passwd(&file, "bob", "hunter2\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Changing alice's password replaces her line.
    let out = run_passwd(&file, "alice", "second\r\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let text = std::fs::read_to_string(&file).expect("read");
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("alice:$argon2id$v=19$"), "{text}");
    assert!(lines[1].starts_with("bob:$argon2id$"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
    // A new file: 0640 and its directory's owner and group (see tests/security/operator.rs).
    assert_eq!(mode & 0o777, 0o640);

    let f = holdfast::auth::PasswordFile::load(&file).expect("loads");
    assert!(f.verify("alice", b"second"));
    assert!(!f.verify("alice", b"first"));
    assert!(f.verify("bob", b"hunter2"));

    // Bad user name, empty password: refused, file untouched.
    for (user, pw, needle) in [
        ("a:b", "x\n", "user name"),
        ("carol", "\n", "empty password"),
    ] {
        let out = run_passwd(&file, user, pw);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&file).expect("read"), text);

    // A file that does not parse is not rewritten; the error names file and line.
    std::fs::write(&file, format!("{text}garbage\n")).expect("write");
    let out = run_passwd(&file, "dave", "pw\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:", file.display())), "{err}");
}

#[tokio::test]
async fn anonymous_access_is_per_listener() {
    let b = start_broker(|c| {
        c.mqtt.allow_anonymous = true;
        c.listener = vec![
            ListenerConfig {
                allow_anonymous: Some(false),
                ..ListenerConfig::new("127.0.0.1:0")
            },
            ListenerConfig::new("127.0.0.1:0"),
        ];
    })
    .await;
    let addrs = b.broker.as_ref().expect("broker").local_addrs().to_vec();
    use ProtocolVersion::*;
    assert_eq!(
        connack_code(addrs[0], login(V5, "a", None, None)).await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        v311_connack_bytes(addrs[0], login(V311, "a", None, None)).await,
        [0x20, 0x02, 0x00, 0x05]
    );
    assert_eq!(
        connack_code(addrs[0], login(V5, "a", Some("u"), None)).await,
        0
    );
    assert_eq!(connack_code(addrs[1], login(V5, "b", None, None)).await, 0);
    b.shutdown().await;

    // The other way round: globally off, on for one listener.
    let b = start_broker(|c| {
        c.mqtt.allow_anonymous = false;
        c.listener[0].allow_anonymous = Some(true);
    })
    .await;
    assert_eq!(connack_code(b.addr, login(V5, "a", None, None)).await, 0);
    b.shutdown().await;
}

#[tokio::test]
async fn network_listener_allowing_anonymous_is_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(
        dir.path(),
        "holdfast.toml",
        "[[listener]]\nbind = \"127.0.0.1:1883\"\n[[listener]]\nbind = \"0.0.0.0:1884\"\n",
    );
    for args in [vec!["check-config"], vec!["run", "--config"]] {
        let out = Command::new(crate::common::bin())
            .args(&args)
            .arg(&cfg)
            .env("HOLDFAST_DATA_DIR", dir.path().join("data"))
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("key `listener[1].allow_anonymous`"), "{err}");
        assert!(err.contains("listener `0.0.0.0:1884`"), "{err}");
    }
    // Explicitly allowed on that listener: valid.
    std::fs::write(
        &cfg,
        "[[listener]]\nbind = \"0.0.0.0:1884\"\nallow_anonymous = true\n",
    )
    .expect("write");
    let out = Command::new(crate::common::bin())
        .arg("check-config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic write shared/in

user watcher
topic read #
topic read $SYS/#

pattern write devices/%c/up
pattern read devices/%c/down/#
pattern readwrite users/%u/#
";

async fn acl_broker(files: &Path) -> TestBroker {
    let acl = write(files, "acl", ACL);
    start_broker(|c| c.auth.acl_file = Some(acl.clone())).await
}

async fn user_client(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    id: &str,
    user: Option<&str>,
) -> RawClient {
    let (c, ack) = RawClient::connect_with(addr, login(version, id, user, None)).await;
    match ack {
        Packet::ConnAck(a) if a.reason_code == 0 => c,
        other => panic!("refused: {other:?}"),
    }
}

fn ack_code(p: Option<Packet>) -> (&'static str, u8) {
    match p {
        Some(Packet::PubAck(a)) => ("PUBACK", a.reason_code),
        Some(Packet::PubRec(a)) => ("PUBREC", a.reason_code),
        Some(Packet::PubComp(a)) => ("PUBCOMP", a.reason_code),
        other => panic!("expected an acknowledgement, got {other:?}"),
    }
}

#[tokio::test]
async fn acl_publish_matrix_v5_and_v311() {
    let files = tempfile::tempdir().expect("tempdir");
    let b = acl_broker(files.path()).await;
    let mut watcher = user_client(b.addr, ProtocolVersion::V5, "w", Some("watcher")).await;
    assert_eq!(watcher.subscribe("#", QoS::AtLeastOnce).await, vec![1]);

    // v5 alice on client id dev1.
    let mut alice = user_client(b.addr, ProtocolVersion::V5, "dev1", Some("alice")).await;
    let mut pid = 0;
    for (topic, allowed) in [
        ("alice/x", true),
        ("alice/secret/x", false),
        ("shared/in", true),
        ("public/news", false),
        ("devices/dev1/up", true),
        ("devices/dev2/up", false),
        ("devices/dev1/down/cmd", false),
        ("users/alice/a", true),
        ("users/bob/a", false),
    ] {
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            pid += 1;
            alice.publish(topic, b"m", qos, pid).await;
            let (kind, code) = ack_code(alice.recv().await);
            let want = if allowed { 0 } else { reason::NOT_AUTHORIZED };
            assert_eq!(code, want, "{topic} {qos:?} {kind}");
            if qos == QoS::ExactlyOnce && allowed {
                alice.send(Packet::PubRel(PubAckLike::new(pid))).await;
                assert_eq!(ack_code(alice.recv().await), ("PUBCOMP", 0));
            }
            if allowed {
                let p = watcher.recv_publish().await;
                assert_eq!(&*p.topic, topic);
                watcher.puback(p.packet_id).await;
            }
        }
        // QoS 0: never acknowledged; denied ones are dropped.
        alice.publish(topic, b"q0", QoS::AtMostOnce, 0).await;
        if allowed {
            assert_eq!(&*watcher.recv_publish().await.topic, topic);
        }
    }
    watcher.expect_silence(Duration::from_millis(200)).await;

    // 3.1.1: acknowledged as usual, dropped.
    let mut old = user_client(b.addr, ProtocolVersion::V311, "dev9", Some("alice")).await;
    old.publish("alice/secret/y", b"m", QoS::AtLeastOnce, 7)
        .await;
    assert_eq!(ack_code(old.recv().await), ("PUBACK", 0));
    old.publish("public/y", b"m", QoS::ExactlyOnce, 8).await;
    assert_eq!(ack_code(old.recv().await).0, "PUBREC");
    old.send(Packet::PubRel(PubAckLike::new(8))).await;
    assert_eq!(ack_code(old.recv().await).0, "PUBCOMP");
    old.publish("alice/ok", b"m", QoS::AtLeastOnce, 9).await;
    assert_eq!(ack_code(old.recv().await), ("PUBACK", 0));
    let p = watcher.recv_publish().await;
    assert_eq!(&*p.topic, "alice/ok");
    watcher.puback(p.packet_id).await;
    watcher.expect_silence(Duration::from_millis(200)).await;

    // Anonymous clients only get the rules before the first `user` line (plus patterns
    // without %u).
    let mut anon = user_client(b.addr, ProtocolVersion::V5, "dev3", None).await;
    anon.publish("alice/x", b"m", QoS::AtLeastOnce, 1).await;
    assert_eq!(ack_code(anon.recv().await).1, reason::NOT_AUTHORIZED);
    anon.publish("devices/dev3/up", b"m", QoS::AtLeastOnce, 2)
        .await;
    assert_eq!(ack_code(anon.recv().await).1, 0);
    b.shutdown().await;
}

async fn subscribe_many(c: &mut RawClient, filters: &[&str]) -> Vec<u8> {
    c.send(Packet::Subscribe(Subscribe {
        packet_id: 5,
        subscription_identifier: None,
        user_properties: vec![],
        filters: filters
            .iter()
            .map(|f| SubscribeFilter {
                filter: (*f).into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            })
            .collect(),
    }))
    .await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => {
            assert_eq!(a.packet_id, 5);
            a.reason_codes
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn acl_subscribe_matrix_v5_and_v311() {
    let files = tempfile::tempdir().expect("tempdir");
    let b = acl_broker(files.path()).await;
    let x = reason::NOT_AUTHORIZED;
    for (version, deny) in [(ProtocolVersion::V5, x), (ProtocolVersion::V311, 0x80)] {
        let mut alice = user_client(b.addr, version, "dev1", Some("alice")).await;
        let codes = subscribe_many(
            &mut alice,
            &[
                "alice/public/#",
                "alice/#", // overlaps `deny alice/secret/#`: granted, filtered per delivery
                "devices/dev1/down/#",
                "devices/+/down/#",
                "users/alice/+",
                "$share/g/users/alice/x",
                "#",
            ],
        )
        .await;
        assert_eq!(codes, vec![1, 1, 1, deny, 1, 1, deny], "{version:?}");
        // All denied: answered by the connection itself.
        assert_eq!(
            subscribe_many(&mut alice, &["shared/in", "#"]).await,
            vec![deny, deny]
        );
        // Then a fully granted one goes through unchanged.
        assert_eq!(subscribe_many(&mut alice, &["alice/x"]).await, vec![1]);

        // The granted subscriptions work (one copy per message), a denied filter delivers
        // nothing more.
        let mut pubber = user_client(b.addr, ProtocolVersion::V5, "pub", Some("alice")).await;
        pubber
            .publish("alice/public/a", b"m", QoS::AtMostOnce, 0)
            .await;
        assert_eq!(&*alice.recv_publish().await.topic, "alice/public/a");
        pubber
            .publish("alice/other", b"m", QoS::AtMostOnce, 0)
            .await;
        assert_eq!(&*alice.recv_publish().await.topic, "alice/other");
        pubber
            .publish("devices/dev2/down/x", b"m", QoS::AtMostOnce, 0)
            .await;
        alice.expect_silence(Duration::from_millis(200)).await;
        drop(pubber);
    }
    let mut anon = user_client(b.addr, ProtocolVersion::V5, "dev3", None).await;
    assert_eq!(
        subscribe_many(&mut anon, &["public/#", "devices/dev3/down/x", "users/x/#"]).await,
        vec![1, 1, x]
    );
    b.shutdown().await;
}

#[tokio::test]
async fn bad_acl_file_stops_start_up_naming_file_and_line() {
    let files = tempfile::tempdir().expect("tempdir");
    let acl = write(files.path(), "acl", "user alice\ntopic sometimes alice/#\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = holdfast::config::Config {
        data_dir: dir.path().to_path_buf(),
        listener: vec![ListenerConfig::new("127.0.0.1:0")],
        ..Default::default()
    };
    cfg.auth.acl_file = Some(acl.clone());
    let err = match holdfast::app::Gateway::start(&cfg).await {
        Ok(_) => panic!("started with a bad ACL file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("{}:2:", acl.display())), "{err}");
}
