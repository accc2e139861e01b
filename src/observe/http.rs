//! A deliberately tiny HTTP/1.1 server for `GET /metrics` (Prometheus text exposition
//! format 0.0.4) and `GET /healthz` (200 `ok` when the router and the store writer answer
//! within [`HEALTH_DEADLINE`], 503 otherwise). One request per connection
//! (`Connection: close`), GET and HEAD only, request head at most 8 KiB, 5 s per request.
//! Bind it to loopback or a management network: it has no authentication.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Health, Observer, Snapshot};
use crate::store::metrics::COMMIT_BUCKETS_US;

/// How long the router and the writer may take to answer a `/healthz` probe.
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(2);
const MAX_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most requests served at once (a scraper and a probe need two).
const MAX_CONCURRENT: usize = 16;

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, observer: Arc<Observer>, shutdown: CancellationToken) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "metrics endpoint busy: connection closed");
            continue;
        };
        let observer = observer.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &observer)).await;
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, observer: &Observer) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_HEAD {
            return respond(
                &mut stream,
                431,
                "text/plain",
                "request head too large\n",
                false,
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, 405, "text/plain", "only GET\n", false).await;
    }
    match path {
        "/metrics" => {
            let health = observer.health(HEALTH_DEADLINE).await;
            let body = render(&observer.snapshot().await, health);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                head_only,
            )
            .await
        }
        "/healthz" => {
            let h = observer.health(HEALTH_DEADLINE).await;
            // A stalled bridge is reported but keeps 200: restarting the gateway would not
            // help (the upstream or the link is the problem) and loses nothing either way.
            let stalled = crate::bridge::stalled(observer.bridges());
            let mut body = format!(
                "{}\nrouter: {}\nstore: {}\n",
                match (h.ok(), stalled.is_empty()) {
                    (false, _) => "unhealthy",
                    (true, true) => "ok",
                    (true, false) => "degraded",
                },
                if h.router { "ok" } else { "not responding" },
                if h.store || !h.store_state.healthy() {
                    // A writer stuck retrying a locked or failing store does not answer
                    // pings: say why.
                    h.store_state.describe()
                } else {
                    "not responding"
                },
            );
            for name in stalled {
                body.push_str(&format!("bridge {name}: stalled\n"));
            }
            let code = if h.ok() { 200 } else { 503 };
            respond(&mut stream, code, "text/plain", &body, head_only).await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n", head_only).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n",
        body.len()
    );
    if code == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// One metric family: HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (suffix, v) in samples {
        let _ = writeln!(out, "{name}{suffix} {v}");
    }
}

/// A label value with `\`, `"` and newlines escaped (text format 0.0.4).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn one(v: u64) -> [(String, f64); 1] {
    [(String::new(), v as f64)]
}

/// The Prometheus text exposition of a snapshot. Router-derived families are absent when
/// the router did not answer (`holdfast_router_up` says so).
pub fn render(s: &Snapshot, health: Health) -> String {
    let mut o = String::with_capacity(4096);
    family(
        &mut o,
        "holdfast_build_info",
        "gauge",
        "Always 1; the version as a label.",
        &[(
            format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
            1.0,
        )],
    );
    family(
        &mut o,
        "holdfast_uptime_seconds",
        "gauge",
        "Seconds since the gateway started.",
        &[(String::new(), s.uptime.as_secs_f64())],
    );
    family(
        &mut o,
        "holdfast_router_up",
        "gauge",
        "1 if the router answered within the health deadline.",
        &one(u64::from(health.router)),
    );
    family(
        &mut o,
        "holdfast_store_writer_up",
        "gauge",
        "1 if the store writer answered within the health deadline.",
        &one(u64::from(health.store)),
    );
    family(
        &mut o,
        "holdfast_clients_connected",
        "gauge",
        "Client connections that completed CONNECT.",
        &one(s.clients_connected),
    );
    family(
        &mut o,
        "holdfast_clients_idle",
        "gauge",
        "Of the connected clients, idle plain-TCP ones waiting without a task (mqtt.park_idle_ms).",
        &one(s.clients_idle),
    );
    family(
        &mut o,
        "holdfast_connections_rate_limited_total",
        "counter",
        "TCP connections closed right after accept by the per-address rate limit.",
        &one(s.connections_rate_limited),
    );
    family(
        &mut o,
        "holdfast_connections_user_limited_total",
        "counter",
        "CONNECTs refused because the user had max_connections_per_user connected.",
        &one(s.connections_user_limited),
    );
    let per_listener = |f: fn(&(String, u64, u64)) -> u64| -> Vec<(String, f64)> {
        s.traffic
            .iter()
            .map(|t| (format!("{{listener=\"{}\"}}", label(&t.0)), f(t) as f64))
            .collect()
    };
    family(
        &mut o,
        "holdfast_bytes_received_total",
        "counter",
        "Bytes received from MQTT clients, by listener.",
        &per_listener(|t| t.1),
    );
    family(
        &mut o,
        "holdfast_bytes_sent_total",
        "counter",
        "Bytes sent to MQTT clients, by listener.",
        &per_listener(|t| t.2),
    );
    if let (Some(r), Some(dropped)) = (s.router, s.dropped()) {
        family(
            &mut o,
            "holdfast_sessions",
            "gauge",
            "Sessions in memory (online clients and persistent offline sessions).",
            &one(r.sessions),
        );
        family(
            &mut o,
            "holdfast_sessions_durable",
            "gauge",
            "Sessions kept on disk (bridge outboxes included).",
            &one(r.durable_sessions),
        );
        family(
            &mut o,
            "holdfast_sessions_expired_total",
            "counter",
            "Sessions removed because their expiry interval passed.",
            &one(r.stats.sessions_expired),
        );
        family(
            &mut o,
            "holdfast_messages_received_total",
            "counter",
            "PUBLISH packets received from clients.",
            &one(r.stats.publishes_in),
        );
        family(
            &mut o,
            "holdfast_messages_sent_total",
            "counter",
            "PUBLISH packets delivered to sessions.",
            &one(r.stats.publishes_out),
        );
        family(
            &mut o,
            "holdfast_messages_retained",
            "gauge",
            "Retained messages.",
            &one(r.retained),
        );
        let by_reason: Vec<(String, f64)> = dropped
            .iter()
            .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n as f64))
            .collect();
        family(
            &mut o,
            "holdfast_messages_dropped_total",
            "counter",
            "Messages discarded, by reason.",
            &by_reason,
        );
        family(
            &mut o,
            "holdfast_messages_refused_total",
            "counter",
            "QoS 1/2 messages refused because their commit failed (disk full, budget).",
            &one(r.stats.refused_store_failure),
        );
        family(
            &mut o,
            "holdfast_messages_acked_by_upstream_total",
            "counter",
            "QoS 1 publishes acknowledged when a bridge's upstream accepted them, before their outbox row was committed.",
            &one(r.stats.acked_by_upstream),
        );
    }
    family(
        &mut o,
        "holdfast_store_size_bytes",
        "gauge",
        "Size of the store files.",
        &[
            ("{file=\"db\"}".to_string(), s.store_db_bytes as f64),
            ("{file=\"wal\"}".to_string(), s.store_wal_bytes as f64),
        ],
    );
    family(
        &mut o,
        "holdfast_store_commits_total",
        "counter",
        "Group commits that succeeded.",
        &one(s.commits.commits),
    );
    family(
        &mut o,
        "holdfast_store_commit_failures_total",
        "counter",
        "Group commits that failed.",
        &one(s.commits.failures),
    );
    family(
        &mut o,
        "holdfast_store_errors_total",
        "counter",
        "Failed store operations by kind (full, locked, io_error, corrupt).",
        &crate::store::metrics::StoreState::ALL[1..]
            .iter()
            .map(|k| {
                (
                    format!("{{kind=\"{}\"}}", k.name()),
                    s.store_errors.0[*k as usize] as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        &mut o,
        "holdfast_store_read_failures_total",
        "counter",
        "Queue read-backs that failed (asked again; nothing is skipped).",
        &one(s.store_errors.1),
    );
    family(
        &mut o,
        "holdfast_store_state",
        "gauge",
        "1 for the store's current state (ok, full, locked, io_error, corrupt).",
        &crate::store::metrics::StoreState::ALL
            .iter()
            .map(|k| {
                (
                    format!("{{state=\"{}\"}}", k.name()),
                    f64::from(u8::from(health.store_state == *k)),
                )
            })
            .collect::<Vec<_>>(),
    );
    let mut hist: Vec<(String, f64)> = COMMIT_BUCKETS_US
        .iter()
        .zip(&s.commits.cumulative)
        .map(|(le, n)| (format!("_bucket{{le=\"{}\"}}", *le as f64 / 1e6), *n as f64))
        .collect();
    hist.push(("_bucket{le=\"+Inf\"}".into(), s.commits.count as f64));
    hist.push(("_sum".into(), s.commits.sum_us as f64 / 1e6));
    hist.push(("_count".into(), s.commits.count as f64));
    family(
        &mut o,
        "holdfast_store_commit_duration_seconds",
        "histogram",
        "Time to apply and commit one group of batches (fsync included).",
        &hist,
    );
    bridges(&mut o, &s.bridges);
    serial(&mut o, &s.serial);
    o
}

/// `holdfast_bridge_*{bridge="<name>"}`.
fn bridges(o: &mut String, all: &[crate::bridge::BridgeMetrics]) {
    if all.is_empty() {
        return;
    }
    let per = |f: &dyn Fn(&crate::bridge::BridgeMetrics) -> f64| -> Vec<(String, f64)> {
        all.iter()
            .map(|b| (format!("{{bridge=\"{}\"}}", label(&b.name)), f(b)))
            .collect()
    };
    family(
        o,
        "holdfast_bridge_connected",
        "gauge",
        "1 while the bridge's upstream link is up.",
        &per(&|b| f64::from(u8::from(b.connected))),
    );
    family(
        o,
        "holdfast_bridge_address_info",
        "gauge",
        "Always 1; the upstream address in use (or being tried) as a label.",
        &all.iter()
            .map(|b| {
                (
                    format!(
                        "{{bridge=\"{}\",address=\"{}\"}}",
                        label(&b.name),
                        label(&b.address)
                    ),
                    1.0,
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        o,
        "holdfast_bridge_backlog_messages",
        "gauge",
        "Messages in the bridge's outboxes: waiting and in flight upstream.",
        &per(&|b| b.backlog_messages as f64),
    );
    family(
        o,
        "holdfast_bridge_backlog_bytes",
        "gauge",
        "Payload bytes of the messages waiting in the bridge's outboxes (in flight not counted).",
        &per(&|b| b.backlog_bytes as f64),
    );
    family(
        o,
        "holdfast_bridge_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest message in the bridge's outboxes (0 when empty).",
        &per(&|b| b.oldest_age_secs),
    );
    family(
        o,
        "holdfast_bridge_reconnects_total",
        "counter",
        "Successful upstream connections after the first.",
        &per(&|b| b.reconnects as f64),
    );
    let mut results = Vec::new();
    for b in all {
        for (result, n) in [
            ("sent", b.sent),
            ("acked", b.acked),
            ("rejected", b.rejected),
            ("dropped", b.dropped),
        ] {
            results.push((
                format!("{{bridge=\"{}\",result=\"{result}\"}}", label(&b.name)),
                n as f64,
            ));
        }
    }
    family(
        o,
        "holdfast_bridge_messages_total",
        "counter",
        "Bridge messages: sent upstream (resends included), acked by the upstream, rejected (refused by it), dropped (outbox budget, max_age_secs, QoS 0 while offline).",
        &results,
    );
}

/// `holdfast_serial_*{port="<name>"}` and `holdfast_modbus_*{port,device}`.
fn serial(o: &mut String, all: &std::collections::BTreeMap<String, crate::serial::SerialStats>) {
    if all.is_empty() {
        return;
    }
    let per = |f: &dyn Fn(&crate::serial::SerialStats) -> u64| -> Vec<(String, f64)> {
        all.iter()
            .map(|(n, s)| (format!("{{port=\"{}\"}}", label(n)), f(s) as f64))
            .collect()
    };
    family(
        o,
        "holdfast_serial_open",
        "gauge",
        "1 while the serial port is open.",
        &per(&|s| u64::from(s.state == "open")),
    );
    family(
        o,
        "holdfast_serial_opens_total",
        "counter",
        "Successful opens of the serial port (the first included).",
        &per(&|s| s.opens),
    );
    family(
        o,
        "holdfast_serial_bytes_total",
        "counter",
        "Bytes read from the serial port.",
        &per(&|s| s.bytes),
    );
    family(
        o,
        "holdfast_serial_frames_total",
        "counter",
        "Complete frames read from the serial port.",
        &per(&|s| s.frames),
    );
    let mut readings = Vec::new();
    let mut dropped = Vec::new();
    for (n, s) in all {
        let port = label(n);
        for (result, v) in [
            ("published", s.published),
            ("delivered", s.delivered),
            ("refused", s.refused),
        ] {
            readings.push((format!("{{port=\"{port}\",result=\"{result}\"}}"), v as f64));
        }
        for (reason, v) in [
            ("too_long", s.dropped_too_long),
            ("utf8", s.dropped_utf8),
            ("malformed", s.dropped_malformed),
            ("checksum", s.dropped_checksum),
            ("topic", s.dropped_topic),
        ] {
            dropped.push((format!("{{port=\"{port}\",reason=\"{reason}\"}}"), v as f64));
        }
    }
    family(
        o,
        "holdfast_serial_readings_total",
        "counter",
        "Readings handed to the broker (published), committed (delivered), refused (retried).",
        &readings,
    );
    family(
        o,
        "holdfast_serial_readings_in_flight",
        "gauge",
        "Readings handed to the broker and not yet acknowledged.",
        &per(&|s| s.inflight),
    );
    family(
        o,
        "holdfast_serial_dropped_total",
        "counter",
        "Input the serial port discarded, by reason.",
        &dropped,
    );
    let mut polls = Vec::new();
    for (n, s) in all {
        for (d, st) in &s.devices {
            for (result, v) in [
                ("ok", st.ok),
                ("timeout", st.timeouts),
                ("exception", st.exceptions),
                ("error", st.errors),
            ] {
                polls.push((
                    format!(
                        "{{port=\"{}\",device=\"{}\",result=\"{result}\"}}",
                        label(n),
                        label(d)
                    ),
                    v as f64,
                ));
            }
        }
    }
    family(
        o,
        "holdfast_modbus_polls_total",
        "counter",
        "Modbus register polls by device and result (ok, timeout, exception, error = garbled or mismatched answer).",
        &polls,
    );
}
