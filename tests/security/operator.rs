//! Security (issue 13), the operator's side: `check-config` keeps secrets out of its output
//! and checks the files the configuration refers to, `holdfast passwd` run as root leaves a
//! file the service user can read, and the admin socket lives where it is configured and
//! cannot stop the gateway when it fails.
//!
//! `HOLDFAST_TEST_BIN` runs the command-line tests against another build of the binary
//! (`common::bin()`).

use crate::common::{self, daemon};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn check_config(args: &[&str]) -> Output {
    Command::new(common::bin())
        .arg("check-config")
        .args(args)
        .output()
        .expect("run check-config")
}

const BRIDGE: &str = "\
[[bridge]]
name = \"cloud\"
address = \"cloud.example.com:8883\"
username = \"gw-1\"
password = \"s3cr3t-Bridge-pw\"
[[bridge.topic]]
pattern = \"sensors/#\"
direction = \"out\"
";

#[test]
fn check_config_does_not_print_the_bridge_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(dir.path(), "holdfast.toml", BRIDGE);
    let out = check_config(&[cfg.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("s3cr3t-Bridge-pw"), "{all}");
    assert!(all.contains("username = \"gw-1\""), "{all}");
}

#[test]
fn check_config_fails_naming_the_key_and_file_when_a_referenced_file_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let bridge_ca = BRIDGE.replace(
        "password = \"s3cr3t-Bridge-pw\"\n",
        &format!("password = \"s3cr3t-Bridge-pw\"\ntls = true\nca_file = \"{d}/nope-ca.pem\"\n"),
    );
    for (toml, key, file) in [
        (format!("[auth]\npassword_file = \"{d}/nope-passwd\"\n"), "auth.password_file", "nope-passwd"),
        (format!("[auth]\nacl_file = \"{d}/nope-acl\"\n"), "auth.acl_file", "nope-acl"),
        (
            format!("[[listener]]\nbind = \"127.0.0.1:8883\"\ntls_cert = \"{d}/nope.crt\"\ntls_key = \"{d}/nope.key\"\n"),
            "listener[0].tls_cert",
            "nope.crt",
        ),
        (bridge_ca, "bridge[0].ca_file", "nope-ca.pem"),
    ] {
        let cfg = write(dir.path(), "holdfast.toml", &toml);
        let out = check_config(&[cfg.to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: valid?\n{err}");
        assert!(err.contains(key) && err.contains(file), "{key}: {err}");
        assert!(err.contains(&cfg.display().to_string()), "{key}: {err}");
    }
}

#[test]
fn check_config_takes_the_config_flag_as_the_docs_show() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/holdfast.toml");
    let out = check_config(&["--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check_config(&[example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Neither form: a usage error, not a panic.
    let out = check_config(&[]);
    assert!(!out.status.success());
}

fn passwd(file: &Path, user: &str) -> Output {
    let mut child = Command::new(common::bin())
        .args(["passwd", "--stdin"])
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn passwd");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"pw\n")
        .expect("write");
    child.wait_with_output().expect("wait")
}

/// The `holdfast` service user cannot read a root:root 0600 file: run as root, as the
/// docs say, `passwd` must leave the file readable by the directory's group.
#[test]
fn passwd_run_as_root_leaves_a_file_the_service_group_can_read() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("*** SKIPPED: needs root (chown) ***");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc-holdfast");
    std::fs::create_dir(&etc).expect("mkdir");
    // /etc/holdfast as packaged: root:holdfast 0750 (65534 stands in for holdfast).
    std::os::unix::fs::chown(&etc, Some(0), Some(65534)).expect("chown");
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let file = etc.join("passwd");
    let out = passwd(&file, "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::metadata(&file).expect("meta");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (0, 65534, 0o640)
    );
    // An existing file keeps what the operator gave it.
    std::os::unix::fs::chown(&file, Some(0), Some(65533)).expect("chown");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).expect("chmod");
    let out = passwd(&file, "bob");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::metadata(&file).expect("meta");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (0, 65533, 0o604)
    );
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(text.contains("alice:") && text.contains("bob:"), "{text}");
}

/// Puts `line` at the top of the daemon's config (top-level keys must precede tables).
fn prepend(d: &daemon::Daemon, line: &str) {
    let text = std::fs::read_to_string(&d.config).expect("read config");
    std::fs::write(&d.config, format!("{line}\n{text}")).expect("write config");
}

#[tokio::test]
async fn the_gateway_starts_when_the_admin_socket_cannot_be_created() {
    let mut d = daemon::Daemon::new("");
    // A socket path below a regular file: creating it fails (as on a filesystem without
    // Unix sockets); the gateway must serve MQTT anyway and say so.
    let blocker = write(d.dir.path(), "not-a-dir", "");
    prepend(
        &d,
        &format!("admin_socket = \"{}/holdfast.sock\"", blocker.display()),
    );
    d.start().await;
    let mut c = common::RawClient::connect(
        d.addr,
        holdfast::protocol::ProtocolVersion::V5,
        "still-serving",
    )
    .await;
    c.send(holdfast::protocol::Packet::PingReq).await;
    assert!(matches!(
        c.recv().await,
        Some(holdfast::protocol::Packet::PingResp)
    ));
    assert!(
        d.log_text().contains("RUNNING WITHOUT THE ADMIN SOCKET"),
        "{}",
        d.log_text()
    );
    d.sigterm().await;
}

#[tokio::test]
async fn the_admin_socket_is_where_the_configuration_says_and_the_cli_finds_it() {
    let mut d = daemon::Daemon::new("");
    let run = d.dir.path().join("run").join("holdfast");
    let socket = run.join("holdfast.sock");
    prepend(&d, &format!("admin_socket = \"{}\"", socket.display()));
    d.start().await;
    let config = d.config.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(common::bin())
            .args(["status", "--json", "--config"])
            .arg(&config)
            .output()
            .expect("status")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(&socket)
        .expect("socket")
        .file_type()
        .is_socket());
    assert!(!d.dir.path().join("data").join("holdfast.sock").exists());
    d.sigterm().await;
    assert!(!socket.exists(), "removed at shutdown");
}
