//! `$SYS/holdfast/...`: the gateway's figures as retained QoS 0 messages, republished every
//! `sys.interval_secs`. Payloads are plain UTF-8 numbers (durations in milliseconds with
//! three decimals), like other brokers' `$SYS` trees. They are kept in memory only
//! (`RouterEvent::SysPublish`): an idle gateway does not write to its disk for them.
//!
//! | topic | payload |
//! |---|---|
//! | `version` | `0.1.0` |
//! | `uptime` | seconds since start |
//! | `clients/connected` | connections that completed CONNECT |
//! | `clients/idle` | of those, idle plain-TCP clients waiting without a task (`mqtt.park_idle_ms`) |
//! | `clients/rate_limited` | TCP connections closed by `mqtt.max_connection_rate` |
//! | `clients/user_limited` | CONNECTs refused by `auth.max_connections_per_user` |
//! | `bytes/received`, `bytes/sent` | bytes from / to MQTT clients, all listeners |
//! | `listener/<bind>/bytes/received`, `.../sent` | the same per listener (`bind` as configured) |
//! | `clients/sessions` | sessions in memory (online + persistent offline) |
//! | `clients/sessions/durable` | of those, the ones on disk |
//! | `messages/received` | PUBLISH packets received from clients |
//! | `messages/sent` | PUBLISH packets delivered to clients (and bridge outboxes) |
//! | `messages/retained` | retained messages |
//! | `messages/dropped` | total of the reasons below |
//! | `messages/dropped/<reason>` | `queue_full`, `qos0_backlog`, `qos0_bridge_offline`, `too_large`, `disk_budget`, `expired` |
//! | `store/size` | database + WAL bytes |
//! | `store/commits` | group commits since start |
//! | `store/commit_latency/p50`, `.../p99` | ms over the last interval |

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Observer, Snapshot};

/// The interval for rolling commit-latency figures when `$SYS` is off.
const ROLL_WITHOUT_SYS: Duration = Duration::from_secs(10);

/// Topic prefix of the gateway's own status messages.
pub const PREFIX: &str = "$SYS/holdfast/";

/// Every `interval` (or every 10 s when it is zero, without publishing): rolls the latency
/// figures and publishes the `$SYS` tree. Stops when `shutdown` is cancelled.
pub async fn run(observer: Arc<Observer>, interval: Duration, shutdown: CancellationToken) {
    let publish = !interval.is_zero();
    let mut tick = tokio::time::interval(if publish { interval } else { ROLL_WITHOUT_SYS });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        observer.roll_interval();
        if !publish {
            continue;
        }
        let snap = observer.snapshot().await;
        let broker = observer.broker();
        for (topic, payload) in messages(&snap) {
            tokio::select! {
                r = broker.sys(format!("{PREFIX}{topic}"), payload.into_bytes()) => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Milliseconds with three decimals.
fn ms(us: u32) -> String {
    format!("{:.3}", f64::from(us) / 1000.0)
}

/// `(topic below $SYS/holdfast/, payload)` for one snapshot. Router figures are left out
/// when the router did not answer (the previous retained values stay).
pub fn messages(s: &Snapshot) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![
        ("version".into(), env!("CARGO_PKG_VERSION").into()),
        ("uptime".into(), s.uptime.as_secs().to_string()),
        ("clients/connected".into(), s.clients_connected.to_string()),
        ("clients/idle".into(), s.clients_idle.to_string()),
        (
            "clients/rate_limited".into(),
            s.connections_rate_limited.to_string(),
        ),
        (
            "clients/user_limited".into(),
            s.connections_user_limited.to_string(),
        ),
        ("bytes/received".into(), s.bytes_received().to_string()),
        ("bytes/sent".into(), s.bytes_sent().to_string()),
        (
            "store/size".into(),
            (s.store_db_bytes + s.store_wal_bytes).to_string(),
        ),
        ("store/commits".into(), s.commits.commits.to_string()),
        ("store/commit_latency/p50".into(), ms(s.latency.p50_us)),
        ("store/commit_latency/p99".into(), ms(s.latency.p99_us)),
    ];
    for (bind, received, sent) in &s.traffic {
        out.push((
            format!("listener/{bind}/bytes/received"),
            received.to_string(),
        ));
        out.push((format!("listener/{bind}/bytes/sent"), sent.to_string()));
    }
    if let (Some(r), Some(dropped), Some(total)) = (s.router, s.dropped(), s.dropped_total()) {
        out.extend([
            ("clients/sessions".into(), r.sessions.to_string()),
            (
                "clients/sessions/durable".into(),
                r.durable_sessions.to_string(),
            ),
            ("messages/received".into(), r.stats.publishes_in.to_string()),
            ("messages/sent".into(), r.stats.publishes_out.to_string()),
            ("messages/retained".into(), r.retained.to_string()),
            ("messages/dropped".into(), total.to_string()),
        ]);
        for (reason, n) in dropped {
            out.push((format!("messages/dropped/{reason}"), n.to_string()));
        }
    }
    out
}
