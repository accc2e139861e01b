//! All text the operator commands print for people: the `sessions list|show` tables and
//! reports, `bridge status`, `holdfast status`. Pure functions of typed data (from
//! `store::inspect` and the admin socket's replies) and the current time; `--json`
//! prints the same data as it is, without passing through here.

use std::fmt::Write as _;

use crate::admin::BridgeReport;
use crate::observe::status::GatewayStatus;
use crate::store::inspect::{SessionDetail, SessionSummary};
use crate::store::metrics::StoreState;

/// `5s`, `4m10s`, `3h2m`, `6d23h`.
pub fn human_secs(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Client ids are printed as they are unless they contain spaces, quotes or control
/// characters; then they are quoted and escaped.
pub fn display_id(id: &str) -> String {
    if id.is_empty()
        || id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    {
        format!("\"{}\"", id.escape_debug())
    } else {
        id.to_string()
    }
}

fn state_text(s: &SessionSummary, now_ms: i64) -> String {
    match s.disconnected_at_ms {
        None => "online".to_string(),
        Some(at) => format!("offline {}", human_secs((now_ms - at) / 1000)),
    }
}

fn expiry_text(s: &SessionSummary, now_ms: i64) -> String {
    match (s.expiry_interval_secs, s.expires_at_ms) {
        (None, _) => "never".to_string(),
        (Some(_), Some(at)) if at <= now_ms => "due".to_string(),
        (Some(_), Some(at)) => format!("in {}", human_secs((at - now_ms + 999) / 1000)),
        (Some(i), None) => human_secs(i64::from(i)),
    }
}

fn bytes_text(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, v) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(v);
            } else {
                let _ = write!(line, "{v:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `sessions list` table.
pub fn format_list(sessions: &[SessionSummary], now_ms: i64) -> String {
    let mut rows = vec![[
        "CLIENT ID",
        "PROTO",
        "STATE",
        "EXPIRY",
        "QUEUED",
        "BYTES",
        "INFLIGHT",
        "DROPPED",
        "SUBS",
    ]
    .map(String::from)
    .to_vec()];
    for s in sessions {
        rows.push(vec![
            display_id(&s.client_id),
            s.protocol.to_string(),
            state_text(s, now_ms),
            expiry_text(s, now_ms),
            s.queued.to_string(),
            s.queued_bytes.to_string(),
            s.inflight.to_string(),
            s.dropped.to_string(),
            s.subscriptions.to_string(),
        ]);
    }
    let mut out = table(&rows);
    let _ = writeln!(out, "{} durable session(s)", sessions.len());
    out
}

/// The `sessions show` report.
pub fn format_detail(d: &SessionDetail, now_ms: i64) -> String {
    let s = &d.session;
    let mut out = String::new();
    let _ = writeln!(out, "client id:       {}", display_id(&s.client_id));
    let _ = writeln!(out, "protocol:        MQTT {}", s.protocol);
    let _ = writeln!(out, "state:           {}", state_text(s, now_ms));
    let interval = s
        .expiry_interval_secs
        .map_or("never".to_string(), |i| human_secs(i64::from(i)));
    let _ = writeln!(
        out,
        "session expiry:  {interval}{}",
        match s.expires_at_ms {
            Some(_) => format!(" (expires {})", expiry_text(s, now_ms)),
            None => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "queue:           {} message(s), {} ({} in flight), {} dropped",
        s.queued,
        bytes_text(s.queued_bytes),
        s.inflight,
        s.dropped
    );
    let will = match &d.will {
        None => "none".to_string(),
        Some(w) => format!(
            "{} (QoS {}, {}retain, {} bytes, delay {})",
            w.topic
                .as_deref()
                .map_or("<undecodable>".to_string(), display_id),
            w.qos.unwrap_or(0),
            if w.retain == Some(true) { "" } else { "no " },
            w.payload_bytes.unwrap_or(0),
            human_secs(i64::from(w.delay_secs))
        ),
    };
    let _ = writeln!(out, "pending will:    {will}");
    let qos2 = if d.incoming_qos2.is_empty() {
        "none".to_string()
    } else {
        d.incoming_qos2
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "incoming QoS 2:  {qos2}");
    let _ = writeln!(out, "\nsubscriptions ({}):", d.subscriptions.len());
    if !d.subscriptions.is_empty() {
        let mut rows = vec![
            ["FILTER", "QOS", "NO-LOCAL", "RAP", "RETAIN-HANDLING", "ID"]
                .map(String::from)
                .to_vec(),
        ];
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        for sub in &d.subscriptions {
            rows.push(vec![
                display_id(&sub.filter),
                sub.qos.to_string(),
                yes_no(sub.no_local),
                yes_no(sub.retain_as_published),
                sub.retain_handling.to_string(),
                sub.identifier.map_or("-".to_string(), |i| i.to_string()),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(
        out,
        "\nqueued messages (first {} of {}):",
        d.queue.len(),
        s.queued
    );
    if !d.queue.is_empty() {
        let mut rows = vec![
            ["SEQ", "STATE", "PKT-ID", "QOS", "SIZE", "EXPIRES", "TOPIC"]
                .map(String::from)
                .to_vec(),
        ];
        for q in &d.queue {
            rows.push(vec![
                q.seq.to_string(),
                q.state.to_string(),
                q.packet_id.map_or("-".to_string(), |p| p.to_string()),
                q.qos.map_or("?".to_string(), |q| q.to_string()),
                q.size.to_string(),
                match q.expires_at_ms {
                    None => "never".to_string(),
                    Some(at) if at <= now_ms => "expired".to_string(),
                    Some(at) => format!("in {}", human_secs((at - now_ms + 999) / 1000)),
                },
                q.topic
                    .as_deref()
                    .map_or("<undecodable>".to_string(), display_id),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// The `bridge status` table.
pub fn format_bridges(items: &[BridgeReport], now_ms: i64) -> String {
    let mut rows = vec![[
        "BRIDGE",
        "ADDRESS",
        "STATE",
        "BACKLOG",
        "BYTES",
        "INFLIGHT",
        "OLDEST",
        "SENT",
        "ACKED",
        "REJECTED",
        "DROPPED",
        "LAST ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for r in items {
        let v = &r.status;
        let up_for = human_secs((now_ms - v.since_ms) / 1000);
        let state = if v.connected {
            format!("connected {up_for}")
        } else {
            format!("down {up_for}")
        };
        // Messages wait and nothing was acknowledged for `stall_secs`.
        let state = if v.stalled {
            format!("STALLED, {state}")
        } else {
            state
        };
        let outbox = r.outbox.unwrap_or_default();
        let oldest = r
            .oldest_enqueued_ms
            .map(|t| human_secs((now_ms - t).max(0) / 1000))
            .unwrap_or_else(|| "-".into());
        rows.push(vec![
            v.name.clone(),
            v.address.clone(),
            state,
            outbox.queued.to_string(),
            bytes_text(outbox.queued_bytes),
            outbox.inflight.to_string(),
            oldest,
            v.sent.to_string(),
            v.acked.to_string(),
            v.rejected.to_string(),
            outbox.dropped.to_string(),
            v.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&rows)
}

/// `1.5 KiB`, `2.0 GiB`: powers of 1024 from 1 KiB on (`holdfast status`).
fn iec_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn ms_text(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// `holdfast status`: one screen for people.
pub fn format_status(v: &GatewayStatus, now_ms: i64) -> String {
    let mut out = String::new();
    let health = v.health;
    let health_text = match (health.router, health.store, health.store_state.healthy()) {
        (true, true, true) if health.store_state == StoreState::Ok => "healthy".to_string(),
        (true, true, true) => format!("healthy (store {})", health.store_state.describe()),
        (r, s, ok) => format!(
            "UNHEALTHY ({})",
            [
                (!r).then_some("router not answering"),
                (!s).then_some("store writer not answering"),
                (!ok).then_some(health.store_state.describe()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        ),
    };
    let _ = writeln!(
        out,
        "holdfast {} (pid {}), up {}, {}",
        v.version,
        v.pid,
        human_secs(v.uptime_secs as i64),
        health_text
    );
    let c = &v.clients;
    let mut refused = Vec::new();
    if c.rate_limited > 0 {
        refused.push(format!("{} rate-limited", c.rate_limited));
    }
    if c.user_limited > 0 {
        refused.push(format!("{} over the per-user limit", c.user_limited));
    }
    let _ = writeln!(
        out,
        "clients:   {} connected{}",
        c.connected,
        if refused.is_empty() {
            String::new()
        } else {
            format!("; refused: {}", refused.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "traffic:   {} received, {} sent",
        iec_bytes(v.traffic.bytes_received),
        iec_bytes(v.traffic.bytes_sent),
    );
    match &v.router {
        None => out.push_str("sessions:  ? (the router did not answer)\n"),
        Some(r) => {
            let _ = writeln!(
                out,
                "sessions:  {} ({} durable, {} online), {} expired since start",
                r.sessions.total, r.sessions.durable, r.sessions.online, r.sessions_expired,
            );
            let m = &r.messages;
            let _ = writeln!(
                out,
                "messages:  {} received, {} sent, {} retained",
                m.received, m.sent, m.retained,
            );
            let dropped = |k: &str| m.dropped.get(k).copied().unwrap_or(0);
            let total = dropped("total");
            let mut drops = if total == 0 {
                "none".to_string()
            } else {
                let parts: Vec<String> = [
                    ("queue_full", "queue full"),
                    ("qos0_backlog", "QoS 0 backlog"),
                    ("qos0_bridge_offline", "QoS 0 bridge offline"),
                    ("too_large", "too large"),
                    ("disk_budget", "disk budget"),
                    ("expired", "expired"),
                ]
                .iter()
                .filter_map(|(k, label)| {
                    let c = dropped(k);
                    (c > 0).then(|| format!("{label} {c}"))
                })
                .collect();
                format!("{total} ({})", parts.join(", "))
            };
            if m.refused_store_failure > 0 {
                let _ = write!(
                    drops,
                    "; {} refused (store failure)",
                    m.refused_store_failure
                );
            }
            let _ = writeln!(out, "dropped:   {drops}");
        }
    }
    let s = &v.store;
    let _ = writeln!(
        out,
        "store:     {} (db {} + wal {}), {} commits, {} failed",
        iec_bytes(s.db_bytes + s.wal_bytes),
        iec_bytes(s.db_bytes),
        iec_bytes(s.wal_bytes),
        s.commits,
        s.commit_failures,
    );
    let l = &s.commit_latency;
    let secs = l.interval_secs;
    if l.count == 0 {
        let _ = writeln!(out, "commits:   none in the last {secs:.0} s");
    } else {
        let _ = writeln!(
            out,
            "commits:   p50 {}, p99 {}, max {} over the last {secs:.0} s ({} commits)",
            ms_text(l.p50_us),
            ms_text(l.p99_us),
            ms_text(l.max_us),
            l.count,
        );
    }
    if v.bridges.is_empty() {
        out.push_str("bridges:   none\n");
    } else {
        out.push_str("bridges:\n");
        for line in format_bridges(&v.bridges, now_ms).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::status::{
        ClientFigures, LatencyFigures, MessageFigures, RouterFigures, SessionFigures, StoreFigures,
        TrafficFigures,
    };
    use crate::observe::Health;

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(250), "4m10s");
        assert_eq!(human_secs(3 * 3600 + 120), "3h2m");
        assert_eq!(human_secs(7 * 86_400), "7d0h");
        assert_eq!(display_id("a b"), "\"a b\"");
        assert_eq!(display_id("ab"), "ab");
    }

    fn status(router: Option<RouterFigures>, health: Health) -> GatewayStatus {
        GatewayStatus {
            version: "0.1.0".into(),
            pid: 42,
            uptime_secs: 3725,
            health,
            clients: ClientFigures {
                connected: 3,
                rate_limited: 4,
                user_limited: 0,
            },
            traffic: TrafficFigures {
                bytes_received: 2048,
                bytes_sent: 100,
                listeners: Vec::new(),
            },
            router,
            store: StoreFigures {
                db_bytes: 4096,
                wal_bytes: 0,
                commits: 7,
                commit_failures: 0,
                commit_latency: LatencyFigures {
                    interval_secs: 10.0,
                    count: 4,
                    p50_us: 1200,
                    p99_us: 8400,
                    max_us: 9000,
                },
            },
            bridges: Vec::new(),
        }
    }

    #[test]
    fn formats_a_full_status() {
        let dropped = [("queue_full", 2), ("expired", 1), ("total", 3)]
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect();
        let router = RouterFigures {
            sessions: SessionFigures {
                total: 5,
                durable: 2,
                online: 3,
            },
            messages: MessageFigures {
                received: 10,
                sent: 20,
                retained: 1,
                dropped,
                ..Default::default()
            },
            sessions_expired: 0,
        };
        let healthy = Health {
            router: true,
            store: true,
            store_state: StoreState::Ok,
        };
        let text = format_status(&status(Some(router), healthy), 0);
        assert!(
            text.starts_with("holdfast 0.1.0 (pid 42), up 1h2m, healthy\n"),
            "{text}"
        );
        assert!(
            text.contains("clients:   3 connected; refused: 4 rate-limited\n"),
            "{text}"
        );
        assert!(
            text.contains("traffic:   2.0 KiB received, 100 B sent"),
            "{text}"
        );
        assert!(text.contains("5 (2 durable, 3 online)"), "{text}");
        assert!(
            text.contains("dropped:   3 (queue full 2, expired 1)"),
            "{text}"
        );
        assert!(text.contains("p50 1.2 ms, p99 8.4 ms"), "{text}");
        assert!(text.contains("bridges:   none"), "{text}");
    }

    #[test]
    fn says_when_the_router_does_not_answer() {
        let health = Health {
            router: false,
            store: true,
            store_state: StoreState::Ok,
        };
        let text = format_status(&status(None, health), 0);
        assert!(text.contains("UNHEALTHY (router not answering)"), "{text}");
        assert!(text.contains("the router did not answer"), "{text}");
    }

    #[test]
    fn the_status_json_keeps_its_shape() {
        // `holdfast status --json` is read by scripts: the typed status serializes to the
        // same keys the untyped one had.
        let v = serde_json::to_value(status(
            None,
            Health {
                router: true,
                store: true,
                store_state: StoreState::Ok,
            },
        ))
        .unwrap();
        for key in [
            "/version",
            "/pid",
            "/uptime_secs",
            "/health/router",
            "/health/store_state",
            "/clients/connected",
            "/clients/rate_limited",
            "/traffic/bytes_received",
            "/traffic/listeners",
            "/router",
            "/store/db_bytes",
            "/store/commit_latency/p99_us",
            "/bridges",
        ] {
            assert!(v.pointer(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["health"]["store_state"], "ok");
    }
}
