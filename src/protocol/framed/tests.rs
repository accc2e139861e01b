//! The framed reader over real byte streams (`tokio::io::duplex` pipes and byte slices).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::*;
use crate::protocol::{encode, Publish, QoS};

const V: ProtocolVersion = ProtocolVersion::V311;

fn publish_bytes(topic: &str, payload: &[u8]) -> (Publish, Vec<u8>) {
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: 7,
        properties: Default::default(),
        payload: Bytes::copy_from_slice(payload),
    };
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(p.clone()), V, &mut buf);
    (p, buf.to_vec())
}

fn payload_of(p: Option<Packet>) -> Bytes {
    match p {
        Some(Packet::Publish(p)) => p.payload,
        other => panic!("expected a PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn a_packet_arriving_one_byte_at_a_time_comes_out_whole() {
    let (_, bytes) = publish_bytes("a/b", b"hello");
    let (mut tx, rx) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        for b in bytes {
            tx.write_all(&[b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        tx
    });
    let mut r = FramedReader::new(rx, 1024);
    assert_eq!(payload_of(r.read_packet(V).await.unwrap()), "hello");
    drop(writer.await.unwrap());
    assert!(r.read_packet(V).await.unwrap().is_none(), "clean end");
}

#[tokio::test]
async fn several_packets_in_one_read_come_out_in_order() {
    let mut all = Vec::new();
    for i in 0..20 {
        all.extend(publish_bytes("t", format!("m{i}").as_bytes()).1);
    }
    let mut r = FramedReader::new(&all[..], 1024);
    for i in 0..20 {
        assert_eq!(payload_of(r.read_packet(V).await.unwrap()), format!("m{i}"));
    }
    assert!(r.read_packet(V).await.unwrap().is_none());
}

#[tokio::test]
async fn a_malformed_length_is_an_error_not_a_panic() {
    let bytes = [0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01];
    let mut r = FramedReader::new(&bytes[..], 1 << 20);
    let e = r.read_packet(V).await.unwrap_err();
    assert!(
        matches!(e, FrameError::Decode(DecodeError::Malformed(_))),
        "{e}"
    );
}

#[tokio::test]
async fn a_256_mb_length_is_refused_by_the_maximum_packet_size_without_allocating_it() {
    // Remaining length 268,435,455 (the largest MQTT can say), then a little body.
    let mut bytes = vec![0x30u8, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x01, b't'];
    bytes.extend([0u8; 100]);
    let (mut tx, rx) = tokio::io::duplex(4096);
    tx.write_all(&bytes).await.unwrap();
    let mut r = FramedReader::new(rx, 1 << 20);
    let e = r.read_packet(V).await.unwrap_err();
    assert!(
        matches!(e, FrameError::Decode(DecodeError::PacketTooLarge)),
        "{e}"
    );
    assert!(
        r.capacity() <= MAX_ROOM,
        "nothing reserved for the body: capacity {}",
        r.capacity()
    );
}

#[tokio::test]
async fn a_connection_that_ends_inside_a_packet_says_so() {
    let (_, bytes) = publish_bytes("a/b", b"hello");
    let mut r = FramedReader::new(&bytes[..bytes.len() - 2], 1024);
    assert!(matches!(
        r.read_packet(V).await,
        Err(FrameError::Truncated(n)) if n == bytes.len() - 2
    ));
}

#[tokio::test]
async fn a_cancelled_read_loses_nothing() {
    let (_, bytes) = publish_bytes("a/b", &[7u8; 300]);
    let (mut tx, rx) = tokio::io::duplex(4096);
    let mut r = FramedReader::new(rx, 1 << 20);
    tx.write_all(&bytes[..100]).await.unwrap();
    // The read is cancelled while the packet is half there (as a select! arm would be).
    let cancelled = tokio::time::timeout(Duration::from_millis(50), r.read_packet(V)).await;
    assert!(cancelled.is_err(), "no whole packet yet");
    tx.write_all(&bytes[100..]).await.unwrap();
    assert_eq!(payload_of(r.read_packet(V).await.unwrap()), &[7u8; 300][..]);
}

#[tokio::test]
async fn small_payloads_do_not_pin_a_grown_buffer_and_it_shrinks_back() {
    // A large packet grows the buffer to its size...
    let (_, big) = publish_bytes("big", &vec![1u8; 300_000]);
    // ...and a burst of small ones arrives in one piece after it.
    let mut all = big.clone();
    for i in 0..50 {
        all.extend(publish_bytes("t", format!("{i:04}").as_bytes()).1);
    }
    let (mut tx, rx) = tokio::io::duplex(1 << 20);
    tx.write_all(&all).await.unwrap();
    drop(tx);
    let mut r = FramedReader::new(rx, 1 << 20);
    assert_eq!(payload_of(r.read_packet(V).await.unwrap()).len(), 300_000);
    let mut kept = Vec::new();
    loop {
        // Where the read buffer is now, to see whether the payload is a slice of it.
        let (start, cap) = (r.buf.as_ptr() as usize, r.buf.capacity());
        let Some(p) = r.read_packet(V).await.unwrap() else {
            break;
        };
        let payload = payload_of(Some(p));
        let at = payload.as_ptr() as usize;
        if cap >= 8 * 16 {
            assert!(
                at < start || at >= start + cap,
                "a 4-byte payload must not be a slice of a {cap}-byte read buffer"
            );
        }
        kept.push(payload);
    }
    assert_eq!(kept.len(), 50);
    assert_eq!(kept[49], "0049");
    assert!(
        r.capacity() <= 2 * MAX_ROOM,
        "back to small after the large packet: {}",
        r.capacity()
    );
}

#[tokio::test]
async fn an_idle_reader_starts_small() {
    let (_tx, rx) = tokio::io::duplex(64);
    let mut r = FramedReader::new(rx, 1 << 20);
    assert!(r.capacity() <= MIN_ROOM);
    assert!(
        tokio::time::timeout(Duration::from_millis(10), r.fill())
            .await
            .is_err(),
        "nothing to read"
    );
    assert!(r.capacity() <= MIN_ROOM);
}

/// Bytes read elsewhere (the bridge reads while its write is blocked) and pushed in are
/// decoded in order with the ones the reader reads itself, split anywhere.
#[tokio::test]
async fn bytes_pushed_in_are_decoded_in_order_with_the_ones_read() {
    let (_, first) = publish_bytes("a", b"one");
    let (_, second) = publish_bytes("b", b"two");
    let (mut tx, rx) = tokio::io::duplex(64);
    let mut r = FramedReader::new(rx, 1024);
    // The first packet and half of the second arrive "elsewhere".
    let cut = second.len() / 2;
    r.push_read(&first);
    r.push_read(&second[..cut]);
    tx.write_all(&second[cut..]).await.unwrap();
    drop(tx);
    assert_eq!(&payload_of(r.read_packet(V).await.unwrap())[..], b"one");
    assert_eq!(&payload_of(r.read_packet(V).await.unwrap())[..], b"two");
    assert!(r.read_packet(V).await.unwrap().is_none());
}

/// 10,000 idle connections each holding even a 256-byte read buffer cost 2.5 MiB plus
/// 10,000 allocations (issue 17 item 1): a reader waiting for its peer holds no buffer,
/// neither before the first packet nor after the last one was decoded. Over real TCP.
#[tokio::test]
async fn a_reader_waiting_for_its_peer_holds_no_buffer() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut tx = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (rx, _) = l.accept().await.unwrap();
    let mut r = FramedReader::new(rx, 1 << 20);
    let waiting = tokio::time::timeout(Duration::from_millis(20), r.fill()).await;
    assert!(waiting.is_err(), "nothing sent yet");
    assert_eq!(
        r.capacity(),
        0,
        "a reader that has read nothing holds no buffer"
    );
    for round in 0..3 {
        let (_, bytes) = publish_bytes("a/b", format!("m{round}").as_bytes());
        tx.write_all(&bytes).await.unwrap();
        assert_eq!(
            payload_of(r.read_packet(V).await.unwrap()),
            format!("m{round}")
        );
        let waiting = tokio::time::timeout(Duration::from_millis(20), r.fill()).await;
        assert!(waiting.is_err(), "nothing more sent");
        assert_eq!(
            r.capacity(),
            0,
            "a reader waiting after its last packet holds no buffer"
        );
    }
    // A large packet still arrives whole, through a buffer grown for it and given back.
    let (_, big) = publish_bytes("big", &vec![3u8; 100_000]);
    tx.write_all(&big).await.unwrap();
    assert_eq!(payload_of(r.read_packet(V).await.unwrap()).len(), 100_000);
    let waiting = tokio::time::timeout(Duration::from_millis(20), r.fill()).await;
    assert!(waiting.is_err(), "nothing more sent");
    assert_eq!(r.capacity(), 0);
}
