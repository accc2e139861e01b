//! Building blocks of the durable scenarios (`durable_compare`): durable sessions that go
//! offline, filling their queues with QoS 1 publishes, and draining them after a restart.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::protocol::{Packet, QoS};
use tokio::task::JoinSet;

use super::client;
use super::scenario::publisher_qos1_timed;

/// How long a drain may go without a message before it is declared stalled.
const STALL: Duration = Duration::from_secs(30);
/// Concurrent connection set-ups when preparing sessions.
const CONNECT_CONCURRENCY: usize = 50;
/// Concurrent CONNECT handshakes while every session reconnects in `drain_and_hold`.
const HANDSHAKES: usize = 128;

/// Creates durable sessions (3.1.1 clean session 0): `ids[i]` subscribes to `filters[i]` at
/// QoS 1, then disconnects, leaving an offline session that queues what matches.
pub async fn prepare_sessions(
    addr: SocketAddr,
    ids: &[String],
    filters: &[String],
) -> io::Result<()> {
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut done = 0;
    while done < ids.len() {
        while next < ids.len() && set.len() < CONNECT_CONCURRENCY {
            let (id, filter) = (ids[next].clone(), filters[next].clone());
            set.spawn(async move {
                let (mut r, mut w, _) = client::connect_with(addr, &id, 600, false).await?;
                client::subscribe(&mut r, &mut w, &filter, QoS::AtLeastOnce).await?;
                client::disconnect(w).await
            });
            next += 1;
        }
        match set.join_next().await {
            Some(r) => {
                r.map_err(io::Error::other)??;
                done += 1;
            }
            None => break,
        }
    }
    Ok(())
}

/// Publishes `per_topic` QoS 1 messages to every topic, from `publishers` concurrent
/// clients (each with the usual window of unacknowledged messages). Returns the number of
/// messages acknowledged and the time taken; with `acks`, also every message's PUBLISH →
/// PUBACK time (µs).
pub async fn fill(
    addr: SocketAddr,
    tag: &str,
    topics: &[String],
    per_topic: u64,
    publishers: usize,
    acks: Option<&mut Vec<u32>>,
) -> io::Result<(u64, Duration)> {
    let t0 = Instant::now();
    let timed = acks.is_some();
    let publishers = publishers.max(1);
    let mut set = JoinSet::new();
    for p in 0..publishers {
        // Enough topics: each publisher owns a share of them. Fewer topics than
        // publishers: every publisher sends a share of the messages to every topic.
        let (mine, n): (Vec<Arc<str>>, u64) = if topics.len() >= publishers {
            let mine: Vec<Arc<str>> = topics
                .iter()
                .skip(p)
                .step_by(publishers)
                .map(|t| t.as_str().into())
                .collect();
            let n = mine.len() as u64 * per_topic;
            (mine, n)
        } else {
            let total = topics.len() as u64 * per_topic;
            let n = total / publishers as u64 + u64::from((p as u64) < total % publishers as u64);
            (topics.iter().map(|t| t.as_str().into()).collect(), n)
        };
        if n == 0 {
            continue;
        }
        let id = format!("{tag}-fill{p}");
        set.spawn(async move {
            let (r, w) = client::connect(addr, &id, 600).await?;
            let mut lat = Vec::new();
            let n = publisher_qos1_timed(r, w, mine, n, timed.then_some(&mut lat)).await?;
            Ok::<_, io::Error>((n, lat))
        });
    }
    let mut sent = 0;
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        let (n, lat) = r.map_err(io::Error::other)??;
        sent += n;
        all.extend(lat);
    }
    if let Some(acks) = acks {
        acks.extend(all);
    }
    Ok((sent, t0.elapsed()))
}

#[derive(Debug, Default, Clone)]
pub struct Drained {
    /// PUBLISH packets received over all sessions (redeliveries included).
    pub received: u64,
    /// Sessions that received all they were expected to.
    pub complete: usize,
    /// From the first connect to the last message.
    pub elapsed: Duration,
    /// From the first connect until every session had its CONNACK.
    pub connected: Duration,
}

/// Reconnects every durable session in `ids` at once (clean session 0) and reads, acking
/// each QoS 1 message, until each has received `each` messages; then disconnects.
pub async fn drain(addr: SocketAddr, ids: &[String], each: u64) -> io::Result<Drained> {
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for id in ids {
        let id = id.clone();
        set.spawn(async move {
            let (mut r, mut w, _present) = client::connect_with(addr, &id, 600, false).await?;
            let connected = t0.elapsed();
            let mut got = 0u64;
            let mut last = t0;
            while got < each {
                let mut any = false;
                while let Some(p) = r.next_buffered()? {
                    let Packet::Publish(p) = p else { continue };
                    got += 1;
                    any = true;
                    if p.qos != QoS::AtMostOnce {
                        w.push(&client::puback(p.packet_id));
                    }
                }
                if any {
                    last = Instant::now();
                    w.flush().await?;
                }
                if got >= each {
                    break;
                }
                fill_draining(&mut r, &id, got).await?;
            }
            client::disconnect(w).await?;
            io::Result::Ok((got, connected, last))
        });
    }
    let mut out = Drained::default();
    let mut last = t0;
    while let Some(r) = set.join_next().await {
        let (got, connected, l) = r.map_err(io::Error::other)??;
        out.received += got;
        out.complete += usize::from(got >= each);
        out.connected = out.connected.max(connected);
        last = last.max(l);
    }
    out.elapsed = last - t0;
    Ok(out)
}

/// What [`drain_and_hold`] measured.
#[derive(Debug, Default, Clone)]
pub struct Held {
    pub drained: Drained,
    /// Messages whose publisher sequence number (payload bytes 8..16, see
    /// `scenario::message`) was not above the previous one of the same session.
    pub out_of_order: u64,
}

/// Like [`drain`], but checks the order of what each session receives (every topic has one
/// publisher in [`fill`] when there are at least as many topics as publishers, so its
/// sequence numbers rise) and keeps every connection open afterwards: the caller measures
/// the broker with all sessions connected, then drops the returned connections.
pub async fn drain_and_hold(
    addr: SocketAddr,
    ids: &[String],
    each: u64,
) -> io::Result<(Held, Vec<(client::Reader, client::Writer)>)> {
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    // Connects at most this many at a time (Holdfast closes sockets beyond
    // `mqtt.max_handshaking`, 256 by default); draining overlaps freely.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    for id in ids {
        let id = id.clone();
        let handshakes = handshakes.clone();
        set.spawn(async move {
            let permit = handshakes.acquire_owned().await.map_err(io::Error::other)?;
            let (mut r, mut w, _present) = client::connect_with(addr, &id, 0, false).await?;
            drop(permit);
            let connected = t0.elapsed();
            let (mut got, mut disorder, mut prev) = (0u64, 0u64, None::<u64>);
            let mut last = t0;
            while got < each {
                let mut any = false;
                while let Some(p) = r.next_buffered()? {
                    let Packet::Publish(p) = p else { continue };
                    got += 1;
                    any = true;
                    let seq = p
                        .payload
                        .get(8..16)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes);
                    if seq.is_none() || seq <= prev {
                        disorder += 1;
                    }
                    prev = seq.or(prev);
                    if p.qos != QoS::AtMostOnce {
                        w.push(&client::puback(p.packet_id));
                    }
                }
                if any {
                    last = Instant::now();
                    w.flush().await?;
                }
                if got >= each {
                    break;
                }
                fill_draining(&mut r, &id, got).await?;
            }
            // The load generator's own buffers are not what is measured: give them back
            // (the framed reader shrinks its own once the socket is quiet).
            w.buf = bytes::BytesMut::new();
            io::Result::Ok((got, disorder, connected, last, r, w))
        });
    }
    let mut out = Held::default();
    let mut conns = Vec::with_capacity(ids.len());
    let mut last = t0;
    while let Some(r) = set.join_next().await {
        let (got, disorder, connected, l, rd, wr) = r.map_err(io::Error::other)??;
        out.drained.received += got;
        out.drained.complete += usize::from(got >= each);
        out.drained.connected = out.drained.connected.max(connected);
        out.out_of_order += disorder;
        last = last.max(l);
        conns.push((rd, wr));
    }
    out.drained.elapsed = last - t0;
    Ok((out, conns))
}

/// One read for a draining subscriber: an error naming the client when nothing came for
/// `STALL` or the broker closed the connection.
async fn fill_draining(r: &mut client::Reader, id: &str, got: u64) -> io::Result<()> {
    let n = tokio::time::timeout(STALL, r.fill()).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("drain of {id}: no message for {STALL:?} after {got}"),
        )
    })??;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("drain of {id}: broker closed the connection after {got}"),
        ));
    }
    Ok(())
}
