//! Hostile and malformed input, as raw bytes on a socket: each case must close only that
//! connection (v5: DISCONNECT with the right reason code first) while another client keeps
//! working.

use crate::common;
use std::time::{Duration, Instant};

use common::*;
use holdfast::protocol::{reason, Packet, ProtocolVersion, QoS};

/// A v5 connection that then sends `bytes`; returns the DISCONNECT reason seen (if any).
async fn v5_send_bad(addr: std::net::SocketAddr, id: &str, bytes: &[u8]) -> Option<u8> {
    let mut c = RawClient::connect(addr, ProtocolVersion::V5, id).await;
    c.send_raw(bytes).await;
    c.expect_closed().await.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason_code),
        _ => None,
    })
}

async fn v3_send_bad(addr: std::net::SocketAddr, id: &str, bytes: &[u8]) {
    let mut c = RawClient::connect(addr, ProtocolVersion::V311, id).await;
    c.send_raw(bytes).await;
    assert!(
        c.expect_closed().await.is_empty(),
        "3.1.1 gets no DISCONNECT"
    );
}

/// Another pair of clients still exchanges a QoS 1 message.
async fn others_unaffected(s: &mut RawClient, p: &mut RawClient, n: u16) {
    p.publish("healthy", &n.to_be_bytes(), QoS::AtLeastOnce, n)
        .await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], &n.to_be_bytes());
    s.puback(got.packet_id).await;
}

#[tokio::test]
async fn malformed_packets_close_only_the_offending_connection() {
    let b = start_broker(|c| c.mqtt.max_packet_size = 1024).await;
    let mut s = RawClient::connect(b.addr, ProtocolVersion::V311, "healthy-sub").await;
    s.subscribe("healthy", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V311, "healthy-pub").await;

    let cases: &[(&str, &[u8], u8)] = &[
        // Remaining length with a fifth continuation byte.
        (
            "bad remaining length",
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            reason::MALFORMED_PACKET,
        ),
        // PUBLISH topic "a\xff" (invalid UTF-8), QoS 0, empty properties.
        (
            "bad utf-8 topic",
            &[0x30, 0x05, 0x00, 0x02, b'a', 0xff, 0x00],
            reason::MALFORMED_PACKET,
        ),
        // SUBSCRIBE with fixed-header flags 0000 instead of 0010.
        (
            "reserved flags",
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'],
            reason::MALFORMED_PACKET,
        ),
        // PUBLISH with QoS 3.
        (
            "qos 3",
            &[0x36, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00],
            reason::MALFORMED_PACKET,
        ),
        // Remaining length 2000 > max packet size 1024.
        ("too large", &[0x30, 0xd0, 0x0f], reason::PACKET_TOO_LARGE),
        // Reserved packet type 0.
        ("packet type 0", &[0x00, 0x00], reason::MALFORMED_PACKET),
        // PUBLISH to a wildcard topic name.
        (
            "wildcard topic",
            &[0x30, 0x04, 0x00, 0x01, b'#', 0x00],
            reason::TOPIC_NAME_INVALID,
        ),
    ];
    for (i, (name, bytes, want)) in cases.iter().enumerate() {
        let got = v5_send_bad(b.addr, &format!("bad5-{i}"), bytes).await;
        // Codecs may classify some of these as protocol errors rather than malformed.
        let acceptable = got == Some(*want)
            || (*want == reason::MALFORMED_PACKET && got == Some(reason::PROTOCOL_ERROR));
        assert!(acceptable, "{name}: expected {want:#04x}, got {got:?}");
        v3_send_bad(b.addr, &format!("bad3-{i}"), &bytes[..]).await;
        others_unaffected(&mut s, &mut p, i as u16 + 1).await;
    }
    b.shutdown().await;
}

#[tokio::test]
async fn garbage_instead_of_connect_is_dropped() {
    let b = start_broker(|_| {}).await;
    let mut s = RawClient::connect(b.addr, ProtocolVersion::V311, "healthy-sub").await;
    s.subscribe("healthy", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V311, "healthy-pub").await;
    for (i, junk) in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x10, 0x02, 0x00, 0x04][..], // CONNECT cut short inside
        &[0x10, 0x07, 0x00, 0x04, b'M', b'Q', b'X', b'X', 0x04][..], // bad protocol name
        &[
            0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x01, 0x00, 0x3c, 0x00, 0x00,
        ][..], // reserved connect flag
    ]
    .iter()
    .enumerate()
    {
        let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
        c.send_raw(junk).await;
        c.expect_closed().await;
        others_unaffected(&mut s, &mut p, i as u16 + 1).await;
    }
    b.shutdown().await;
}

#[tokio::test]
async fn slowloris_connect_is_cut_off_at_the_connect_timeout() {
    let b = start_broker(|c| c.mqtt.connect_timeout_secs = 1).await;
    let mut c = RawClient::tcp(b.addr, ProtocolVersion::V311).await;
    let t0 = Instant::now();
    let connect = [
        0x10u8, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c,
    ];
    let mut closed = false;
    for byte in connect {
        use tokio::io::AsyncWriteExt;
        if c.stream().write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if !closed {
        c.expect_closed().await;
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    b.shutdown().await;
}

#[tokio::test]
async fn many_bad_clients_at_once_do_not_disturb_a_good_one() {
    let b = start_broker(|_| {}).await;
    let mut s = RawClient::connect(b.addr, ProtocolVersion::V311, "healthy-sub").await;
    s.subscribe("healthy", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, ProtocolVersion::V311, "healthy-pub").await;
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let addr = b.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::tcp(addr, ProtocolVersion::V311).await;
            c.send_raw(&[0x10, 0xff, 0xff, 0xff, 0xff, i]).await;
            c.expect_closed().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    others_unaffected(&mut s, &mut p, 1).await;
    b.shutdown().await;
}
