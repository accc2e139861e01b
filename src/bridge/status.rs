//! What a bridge reports: its live status (`holdfast bridge status`, the admin socket,
//! `/healthz`), `$SYS/holdfast/bridge/<name>/{state,stats}`, and the "stalled" verdict.
//!
//! Stalled: the outboxes hold messages (queued or in flight) and the upstream acknowledged
//! none of them for `stall_secs`, whether or not the link is up (a link that is "connected"
//! while nothing moves is the case this exists for). Checked once a second by
//! [`watch`]; the state topic then says `stalled` instead of `connected`/`disconnected`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::BridgeShared;
use crate::broker::client::SessionStats;

/// Live status of one bridge (`holdfast bridge status`, `$SYS/holdfast/bridge/<name>/...`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct BridgeStatus {
    pub name: String,
    /// The upstream address in use (connected) or being tried.
    pub address: String,
    /// Every configured address, primary first.
    pub addresses: Vec<String>,
    pub client_id: String,
    pub connected: bool,
    /// The outboxes hold messages and none was acknowledged for `stall_secs`.
    pub stalled: bool,
    /// Unix ms of the last change of `connected`.
    pub since_ms: i64,
    pub last_error: Option<String>,
    /// Messages handed to the upstream connection (resends included).
    pub sent: u64,
    /// Messages the upstream acknowledged (PUBACK, or PUBCOMP for QoS 2): each deletes
    /// one from the outbox.
    pub acked: u64,
    /// Unix ms of the last acknowledgement from upstream (0 = none since start).
    pub last_ack_ms: i64,
    /// Messages the upstream refused (v5 reason code >= 0x80 other than 0x97), could never
    /// take (larger than its Maximum Packet Size), or answered by closing the connection
    /// `reject_after_closes` times in a row: removed from the outbox, logged and counted.
    pub rejected: u64,
    /// QoS 0 messages the link lost: held back (behind a higher priority or the in-flight
    /// byte bound) when the connection dropped. QoS 0 messages that arrive while the
    /// bridge is disconnected are counted in the outbox's `dropped`.
    pub dropped_qos0: u64,
    /// Messages received from upstream (downlink).
    pub received: u64,
    /// Successful connections since start.
    pub connects: u64,
    /// Client ids of its outboxes (internal sessions), highest priority first.
    pub outboxes: Vec<String>,
}

/// How often the bridge publishes its statistics under `$SYS`.
const STATS_EVERY: Duration = Duration::from_secs(10);
/// How often the stall verdict is checked.
const STALL_CHECK: Duration = Duration::from_secs(1);

/// What the bridge task shares with [`watch`]: when the upstream last acknowledged
/// something (a monotonic clock, so a stepping wall clock cannot fake a stall).
pub(super) struct Progress {
    start: Instant,
    /// Milliseconds since `start` of the last acknowledgement.
    last_ack: AtomicU64,
    /// Whether the link is up (for the state topic).
    pub connected: AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            start: Instant::now(),
            last_ack: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        })
    }

    pub fn acked_now(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ack.store(ms, Ordering::Relaxed);
    }

    fn last_ack(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ack.load(Ordering::Relaxed))
    }
}

/// The value of `$SYS/holdfast/bridge/<name>/state`.
pub(super) fn state_word(connected: bool, stalled: bool) -> &'static str {
    match (stalled, connected) {
        (true, _) => "stalled",
        (false, true) => "connected",
        (false, false) => "disconnected",
    }
}

/// Publishes a retained `$SYS/holdfast/bridge/<name>/<leaf>` message locally.
pub(super) async fn sys(shared: &BridgeShared, name: &str, leaf: &str, payload: Vec<u8>) {
    let topic = format!("$SYS/holdfast/bridge/{name}/{leaf}");
    let _ = shared.broker.sys(topic, payload).await;
}

/// Checks for a stall every second and publishes the statistics every `STATS_EVERY`,
/// until `shutdown`.
pub(super) async fn watch(
    shared: Arc<BridgeShared>,
    name: String,
    stall_after: Duration,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(STALL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stats: Option<Instant> = None;
    // When the outboxes last went from empty to holding messages.
    let mut backlog_since: Option<Instant> = None;
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(outbox) = outbox_stats(&shared, &name).await else {
            continue;
        };
        let now = Instant::now();
        let backlog = outbox.queued + outbox.inflight;
        let since = match (backlog, backlog_since) {
            (0, _) => {
                backlog_since = None;
                None
            }
            (_, Some(t)) => Some(t),
            (_, None) => Some(*backlog_since.insert(now)),
        };
        let quiet_since = since.map(|s| s.max(progress.last_ack()));
        let now_stalled = quiet_since.is_some_and(|q| now.duration_since(q) >= stall_after);
        if now_stalled != stalled {
            stalled = now_stalled;
            if stalled {
                warn!(bridge = %name, backlog, stall_secs = stall_after.as_secs(), "bridge stalled: messages wait and the upstream acknowledged none of them for stall_secs");
            } else {
                info!(bridge = %name, backlog, "bridge moving again");
            }
            if let Ok(mut all) = shared.bridges.lock() {
                if let Some(st) = all.get_mut(&name) {
                    st.stalled = stalled;
                }
            }
            let connected = progress.connected.load(Ordering::Relaxed);
            let word = state_word(connected, stalled);
            sys(&shared, &name, "state", word.as_bytes().to_vec()).await;
        }
        if last_stats.is_none_or(|t| now.duration_since(t) >= STATS_EVERY) {
            last_stats = Some(now);
            if let Some(json) = status_json(&shared, &name).await {
                sys(&shared, &name, "stats", json.into_bytes()).await;
            }
        }
    }
}

/// A bridge's outbox figures from the router, summed over its priorities.
async fn outbox_stats(shared: &BridgeShared, name: &str) -> Option<SessionStats> {
    let ids = shared.bridges.lock().ok()?.get(name)?.outboxes.clone();
    let mut outbox: Option<SessionStats> = None;
    for id in ids {
        if let Some(st) = shared.broker.session_stats(&id).await {
            let sum = outbox.get_or_insert_with(Default::default);
            sum.online |= st.online;
            sum.queued += st.queued;
            sum.queued_bytes += st.queued_bytes;
            sum.inflight += st.inflight;
            sum.dropped += st.dropped;
        }
    }
    outbox
}

/// One bridge's status merged with its outbox figures from the router (summed over its
/// priorities), as JSON.
pub async fn status_json(shared: &BridgeShared, name: &str) -> Option<String> {
    let status = shared.bridges.lock().ok()?.get(name).cloned()?;
    let outbox = outbox_stats(shared, name).await;
    #[derive(serde::Serialize)]
    struct Full {
        #[serde(flatten)]
        status: BridgeStatus,
        outbox: Option<SessionStats>,
    }
    serde_json::to_string(&Full { status, outbox }).ok()
}

/// Every bridge's status with its outbox figures from the router (summed over its
/// priorities), by name (admin socket).
pub async fn all_status(shared: &BridgeShared) -> Vec<(BridgeStatus, Option<SessionStats>)> {
    let all: Vec<BridgeStatus> = match shared.bridges.lock() {
        Ok(all) => all.values().cloned().collect(),
        Err(_) => Vec::new(),
    };
    let mut out = Vec::new();
    for status in all {
        let outbox = outbox_stats(shared, &status.name).await;
        out.push((status, outbox));
    }
    out
}

/// One bridge's figures for `/metrics` (`holdfast_bridge_*{bridge="<name>"}`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BridgeMetrics {
    pub name: String,
    /// The address in use (or being tried).
    pub address: String,
    pub connected: bool,
    /// Messages in the outboxes: waiting and in flight upstream.
    pub backlog_messages: u64,
    /// Payload bytes of the messages waiting (not those in flight).
    pub backlog_bytes: u64,
    /// Age of the oldest message in the outboxes (0 when empty), seconds.
    pub oldest_age_secs: f64,
    /// Successful connections after the first.
    pub reconnects: u64,
    pub sent: u64,
    pub acked: u64,
    pub rejected: u64,
    /// Dropped by the outbox budget, `max_age_secs` or offline QoS 0, and QoS 0 held back
    /// when the link dropped.
    pub dropped: u64,
}

/// Every bridge's figures: the status, the router's outbox figures, and the age of the
/// oldest outbox row from the database `db` (one indexed read per outbox).
pub async fn metrics(shared: &BridgeShared, db: &std::path::Path) -> Vec<BridgeMetrics> {
    let all: Vec<BridgeStatus> = match shared.bridges.lock() {
        Ok(all) => all.values().cloned().collect(),
        Err(_) => Vec::new(),
    };
    let mut out = Vec::with_capacity(all.len());
    for st in all {
        let outbox = outbox_stats(shared, &st.name).await.unwrap_or_default();
        let backlog = outbox.queued + outbox.inflight;
        let oldest_age_secs = if backlog == 0 {
            0.0
        } else {
            let (db, ids) = (db.to_path_buf(), st.outboxes.clone());
            let oldest = tokio::task::spawn_blocking(move || {
                ids.iter()
                    .filter_map(|id| crate::store::inspect::oldest_enqueued(&db, id))
                    .min()
            })
            .await
            .ok()
            .flatten();
            oldest.map_or(0.0, |t| {
                (crate::store::unix_ms() - t).max(0) as f64 / 1000.0
            })
        };
        out.push(BridgeMetrics {
            address: st.address.clone(),
            connected: st.connected,
            backlog_messages: backlog,
            backlog_bytes: outbox.queued_bytes,
            oldest_age_secs,
            reconnects: st.connects.saturating_sub(1),
            sent: st.sent,
            acked: st.acked,
            rejected: st.rejected,
            dropped: outbox.dropped + st.dropped_qos0,
            name: st.name,
        });
    }
    out
}

/// Names of the bridges that are stalled (`/healthz`).
pub fn stalled(shared: &BridgeShared) -> Vec<String> {
    match shared.bridges.lock() {
        Ok(all) => all
            .values()
            .filter(|st| st.stalled)
            .map(|st| st.name.clone())
            .collect(),
        Err(_) => Vec::new(),
    }
}
