//! `Packet` -> bytes. One generic writer serves both `encoded_len` (a byte counter) and
//! `encode` (a `BytesMut`), so the two cannot disagree.

use bytes::{BufMut, BytesMut};

use super::props::{Props, SubscribeProps, UserProps};
use crate::protocol::reason;
use crate::protocol::types::*;

/// Where encoded bytes go.
pub(super) trait Sink {
    fn put_slice(&mut self, v: &[u8]);
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16) {
        self.put_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.put_slice(&v.to_be_bytes());
    }
}

/// Counts bytes instead of writing them.
#[derive(Default)]
pub(super) struct Counter(pub(super) usize);

impl Sink for Counter {
    #[inline]
    fn put_slice(&mut self, v: &[u8]) {
        self.0 += v.len();
    }
    #[inline]
    fn put_u8(&mut self, _: u8) {
        self.0 += 1;
    }
    #[inline]
    fn put_u16(&mut self, _: u16) {
        self.0 += 2;
    }
    #[inline]
    fn put_u32(&mut self, _: u32) {
        self.0 += 4;
    }
}

impl Sink for BytesMut {
    #[inline]
    fn put_slice(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
    #[inline]
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v);
    }
}

/// Bytes a Variable Byte Integer takes (values above 268 435 455 cannot be sent; they are
/// written with more than 4 bytes and the peer rejects them).
pub(super) fn varint_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub(super) fn put_varint<S: Sink>(s: &mut S, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            s.put_u8(byte);
            return;
        }
        s.put_u8(byte | 0x80);
    }
}

/// A UTF-8 string, truncated on a char boundary to the 65 535 bytes a string can hold.
pub(super) fn put_str<S: Sink>(s: &mut S, v: &str) {
    let mut end = v.len().min(0xffff);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    let v = v.as_bytes().get(..end).unwrap_or_default();
    s.put_u16(end as u16);
    s.put_slice(v);
}

/// Binary data, truncated to the 65 535 bytes it can hold.
pub(super) fn put_bin<S: Sink>(s: &mut S, v: &[u8]) {
    let v = v.get(..v.len().min(0xffff)).unwrap_or_default();
    s.put_u16(v.len() as u16);
    s.put_slice(v);
}

fn props_len<P: Props + ?Sized>(p: &P) -> usize {
    let mut c = Counter(0);
    p.write(&mut c);
    c.0
}

/// Property Length followed by the properties.
fn put_props<S: Sink, P: Props + ?Sized>(s: &mut S, p: &P) {
    put_varint(s, props_len(p));
    p.write(s);
}

/// v5 reason code + properties with the short forms: nothing when the code is 0 and there
/// are no properties, the code alone when there are no properties.
fn put_reason_and_props<S: Sink, P: Props>(s: &mut S, code: u8, p: &P) {
    let len = props_len(p);
    if len == 0 {
        if code != 0 {
            s.put_u8(code);
        }
        return;
    }
    s.put_u8(code);
    put_varint(s, len);
    p.write(s);
}

pub(super) fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => {
            let qos = p.qos as u8;
            let dup = p.dup && qos > 0;
            0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(p.retain)
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xa2,
        Packet::UnsubAck(_) => 0xb0,
        Packet::PingReq => 0xc0,
        Packet::PingResp => 0xd0,
        Packet::Disconnect(_) => 0xe0,
        Packet::Auth(_) => 0xf0,
    }
}

/// The Remaining Length of `packet`.
pub(super) fn body_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let mut c = Counter(0);
    body(packet, version, &mut c);
    c.0
}

/// Writes the whole packet; `remaining` must be `body_len(packet, version)`.
pub(super) fn write(
    packet: &Packet,
    version: ProtocolVersion,
    remaining: usize,
    buf: &mut BytesMut,
) {
    Sink::put_u8(buf, first_byte(packet));
    put_varint(buf, remaining);
    body(packet, version, buf);
}

fn body<S: Sink>(packet: &Packet, version: ProtocolVersion, s: &mut S) {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => connect(c, s),
        Packet::ConnAck(c) => {
            let session_present =
                c.session_present && c.reason_code == 0 && version != ProtocolVersion::V31;
            s.put_u8(u8::from(session_present));
            if v5 {
                s.put_u8(c.reason_code);
                put_props(s, &c.properties);
            } else {
                s.put_u8(reason::v3_connack_return_code(c.reason_code));
            }
        }
        Packet::Publish(p) => {
            put_str(s, &p.topic);
            if p.qos != QoS::AtMostOnce {
                s.put_u16(p.packet_id);
            }
            if v5 {
                put_props(s, &p.properties);
            }
            s.put_slice(&p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            s.put_u16(a.packet_id);
            if v5 {
                put_reason_and_props(s, a.reason_code, &a.properties);
            }
        }
        Packet::Subscribe(sub) => {
            s.put_u16(sub.packet_id);
            if v5 {
                put_props(s, &SubscribeProps(sub));
            }
            for f in &sub.filters {
                put_str(s, &f.filter);
                let o = &f.options;
                let mut options = o.qos as u8;
                if v5 {
                    options |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 0x03) << 4;
                }
                s.put_u8(options);
            }
        }
        Packet::SubAck(a) => {
            s.put_u16(a.packet_id);
            if v5 {
                put_props(s, &a.properties);
                s.put_slice(&a.reason_codes);
            } else {
                for &code in &a.reason_codes {
                    s.put_u8(if code <= 2 { code } else { 0x80 });
                }
            }
        }
        Packet::Unsubscribe(u) => {
            s.put_u16(u.packet_id);
            if v5 {
                put_props(s, &UserProps(&u.user_properties));
            }
            for f in &u.filters {
                put_str(s, f);
            }
        }
        Packet::UnsubAck(a) => {
            s.put_u16(a.packet_id);
            if v5 {
                put_props(s, &a.properties);
                s.put_slice(&a.reason_codes);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                put_reason_and_props(s, d.reason_code, &d.properties);
            }
        }
        // AUTH only exists in MQTT 5.
        Packet::Auth(a) => put_reason_and_props(s, a.reason_code, &a.properties),
    }
}

fn connect<S: Sink>(c: &Connect, s: &mut S) {
    let v5 = c.protocol.is_v5();
    match c.protocol {
        ProtocolVersion::V31 => put_str(s, "MQIsdp"),
        ProtocolVersion::V311 | ProtocolVersion::V5 => put_str(s, "MQTT"),
    }
    s.put_u8(c.protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3;
        if w.retain {
            flags |= 0x20;
        }
    }
    // 3.x cannot carry a password without a user name (MQTT-3.1.2-22): it is left out.
    let password = c.password.as_ref().filter(|_| v5 || c.username.is_some());
    if password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.put_u8(flags);
    s.put_u16(c.keep_alive);
    if v5 {
        put_props(s, &c.properties);
    }
    put_str(s, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            put_props(s, &w.properties);
        }
        put_str(s, &w.topic);
        put_bin(s, &w.payload);
    }
    if let Some(u) = &c.username {
        put_str(s, u);
    }
    if let Some(p) = password {
        put_bin(s, p);
    }
}
