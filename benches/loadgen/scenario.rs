//! Throughput/latency scenarios (N publishers → N subscribers, publisher i → `bench/i`)
//! and the idle-connection scenario.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use holdfast::protocol::{Packet, QoS};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::client::{self, Reader, Writer};

/// Payload size of every benchmark message: 8-byte send timestamp, 8-byte sequence
/// number, zero padding.
pub const PAYLOAD_LEN: usize = 64;
/// Most QoS 0 publishes encoded into one write.
const BATCH: u64 = 256;
/// The QoS 1 publisher's window of unacknowledged publishes (the brokers' receive maximum).
pub const QOS1_WINDOW: usize = 64;
/// How long a subscriber waits for more messages once its publisher has finished (QoS 0
/// messages may have been dropped, so "all arrived" cannot be the only exit).
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// How long anything may go without progress before the scenario is declared stalled.
const STALL: Duration = Duration::from_secs(30);

/// Shared clock for send/receive timestamps (everything runs in one process).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

fn stalled(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: no progress for {STALL:?}"),
    )
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub label: String,
    pub qos: QoS,
    /// Publisher/subscriber pairs.
    pub pairs: usize,
    /// Messages over all publishers.
    pub messages: u64,
    /// QoS 0 flow control: a publisher stays at most this many messages ahead of what its
    /// subscriber has received. `None` = unthrottled.
    pub window: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: u64,
    /// Distinct messages received (by sequence number).
    pub received: u64,
    pub duplicates: u64,
    /// First send to last receive.
    pub elapsed: Duration,
    /// Sorted receive − send times, nanoseconds, one per received message.
    pub latencies_ns: Vec<u64>,
}

impl Outcome {
    pub fn msgs_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.received as f64 / s
        } else {
            0.0
        }
    }

    /// Latency percentile in microseconds.
    pub fn percentile_us(&self, p: f64) -> Option<f64> {
        let v = &self.latencies_ns;
        if v.is_empty() {
            return None;
        }
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        Some(v[idx.min(v.len() - 1)] as f64 / 1000.0)
    }
}

/// Progress shared by one publisher and its subscriber.
#[derive(Default)]
struct Progress {
    received: AtomicU64,
    publisher_done: AtomicBool,
    notify: Notify,
}

struct SubResult {
    received: u64,
    duplicates: u64,
    last_receive: Option<Instant>,
    latencies_ns: Vec<u64>,
}

pub(crate) fn message(arena: &mut BytesMut, seq: u64) -> bytes::Bytes {
    if arena.capacity() < PAYLOAD_LEN {
        arena.reserve(PAYLOAD_LEN * BATCH as usize);
    }
    arena.put_u64(now_nanos());
    arena.put_u64(seq);
    arena.put_bytes(0, PAYLOAD_LEN - 16);
    arena.split().freeze()
}

async fn publisher_qos0(
    mut w: Writer,
    topic: Arc<str>,
    n: u64,
    window: Option<u64>,
    progress: Arc<Progress>,
) -> io::Result<u64> {
    let mut arena = BytesMut::new();
    let mut seq = 0u64;
    while seq < n {
        let mut allowed = BATCH;
        if let Some(wnd) = window {
            loop {
                let ahead = seq.saturating_sub(progress.received.load(Ordering::Acquire));
                if ahead < wnd {
                    allowed = allowed.min(wnd - ahead);
                    break;
                }
                // notify_one stores a permit, so a notification between the load and
                // this await is not lost.
                // Nothing for DRAIN_IDLE with a full window: messages were dropped and the
                // window will never reopen.
                tokio::time::timeout(DRAIN_IDLE, progress.notify.notified())
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            "flow-controlled QoS 0 publisher stalled: the broker dropped messages",
                        )
                    })?;
            }
        }
        for _ in 0..allowed.min(n - seq) {
            let payload = message(&mut arena, seq);
            w.push(&client::publish(&topic, QoS::AtMostOnce, 0, payload));
            seq += 1;
        }
        w.flush().await?;
    }
    Ok(seq)
}

/// QoS 1 publisher with a window of `QOS1_WINDOW` unacknowledged messages; message `i`
/// goes to `topics[i % topics.len()]`.
pub(crate) async fn publisher_qos1(
    r: Reader,
    w: Writer,
    topics: Vec<Arc<str>>,
    n: u64,
) -> io::Result<u64> {
    publisher_qos1_timed(r, w, topics, n, None).await
}

/// [`publisher_qos1`], also recording each message's PUBLISH → PUBACK time (µs) in
/// `acks` if given.
pub(crate) async fn publisher_qos1_timed(
    mut r: Reader,
    mut w: Writer,
    topics: Vec<Arc<str>>,
    n: u64,
    mut acks: Option<&mut Vec<u32>>,
) -> io::Result<u64> {
    let mut arena = BytesMut::new();
    let mut in_flight = vec![false; 1 << 16];
    let mut sent_at = vec![None::<std::time::Instant>; if acks.is_some() { 1 << 16 } else { 0 }];
    let mut n_in_flight = 0usize;
    let mut next_id: u16 = 1;
    let mut seq = 0u64;
    while seq < n || n_in_flight > 0 {
        while seq < n && n_in_flight < QOS1_WINDOW {
            while in_flight[next_id as usize] {
                next_id = next_id.checked_add(1).unwrap_or(1);
            }
            let payload = message(&mut arena, seq);
            let topic = &topics[(seq % topics.len() as u64) as usize];
            w.push(&client::publish(topic, QoS::AtLeastOnce, next_id, payload));
            in_flight[next_id as usize] = true;
            if let Some(t) = sent_at.get_mut(next_id as usize) {
                *t = Some(std::time::Instant::now());
            }
            n_in_flight += 1;
            next_id = next_id.checked_add(1).unwrap_or(1);
            seq += 1;
        }
        w.flush().await?;
        // Read acknowledgements until there is room to send again (or all are acked).
        loop {
            while let Some(p) = r.next_buffered()? {
                if let Packet::PubAck(a) = p {
                    let slot = &mut in_flight[a.packet_id as usize];
                    if !*slot {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("PUBACK for packet id {} not in flight", a.packet_id),
                        ));
                    }
                    *slot = false;
                    n_in_flight -= 1;
                    if let (Some(acks), Some(Some(t))) = (
                        acks.as_deref_mut(),
                        sent_at.get(a.packet_id as usize).copied(),
                    ) {
                        acks.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
            }
            if (seq < n && n_in_flight < QOS1_WINDOW) || n_in_flight == 0 {
                break;
            }
            let got = tokio::time::timeout(STALL, r.fill())
                .await
                .map_err(|_| stalled("QoS 1 publisher waiting for PUBACKs"))??;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "broker closed the publisher's connection",
                ));
            }
        }
    }
    Ok(seq)
}

async fn subscriber(
    mut r: Reader,
    mut w: Writer,
    expected: u64,
    progress: Arc<Progress>,
) -> io::Result<SubResult> {
    let mut seen = vec![false; expected as usize];
    let mut res = SubResult {
        received: 0,
        duplicates: 0,
        last_receive: None,
        latencies_ns: Vec::with_capacity(expected as usize),
    };
    loop {
        let mut any = false;
        while let Some(p) = r.next_buffered()? {
            let Packet::Publish(p) = p else { continue };
            let now = now_nanos();
            any = true;
            if p.payload.len() < 16 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short benchmark payload",
                ));
            }
            let ts = u64::from_be_bytes(p.payload[0..8].try_into().unwrap());
            let seq = u64::from_be_bytes(p.payload[8..16].try_into().unwrap());
            res.latencies_ns.push(now.saturating_sub(ts));
            match seen.get_mut(seq as usize) {
                Some(s) if !*s => {
                    *s = true;
                    res.received += 1;
                }
                _ => res.duplicates += 1,
            }
            if p.qos != QoS::AtMostOnce {
                w.push(&client::puback(p.packet_id));
            }
        }
        if any {
            res.last_receive = Some(Instant::now());
            w.flush().await?;
            progress.received.store(res.received, Ordering::Release);
            progress.notify.notify_one();
        }
        if res.received >= expected {
            return Ok(res);
        }
        let wait = if progress.publisher_done.load(Ordering::Acquire) {
            DRAIN_IDLE
        } else {
            STALL
        };
        match tokio::time::timeout(wait, r.fill()).await {
            // Publisher finished and nothing more arrives: QoS 0 messages were lost.
            Err(_) if wait == DRAIN_IDLE => return Ok(res),
            Err(_) => {
                // The publisher may have finished meanwhile; re-check once with the
                // drain timeout before calling it a stall.
                if progress.publisher_done.load(Ordering::Acquire) {
                    continue;
                }
                return Err(stalled("subscriber"));
            }
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "broker closed the subscriber's connection",
                ))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Runs one throughput/latency scenario against the broker at `addr`. `tag` makes client
/// ids unique per run.
pub async fn run(addr: SocketAddr, spec: &Spec, tag: &str) -> io::Result<Outcome> {
    run_opts(addr, spec, tag, false).await
}

/// Like [`run`]; `durable_subs` makes the subscribers durable sessions (3.1.1 clean
/// session 0), so a broker with persistence stores every message for them.
pub async fn run_opts(
    addr: SocketAddr,
    spec: &Spec,
    tag: &str,
    durable_subs: bool,
) -> io::Result<Outcome> {
    let pairs = spec.pairs as u64;
    // Durable subscribers outlive their run: each run gets its own topics, or every later
    // run would also queue a copy for every earlier run's (offline) subscriber.
    let topic_for = |i: usize| {
        if durable_subs {
            format!("bench/{tag}/{i}")
        } else {
            format!("bench/{i}")
        }
    };
    let mut subs = Vec::new();
    for i in 0..spec.pairs {
        let (mut r, mut w, _) =
            client::connect_with(addr, &format!("{tag}-sub{i}"), 60, !durable_subs).await?;
        client::subscribe(&mut r, &mut w, &topic_for(i), spec.qos).await?;
        subs.push((r, w));
    }
    let mut pubs = Vec::new();
    for i in 0..spec.pairs {
        pubs.push(client::connect(addr, &format!("{tag}-pub{i}"), 60).await?);
    }

    let t0 = Instant::now();
    let mut sub_tasks = Vec::new();
    let mut pub_tasks = Vec::new();
    for (i, ((sr, sw), (pr, pw))) in subs.into_iter().zip(pubs).enumerate() {
        // Spread the remainder over the first publishers.
        let n = spec.messages / pairs + u64::from((i as u64) < spec.messages % pairs);
        let progress = Arc::new(Progress::default());
        sub_tasks.push(tokio::spawn(subscriber(sr, sw, n, progress.clone())));
        let topic: Arc<str> = topic_for(i).into();
        let (qos, window) = (spec.qos, spec.window);
        pub_tasks.push(tokio::spawn(async move {
            let res = match qos {
                QoS::AtMostOnce => publisher_qos0(pw, topic, n, window, progress.clone()).await,
                _ => publisher_qos1(pr, pw, vec![topic], n).await,
            };
            progress.publisher_done.store(true, Ordering::Release);
            progress.notify.notify_one();
            res
        }));
    }

    let mut out = Outcome::default();
    let mut first_err = None;
    for t in pub_tasks {
        match t.await.map_err(io::Error::other) {
            Ok(Ok(sent)) => out.sent += sent,
            Ok(Err(e)) | Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let mut last = t0;
    for t in sub_tasks {
        match t.await.map_err(io::Error::other) {
            Ok(Ok(s)) => {
                out.received += s.received;
                out.duplicates += s.duplicates;
                if let Some(l) = s.last_receive {
                    last = last.max(l);
                }
                out.latencies_ns.extend(s.latencies_ns);
            }
            Ok(Err(e)) | Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    out.elapsed = last - t0;
    out.latencies_ns.sort_unstable();
    Ok(out)
}

/// Opens `n` connections (CONNECT, keep-alive 60 s) and keeps them open; returns them so
/// the caller decides when they close.
pub async fn idle_connections(
    addr: SocketAddr,
    n: usize,
    tag: &str,
) -> io::Result<Vec<(Reader, Writer)>> {
    const CONCURRENCY: usize = 50;
    let mut conns = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let mut next = 0;
    while conns.len() < n {
        while next < n && set.len() < CONCURRENCY {
            let id = format!("{tag}-idle{next}");
            set.spawn(async move { client::connect(addr, &id, 60).await });
            next += 1;
        }
        match set.join_next().await {
            Some(r) => conns.push(r.map_err(io::Error::other)??),
            None => break,
        }
    }
    Ok(conns)
}
