//! Conversions between in-memory router state and what the store keeps: messages and wills
//! as encoded v5 PUBLISH packets, expiry instants as milliseconds on the store's time line
//! ([`crate::clock`]: never the wall clock, which may step), subscription options as the
//! SUBSCRIBE options byte.

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::protocol::{
    self, Packet, ProtocolVersion, Publish, PublishProperties, QoS, SubscriptionOptions, Will,
    WillProperties,
};
use crate::store::StoredWill;

/// Encodes a message for the store. The packet id on disk is a placeholder (a QoS 1/2
/// PUBLISH must carry a non-zero one to be well-formed); the real one is in `queue.packet_id`.
pub fn encode_publish(p: &Publish) -> Bytes {
    let mut p = p.clone();
    p.packet_id = u16::from(p.qos != QoS::AtMostOnce);
    p.dup = false;
    let packet = Packet::Publish(p);
    let mut buf = BytesMut::with_capacity(protocol::encoded_len(&packet, ProtocolVersion::V5));
    protocol::encode(&packet, ProtocolVersion::V5, &mut buf);
    buf.freeze()
}

pub fn decode_publish(bytes: &Bytes) -> Option<Publish> {
    let mut buf = BytesMut::from(&bytes[..]);
    match protocol::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
        Ok(Some(Packet::Publish(mut p))) => {
            p.packet_id = 0;
            Some(p)
        }
        _ => None,
    }
}

/// A deadline as milliseconds on the store's time line.
pub fn instant_to_store(clock: &Clock, at: Option<Instant>) -> Option<i64> {
    at.map(|t| {
        let now = Instant::now();
        let delta = if t >= now {
            t.duration_since(now).as_millis() as i64
        } else {
            -(now.duration_since(t).as_millis() as i64)
        };
        clock.now_ms().saturating_add(delta)
    })
}

/// A deadline stored on the time line, as an instant of this run.
pub fn store_to_instant(clock: &Clock, ms: Option<i64>) -> Option<Instant> {
    ms.map(|ms| {
        let now = Instant::now();
        let delta = ms.saturating_sub(clock.now_ms());
        if delta >= 0 {
            now + std::time::Duration::from_millis(delta as u64)
        } else {
            now.checked_sub(std::time::Duration::from_millis((-delta) as u64))
                .unwrap_or(now)
        }
    })
}

/// The PUBLISH a will becomes (packet id 0: assigned per subscriber).
pub fn will_publish(w: &Will) -> Publish {
    let props = &w.properties;
    Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic.clone(),
        packet_id: 0,
        properties: PublishProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            topic_alias: None,
            response_topic: props.response_topic.clone(),
            correlation_data: props.correlation_data.clone(),
            user_properties: props.user_properties.clone(),
            subscription_identifiers: Vec::new(),
            content_type: props.content_type.clone(),
        },
        payload: w.payload.clone(),
    }
}

pub fn will_to_stored(w: &Will) -> StoredWill {
    StoredWill {
        packet: encode_publish(&will_publish(w)),
        delay: w.properties.will_delay_interval.unwrap_or(0),
    }
}

pub fn will_from_stored(w: &StoredWill) -> Option<Will> {
    let p = decode_publish(&w.packet)?;
    let props = p.properties;
    Some(Will {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: WillProperties {
            will_delay_interval: (w.delay > 0).then_some(w.delay),
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            content_type: props.content_type,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
        },
    })
}

pub fn options_to_byte(o: &SubscriptionOptions) -> u8 {
    (o.qos as u8)
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling & 3) << 4)
}

pub fn options_from_byte(b: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::from_u8(b & 3).unwrap_or(QoS::AtMostOnce),
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: (b >> 4) & 3,
    }
}

pub fn protocol_from_level(level: u8) -> ProtocolVersion {
    match level {
        3 => ProtocolVersion::V31,
        5 => ProtocolVersion::V5,
        _ => ProtocolVersion::V311,
    }
}

/// Ops that write the whole state of a session that was kept in memory only (created
/// without a Session Expiry Interval) and becomes durable because a connection resumed it
/// with one: its subscriptions, in-flight and queued messages and incoming QoS 2 ids. The
/// caller pushes `Op::UpsertSession` first.
pub fn session_state_ops(
    clock: &Clock,
    s: &crate::broker::session::Session,
    ops: &mut Vec<crate::store::Op>,
) {
    use crate::broker::session::InflightState;
    use crate::store::Op;
    let sid = s.id;
    for (filter, data) in s.subscriptions.iter() {
        ops.push(Op::Subscribe {
            sid,
            filter: filter.to_owned(),
            options: options_to_byte(&data.options),
            identifier: data.identifier,
        });
    }
    let enqueue = |seq, packet_id, m: &crate::broker::session::Message| Op::Enqueue {
        sid,
        seq,
        packet_id,
        expires_at: instant_to_store(clock, m.expires_at),
        size: m.publish.payload.len() as u32,
        packet: encode_publish(&m.publish),
    };
    for m in &s.inflight {
        // Only sessions kept in memory are promoted: their bodies are all there.
        let Some(message) = &m.message else {
            continue;
        };
        ops.push(enqueue(m.seq, Some(m.packet_id), message));
        if m.state == InflightState::AwaitingComp {
            ops.push(Op::MarkReleased { sid, seq: m.seq });
        }
    }
    for q in &s.queue {
        ops.push(enqueue(q.seq, None, &q.message));
    }
    for &packet_id in s.incoming_qos2.keys() {
        ops.push(Op::IncomingQos2 {
            sid,
            packet_id,
            present: true,
        });
    }
}
