//! `holdfast status`: the running gateway's figures, gathered for the admin socket's
//! `status` request. The typed [`GatewayStatus`] is what travels (as JSON) to the CLI,
//! which formats it (`crate::cli`); `status --json` prints it as it came.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Health, Observer};

/// How long the router and the writer may take to answer for `status`.
const STATUS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The running gateway at one moment (`holdfast status --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub health: Health,
    pub clients: ClientFigures,
    pub traffic: TrafficFigures,
    /// None when the router did not answer within the deadline.
    pub router: Option<RouterFigures>,
    pub store: StoreFigures,
    /// Filled in by the admin socket (with the age of each outbox's oldest message).
    #[serde(default)]
    pub bridges: Vec<crate::admin::BridgeReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientFigures {
    pub connected: u64,
    /// Sockets refused by the per-address connection rate limit.
    pub rate_limited: u64,
    /// CONNECTs refused by `auth.max_connections_per_user`.
    pub user_limited: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrafficFigures {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub listeners: Vec<ListenerTraffic>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListenerTraffic {
    pub bind: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterFigures {
    pub sessions: SessionFigures,
    pub messages: MessageFigures,
    pub sessions_expired: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionFigures {
    pub total: u64,
    pub durable: u64,
    pub online: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MessageFigures {
    pub received: u64,
    pub sent: u64,
    pub retained: u64,
    pub refused_store_failure: u64,
    pub acked_by_upstream: u64,
    /// By reason (`queue_full`, `qos0_backlog`, ...), and `total`.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreFigures {
    pub db_bytes: u64,
    pub wal_bytes: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub commit_latency: LatencyFigures,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyFigures {
    pub interval_secs: f64,
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Gathers the status (without `bridges`, which the admin socket adds).
pub async fn gather(observer: &Observer) -> GatewayStatus {
    let health = observer.health(STATUS_DEADLINE).await;
    let s = observer.snapshot().await;
    let router = s.router.map(|r| {
        let mut dropped: BTreeMap<String, u64> = s
            .dropped()
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, n)| (reason.to_string(), n))
            .collect();
        dropped.insert("total".into(), s.dropped_total().unwrap_or(0));
        RouterFigures {
            sessions: SessionFigures {
                total: r.sessions,
                durable: r.durable_sessions,
                online: r.online_sessions,
            },
            messages: MessageFigures {
                received: r.stats.publishes_in,
                sent: r.stats.publishes_out,
                retained: r.retained,
                refused_store_failure: r.stats.refused_store_failure,
                acked_by_upstream: r.stats.acked_by_upstream,
                dropped,
            },
            sessions_expired: r.stats.sessions_expired,
        }
    });
    GatewayStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: s.uptime.as_secs(),
        health,
        clients: ClientFigures {
            connected: s.clients_connected,
            rate_limited: s.connections_rate_limited,
            user_limited: s.connections_user_limited,
        },
        traffic: TrafficFigures {
            bytes_received: s.bytes_received(),
            bytes_sent: s.bytes_sent(),
            listeners: s
                .traffic
                .iter()
                .map(|(bind, received, sent)| ListenerTraffic {
                    bind: bind.clone(),
                    bytes_received: *received,
                    bytes_sent: *sent,
                })
                .collect(),
        },
        router,
        store: StoreFigures {
            db_bytes: s.store_db_bytes,
            wal_bytes: s.store_wal_bytes,
            commits: s.commits.commits,
            commit_failures: s.commits.failures,
            commit_latency: LatencyFigures {
                interval_secs: s.latency_interval.as_secs_f64(),
                count: s.latency.count,
                p50_us: u64::from(s.latency.p50_us),
                p99_us: u64::from(s.latency.p99_us),
                max_us: u64::from(s.latency.max_us),
            },
        },
        bridges: Vec::new(),
    }
}
