//! Codec tests: known bytes per packet type and version, one test per rumqttc defect
//! (research notes, crates.md section 1), and property tests.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::decode::{AUTH_CODES, DISCONNECT_CODES, PUBACK_CODES, PUBREL_CODES};
use super::*;
use crate::protocol::types::*;

use ProtocolVersion::{V31, V311, V5};

const MAX: usize = 1 << 20;

fn dec(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let r = decode(&mut buf, version, MAX);
    if let Ok(Some(_)) = r {
        assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    }
    r
}

fn ok(bytes: &[u8], version: ProtocolVersion) -> Packet {
    match dec(bytes, version) {
        Ok(Some(p)) => p,
        other => panic!("expected a packet from {bytes:02x?}, got {other:?}"),
    }
}

fn err(bytes: &[u8], version: ProtocolVersion) -> DecodeError {
    match dec(bytes, version) {
        Err(e) => e,
        other => panic!("expected an error from {bytes:02x?}, got {other:?}"),
    }
}

fn enc(p: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, version, &mut buf);
    assert_eq!(buf.len(), encoded_len(p, version), "encoded_len for {p:?}");
    buf.to_vec()
}

/// Decodes `bytes` to `packet` and encodes `packet` back to exactly `bytes`.
fn both_ways(bytes: &[u8], version: ProtocolVersion, packet: Packet) {
    assert_eq!(ok(bytes, version), packet, "decode {bytes:02x?}");
    assert_eq!(enc(&packet, version), bytes, "encode {packet:?}");
}

fn is_malformed(e: DecodeError) -> bool {
    matches!(e, DecodeError::Malformed(_))
}

fn is_protocol(e: DecodeError) -> bool {
    matches!(e, DecodeError::Protocol(_))
}

fn user(a: &str, b: &str) -> UserProperty {
    (a.to_owned(), b.to_owned())
}

// ------------------------------------------------------------------------------------------
// Framing
// ------------------------------------------------------------------------------------------

#[test]
fn incomplete_packets_consume_nothing() {
    for bytes in [&[][..], &[0x30], &[0x30, 0x80], &[0x30, 0x05, 0x00, 0x01]] {
        let mut buf = BytesMut::from(bytes);
        assert_eq!(decode(&mut buf, V311, MAX), Ok(None));
        assert_eq!(&buf[..], bytes);
    }
}

#[test]
fn incomplete_packet_reserves_room_for_the_rest() {
    let mut buf = BytesMut::from(&[0x30, 0xe8, 0x07][..]); // remaining 1000
    assert_eq!(decode(&mut buf, V311, MAX), Ok(None));
    assert!(buf.capacity() >= 1003);
}

#[test]
fn remaining_length_longer_than_four_bytes_is_malformed() {
    assert!(is_malformed(err(
        &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        V311
    )));
    // The largest 4-byte value is fine (and too large here).
    assert_eq!(
        err(&[0x30, 0xff, 0xff, 0xff, 0x7f], V311),
        DecodeError::PacketTooLarge
    );
}

#[test]
fn remaining_length_not_minimal_is_malformed() {
    assert!(is_malformed(err(&[0xc0, 0x80, 0x00], V311)));
}

#[test]
fn too_large_is_reported_before_the_body_arrives() {
    // Whole packet = 2 + 10 bytes; only the header is here.
    let mut buf = BytesMut::from(&[0x30, 0x0a][..]);
    assert_eq!(decode(&mut buf, V5, 11), Err(DecodeError::PacketTooLarge));
    let mut buf = BytesMut::from(&[0x30, 0x0a][..]);
    assert_eq!(decode(&mut buf, V5, 12), Ok(None));
    // The limit counts the fixed header too.
    let mut buf = BytesMut::from(&[0xc0, 0x00][..]);
    assert_eq!(decode(&mut buf, V5, 1), Err(DecodeError::PacketTooLarge));
    let mut buf = BytesMut::from(&[0xc0, 0x00][..]);
    assert_eq!(decode(&mut buf, V5, 2), Ok(Some(Packet::PingReq)));
}

#[test]
fn decodes_one_packet_at_a_time() {
    let mut buf = BytesMut::from(&[0xc0, 0x00, 0xd0, 0x00, 0xe0][..]);
    assert_eq!(decode(&mut buf, V311, MAX), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buf, V311, MAX), Ok(Some(Packet::PingResp)));
    assert_eq!(decode(&mut buf, V311, MAX), Ok(None));
    assert_eq!(&buf[..], &[0xe0]);
}

#[test]
fn reserved_packet_type_is_malformed() {
    assert!(is_malformed(err(&[0x00, 0x00], V311)));
    assert!(is_malformed(err(&[0x00, 0x00], V5)));
}

#[test]
fn error_reason_codes() {
    assert_eq!(DecodeError::PacketTooLarge.reason_code(), 0x95);
    assert_eq!(DecodeError::Malformed("x").reason_code(), 0x81);
    assert_eq!(DecodeError::Protocol("x").reason_code(), 0x82);
    assert_eq!(
        DecodeError::UnsupportedProtocolVersion(6).reason_code(),
        0x84
    );
    assert_eq!(DecodeError::InvalidProtocolName.reason_code(), 0x84);
    assert_eq!(
        DecodeError::Malformed("bad thing").to_string(),
        "malformed packet: bad thing"
    );
}

// ------------------------------------------------------------------------------------------
// CONNECT
// ------------------------------------------------------------------------------------------

fn connect(protocol: ProtocolVersion) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: "a".into(),
        ..Default::default()
    }
}

#[test]
fn connect_v311() {
    let bytes = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a',
    ];
    let p = Packet::Connect(Box::new(connect(V311)));
    both_ways(&bytes, V311, p.clone());
    // The CONNECT's own level decides, not the version argument.
    assert_eq!(ok(&bytes, V5), p);
}

#[test]
fn connect_v31_mqisdp() {
    // defect 8: MQTT 3.1 (`MQIsdp`, level 3) is supported.
    let bytes = [
        0x10, 0x0f, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00,
        0x01, b'a',
    ];
    let p = Packet::Connect(Box::new(connect(V31)));
    both_ways(&bytes, V311, p.clone());
    assert_eq!(ok(&bytes, V5), p);
}

#[test]
fn connect_v5_with_properties() {
    // Receive Maximum 20, then client id "a".
    let bytes = [
        0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x03, 0x21, 0x00,
        0x14, 0x00, 0x01, b'a',
    ];
    let mut c = connect(V5);
    c.properties.receive_maximum = Some(20);
    both_ways(&bytes, V5, Packet::Connect(Box::new(c)));
}

#[test]
fn level_5_connect_is_parsed_as_v5_whatever_the_version_argument() {
    // defect 8: a v4 codec misparses a level-5 CONNECT.
    let bytes = [
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x01,
        b'a',
    ];
    for v in [V31, V311, V5] {
        let Packet::Connect(c) = ok(&bytes, v) else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.protocol, V5);
        assert_eq!(c.client_id, "a");
    }
}

#[test]
fn connect_unknown_level_and_name() {
    let mut bytes = vec![
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a',
    ];
    assert_eq!(
        err(&bytes, V311),
        DecodeError::UnsupportedProtocolVersion(6)
    );
    bytes[8] = 3; // MQTT + level 3
    assert_eq!(
        err(&bytes, V311),
        DecodeError::UnsupportedProtocolVersion(3)
    );
    bytes[8] = 4;
    bytes[7] = b'X';
    assert_eq!(err(&bytes, V311), DecodeError::InvalidProtocolName);
}

#[test]
fn connect_reserved_flag_must_be_zero() {
    // defect 6: v4 CONNECT reserved bit.
    for (level, v) in [(4u8, V311), (5, V5)] {
        let mut bytes = vec![
            0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x03, 0x00, 0x3c, 0x00, 0x01,
            b'a',
        ];
        if level == 5 {
            bytes.insert(12, 0x00);
            bytes[1] += 1;
        }
        assert!(is_malformed(err(&bytes, v)), "level {level}");
    }
}

#[test]
fn connect_password_without_username() {
    // defect 6: malformed in 3.1.1, allowed in v5.
    let v4 = [
        0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x42, 0x00, 0x3c, 0x00, 0x01, b'a',
        0x00, 0x02, b'p', b'w',
    ];
    assert!(is_malformed(err(&v4, V311)));
    let v5 = [
        0x10, 0x12, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x42, 0x00, 0x3c, 0x00, 0x00, 0x01,
        b'a', 0x00, 0x02, b'p', b'w',
    ];
    let mut c = connect(V5);
    c.password = Some(Bytes::from_static(b"pw"));
    both_ways(&v5, V5, Packet::Connect(Box::new(c)));
}

#[test]
fn connect_binary_password_and_will() {
    // defect 8: binary passwords.
    let bytes = [
        0x10, 0x23, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xee, 0x00, 0x3c, 0x00, 0x01, b'a',
        0x00, 0x03, b'w', b'/', b't', 0x00, 0x02, 0xde, 0xad, 0x00, 0x01, b'u', 0x00, 0x04, 0xff,
        0x00, 0xfe, 0x80,
    ];
    // 0xee = username | password | will retain | will QoS 1 | will | clean
    let mut c = connect(V311);
    c.will = Some(Will {
        topic: Arc::from("w/t"),
        payload: Bytes::from_static(&[0xde, 0xad]),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
    });
    c.username = Some("u".into());
    c.password = Some(Bytes::from_static(&[0xff, 0x00, 0xfe, 0x80]));
    // Fix up the remaining length: 0x21 bytes of body.
    let mut bytes = bytes.to_vec();
    bytes[1] = (bytes.len() - 2) as u8;
    both_ways(&bytes, V311, Packet::Connect(Box::new(c)));
}

#[test]
fn connect_will_flags_without_will_are_malformed() {
    // Will QoS 1 without the will flag.
    let bytes = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x0a, 0x00, 0x3c, 0x00, 0x01, b'a',
    ];
    assert!(is_malformed(err(&bytes, V311)));
    // Will QoS 3.
    let bytes = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x1e, 0x00, 0x3c, 0x00, 0x01, b'a',
    ];
    assert!(is_malformed(err(&bytes, V311)));
}

#[test]
fn connect_property_checks() {
    let with_props = |props: &[u8]| {
        let mut b = vec![
            0x10, 0x00, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c,
        ];
        b.push(props.len() as u8);
        b.extend_from_slice(props);
        b.extend_from_slice(&[0x00, 0x01, b'a']);
        b[1] = (b.len() - 2) as u8;
        b
    };
    // Receive Maximum 0, Maximum Packet Size 0: protocol errors.
    assert!(is_protocol(err(&with_props(&[0x21, 0x00, 0x00]), V5)));
    assert!(is_protocol(err(
        &with_props(&[0x27, 0x00, 0x00, 0x00, 0x00]),
        V5
    )));
    // Request Problem Information 2.
    assert!(is_protocol(err(&with_props(&[0x17, 0x02]), V5)));
    // Duplicate Session Expiry Interval.
    assert!(is_protocol(err(
        &with_props(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]),
        V5
    )));
    // Topic Alias is not a CONNECT property; 0x7f is no property at all.
    assert!(is_malformed(err(&with_props(&[0x23, 0x00, 0x01]), V5)));
    assert!(is_malformed(err(&with_props(&[0x7f, 0x00]), V5)));
    // Authentication Data without Authentication Method.
    assert!(is_protocol(err(&with_props(&[0x16, 0x00, 0x01, 0xaa]), V5)));
    // Property length beyond the packet.
    let mut b = with_props(&[]);
    b[12] = 0x7f;
    assert!(is_malformed(err(&b, V5)));
    // User properties repeat and keep their order.
    let b = with_props(&[
        0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'1', 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'2',
    ]);
    let Packet::Connect(c) = ok(&b, V5) else {
        panic!()
    };
    assert_eq!(
        c.properties.user_properties,
        vec![user("k", "1"), user("k", "2")]
    );
    assert_eq!(enc(&Packet::Connect(c), V5), b);
}

#[test]
fn connect_trailing_bytes_are_malformed() {
    let bytes = [
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a',
        0x00,
    ];
    assert!(is_malformed(err(&bytes, V311)));
}

// ------------------------------------------------------------------------------------------
// CONNACK
// ------------------------------------------------------------------------------------------

#[test]
fn connack_v311() {
    both_ways(
        &[0x20, 0x02, 0x01, 0x00],
        V311,
        Packet::ConnAck(ConnAck {
            session_present: true,
            ..Default::default()
        }),
    );
    // Return code 5 (not authorized) <-> v5 0x87.
    both_ways(
        &[0x20, 0x02, 0x00, 0x05],
        V311,
        Packet::ConnAck(ConnAck {
            reason_code: 0x87,
            ..Default::default()
        }),
    );
    // v5 codes are mapped to 3.1.1 return codes; session present is dropped with an error.
    let p = Packet::ConnAck(ConnAck {
        session_present: true,
        reason_code: 0x8c, // bad authentication method
        ..Default::default()
    });
    assert_eq!(enc(&p, V311), [0x20, 0x02, 0x00, 0x04]);
    // Reserved ack flags.
    assert!(is_malformed(err(&[0x20, 0x02, 0x02, 0x00], V311)));
    // Session present with a failure code.
    assert!(is_protocol(err(&[0x20, 0x02, 0x01, 0x05], V311)));
}

#[test]
fn connack_v31_has_no_session_present() {
    let p = Packet::ConnAck(ConnAck {
        session_present: true,
        ..Default::default()
    });
    assert_eq!(enc(&p, V31), [0x20, 0x02, 0x00, 0x00]);
    assert_eq!(
        ok(&[0x20, 0x02, 0x00, 0x01], V31),
        Packet::ConnAck(ConnAck {
            reason_code: 0x84,
            ..Default::default()
        })
    );
}

#[test]
fn connack_v5() {
    both_ways(
        &[0x20, 0x03, 0x01, 0x00, 0x00],
        V5,
        Packet::ConnAck(ConnAck {
            session_present: true,
            ..Default::default()
        }),
    );
    // Maximum QoS 1, Assigned Client Identifier "c", Topic Alias Maximum 10.
    let bytes = [
        0x20, 0x0e, 0x00, 0x00, 0x0b, 0x24, 0x01, 0x12, 0x00, 0x01, b'c', 0x22, 0x00, 0x0a, 0x25,
        0x00,
    ];
    let mut bytes = bytes.to_vec();
    bytes[4] = (bytes.len() - 5) as u8;
    bytes[1] = (bytes.len() - 2) as u8;
    let p = Packet::ConnAck(ConnAck {
        session_present: false,
        reason_code: 0,
        properties: ConnAckProperties {
            maximum_qos: Some(1),
            retain_available: Some(0),
            assigned_client_identifier: Some("c".into()),
            topic_alias_maximum: Some(10),
            ..Default::default()
        },
    });
    assert_eq!(ok(&bytes, V5), p);
    let again = enc(&p, V5);
    assert_eq!(ok(&again, V5), p);
    assert_eq!(again.len(), bytes.len());
    // Maximum QoS 2 is a protocol error.
    assert!(is_protocol(err(
        &[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02],
        V5
    )));
    // A v5 CONNACK must have a property length.
    assert!(is_malformed(err(&[0x20, 0x02, 0x00, 0x00], V5)));
}

// ------------------------------------------------------------------------------------------
// PUBLISH
// ------------------------------------------------------------------------------------------

fn publish(qos: QoS, packet_id: u16) -> Publish {
    Publish {
        qos,
        packet_id,
        topic: Arc::from("a/b"),
        payload: Bytes::from_static(b"hi"),
        ..Default::default()
    }
}

#[test]
fn publish_v311() {
    both_ways(
        &[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
        V311,
        Packet::Publish(publish(QoS::AtMostOnce, 0)),
    );
    let mut p = publish(QoS::AtLeastOnce, 10);
    p.dup = true;
    p.retain = true;
    both_ways(
        &[
            0x3b, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0a, b'h', b'i',
        ],
        V311,
        Packet::Publish(p),
    );
    both_ways(
        &[0x34, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0b],
        V31,
        Packet::Publish(Publish {
            payload: Bytes::new(),
            ..publish(QoS::ExactlyOnce, 11)
        }),
    );
}

#[test]
fn publish_v5() {
    both_ways(
        &[0x30, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, b'h', b'i'],
        V5,
        Packet::Publish(publish(QoS::AtMostOnce, 0)),
    );
    // Empty topic with a Topic Alias.
    let mut p = publish(QoS::AtLeastOnce, 1);
    p.topic = Arc::from("");
    p.properties.topic_alias = Some(3);
    both_ways(
        &[
            0x32, 0x0a, 0x00, 0x00, 0x00, 0x01, 0x03, 0x23, 0x00, 0x03, b'h', b'i',
        ],
        V5,
        Packet::Publish(p),
    );
}

#[test]
fn publish_payload_is_a_slice_of_the_read_buffer() {
    let mut buf = BytesMut::from(&[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'][..]);
    let start = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V311, MAX) else {
        panic!()
    };
    assert_eq!(p.payload.as_ptr() as usize, start + 7);
}

#[test]
fn publish_flag_checks() {
    // QoS 3, DUP on QoS 0, packet id 0.
    assert!(is_malformed(err(
        &[0x36, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01],
        V311
    )));
    assert!(is_malformed(err(
        &[0x38, 0x05, 0x00, 0x03, b'a', b'/', b'b'],
        V311
    )));
    assert!(is_malformed(err(
        &[0x32, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x00],
        V311
    )));
    // DUP is never written for QoS 0.
    let p = Packet::Publish(Publish {
        dup: true,
        ..publish(QoS::AtMostOnce, 0)
    });
    assert_eq!(enc(&p, V311)[0], 0x30);
}

#[test]
fn publish_strings_must_be_valid_utf8_without_nul() {
    assert!(is_malformed(err(
        &[0x30, 0x04, 0x00, 0x02, 0xc3, 0x28],
        V311
    )));
    assert!(is_malformed(err(
        &[0x30, 0x04, 0x00, 0x02, b'a', 0x00],
        V311
    )));
    // UTF-16 surrogate encoded in UTF-8 (ED A0 80).
    assert!(is_malformed(err(
        &[0x30, 0x05, 0x00, 0x03, 0xed, 0xa0, 0x80],
        V311
    )));
    // Wildcards are the broker's business, not the codec's.
    assert!(ok(&[0x30, 0x03, 0x00, 0x01, b'#'], V311) != Packet::PingReq);
}

#[test]
fn publish_empty_topic_needs_an_alias() {
    assert!(is_protocol(err(&[0x30, 0x02, 0x00, 0x00], V311)));
    assert!(is_protocol(err(&[0x30, 0x03, 0x00, 0x00, 0x00], V5)));
}

#[test]
fn publish_topic_alias_zero_is_a_protocol_error() {
    // defect 6.
    assert!(is_protocol(err(
        &[0x30, 0x07, 0x00, 0x01, b't', 0x03, 0x23, 0x00, 0x00],
        V5
    )));
}

#[test]
fn publish_multiple_subscription_identifiers_then_another_property() {
    // defect 5: ids 1, 2, 128 then Content Type "x"; payload "p".
    let bytes = [
        0x30, 0x10, 0x00, 0x01, b't', 0x0b, 0x0b, 0x01, 0x0b, 0x02, 0x0b, 0x80, 0x01, 0x03, 0x00,
        0x01, b'x', b'p',
    ];
    let p = ok(&bytes, V5);
    let Packet::Publish(ref publish) = p else {
        panic!()
    };
    assert_eq!(publish.properties.subscription_identifiers, [1, 2, 128]);
    assert_eq!(publish.properties.content_type.as_deref(), Some("x"));
    assert_eq!(&publish.payload[..], b"p");
    let again = enc(&p, V5);
    assert_eq!(again.len(), bytes.len());
    assert_eq!(ok(&again, V5), p);
    // Subscription Identifier 0 is a protocol error.
    assert!(is_protocol(err(
        &[0x30, 0x06, 0x00, 0x01, b't', 0x02, 0x0b, 0x00],
        V5
    )));
}

#[test]
fn duplicate_v5_properties_are_protocol_errors() {
    // defect 6: Message Expiry Interval twice.
    assert!(is_protocol(err(
        &[0x30, 0x0e, 0x00, 0x01, b't', 0x0a, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2],
        V5
    )));
    // Topic Alias twice.
    assert!(is_protocol(err(
        &[0x30, 0x0a, 0x00, 0x01, b't', 0x06, 0x23, 0, 1, 0x23, 0, 2],
        V5
    )));
    // Reason String twice on a PUBACK.
    assert!(is_protocol(err(
        &[0x40, 0x0a, 0x00, 0x01, 0x00, 0x06, 0x1f, 0, 0, 0x1f, 0, 0],
        V5
    )));
    // Subscription Identifier twice on a SUBSCRIBE.
    assert!(is_protocol(err(
        &[0x82, 0x0b, 0x00, 0x01, 0x04, 0x0b, 0x01, 0x0b, 0x02, 0x00, 0x01, b'a', 0x00],
        V5
    )));
}

#[test]
fn publish_property_value_ranges() {
    // Payload Format Indicator 2.
    assert!(is_protocol(err(
        &[0x30, 0x06, 0x00, 0x01, b't', 0x02, 0x01, 0x02],
        V5
    )));
    // Property not allowed on PUBLISH (Receive Maximum).
    assert!(is_malformed(err(
        &[0x30, 0x07, 0x00, 0x01, b't', 0x03, 0x21, 0x00, 0x01],
        V5
    )));
}

// ------------------------------------------------------------------------------------------
// PUBACK, PUBREC, PUBREL, PUBCOMP
// ------------------------------------------------------------------------------------------

#[test]
fn puback_family_v311() {
    both_ways(
        &[0x40, 0x02, 0x00, 0x01],
        V311,
        Packet::PubAck(PubAckLike::new(1)),
    );
    both_ways(
        &[0x50, 0x02, 0x00, 0x02],
        V311,
        Packet::PubRec(PubAckLike::new(2)),
    );
    both_ways(
        &[0x62, 0x02, 0x00, 0x03],
        V311,
        Packet::PubRel(PubAckLike::new(3)),
    );
    both_ways(
        &[0x70, 0x02, 0x00, 0x04],
        V31,
        Packet::PubComp(PubAckLike::new(4)),
    );
    // v5 reason codes are not on the 3.x wire.
    assert_eq!(
        enc(&Packet::PubAck(PubAckLike::with_reason(1, 0x10)), V311),
        [0x40, 0x02, 0x00, 0x01]
    );
    assert!(is_malformed(err(&[0x40, 0x03, 0x00, 0x01, 0x00], V311)));
    assert!(is_malformed(err(&[0x40, 0x02, 0x00, 0x00], V311)));
    assert!(is_malformed(err(&[0x40, 0x01, 0x00], V311)));
}

#[test]
fn puback_family_v5_short_forms() {
    both_ways(
        &[0x40, 0x02, 0x00, 0x01],
        V5,
        Packet::PubAck(PubAckLike::new(1)),
    );
    both_ways(
        &[0x50, 0x03, 0x00, 0x01, 0x10],
        V5,
        Packet::PubRec(PubAckLike::with_reason(1, 0x10)),
    );
    both_ways(
        &[0x62, 0x03, 0x00, 0x01, 0x92],
        V5,
        Packet::PubRel(PubAckLike::with_reason(1, 0x92)),
    );
    // Reason 0 with an empty property length decodes too.
    assert_eq!(
        ok(&[0x70, 0x04, 0x00, 0x01, 0x00, 0x00], V5),
        Packet::PubComp(PubAckLike::new(1))
    );
    let p = Packet::PubAck(PubAckLike {
        packet_id: 7,
        reason_code: 0x80,
        properties: AckProperties {
            reason_string: Some("no".into()),
            user_properties: vec![user("a", "b")],
        },
    });
    both_ways(
        &[
            0x40, 0x10, 0x00, 0x07, 0x80, 0x0c, 0x1f, 0x00, 0x02, b'n', b'o', 0x26, 0x00, 0x01,
            b'a', 0x00, 0x01, b'b',
        ],
        V5,
        p,
    );
    // Reason codes outside the packet's set.
    assert!(is_protocol(err(&[0x40, 0x03, 0x00, 0x01, 0x05], V5)));
    assert!(is_protocol(err(&[0x62, 0x03, 0x00, 0x01, 0x10], V5)));
}

#[test]
fn reserved_fixed_header_flags_are_checked() {
    // defect 6: SUBSCRIBE/UNSUBSCRIBE/PUBREL must have 0b0010, others 0 (except PUBLISH).
    for v in [V311, V5] {
        assert!(is_malformed(err(&[0x60, 0x02, 0x00, 0x01], v)));
        assert!(is_malformed(err(
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
            v
        )));
        assert!(is_malformed(err(
            &[0xa0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
            v
        )));
        assert!(is_malformed(err(&[0x41, 0x02, 0x00, 0x01], v)));
        assert!(is_malformed(err(&[0x52, 0x02, 0x00, 0x01], v)));
        assert!(is_malformed(err(&[0x78, 0x02, 0x00, 0x01], v)));
        assert!(is_malformed(err(&[0xc1, 0x00], v)));
        assert!(is_malformed(err(&[0xd4, 0x00], v)));
        assert!(is_malformed(err(&[0xe2, 0x00], v)));
        assert!(is_malformed(err(&[0x12, 0x00], v)));
        assert!(is_malformed(err(&[0x2f, 0x02, 0x00, 0x00], v)));
        assert!(is_malformed(err(&[0x92, 0x03, 0x00, 0x01, 0x00], v)));
        assert!(is_malformed(err(&[0xb1, 0x02, 0x00, 0x01], v)));
    }
    assert!(is_malformed(err(&[0xf1, 0x00], V5)));
}

// ------------------------------------------------------------------------------------------
// SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK
// ------------------------------------------------------------------------------------------

fn filter(f: &str, qos: QoS) -> SubscribeFilter {
    SubscribeFilter {
        filter: f.into(),
        options: SubscriptionOptions {
            qos,
            ..Default::default()
        },
    }
}

#[test]
fn subscribe_v311() {
    both_ways(
        &[
            0x82, 0x0c, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x01, b'#', 0x02,
        ],
        V311,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![
                filter("a/b", QoS::AtLeastOnce),
                filter("#", QoS::ExactlyOnce),
            ],
            ..Default::default()
        }),
    );
    // Upper 6 option bits must be 0 in 3.x; QoS 3 is malformed.
    assert!(is_malformed(err(
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04],
        V311
    )));
    assert!(is_malformed(err(
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03],
        V311
    )));
    // No filters, packet id 0.
    assert!(is_protocol(err(&[0x82, 0x02, 0x00, 0x01], V311)));
    assert!(is_malformed(err(
        &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
        V311
    )));
}

#[test]
fn subscribe_v5() {
    let bytes = [
        0x82, 0x0b, 0x00, 0x01, 0x02, 0x0b, 0x05, 0x00, 0x03, b'a', b'/', b'b', 0x2d,
    ];
    both_ways(
        &bytes,
        V5,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscription_identifier: Some(5),
            user_properties: vec![],
            filters: vec![SubscribeFilter {
                filter: "a/b".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
            }],
        }),
    );
    let with_options = |o: u8| [0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', o];
    assert!(is_malformed(err(&with_options(0x40), V5)));
    assert!(is_malformed(err(&with_options(0x80), V5)));
    assert!(is_malformed(err(&with_options(0x30), V5)));
    assert!(is_malformed(err(&with_options(0x03), V5)));
    assert!(ok(&with_options(0x1e), V5) != Packet::PingReq);
    assert!(is_protocol(err(&[0x82, 0x03, 0x00, 0x01, 0x00], V5)));
    // Subscription Identifier 0.
    assert!(is_protocol(err(
        &[0x82, 0x09, 0x00, 0x01, 0x02, 0x0b, 0x00, 0x00, 0x01, b'a', 0x00],
        V5
    )));
}

#[test]
fn suback() {
    both_ways(
        &[0x90, 0x05, 0x00, 0x01, 0x00, 0x01, 0x80],
        V311,
        Packet::SubAck(SubAck {
            packet_id: 1,
            reason_codes: vec![0, 1, 0x80],
            ..Default::default()
        }),
    );
    // 3.x writes 0x80 for every failure code.
    let p = Packet::SubAck(SubAck {
        packet_id: 1,
        reason_codes: vec![2, 0x87, 0xa2],
        ..Default::default()
    });
    assert_eq!(enc(&p, V311), [0x90, 0x05, 0x00, 0x01, 0x02, 0x80, 0x80]);
    both_ways(&[0x90, 0x06, 0x00, 0x01, 0x00, 0x02, 0x87, 0xa2], V5, p);
    assert!(is_malformed(err(&[0x90, 0x03, 0x00, 0x01, 0x03], V311)));
    assert!(is_malformed(err(&[0x90, 0x02, 0x00, 0x01], V311)));
}

#[test]
fn unsubscribe_and_unsuback() {
    let p = Packet::Unsubscribe(Unsubscribe {
        packet_id: 1,
        user_properties: vec![],
        filters: vec!["a".into(), "b/#".into()],
    });
    both_ways(
        &[
            0xa2, 0x0a, 0x00, 0x01, 0x00, 0x01, b'a', 0x00, 0x03, b'b', b'/', b'#',
        ],
        V311,
        p.clone(),
    );
    both_ways(
        &[
            0xa2, 0x0b, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x00, 0x03, b'b', b'/', b'#',
        ],
        V5,
        p,
    );
    assert!(is_protocol(err(&[0xa2, 0x02, 0x00, 0x01], V311)));
    assert!(is_protocol(err(&[0xa2, 0x03, 0x00, 0x01, 0x00], V5)));

    // 3.x UNSUBACK: packet id only.
    both_ways(
        &[0xb0, 0x02, 0x00, 0x05],
        V311,
        Packet::UnsubAck(UnsubAck {
            packet_id: 5,
            ..Default::default()
        }),
    );
    let p = Packet::UnsubAck(UnsubAck {
        packet_id: 5,
        properties: Default::default(),
        reason_codes: vec![0x00, 0x11],
    });
    assert_eq!(enc(&p, V311), [0xb0, 0x02, 0x00, 0x05]);
    both_ways(&[0xb0, 0x05, 0x00, 0x05, 0x00, 0x00, 0x11], V5, p);
    assert!(is_malformed(err(&[0xb0, 0x03, 0x00, 0x05, 0x00], V311)));
    assert!(is_malformed(err(&[0xb0, 0x03, 0x00, 0x05, 0x00], V5)));
}

// ------------------------------------------------------------------------------------------
// PINGREQ, PINGRESP, DISCONNECT, AUTH
// ------------------------------------------------------------------------------------------

#[test]
fn ping() {
    for v in [V31, V311, V5] {
        both_ways(&[0xc0, 0x00], v, Packet::PingReq);
        both_ways(&[0xd0, 0x00], v, Packet::PingResp);
        assert!(is_malformed(err(&[0xc0, 0x01, 0x00], v)));
    }
}

#[test]
fn disconnect_v311() {
    both_ways(
        &[0xe0, 0x00],
        V311,
        Packet::Disconnect(Disconnect::default()),
    );
    assert!(is_malformed(err(&[0xe0, 0x01, 0x00], V311)));
    // The reason code is not on the 3.x wire.
    let p = Packet::Disconnect(Disconnect {
        reason_code: 0x8e,
        ..Default::default()
    });
    assert_eq!(enc(&p, V311), [0xe0, 0x00]);
}

#[test]
fn disconnect_v5_empty() {
    // defect 1: `e0 00` is a Normal disconnection.
    both_ways(&[0xe0, 0x00], V5, Packet::Disconnect(Disconnect::default()));
}

#[test]
fn disconnect_v5_reason_only() {
    // defects 2 and 3: Mosquitto's session-taken-over `e0 01 8e`, both ways (not `e0 01 8e 00`).
    both_ways(
        &[0xe0, 0x01, 0x8e],
        V5,
        Packet::Disconnect(Disconnect {
            reason_code: 0x8e,
            ..Default::default()
        }),
    );
    // And it is not swallowed when followed by more bytes.
    let mut buf = BytesMut::from(&[0xe0, 0x01, 0x8e, 0xc0, 0x00][..]);
    assert!(matches!(
        decode(&mut buf, V5, MAX),
        Ok(Some(Packet::Disconnect(Disconnect {
            reason_code: 0x8e,
            ..
        })))
    ));
    assert_eq!(decode(&mut buf, V5, MAX), Ok(Some(Packet::PingReq)));
}

#[test]
fn disconnect_v5_with_properties() {
    let p = Packet::Disconnect(Disconnect {
        reason_code: 0,
        properties: DisconnectProperties {
            session_expiry_interval: Some(0),
            ..Default::default()
        },
    });
    both_ways(&[0xe0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0], V5, p);
    assert_eq!(
        ok(&[0xe0, 0x02, 0x04, 0x00], V5),
        Packet::Disconnect(Disconnect {
            reason_code: 4,
            ..Default::default()
        })
    );
    assert!(is_protocol(err(&[0xe0, 0x01, 0x05], V5)));
    // Will Delay Interval is not a DISCONNECT property.
    assert!(is_malformed(err(
        &[0xe0, 0x07, 0x00, 0x05, 0x18, 0, 0, 0, 0],
        V5
    )));
}

#[test]
fn auth_v5() {
    // defect 4: AUTH (type 15) decodes and encodes.
    both_ways(&[0xf0, 0x00], V5, Packet::Auth(Auth::default()));
    both_ways(
        &[0xf0, 0x01, 0x18],
        V5,
        Packet::Auth(Auth {
            reason_code: 0x18,
            ..Default::default()
        }),
    );
    let p = Packet::Auth(Auth {
        reason_code: 0x18,
        properties: AuthProperties {
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(&[1, 2])),
            ..Default::default()
        },
    });
    both_ways(
        &[
            0xf0, 0x0f, 0x18, 0x0d, 0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', 0x16, 0x00,
            0x02, 1, 2,
        ],
        V5,
        p,
    );
    assert!(is_protocol(err(&[0xf0, 0x01, 0x01], V5)));
    // AUTH does not exist before MQTT 5.
    assert!(is_malformed(err(&[0xf0, 0x00], V311)));
}

// ------------------------------------------------------------------------------------------
// Property tests
// ------------------------------------------------------------------------------------------

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(V31), Just(V311), Just(V5)]
}

fn string() -> impl Strategy<Value = String> {
    "\\PC{0,6}"
}

fn opt_string() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(string())
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..8).prop_map(Bytes::from)
}

fn opt_bin() -> impl Strategy<Value = Option<Bytes>> {
    proptest::option::of(bin())
}

fn users() -> impl Strategy<Value = Vec<UserProperty>> {
    proptest::collection::vec((string(), string()), 0..3)
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    proptest::option::of(0..=1u8)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn sub_id() -> impl Strategy<Value = u32> {
    1..=MAX_VARINT as u32
}

fn ack_props() -> impl Strategy<Value = AckProperties> {
    (opt_string(), users()).prop_map(|(reason_string, user_properties)| AckProperties {
        reason_string,
        user_properties,
    })
}

fn arb_connect() -> impl Strategy<Value = Packet> {
    let props = (
        proptest::option::of(any::<u32>()),
        proptest::option::of(1..=u16::MAX),
        proptest::option::of(1..=u32::MAX),
        proptest::option::of(any::<u16>()),
        flag(),
        flag(),
        users(),
        opt_string(),
        opt_bin(),
    )
        .prop_map(|(a, b, c, d, e, f, g, method, data)| ConnectProperties {
            session_expiry_interval: a,
            receive_maximum: b,
            maximum_packet_size: c,
            topic_alias_maximum: d,
            request_response_information: e,
            request_problem_information: f,
            user_properties: g,
            authentication_data: method.as_ref().and(data),
            authentication_method: method,
        });
    let will_props = (
        proptest::option::of(any::<u32>()),
        flag(),
        proptest::option::of(any::<u32>()),
        opt_string(),
        opt_string(),
        opt_bin(),
        users(),
    )
        .prop_map(|(a, b, c, d, e, f, g)| WillProperties {
            will_delay_interval: a,
            payload_format_indicator: b,
            message_expiry_interval: c,
            content_type: d,
            response_topic: e,
            correlation_data: f,
            user_properties: g,
        });
    let will = ("\\PC{1,6}", bin(), qos(), any::<bool>(), will_props).prop_map(
        |(topic, payload, qos, retain, properties)| Will {
            topic: Arc::from(topic),
            payload,
            qos,
            retain,
            properties,
        },
    );
    (
        version(),
        any::<bool>(),
        any::<u16>(),
        props,
        string(),
        proptest::option::of(will),
        opt_string(),
        opt_bin(),
    )
        .prop_map(
            |(
                protocol,
                clean_start,
                keep_alive,
                properties,
                client_id,
                will,
                username,
                password,
            )| {
                Packet::Connect(Box::new(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    properties,
                    client_id,
                    will,
                    username,
                    password,
                }))
            },
        )
}

fn arb_connack() -> impl Strategy<Value = Packet> {
    let a = (
        proptest::option::of(any::<u32>()),
        proptest::option::of(1..=u16::MAX),
        flag(),
        flag(),
        proptest::option::of(1..=u32::MAX),
        opt_string(),
        proptest::option::of(any::<u16>()),
        opt_string(),
        users(),
    );
    let b = (
        flag(),
        flag(),
        flag(),
        proptest::option::of(any::<u16>()),
        opt_string(),
        opt_string(),
        opt_string(),
        opt_bin(),
    );
    (any::<bool>(), any::<u8>(), a, b).prop_map(
        |(session_present, reason_code, (a, b, c, d, e, f, g, h, i), (j, k, l, m, n, o, p, q))| {
            Packet::ConnAck(ConnAck {
                session_present: session_present && reason_code == 0,
                reason_code,
                properties: ConnAckProperties {
                    session_expiry_interval: a,
                    receive_maximum: b,
                    maximum_qos: c,
                    retain_available: d,
                    maximum_packet_size: e,
                    assigned_client_identifier: f,
                    topic_alias_maximum: g,
                    reason_string: h,
                    user_properties: i,
                    wildcard_subscription_available: j,
                    subscription_identifiers_available: k,
                    shared_subscription_available: l,
                    server_keep_alive: m,
                    response_information: n,
                    server_reference: o,
                    authentication_data: p.as_ref().and(q),
                    authentication_method: p,
                },
            })
        },
    )
}

fn arb_publish() -> impl Strategy<Value = Packet> {
    let props = (
        flag(),
        proptest::option::of(any::<u32>()),
        proptest::option::of(1..=u16::MAX),
        opt_string(),
        opt_bin(),
        users(),
        proptest::collection::vec(sub_id(), 0..3),
        opt_string(),
    )
        .prop_map(|(a, b, c, d, e, f, g, h)| PublishProperties {
            payload_format_indicator: a,
            message_expiry_interval: b,
            topic_alias: c,
            response_topic: d,
            correlation_data: e,
            user_properties: f,
            subscription_identifiers: g,
            content_type: h,
        });
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        "\\PC{0,8}",
        pid(),
        props,
        proptest::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(
            |(qos, dup, retain, topic, packet_id, mut properties, payload)| {
                if topic.is_empty() && properties.topic_alias.is_none() {
                    properties.topic_alias = Some(1);
                }
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic: Arc::from(topic),
                    packet_id: if qos0 { 0 } else { packet_id },
                    properties,
                    payload: Bytes::from(payload),
                })
            },
        )
}

fn arb_ack(kind: u8) -> impl Strategy<Value = Packet> {
    let codes = if kind < 6 { PUBACK_CODES } else { PUBREL_CODES };
    (pid(), proptest::sample::select(codes), ack_props()).prop_map(
        move |(packet_id, reason_code, properties)| {
            let a = PubAckLike {
                packet_id,
                reason_code,
                properties,
            };
            match kind {
                4 => Packet::PubAck(a),
                5 => Packet::PubRec(a),
                6 => Packet::PubRel(a),
                _ => Packet::PubComp(a),
            }
        },
    )
}

fn arb_subscribe() -> impl Strategy<Value = Packet> {
    let filter = (string(), qos(), any::<bool>(), any::<bool>(), 0..=2u8).prop_map(
        |(filter, qos, no_local, retain_as_published, retain_handling)| SubscribeFilter {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            },
        },
    );
    (
        pid(),
        proptest::option::of(sub_id()),
        users(),
        proptest::collection::vec(filter, 1..4),
    )
        .prop_map(
            |(packet_id, subscription_identifier, user_properties, filters)| {
                Packet::Subscribe(Subscribe {
                    packet_id,
                    subscription_identifier,
                    user_properties,
                    filters,
                })
            },
        )
}

fn arb_packet() -> BoxedStrategy<Packet> {
    let codes = || proptest::collection::vec(any::<u8>(), 1..5);
    proptest::strategy::Union::new(vec![
        arb_connect().boxed(),
        arb_connack().boxed(),
        arb_publish().boxed(),
        arb_publish().boxed(),
        arb_ack(4).boxed(),
        arb_ack(5).boxed(),
        arb_ack(6).boxed(),
        arb_ack(7).boxed(),
        arb_subscribe().boxed(),
        (pid(), ack_props(), codes())
            .prop_map(|(packet_id, properties, reason_codes)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    properties,
                    reason_codes,
                })
            })
            .boxed(),
        (pid(), users(), proptest::collection::vec(string(), 1..4))
            .prop_map(|(packet_id, user_properties, filters)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    user_properties,
                    filters,
                })
            })
            .boxed(),
        (pid(), ack_props(), codes())
            .prop_map(|(packet_id, properties, reason_codes)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    properties,
                    reason_codes,
                })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        (
            proptest::sample::select(DISCONNECT_CODES),
            proptest::option::of(any::<u32>()),
            opt_string(),
            users(),
            opt_string(),
        )
            .prop_map(|(reason_code, a, b, c, d)| {
                Packet::Disconnect(Disconnect {
                    reason_code,
                    properties: DisconnectProperties {
                        session_expiry_interval: a,
                        reason_string: b,
                        user_properties: c,
                        server_reference: d,
                    },
                })
            })
            .boxed(),
        (
            proptest::sample::select(AUTH_CODES),
            opt_string(),
            opt_bin(),
            opt_string(),
            users(),
        )
            .prop_map(
                |(reason_code, method, data, reason_string, user_properties)| {
                    Packet::Auth(Auth {
                        reason_code,
                        properties: AuthProperties {
                            authentication_data: method.as_ref().and(data),
                            authentication_method: method,
                            reason_string,
                            user_properties,
                        },
                    })
                },
            )
            .boxed(),
    ])
    .boxed()
}

/// What a valid v5-superset packet looks like after a trip through `version`'s wire format;
/// `None` if it cannot be sent in that version at all.
fn normalize(p: Packet, version: ProtocolVersion) -> Option<Packet> {
    Some(match p {
        // CONNECT follows its own protocol, not `version`.
        Packet::Connect(mut c) => {
            if !c.protocol.is_v5() {
                c.properties = Default::default();
                if let Some(w) = &mut c.will {
                    w.properties = Default::default();
                }
                if c.username.is_none() {
                    c.password = None;
                }
            }
            Packet::Connect(c)
        }
        p if version.is_v5() => p,
        Packet::ConnAck(c) => {
            let reason_code = reason::v5_from_v3_connack_return_code(
                reason::v3_connack_return_code(c.reason_code),
            );
            Packet::ConnAck(ConnAck {
                session_present: c.session_present && version != V31,
                reason_code,
                properties: Default::default(),
            })
        }
        Packet::Publish(mut p) => {
            p.properties = Default::default();
            if p.topic.is_empty() {
                return None; // needs a v5 Topic Alias
            }
            Packet::Publish(p)
        }
        Packet::PubAck(a) => Packet::PubAck(PubAckLike::new(a.packet_id)),
        Packet::PubRec(a) => Packet::PubRec(PubAckLike::new(a.packet_id)),
        Packet::PubRel(a) => Packet::PubRel(PubAckLike::new(a.packet_id)),
        Packet::PubComp(a) => Packet::PubComp(PubAckLike::new(a.packet_id)),
        Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            packet_id: s.packet_id,
            subscription_identifier: None,
            user_properties: vec![],
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: f.filter,
                    options: SubscriptionOptions {
                        qos: f.options.qos,
                        ..Default::default()
                    },
                })
                .collect(),
        }),
        Packet::SubAck(s) => Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: Default::default(),
            reason_codes: s
                .reason_codes
                .into_iter()
                .map(|c| if c <= 2 { c } else { 0x80 })
                .collect(),
        }),
        Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            user_properties: vec![],
            ..u
        }),
        Packet::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            ..Default::default()
        }),
        Packet::PingReq | Packet::PingResp => p,
        Packet::Disconnect(_) => Packet::Disconnect(Disconnect::default()),
        Packet::Auth(_) => return None,
    })
}

/// Encode, decode again, and the packet must not change (the fuzz target's invariant).
fn reencode_is_stable(p: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(p, version, &mut buf);
    prop_assert_eq!(buf.len(), encoded_len(p, version));
    let again = decode(&mut buf, version, usize::MAX);
    prop_assert_eq!(again, Ok(Some(p.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip(p in arb_packet(), version in version()) {
        let Some(expected) = normalize(p.clone(), version) else {
            return Ok(());
        };
        let mut buf = BytesMut::new();
        encode(&p, version, &mut buf);
        prop_assert_eq!(buf.len(), encoded_len(&p, version));
        let decoded = decode(&mut buf, version, usize::MAX);
        prop_assert_eq!(decoded, Ok(Some(expected)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn split_at_every_byte_is_incomplete_until_the_end(
        p in arb_packet(),
        version in version(),
    ) {
        let Some(expected) = normalize(p.clone(), version) else {
            return Ok(());
        };
        let mut full = BytesMut::new();
        encode(&p, version, &mut full);
        for k in 0..full.len() {
            let mut part = BytesMut::from(&full[..k]);
            prop_assert_eq!(decode(&mut part, version, usize::MAX), Ok(None));
            prop_assert_eq!(part.len(), k);
        }
        // Arriving in two chunks through one buffer gives the packet.
        let cut = full.len() / 2;
        let mut buf = BytesMut::from(&full[..cut]);
        prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(None));
        buf.extend_from_slice(&full[cut..]);
        prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(Some(expected)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        version in version(),
        max in 0usize..128,
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(p)) = decode(&mut buf, version, max) {
            reencode_is_stable(&p, version)?;
        }
    }

    #[test]
    fn mutated_packets_never_panic_and_reencode_stably(
        p in arb_packet(),
        version in version(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = BytesMut::new();
        encode(&p, version, &mut bytes);
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(Some(p)) = decode(&mut bytes, version, usize::MAX) {
            reencode_is_stable(&p, version)?;
        }
    }
}

#[test]
fn oversized_strings_are_truncated_consistently() {
    let long = "é".repeat(40_000); // 80 000 bytes
    let p = Packet::Publish(Publish {
        topic: Arc::from(long.as_str()),
        ..publish(QoS::AtMostOnce, 0)
    });
    let bytes = enc(&p, V311);
    let Packet::Publish(d) = ok(&bytes, V311) else {
        panic!()
    };
    assert_eq!(d.topic.len(), 65_534);
    assert!(long.starts_with(&*d.topic));
}
