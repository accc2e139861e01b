//! [`Observer`]: where every figure of the running gateway is gathered.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::broker::client::{BrokerHandle, RouterSnapshot};
use crate::store::metrics::{CommitCounts, LatencySummary};
use crate::store::StoreProbe;

/// How long the router may take to answer a stats request for a snapshot.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(2);

/// The figures of one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub uptime: Duration,
    /// Connections that completed CONNECT.
    pub clients_connected: u64,
    /// Of those, idle clients waiting without a task (`mqtt.park_idle_ms`).
    pub clients_idle: u64,
    /// None when the router did not answer in time.
    pub router: Option<RouterSnapshot>,
    pub store_db_bytes: u64,
    pub store_wal_bytes: u64,
    pub commits: CommitCounts,
    /// Failed store operations per `StoreState::ALL` kind, and failed queue read-backs.
    pub store_errors: ([u64; 5], u64),
    /// Commit latency over the last completed interval.
    pub latency: LatencySummary,
    /// Length of that interval.
    pub latency_interval: Duration,
    /// Per listener: `(bind, bytes received, bytes sent)` (see `broker::traffic`).
    pub traffic: Vec<(String, u64, u64)>,
    /// TCP connections closed by the per-address rate limit.
    pub connections_rate_limited: u64,
    /// CONNECTs refused by `auth.max_connections_per_user`.
    pub connections_user_limited: u64,
    /// Per bridge (by name).
    pub bridges: Vec<crate::bridge::BridgeMetrics>,
    /// Per serial port (by name), Modbus devices inside.
    pub serial: std::collections::BTreeMap<String, crate::serial::SerialStats>,
}

impl Snapshot {
    /// Bytes received from clients over all listeners.
    pub fn bytes_received(&self) -> u64 {
        self.traffic.iter().map(|t| t.1).sum()
    }

    /// Bytes sent to clients over all listeners.
    pub fn bytes_sent(&self) -> u64 {
        self.traffic.iter().map(|t| t.2).sum()
    }

    /// Every message dropped, whatever the reason.
    pub fn dropped_total(&self) -> Option<u64> {
        self.router.map(|r| {
            let s = r.stats;
            s.dropped_queue_full
                + s.dropped_qos0_backlog
                + s.dropped_qos0_bridge_offline
                + s.dropped_too_large
                + s.dropped_disk_budget
                + s.expired
        })
    }

    /// `(reason, count)` for each drop reason (labels of `holdfast_messages_dropped_total`
    /// and leaves of `$SYS/holdfast/messages/dropped/`).
    pub fn dropped(&self) -> Option<[(&'static str, u64); 6]> {
        self.router.map(|r| {
            let s = r.stats;
            [
                ("queue_full", s.dropped_queue_full),
                ("qos0_backlog", s.dropped_qos0_backlog),
                ("qos0_bridge_offline", s.dropped_qos0_bridge_offline),
                ("too_large", s.dropped_too_large),
                ("disk_budget", s.dropped_disk_budget),
                ("expired", s.expired),
            ]
        })
    }
}

/// Whether the router and the store writer answered within the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    pub router: bool,
    /// The writer answers.
    pub store: bool,
    /// What the writer last found (`StoreState`: full, locked, I/O error, corrupt).
    pub store_state: crate::store::metrics::StoreState,
}

impl Health {
    pub fn ok(&self) -> bool {
        self.router && self.store && self.store_state.healthy()
    }
}

/// Gathers figures from the router, the store writer and the connection count.
pub struct Observer {
    started: Instant,
    broker: BrokerHandle,
    store: StoreProbe,
    /// The bridges' live status (stalled bridges fail `/healthz`).
    bridges: Arc<crate::bridge::BridgeShared>,
    /// The serial ports' latest counters.
    serial: crate::serial::SerialRegistry,
    data_dir: PathBuf,
    /// (summary, interval length, when it was rolled).
    last_interval: Mutex<(LatencySummary, Duration, Instant)>,
}

impl Observer {
    pub fn new(
        broker: BrokerHandle,
        store: StoreProbe,
        bridges: Arc<crate::bridge::BridgeShared>,
        serial: crate::serial::SerialRegistry,
        data_dir: PathBuf,
    ) -> Observer {
        let now = Instant::now();
        Observer {
            started: now,
            broker,
            store,
            bridges,
            serial,
            data_dir,
            last_interval: Mutex::new((LatencySummary::default(), Duration::ZERO, now)),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The broker core's client API.
    pub fn broker(&self) -> &BrokerHandle {
        &self.broker
    }

    pub fn bridges(&self) -> &Arc<crate::bridge::BridgeShared> {
        &self.bridges
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Asks the router for its figures; None if it does not answer within `deadline`
    /// (busy beyond reason, wedged, or stopped).
    pub async fn router_snapshot(&self, deadline: Duration) -> Option<RouterSnapshot> {
        let ask = self.broker.snapshot();
        tokio::time::timeout(deadline, ask).await.ok().flatten()
    }

    /// Pings the router and the store writer concurrently, each under `deadline`.
    pub async fn health(&self, deadline: Duration) -> Health {
        let router = self.router_snapshot(deadline);
        let store = tokio::time::timeout(deadline, self.store.ping());
        let (router, store) = tokio::join!(router, store);
        Health {
            router: router.is_some(),
            store: store.unwrap_or(false),
            store_state: self.store.metrics().state(),
        }
    }

    /// Drains the commit-latency samples recorded since the last call into p50/p99
    /// figures, kept for [`Observer::snapshot`] until the next call.
    pub fn roll_interval(&self) -> LatencySummary {
        let summary = self.store.metrics().drain_interval();
        let now = Instant::now();
        if let Ok(mut last) = self.last_interval.lock() {
            let took = now.duration_since(last.2);
            *last = (summary, took, now);
        }
        summary
    }

    /// Everything at once (the router under a short deadline).
    pub async fn snapshot(&self) -> Snapshot {
        let router = self.router_snapshot(SNAPSHOT_DEADLINE).await;
        let db = crate::store::db_path(&self.data_dir);
        let bridges = tokio::time::timeout(
            SNAPSHOT_DEADLINE,
            crate::bridge::metrics(&self.bridges, &db),
        )
        .await
        .unwrap_or_default();
        let serial = self.serial.lock().map(|s| s.clone()).unwrap_or_default();
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let (latency, latency_interval) = self
            .last_interval
            .lock()
            .map(|l| (l.0, l.1))
            .unwrap_or_default();
        let connections = self.broker.connections();
        Snapshot {
            uptime: self.uptime(),
            clients_connected: connections.connected,
            clients_idle: connections.idle,
            router,
            store_db_bytes: size(db),
            store_wal_bytes: size(PathBuf::from(wal)),
            commits: self.store.metrics().counts(),
            store_errors: self.store.metrics().error_counts(),
            latency,
            latency_interval,
            traffic: connections.traffic,
            connections_rate_limited: connections.rate_limited,
            connections_user_limited: connections.user_limited,
            bridges,
            serial,
        }
    }
}
