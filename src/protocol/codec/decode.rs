//! Packet bodies: bytes -> `Packet`. Every read is bounds-checked through `Reader`.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::DecodeError::{self, Malformed, Protocol};
use crate::protocol::reason;
use crate::protocol::types::*;

use super::props::*;

type Result<T> = std::result::Result<T, DecodeError>;

const EOF: DecodeError = Malformed("unexpected end of packet");

/// Reason codes a receiver accepts per packet type (v5).
pub(super) const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
pub(super) const PUBREL_CODES: &[u8] = &[0x00, 0x92];
pub(super) const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
pub(super) const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

/// A cursor over `data[pos..end]`. Invariant: `pos <= end <= data.len()`.
pub(super) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a Bytes) -> Self {
        Reader {
            data,
            pos: 0,
            end: data.len(),
        }
    }

    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn take(&mut self, n: usize) -> Result<Range<usize>> {
        if n > self.remaining() {
            return Err(EOF);
        }
        let start = self.pos;
        self.pos += n;
        Ok(start..self.pos)
    }

    fn slice(&mut self, n: usize) -> Result<&'a [u8]> {
        let range = self.take(n)?;
        let data: &'a Bytes = self.data;
        data.get(range).ok_or(EOF)
    }

    pub(super) fn u8(&mut self) -> Result<u8> {
        match self.slice(1)? {
            [b] => Ok(*b),
            _ => Err(EOF),
        }
    }

    pub(super) fn u16(&mut self) -> Result<u16> {
        match self.slice(2)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(EOF),
        }
    }

    pub(super) fn u32(&mut self) -> Result<u32> {
        match self.slice(4)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(EOF),
        }
    }

    /// Variable Byte Integer: at most 4 bytes, minimally encoded (MQTT-1.5.5-1).
    pub(super) fn varint(&mut self) -> Result<u32> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(Malformed("variable byte integer not minimally encoded"));
                }
                return Ok(value);
            }
        }
        Err(Malformed("variable byte integer longer than 4 bytes"))
    }

    /// Two-byte length + bytes, as a zero-copy slice of the frame.
    pub(super) fn binary(&mut self) -> Result<Bytes> {
        let n = usize::from(self.u16()?);
        let range = self.take(n)?;
        Ok(self.data.slice(range))
    }

    /// Two-byte length + UTF-8 without U+0000 (MQTT-1.5.4-1, MQTT-1.5.4-2).
    pub(super) fn str(&mut self) -> Result<&'a str> {
        let n = usize::from(self.u16()?);
        let bytes = self.slice(n)?;
        if bytes.contains(&0) {
            return Err(Malformed("U+0000 in UTF-8 string"));
        }
        std::str::from_utf8(bytes).map_err(|_| Malformed("invalid UTF-8 string"))
    }

    pub(super) fn string(&mut self) -> Result<String> {
        self.str().map(str::to_owned)
    }

    fn topic(&mut self) -> Result<Arc<str>> {
        self.str().map(Arc::from)
    }

    /// Everything left, as a zero-copy slice.
    fn rest(&mut self) -> Bytes {
        let range = self.pos..self.end;
        self.pos = self.end;
        self.data.slice(range)
    }

    fn rest_vec(&mut self) -> Vec<u8> {
        let v = self
            .data
            .get(self.pos..self.end)
            .unwrap_or_default()
            .to_vec();
        self.pos = self.end;
        v
    }

    /// Reads a Property Length and returns a reader over exactly the properties.
    fn properties(&mut self) -> Result<Reader<'a>> {
        let len = self.varint()? as usize;
        let range = self
            .take(len)
            .map_err(|_| Malformed("property length exceeds packet"))?;
        Ok(Reader {
            data: self.data,
            pos: range.start,
            end: range.end,
        })
    }

    fn finish(&self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Malformed("unexpected bytes at end of packet"))
        }
    }
}

fn packet_id(r: &mut Reader) -> Result<u16> {
    match r.u16()? {
        0 => Err(Malformed("packet identifier 0")),
        id => Ok(id),
    }
}

/// Decodes the body of a packet whose first fixed-header byte is `first`.
pub(super) fn packet(first: u8, body: &Bytes, version: ProtocolVersion) -> Result<Packet> {
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    let expected_flags = match packet_type {
        3 => flags,
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected_flags {
        return Err(Malformed("invalid fixed header flags"));
    }
    let v5 = version.is_v5();
    let mut r = Reader::new(body);
    let packet = match packet_type {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(connack(&mut r, version)?),
        3 => Packet::Publish(publish(flags, &mut r, v5)?),
        4 => Packet::PubAck(pub_ack(&mut r, v5, PUBACK_CODES)?),
        5 => Packet::PubRec(pub_ack(&mut r, v5, PUBACK_CODES)?),
        6 => Packet::PubRel(pub_ack(&mut r, v5, PUBREL_CODES)?),
        7 => Packet::PubComp(pub_ack(&mut r, v5, PUBREL_CODES)?),
        8 => Packet::Subscribe(subscribe(&mut r, v5)?),
        9 => Packet::SubAck(suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(unsuback(&mut r, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(disconnect(&mut r, v5)?),
        15 if v5 => Packet::Auth(auth(&mut r)?),
        15 => return Err(Malformed("AUTH packet before MQTT 5")),
        _ => return Err(Malformed("reserved packet type 0")),
    };
    r.finish()?;
    Ok(packet)
}

fn connect(r: &mut Reader) -> Result<Connect> {
    let name_len = usize::from(r.u16()?);
    let name = r.slice(name_len)?;
    let level = r.u8()?;
    // Mosquitto bridges set bit 7 of the level ("try_private") to say "I am a bridge";
    // the protocol is otherwise the same, so accept it as that level.
    let protocol = match (name, level) {
        (b"MQIsdp", 3 | 0x83) => ProtocolVersion::V31,
        (b"MQTT", 4 | 0x84) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp" | b"MQTT", level) => return Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let v5 = protocol.is_v5();

    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(Malformed("will QoS or retain set without will flag"));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(Malformed("will QoS 3"))?;
    if password_flag && !username_flag && !v5 {
        return Err(Malformed("password flag without user name flag"));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        connect_properties(&mut r.properties()?)?
    } else {
        ConnectProperties::default()
    };

    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if v5 {
            will_properties(&mut r.properties()?)?
        } else {
            WillProperties::default()
        };
        let topic = r.topic()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

fn connack(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck> {
    let ack_flags = r.u8()?;
    let session_present = match version {
        // MQTT 3.1: the first byte is reserved and unused.
        ProtocolVersion::V31 => false,
        _ if ack_flags & 0xfe != 0 => return Err(Malformed("CONNACK reserved flags set")),
        _ => ack_flags & 0x01 != 0,
    };
    let code = r.u8()?;
    let (reason_code, properties) = if version.is_v5() {
        (code, connack_properties(&mut r.properties()?)?)
    } else {
        (
            reason::v5_from_v3_connack_return_code(code),
            ConnAckProperties::default(),
        )
    };
    if session_present && reason_code != 0 {
        return Err(Protocol("session present with a non-zero CONNACK code"));
    }
    Ok(ConnAck {
        session_present,
        reason_code,
        properties,
    })
}

fn publish(flags: u8, r: &mut Reader, v5: bool) -> Result<Publish> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(Malformed("PUBLISH QoS 3"))?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.topic()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r)?
    };
    let properties = if v5 {
        publish_properties(&mut r.properties()?)?
    } else {
        PublishProperties::default()
    };
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(Protocol("empty topic name without topic alias"));
    }
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

/// Reason code (validated against `codes`) then properties, both optional (v5 short forms).
fn reason_and_properties<'a, P>(
    r: &mut Reader<'a>,
    codes: &[u8],
    props: impl FnOnce(&mut Reader<'a>) -> Result<P>,
) -> Result<(u8, Option<P>)> {
    if r.is_empty() {
        return Ok((0, None));
    }
    let code = r.u8()?;
    if !codes.contains(&code) {
        return Err(Protocol("invalid reason code for packet type"));
    }
    if r.is_empty() {
        return Ok((code, None));
    }
    Ok((code, Some(props(&mut r.properties()?)?)))
}

fn pub_ack(r: &mut Reader, v5: bool, codes: &[u8]) -> Result<PubAckLike> {
    let packet_id = packet_id(r)?;
    if !v5 {
        return Ok(PubAckLike::new(packet_id));
    }
    let (reason_code, properties) = reason_and_properties(r, codes, ack_properties)?;
    Ok(PubAckLike {
        packet_id,
        reason_code,
        properties: properties.unwrap_or_default(),
    })
}

fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe> {
    let packet_id = packet_id(r)?;
    let (subscription_identifier, user_properties) = if v5 {
        subscribe_properties(&mut r.properties()?)?
    } else {
        (None, Vec::new())
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        let reserved = if v5 { 0xc0 } else { 0xfc };
        if options & reserved != 0 {
            return Err(Malformed("subscription options reserved bits set"));
        }
        let qos = QoS::from_u8(options & 0x03).ok_or(Malformed("subscription QoS 3"))?;
        let retain_handling = (options >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(Malformed("retain handling 3"));
        }
        filters.push(SubscribeFilter {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local: options & 0x04 != 0,
                retain_as_published: options & 0x08 != 0,
                retain_handling,
            },
        });
    }
    if filters.is_empty() {
        return Err(Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        subscription_identifier,
        user_properties,
        filters,
    })
}

fn suback(r: &mut Reader, v5: bool) -> Result<SubAck> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        ack_properties(&mut r.properties()?)?
    } else {
        AckProperties::default()
    };
    let reason_codes = r.rest_vec();
    if reason_codes.is_empty() {
        return Err(Malformed("SUBACK without return codes"));
    }
    if !v5 && reason_codes.iter().any(|c| !matches!(c, 0 | 1 | 2 | 0x80)) {
        return Err(Malformed("invalid SUBACK return code"));
    }
    Ok(SubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe> {
    let packet_id = packet_id(r)?;
    let user_properties = if v5 {
        unsubscribe_properties(&mut r.properties()?)?
    } else {
        Vec::new()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        user_properties,
        filters,
    })
}

fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck> {
    let packet_id = packet_id(r)?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            ..Default::default()
        });
    }
    let properties = ack_properties(&mut r.properties()?)?;
    let reason_codes = r.rest_vec();
    if reason_codes.is_empty() {
        return Err(Malformed("UNSUBACK without reason codes"));
    }
    Ok(UnsubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect> {
    if !v5 {
        return Ok(Disconnect::default());
    }
    let (reason_code, properties) =
        reason_and_properties(r, DISCONNECT_CODES, disconnect_properties)?;
    Ok(Disconnect {
        reason_code,
        properties: properties.unwrap_or_default(),
    })
}

fn auth(r: &mut Reader) -> Result<Auth> {
    let (reason_code, properties) = reason_and_properties(r, AUTH_CODES, auth_properties)?;
    Ok(Auth {
        reason_code,
        properties: properties.unwrap_or_default(),
    })
}
