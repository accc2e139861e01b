//! Building blocks of `bridge_compare`: a publisher on the gateway (local broker), a
//! subscriber on the upstream ("cloud") broker, and in between the gateway's bridge.
//!
//! Every message carries its send time and a per-topic sequence number (see
//! [`super::scenario::message`]), so the receiving side measures end-to-end latency and
//! checks loss, duplicates and order per topic (= per publisher).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use holdfast::protocol::{Packet, QoS};

use super::client::{self, Reader, Writer};
use super::scenario::{message, now_nanos, publisher_qos1, QOS1_WINDOW};

/// A receiver gives up after this long without a new message (and reports what it has).
pub const IDLE: Duration = Duration::from_secs(15);
/// A publisher gives up after this long without a PUBACK.
const STALL: Duration = Duration::from_secs(30);

/// What one subscriber received.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub expected: u64,
    /// Distinct messages (by topic and sequence number).
    pub received: u64,
    /// Deliveries of a message already received (QoS 1 resends).
    pub duplicates: u64,
    /// New messages that arrived while an earlier one of the same topic was still missing
    /// (0 = per-topic order kept).
    pub reordered: u64,
    /// Messages on topics not being measured (acked and ignored).
    pub strays: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Sorted receive − send times of first deliveries, nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Whether the receiver gave up after `IDLE` without a new message.
    pub timed_out: bool,
}

impl Received {
    /// Latency percentile in microseconds.
    pub fn percentile_us(&self, p: f64) -> Option<f64> {
        percentile_us(&self.latencies_ns, p)
    }

    /// First to last receive.
    pub fn span(&self) -> Option<Duration> {
        Some(self.last? - self.first?)
    }

    pub fn complete(&self) -> bool {
        self.received == self.expected
    }
}

pub fn percentile_us(v: &[u64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[idx.min(v.len() - 1)] as f64 / 1000.0)
}

/// Per-topic progress of a receiver.
struct TopicState {
    seen: Vec<bool>,
    /// Lowest sequence number not yet received.
    next: u64,
}

/// Reads PUBLISHes (acking QoS 1) until `each` distinct messages arrived on every topic in
/// `topics`, or nothing new came for `IDLE`; then disconnects (a durable session stays).
pub async fn collect(
    mut r: Reader,
    mut w: Writer,
    topics: &[String],
    each: u64,
) -> io::Result<Received> {
    let mut state: HashMap<&str, TopicState> = topics
        .iter()
        .map(|t| {
            (
                t.as_str(),
                TopicState {
                    seen: vec![false; each as usize],
                    next: 0,
                },
            )
        })
        .collect();
    let mut out = Received {
        expected: each * topics.len() as u64,
        latencies_ns: Vec::with_capacity((each * topics.len() as u64) as usize),
        ..Default::default()
    };
    while out.received < out.expected {
        let mut any = false;
        while let Some(p) = r.next_buffered()? {
            let Packet::Publish(p) = p else { continue };
            let now = now_nanos();
            if p.qos != QoS::AtMostOnce {
                w.push(&client::puback(p.packet_id));
            }
            let Some(st) = state.get_mut(&*p.topic) else {
                out.strays += 1;
                continue;
            };
            if p.payload.len() < 16 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short benchmark payload",
                ));
            }
            let ts = u64::from_be_bytes(p.payload[0..8].try_into().unwrap());
            let seq = u64::from_be_bytes(p.payload[8..16].try_into().unwrap());
            match st.seen.get_mut(seq as usize) {
                Some(s) if !*s => {
                    *s = true;
                    any = true;
                    out.received += 1;
                    out.latencies_ns.push(now.saturating_sub(ts));
                    if seq == st.next {
                        while st.seen.get(st.next as usize) == Some(&true) {
                            st.next += 1;
                        }
                    } else {
                        out.reordered += 1;
                    }
                }
                Some(_) => out.duplicates += 1,
                None => out.strays += 1,
            }
        }
        w.flush().await?;
        if any {
            let now = Instant::now();
            out.first.get_or_insert(now);
            out.last = Some(now);
        }
        if out.received >= out.expected {
            break;
        }
        match tokio::time::timeout(IDLE, r.fill()).await {
            Err(_) => {
                out.timed_out = true;
                break;
            }
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "broker closed the subscriber's connection after {}",
                        out.received
                    ),
                ))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    out.latencies_ns.sort_unstable();
    client::disconnect(w).await?;
    Ok(out)
}

/// Connects a subscriber (clean session) and subscribes `filter` at QoS 1.
pub async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> io::Result<(Reader, Writer)> {
    let (mut r, mut w) = client::connect(addr, id, 60).await?;
    client::subscribe(&mut r, &mut w, filter, QoS::AtLeastOnce).await?;
    Ok((r, w))
}

/// Waits until the path gateway → bridge → upstream works: publishes a QoS 1 probe on the
/// gateway every 200 ms until the upstream subscriber sees one (or `limit` passes).
pub async fn wait_path(
    gateway: SocketAddr,
    upstream: SocketAddr,
    tag: &str,
    limit: Duration,
) -> io::Result<Duration> {
    let t0 = Instant::now();
    let topic: Arc<str> = format!("bench/probe-{tag}").into();
    let (mut sr, sw) = subscriber(upstream, &format!("{tag}-probe-sub"), &topic).await?;
    let (mut pr, mut pw) = client::connect(gateway, &format!("{tag}-probe-pub"), 60).await?;
    let mut arena = BytesMut::new();
    let mut id = 1u16;
    loop {
        if t0.elapsed() > limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no message through the bridge within {limit:?}"),
            ));
        }
        pw.push(&client::publish(
            &topic,
            QoS::AtLeastOnce,
            id,
            message(&mut arena, 0),
        ));
        pw.flush().await?;
        id = id.wrapping_add(1).max(1);
        // Drain PUBACKs so the publisher's window never fills.
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(1), pr.fill()).await {
            while pr.next_buffered()?.is_some() {}
        }
        while let Some(p) = pr.next_buffered()? {
            let _ = p;
        }
        if let Ok(p) = tokio::time::timeout(Duration::from_millis(200), sr.next_packet()).await {
            if let Packet::Publish(_) = p? {
                break;
            }
        }
    }
    let took = t0.elapsed();
    // Let the remaining probes pass before anything is measured.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client::disconnect(sw).await?;
    client::disconnect(pw).await?;
    Ok(took)
}

/// One steady-state run: a QoS 1 publisher (window `QOS1_WINDOW`) on the gateway sends `n`
/// messages to `bench/<tag>` as fast as PUBACKs allow; an upstream subscriber receives.
/// Returns (acknowledged by the gateway, what the subscriber got, first send).
pub async fn steady(
    gateway: SocketAddr,
    upstream: SocketAddr,
    tag: &str,
    n: u64,
) -> io::Result<(u64, Received, Instant)> {
    let topic = format!("bench/{tag}");
    let (sr, sw) = subscriber(upstream, &format!("{tag}-cloud"), &topic).await?;
    let (pr, pw) = client::connect(gateway, &format!("{tag}-pub"), 60).await?;
    let t0 = Instant::now();
    let topics = vec![topic.clone()];
    let sub = tokio::spawn(async move { collect(sr, sw, &topics, n).await });
    let sent = publisher_qos1(pr, pw, vec![topic.as_str().into()], n).await?;
    let got = sub.await.map_err(io::Error::other)??;
    Ok((sent, got, t0))
}

/// A QoS 1 publisher at a fixed rate: message `i` is due at `start + i / rate` (sent with
/// the current time as timestamp); at most `QOS1_WINDOW` unacknowledged.
pub async fn paced_publisher(
    mut r: Reader,
    mut w: Writer,
    topic: Arc<str>,
    n: u64,
    rate: u64,
) -> io::Result<u64> {
    let start = tokio::time::Instant::now();
    let due = |seq: u64| start + Duration::from_nanos(seq * 1_000_000_000 / rate.max(1));
    let mut arena = BytesMut::new();
    let mut in_flight = vec![false; 1 << 16];
    let mut n_in_flight = 0usize;
    let mut next_id: u16 = 1;
    let mut seq = 0u64;
    loop {
        let now = tokio::time::Instant::now();
        let mut pushed = false;
        while seq < n && n_in_flight < QOS1_WINDOW && due(seq) <= now {
            while in_flight[next_id as usize] {
                next_id = next_id.checked_add(1).unwrap_or(1);
            }
            w.push(&client::publish(
                &topic,
                QoS::AtLeastOnce,
                next_id,
                message(&mut arena, seq),
            ));
            in_flight[next_id as usize] = true;
            n_in_flight += 1;
            next_id = next_id.checked_add(1).unwrap_or(1);
            seq += 1;
            pushed = true;
        }
        if pushed {
            w.flush().await?;
        }
        while let Some(p) = r.next_buffered()? {
            if let Packet::PubAck(a) = p {
                let slot = &mut in_flight[a.packet_id as usize];
                if std::mem::replace(slot, false) {
                    n_in_flight -= 1;
                }
            }
        }
        if seq >= n && n_in_flight == 0 {
            return Ok(seq);
        }
        let can_send = seq < n && n_in_flight < QOS1_WINDOW;
        tokio::select! {
            _ = tokio::time::sleep_until(due(seq)), if can_send => {}
            got = tokio::time::timeout(STALL, r.fill()) => match got {
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "paced publisher: no PUBACK")),
                Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "broker closed the publisher's connection")),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            },
        }
    }
}

/// Added latency: one paced publisher on the gateway (`rate` msg/s, `n` messages) to
/// `bench/<tag>`, received at the same time by a subscriber on the gateway (local path)
/// and by one on the upstream (through the bridge). Returns (sent, local, upstream).
pub async fn added_latency(
    gateway: SocketAddr,
    upstream: SocketAddr,
    tag: &str,
    rate: u64,
    n: u64,
) -> io::Result<(u64, Received, Received)> {
    let topic = format!("bench/{tag}");
    let (lr, lw) = subscriber(gateway, &format!("{tag}-local"), &topic).await?;
    let (cr, cw) = subscriber(upstream, &format!("{tag}-cloud"), &topic).await?;
    let (pr, pw) = client::connect(gateway, &format!("{tag}-pub"), 60).await?;
    let topics = vec![topic.clone()];
    let t2 = topics.clone();
    let local = tokio::spawn(async move { collect(lr, lw, &t2, n).await });
    let cloud = tokio::spawn(async move { collect(cr, cw, &topics, n).await });
    let sent = paced_publisher(pr, pw, topic.as_str().into(), n, rate).await?;
    let local = local.await.map_err(io::Error::other)??;
    let cloud = cloud.await.map_err(io::Error::other)??;
    Ok((sent, local, cloud))
}
