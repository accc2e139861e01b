//! Operator commands against the real binary and a real broker: `sessions list/show/drop`
//! (through the admin socket of a running broker, and directly in the database of a
//! stopped one) and `backup` of a broker under load, restored and resumed.

use crate::common::{self, daemon::Daemon};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use holdfast::protocol::{
    reason, Packet, ProtocolVersion, QoS, SubscriptionOptions, Will, WillProperties,
};
use serde_json::Value;

/// Starts `holdfast run` on `data` (the kit's daemon) and waits until it accepts TCP.
async fn start(data: &Path) -> Daemon {
    let mut d = Daemon::with_data_dir(data, "[mqtt]\nshutdown_timeout_secs = 2\n");
    d.start().await;
    d
}

/// Runs the binary (off the async threads) and returns its output.
async fn holdfast(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(crate::common::bin())
            .args(&args)
            .output()
            .expect("run")
    })
    .await
    .unwrap()
}

fn args(parts: &[&str], config: &Path) -> Vec<String> {
    let mut v: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
    v.push("--config".into());
    v.push(config.display().to_string());
    v
}

/// Runs a command that must succeed; returns stdout.
async fn ok(parts: &[&str], config: &Path) -> String {
    let out = holdfast(args(parts, config)).await;
    assert!(
        out.status.success(),
        "{parts:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a command that must fail; returns stderr.
async fn fails(parts: &[&str], config: &Path) -> String {
    let out = holdfast(args(parts, config)).await;
    assert!(
        !out.status.success(),
        "{parts:?} should fail, printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sessions list --json`, by client id.
async fn list_json(config: &Path) -> Vec<Value> {
    ok(&["sessions", "list", "--json"], config)
        .await
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn find<'a>(sessions: &'a [Value], id: &str) -> Option<&'a Value> {
    sessions.iter().find(|s| s["client_id"] == id)
}

/// Connects with clean start / clean session off; returns the client and Session Present.
async fn connect_durable(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    will: Option<Will>,
) -> (RawClient, bool) {
    let mut c = connect_packet(version, id, false);
    if version == ProtocolVersion::V5 {
        c.properties.session_expiry_interval = Some(3600);
    }
    c.will = will;
    let (client, ack) = RawClient::connect_with(addr, c).await;
    match ack {
        Packet::ConnAck(a) if a.reason_code == 0 => (client, a.session_present),
        other => panic!("connect {id} refused: {other:?}"),
    }
}

/// Publishes QoS 1 messages and waits for each PUBACK (sent after the commit).
async fn publish_acked(c: &mut RawClient, topic: &str, payloads: &[&[u8]]) {
    for (i, p) in payloads.iter().enumerate() {
        let id = i as u16 + 1;
        c.publish(topic, p, QoS::AtLeastOnce, id).await;
        match c.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

async fn disconnect(mut c: RawClient) {
    c.send(Packet::Disconnect(Default::default())).await;
    let _ = c.recv_timeout(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_drop_on_a_running_and_a_stopped_broker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut d = start(&data).await;
    let cfg = d.config.clone();

    // A v5 session that stays online, with a will and a subscription with every option.
    let will = Will {
        topic: "wills/online-v5".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    };
    let (mut online, present) =
        connect_durable(d.addr, ProtocolVersion::V5, "online-v5", Some(will)).await;
    assert!(!present);
    let codes = online
        .subscribe_opts(
            "a/#",
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
            Some(7),
        )
        .await;
    assert_eq!(codes, [1]);

    // A 3.1.1 session that goes offline with messages queued for it.
    let (mut offline, _) = connect_durable(d.addr, ProtocolVersion::V311, "offline-v3", None).await;
    assert_eq!(offline.subscribe("t/+", QoS::AtLeastOnce).await, [1]);
    disconnect(offline).await;
    // A session whose id needs the socket protocol's encoding.
    let odd = "wéird id 100%\nx";
    let (c, _) = connect_durable(d.addr, ProtocolVersion::V5, odd, None).await;
    disconnect(c).await;

    let mut publisher = RawClient::connect(d.addr, ProtocolVersion::V5, "pub").await;
    publish_acked(&mut publisher, "t/x", &[b"one", b"two!", b"three"]).await;

    // --- list -------------------------------------------------------------------------
    let sessions = list_json(&cfg).await;
    assert_eq!(sessions.len(), 3, "{sessions:?}"); // `pub` is a clean session
    let off = find(&sessions, "offline-v3").expect("offline-v3 listed");
    assert_eq!(off["protocol"], "3.1.1");
    assert_eq!(off["online"], false);
    assert_eq!(off["queued"], 3);
    assert_eq!(off["queued_bytes"], 12);
    assert_eq!(off["inflight"], 0);
    assert_eq!(off["dropped"], 0);
    assert_eq!(off["subscriptions"], 1);
    assert!(off["expires_at_ms"].as_i64().is_some());
    let on = find(&sessions, "online-v5").expect("online-v5 listed");
    assert_eq!(on["protocol"], "5.0");
    assert_eq!(on["online"], true);
    assert_eq!(on["expiry_interval_secs"], 3600);
    assert_eq!(on["queued"], 0);
    assert_eq!(on["subscriptions"], 1);
    assert!(find(&sessions, odd).is_some());

    let text = ok(&["sessions", "list"], &cfg).await;
    assert!(text.starts_with("CLIENT ID"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("offline-v3 "))
        .expect("offline-v3 line");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], "3.1.1", "{line}");
    assert_eq!(cols[2], "offline", "{line}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("online-v5 ") && l.contains(" online ")),
        "{text}"
    );
    assert!(text.contains("\"wéird id 100%\\nx\""), "{text}");
    assert!(text.contains("3 durable session(s)"), "{text}");

    // --- show -------------------------------------------------------------------------
    let text = ok(&["sessions", "show", "offline-v3"], &cfg).await;
    assert!(text.contains("MQTT 3.1.1"), "{text}");
    assert!(text.contains("3 message(s), 12 B (0 in flight)"), "{text}");
    assert!(text.contains("t/+"), "{text}");
    assert_eq!(text.matches(" t/x").count(), 3, "{text}");
    assert!(text.contains("queued messages (first 3 of 3)"), "{text}");
    let text = ok(&["sessions", "show", "offline-v3", "--limit", "1"], &cfg).await;
    assert!(text.contains("queued messages (first 1 of 3)"), "{text}");

    let v: Value =
        serde_json::from_str(&ok(&["sessions", "show", "online-v5", "--json"], &cfg).await)
            .unwrap();
    let sub = &v["subscriptions"][0];
    assert_eq!(sub["filter"], "a/#");
    assert_eq!(sub["qos"], 1);
    assert_eq!(sub["no_local"], true);
    assert_eq!(sub["retain_as_published"], true);
    assert_eq!(sub["retain_handling"], 2);
    assert_eq!(sub["identifier"], 7);
    assert_eq!(v["will"]["topic"], "wills/online-v5");
    assert_eq!(v["session"]["online"], true);
    let v: Value =
        serde_json::from_str(&ok(&["sessions", "show", "offline-v3", "--json"], &cfg).await)
            .unwrap();
    let queue = v["queue"].as_array().unwrap();
    assert_eq!(queue.len(), 3);
    assert_eq!(queue[0]["seq"], 0);
    assert_eq!(queue[0]["state"], "queued");
    assert_eq!(queue[0]["topic"], "t/x");
    assert_eq!(queue[0]["size"], 3);
    assert_eq!(queue[0]["qos"], 1);
    assert_eq!(v["will"], Value::Null);

    let err = fails(&["sessions", "show", "nobody"], &cfg).await;
    assert!(err.contains("nobody"), "{err}");

    // --- drop on the running broker ----------------------------------------------------
    let sock = data.join("holdfast.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("admin socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let mut watcher = RawClient::connect(d.addr, ProtocolVersion::V5, "watcher").await;
    assert_eq!(watcher.subscribe("wills/#", QoS::AtMostOnce).await, [0]);

    let out = ok(&["sessions", "drop", "online-v5"], &cfg).await;
    assert!(out.contains("on the running broker"), "{out}");
    let seen = online.expect_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == reason::ADMINISTRATIVE_ACTION),
        "{seen:?}"
    );
    let w = watcher.recv_publish().await;
    assert_eq!(&*w.topic, "wills/online-v5");
    // Committed before the command returned.
    let sessions = list_json(&cfg).await;
    assert!(find(&sessions, "online-v5").is_none(), "{sessions:?}");
    let (mut again, present) =
        connect_durable(d.addr, ProtocolVersion::V5, "online-v5", None).await;
    assert!(!present, "the dropped session must not come back");

    let out = ok(&["sessions", "drop", odd], &cfg).await;
    assert!(out.contains("on the running broker"), "{out}");
    assert!(find(&list_json(&cfg).await, odd).is_none());

    let err = fails(&["sessions", "drop", "nobody"], &cfg).await;
    assert!(
        err.contains("\"nobody\"") && err.contains("running broker"),
        "{err}"
    );

    // The broker keeps working.
    assert_eq!(again.subscribe("a/b", QoS::AtLeastOnce).await, [1]);
    publish_acked(&mut publisher, "a/b", &[b"still alive"]).await;
    let p = again.recv_publish().await;
    assert_eq!(&p.payload[..], b"still alive");
    again.puback(p.packet_id).await;
    disconnect(again).await;

    // A second broker on the same data directory is refused.
    let second = Daemon::with_data_dir(&data, "");
    let cfg2 = second.config.clone();
    let out = holdfast(args(&["run"], &cfg2)).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(
        sock.exists(),
        "the refused broker must leave the socket alone"
    );

    // --- drop with the broker stopped ---------------------------------------------------
    drop(publisher);
    drop(watcher);
    d.sigterm().await;
    assert!(!sock.exists(), "socket removed on shutdown");
    let sessions = list_json(&cfg).await;
    assert_eq!(find(&sessions, "offline-v3").unwrap()["queued"], 3);

    let out = ok(&["sessions", "drop", "offline-v3"], &cfg).await;
    assert!(
        out.contains("broker not running") && out.contains("3 queued message(s) discarded"),
        "{out}"
    );
    assert!(find(&list_json(&cfg).await, "offline-v3").is_none());
    let err = fails(&["sessions", "drop", "offline-v3"], &cfg).await;
    assert!(err.contains("holdfast.db"), "{err}");

    // A stale socket file (broker killed) does not fool `drop`.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    assert!(sock.exists());
    let err = fails(&["sessions", "drop", "nobody"], &cfg).await;
    assert!(err.contains("holdfast.db"), "{err}");

    // Restart (replacing the stale socket): the dropped sessions stay gone, the rest is intact.
    let mut d = start(&data).await;
    let (c, present) = connect_durable(d.addr, ProtocolVersion::V311, "offline-v3", None).await;
    assert!(!present);
    drop(c);
    let (c, present) = connect_durable(d.addr, ProtocolVersion::V5, "online-v5", None).await;
    assert!(
        present,
        "the session created after the drop survives the restart"
    );
    drop(c);
    d.sigterm().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_of_a_busy_broker_restores_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut d = start(&data).await;
    let cfg = d.config.clone();

    // A durable subscriber, offline, accumulating messages.
    let (mut sub, _) = connect_durable(d.addr, ProtocolVersion::V5, "sub", None).await;
    assert_eq!(sub.subscribe("load/#", QoS::AtLeastOnce).await, [1]);
    disconnect(sub).await;

    // A publisher sending QoS 1 messages until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let addr = d.addr;
    let publisher = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut c = RawClient::connect(addr, ProtocolVersion::V5, "loader").await;
            let payload = vec![b'x'; 4096];
            let mut id = 0u16;
            while !stop.load(Ordering::Relaxed) {
                id = id % 60_000 + 1;
                c.publish("load/a", &payload, QoS::AtLeastOnce, id).await;
                match c.recv().await {
                    Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
                    other => panic!("expected PUBACK, got {other:?}"),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Enough for a database of several backup steps (256 pages each).
    while sent.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let file = dir.path().join("backup.db");
    let file_s = file.display().to_string();
    let before = sent.load(Ordering::Relaxed);
    let out = ok(&["backup", &file_s], &cfg).await;
    assert!(out.contains("integrity ok"), "{out}");
    assert!(out.contains("1 session(s)"), "{out}");
    // "... bytes (P pages in S step(s)) ...": several steps, and no restart although the
    // broker committed all along (the copy reads one snapshot).
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "pages").expect("pages");
    let pages: u64 = words[at - 1].trim_start_matches('(').parse().unwrap();
    let steps: u64 = words[at + 2].parse().unwrap();
    assert!(pages > 256, "{out}");
    assert_eq!(steps, pages.div_ceil(256), "{out}");
    let err = fails(&["backup", &file_s], &cfg).await;
    assert!(err.contains("--force") && err.contains(&file_s), "{err}");
    let out = ok(&["backup", &file_s, "--force"], &cfg).await;
    assert!(out.contains("integrity ok"), "{out}");
    assert!(
        sent.load(Ordering::Relaxed) > before,
        "the publisher kept going during the backups"
    );

    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();

    // The copy opens on its own and is sound.
    {
        let conn = rusqlite::Connection::open(&file).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let ids: Vec<String> = conn
            .prepare("SELECT client_id FROM session")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, ["sub"]);
        let queued: i64 = conn
            .query_row("SELECT count(*) FROM queue_all", [], |r| r.get(0))
            .unwrap();
        assert!(queued > 0);
    }
    assert!(
        !Path::new(&format!("{file_s}-wal")).exists(),
        "the backup is one file"
    );
    d.sigterm().await;

    // Restore into a fresh data directory and resume the session there.
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(&file, restored.join("holdfast.db")).unwrap();
    let mut d = start(&restored).await;
    let sessions = list_json(&d.config).await;
    let s = find(&sessions, "sub").expect("restored session");
    let queued = s["queued"].as_u64().unwrap();
    assert!(queued > 0, "{s}");
    let (mut sub, present) = connect_durable(d.addr, ProtocolVersion::V5, "sub", None).await;
    assert!(present, "the restored session resumes");
    let p = sub.recv_publish().await;
    assert_eq!(&*p.topic, "load/a");
    assert_eq!(p.payload.len(), 4096);
    drop(sub);
    assert_eq!(d.data, restored);
    d.sigterm().await;
}

#[tokio::test]
async fn missing_database_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-started");
    let never = Daemon::with_data_dir(&data, "");
    let cfg = never.config.clone();
    let db = data.join("holdfast.db").display().to_string();
    for cmd in [
        vec!["sessions", "list"],
        vec!["sessions", "show", "x"],
        vec!["sessions", "drop", "x"],
        vec!["backup", "/tmp/never-written.db"],
    ] {
        let err = fails(&cmd, &cfg).await;
        assert!(
            err.contains(&db) && err.contains("does not exist"),
            "{cmd:?}: {err}"
        );
    }
    assert!(!Path::new("/tmp/never-written.db").exists());
}
