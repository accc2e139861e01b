//! `holdfast status`: the running gateway's figures as JSON (admin socket command `status`)
//! and as one screen of text.

use serde_json::{json, Value};

use super::{Health, Observer};

/// How long the router and the writer may take to answer for `status`.
const STATUS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The `status` object (without `bridges`, which the admin socket adds).
pub async fn json(observer: &Observer) -> Value {
    let health = observer.health(STATUS_DEADLINE).await;
    let s = observer.snapshot().await;
    let router = s.router.map(|r| {
        let mut dropped = serde_json::Map::new();
        for (reason, n) in s.dropped().unwrap_or_default() {
            dropped.insert(reason.to_string(), json!(n));
        }
        dropped.insert("total".into(), json!(s.dropped_total().unwrap_or(0)));
        json!({
            "sessions": {
                "total": r.sessions,
                "durable": r.durable_sessions,
                "online": r.online_sessions,
            },
            "messages": {
                "received": r.stats.publishes_in,
                "sent": r.stats.publishes_out,
                "retained": r.retained,
                "refused_store_failure": r.stats.refused_store_failure,
                "acked_by_upstream": r.stats.acked_by_upstream,
                "dropped": dropped,
            },
            "sessions_expired": r.stats.sessions_expired,
        })
    });
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": s.uptime.as_secs(),
        "health": health,
        "clients": {
            "connected": s.clients_connected,
            "rate_limited": s.connections_rate_limited,
            "user_limited": s.connections_user_limited,
        },
        "traffic": {
            "bytes_received": s.bytes_received(),
            "bytes_sent": s.bytes_sent(),
            "listeners": s.traffic.iter().map(|(bind, received, sent)| json!({
                "bind": bind, "bytes_received": received, "bytes_sent": sent,
            })).collect::<Vec<_>>(),
        },
        "router": router,
        "store": {
            "db_bytes": s.store_db_bytes,
            "wal_bytes": s.store_wal_bytes,
            "commits": s.commits.commits,
            "commit_failures": s.commits.failures,
            "commit_latency": {
                "interval_secs": s.latency_interval.as_secs_f64(),
                "count": s.latency.count,
                "p50_us": s.latency.p50_us,
                "p99_us": s.latency.p99_us,
                "max_us": s.latency.max_us,
            },
        },
    })
}

fn bytes_text(n: u64) -> String {
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

/// One screen for people.
pub fn format(v: &Value, now_ms: i64) -> String {
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    let state_name = v.pointer("/health/store_state").and_then(Value::as_str);
    let health: Health = Health {
        router: v.pointer("/health/router").and_then(Value::as_bool) == Some(true),
        store: v.pointer("/health/store").and_then(Value::as_bool) == Some(true),
        store_state: crate::store::metrics::StoreState::ALL
            .into_iter()
            .find(|k| Some(k.name()) == state_name)
            .unwrap_or(crate::store::metrics::StoreState::Ok),
    };
    let health_text = match (health.router, health.store, health.store_state.healthy()) {
        (true, true, true) if health.store_state == crate::store::metrics::StoreState::Ok => {
            "healthy".to_string()
        }
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
    out.push_str(&format!(
        "holdfast {} (pid {}), up {}, {}\n",
        v["version"].as_str().unwrap_or("?"),
        n("/pid"),
        crate::admin::human_secs(n("/uptime_secs") as i64),
        health_text
    ));
    let mut refused = Vec::new();
    if n("/clients/rate_limited") > 0 {
        refused.push(format!("{} rate-limited", n("/clients/rate_limited")));
    }
    if n("/clients/user_limited") > 0 {
        refused.push(format!(
            "{} over the per-user limit",
            n("/clients/user_limited")
        ));
    }
    out.push_str(&format!(
        "clients:   {} connected{}\n",
        n("/clients/connected"),
        if refused.is_empty() {
            String::new()
        } else {
            format!("; refused: {}", refused.join(", "))
        }
    ));
    out.push_str(&format!(
        "traffic:   {} received, {} sent\n",
        bytes_text(n("/traffic/bytes_received")),
        bytes_text(n("/traffic/bytes_sent")),
    ));
    if v["router"].is_null() {
        out.push_str("sessions:  ? (the router did not answer)\n");
    } else {
        out.push_str(&format!(
            "sessions:  {} ({} durable, {} online), {} expired since start\n",
            n("/router/sessions/total"),
            n("/router/sessions/durable"),
            n("/router/sessions/online"),
            n("/router/sessions_expired"),
        ));
        out.push_str(&format!(
            "messages:  {} received, {} sent, {} retained\n",
            n("/router/messages/received"),
            n("/router/messages/sent"),
            n("/router/messages/retained"),
        ));
        let total = n("/router/messages/dropped/total");
        let refused = n("/router/messages/refused_store_failure");
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
                let c = n(&format!("/router/messages/dropped/{k}"));
                (c > 0).then(|| format!("{label} {c}"))
            })
            .collect();
            format!("{total} ({})", parts.join(", "))
        };
        if refused > 0 {
            drops.push_str(&format!("; {refused} refused (store failure)"));
        }
        out.push_str(&format!("dropped:   {drops}\n"));
    }
    let (db, wal) = (n("/store/db_bytes"), n("/store/wal_bytes"));
    out.push_str(&format!(
        "store:     {} (db {} + wal {}), {} commits, {} failed\n",
        bytes_text(db + wal),
        bytes_text(db),
        bytes_text(wal),
        n("/store/commits"),
        n("/store/commit_failures"),
    ));
    let count = n("/store/commit_latency/count");
    let secs = v
        .pointer("/store/commit_latency/interval_secs")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    if count == 0 {
        out.push_str(&format!("commits:   none in the last {secs:.0} s\n"));
    } else {
        out.push_str(&format!(
            "commits:   p50 {}, p99 {}, max {} over the last {secs:.0} s ({count} commits)\n",
            ms_text(n("/store/commit_latency/p50_us")),
            ms_text(n("/store/commit_latency/p99_us")),
            ms_text(n("/store/commit_latency/max_us")),
        ));
    }
    let bridges = v["bridges"].as_array().cloned().unwrap_or_default();
    if bridges.is_empty() {
        out.push_str("bridges:   none\n");
    } else {
        out.push_str("bridges:\n");
        for line in crate::admin::format_bridges(&bridges, now_ms).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_full_status() {
        let v = json!({
            "version": "0.1.0", "pid": 42, "uptime_secs": 3725,
            "health": {"router": true, "store": true},
            "clients": {"connected": 3, "rate_limited": 4, "user_limited": 0},
            "traffic": {"bytes_received": 2048, "bytes_sent": 100, "listeners": []},
            "router": {
                "sessions": {"total": 5, "durable": 2, "online": 3},
                "messages": {"received": 10, "sent": 20, "retained": 1, "refused_store_failure": 0,
                    "dropped": {"queue_full": 2, "qos0_backlog": 0, "too_large": 0,
                        "disk_budget": 0, "expired": 1, "total": 3}},
                "sessions_expired": 0
            },
            "store": {"db_bytes": 4096, "wal_bytes": 0, "commits": 7, "commit_failures": 0,
                "commit_latency": {"interval_secs": 10.0, "count": 4, "p50_us": 1200,
                    "p99_us": 8400, "max_us": 9000}},
            "bridges": []
        });
        let text = format(&v, 0);
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
        let v = json!({"version": "0.1.0", "health": {"router": false, "store": true},
            "router": null, "store": {}});
        let text = format(&v, 0);
        assert!(text.contains("UNHEALTHY (router not answering)"), "{text}");
        assert!(text.contains("the router did not answer"), "{text}");
    }
}
