//! Held output: what a session sends waits, in order, for the store token it depends on
//! (and for backpressure gates) before it goes to the connection.

use super::*;

/// The token output of the current event waits for: the pending one if this event added
/// store ops (`ops_len > event_start`), else none (0).
pub(super) fn event_token(ops_len: usize, event_start: usize, next_token: u64) -> u64 {
    if ops_len > event_start {
        next_token
    } else {
        0
    }
}

/// Queues output for the session's connection: sent at once if it waits for nothing and
/// nothing is held ahead of it, otherwise held until `token` commits.
pub(super) fn hold(
    s: &mut Session,
    token: u64,
    item: Held,
    cur: &mut Pending,
    stats: &mut RouterStats,
) {
    if s.conn.is_none() {
        return; // in-flight state is resent on reconnect; acks die with the connection
    }
    if token == 0 && s.held.is_empty() {
        release(s, item, true, stats);
    } else {
        if token & !GATE_BIT != 0 {
            cur.sids.push(s.id);
        }
        s.held.push_back((token, item));
    }
}

/// Releases held output whose tokens are committed (up to `completed`) and not gated.
pub(super) fn flush_held(s: &mut Session, completed: u64, stats: &mut RouterStats) {
    while let Some((t, _)) = s.held.front() {
        if *t & GATE_BIT != 0 || *t & !FAILED_BIT > completed {
            break;
        }
        let Some((t, item)) = s.held.pop_front() else {
            break;
        };
        release(s, item, t & FAILED_BIT == 0, stats);
    }
    s.shrink_idle();
}

pub(super) fn release(s: &mut Session, item: Held, ok: bool, stats: &mut RouterStats) {
    let Some(c) = &s.conn else {
        return;
    };
    match item {
        Held::Packet(mut p) => {
            match &mut *p {
                Packet::ConnAck(a) if !ok && a.reason_code < 0x80 && !a.session_present => {
                    // A new durable session whose row could not be stored: the store refuses
                    // new data (disk budget reached, disk full). Refuse the connection rather
                    // than promise a session that is not on disk (3.1.1: return code 3,
                    // server unavailable). A resumed session's row is on disk from before:
                    // it connects (and can drain its queue, which frees space).
                    warn!(client_id = %s.client_id, "new session not stored (the store refuses new data): connection refused with 0x97 Quota exceeded");
                    a.reason_code = reason::QUOTA_EXCEEDED;
                }
                Packet::SubAck(a) if !ok => {
                    // The subscriptions were not stored (and were taken back): say so.
                    warn!(client_id = %s.client_id, "subscription not stored (the store refuses new data): SUBACK reports failure");
                    let refused = if s.params.protocol.is_v5() {
                        reason::QUOTA_EXCEEDED
                    } else {
                        0x80
                    };
                    for code in a.reason_codes.iter_mut().filter(|c| **c < 0x80) {
                        *code = refused;
                    }
                }
                Packet::Publish(_) => stats.publishes_out += 1,
                _ => {}
            }
            c.send(Outgoing::Packet(p));
        }
        Held::Deliver {
            packet_id,
            dup,
            fresh,
        } => {
            let Some(i) = s.inflight_position(packet_id) else {
                return;
            };
            if !ok && fresh {
                // Its row was never committed: it was not accepted, so it is not sent.
                s.inflight.remove(i);
                return;
            }
            let Some(message) = &s.inflight[i].message else {
                return; // on disk: sent once read back
            };
            let p = message.to_send(packet_id, dup, Instant::now());
            stats.publishes_out += 1;
            c.send(Outgoing::Packet(Box::new(Packet::Publish(p))));
        }
        Held::PubAck {
            packet_id,
            qos2,
            code,
        } => {
            let code = if ok {
                code
            } else {
                if !s.params.protocol.is_v5() {
                    warn!(client_id = %s.client_id, packet_id, "store refused the message: not acknowledged (3.x has no reason codes)");
                    return;
                }
                reason::QUOTA_EXCEEDED
            };
            let ack = PubAckLike::with_reason(packet_id, code);
            c.send(Outgoing::Packet(Box::new(if qos2 {
                Packet::PubRec(ack)
            } else {
                Packet::PubAck(ack)
            })));
        }
    }
}
