//! The real `holdfast` binary: `--version`, `check-config` (valid and invalid files, errors
//! naming key and file), `run` with a config file and environment overrides, and graceful
//! shutdown on SIGTERM/SIGINT (v5 clients get DISCONNECT 0x8B, exit status 0, bounded time).

use crate::common::{self, daemon::Daemon};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use holdfast::protocol::{reason, Packet, ProtocolVersion};

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("holdfast.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n[log]\nlevel = \"info\"\n",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

#[test]
fn version_is_printed() {
    let out = Command::new(crate::common::bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
}

#[test]
fn check_config_accepts_the_example_and_prints_the_effective_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/holdfast.toml");
    let out = Command::new(crate::common::bin())
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[[listener]]") && text.contains("max_inflight"),
        "{text}"
    );
}

#[test]
fn check_config_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    for (body, key) in [
        ("[mqtt]\nmax_qos = 3\n", "mqtt.max_qos"),
        ("[mqtt]\nmax_inflight = \"lots\"\n", "mqtt.max_inflight"),
        ("[mqtt]\nno_such_key = 1\n", "no_such_key"),
        ("[[listener]]\nbind = \"not-an-address\"\n", "bind"),
    ] {
        std::fs::write(&path, body).unwrap();
        let out = Command::new(crate::common::bin())
            .args(["check-config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{body} should be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{body}: error should name {key}: {err}");
        assert!(
            err.contains(&*path.to_string_lossy()),
            "error should name the file: {err}"
        );
    }
    let out = Command::new(crate::common::bin())
        .args(["check-config", "/nonexistent/holdfast.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/holdfast.toml"));
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), port);
    let out = Command::new(crate::common::bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_0x8b() {
    let mut d = Daemon::started("").await;
    let addr = d.addr;
    let mut v5 = RawClient::connect(addr, ProtocolVersion::V5, "v5").await;
    let mut v3 = RawClient::connect(addr, ProtocolVersion::V311, "v3").await;
    let t0 = Instant::now();
    d.signal("TERM");
    let seen = v5.expect_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == reason::SERVER_SHUTTING_DOWN),
        "{seen:?}"
    );
    assert!(v3.expect_closed().await.is_empty());
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn sigint_also_exits_cleanly_and_environment_overrides_the_file() {
    let mut d = Daemon::new("");
    d.env.push(("HOLDFAST_MQTT__MAX_QOS".into(), "1".into()));
    d.start().await;
    let addr = d.addr;
    let (_c, ack) =
        RawClient::connect_with(addr, connect_packet(ProtocolVersion::V5, "env", true)).await;
    match ack {
        Packet::ConnAck(a) => assert_eq!(a.properties.maximum_qos, Some(1)),
        other => panic!("{other:?}"),
    }
    d.signal("INT");
    assert!(d.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_bad_environment_override_is_refused_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), crate::common::free_port());
    let out = Command::new(crate::common::bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("HOLDFAST_MQTT__MAX_INFLIGHT", "many")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HOLDFAST_MQTT__MAX_INFLIGHT") && err.contains("mqtt.max_inflight"),
        "{err}"
    );
}
