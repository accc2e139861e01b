//! What the router keeps per session (issue 17 item 1): 10,000 durable sessions must fit in
//! a few MiB of router state, and a drained queue must leave nothing behind.

use super::harness::*;
use super::Session;
use crate::protocol::QoS;

const HOUR: u32 = 3600;

/// Heap bytes in use (glibc), minus what SQLite holds (its page caches belong to the
/// store, not to the router).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn router_heap() -> i64 {
    // SAFETY: mallinfo2 and sqlite3_memory_used only read allocator statistics.
    let (m, sqlite) = unsafe { (libc::mallinfo2(), rusqlite::ffi::sqlite3_memory_used()) };
    // In-use chunks of the arenas plus large blocks mapped on their own.
    (m.uordblks + m.hblkhd) as i64 - sqlite
}

/// Measurement, not a check (the heap of a test process running other tests in parallel
/// is noisy): `cargo test --release --lib router::memory_tests::measure -- --ignored
/// --nocapture --test-threads=1`, `HOLDFAST_MEASURE_SESSIONS` sessions (10,000).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
#[ignore = "measurement: run alone with --nocapture"]
fn measure_router_heap_per_session() {
    let n: usize = std::env::var("HOLDFAST_MEASURE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut h = Harness::new(|_, _| {});
    let p = h.connect("p", true, 0, 10);
    h.settle();
    let per = |a: i64, b: i64| (b - a) as f64 / n as f64;
    let h0 = router_heap();
    for i in 0..n {
        let s = h.connect(&format!("s{i}"), true, HOUR, 64);
        h.subscribe(&s, &format!("scale/{i}"), QoS::AtLeastOnce);
        h.settle();
        h.disconnect(s);
    }
    h.settle();
    let h1 = router_heap();
    for i in 0..n {
        h.publish(
            &p,
            &format!("scale/{i}"),
            "m",
            (i % 60_000 + 1) as u16,
            None,
        );
    }
    h.settle();
    let h2 = router_heap();
    let mut clients: Vec<Client> = (0..n)
        .map(|i| h.connect(&format!("s{i}"), false, HOUR, 64))
        .collect();
    h.settle();
    let h3 = router_heap();
    for c in &mut clients {
        assert_eq!(h.drain(c).len(), 1);
    }
    h.settle();
    let h4 = router_heap();
    eprintln!(
        "router heap per session: offline+subscribed {:.0} B, +1 queued {:.0} B, \
         connected (before drain) {:.0} B, connected after drain {:.0} B; \
         size_of Session {} B",
        per(h0, h1),
        per(h1, h2),
        per(h0, h3),
        per(h0, h4),
        std::mem::size_of::<Session>(),
    );
}

/// The state every session carries whether or not it holds messages, and the slots of its
/// window and held output, stay small: 10,000 sessions × (`Session` + map slot) and
/// windows of 64 per session add up (issue 17: the session map alone was 11 MiB; a
/// `Session` was 440 bytes before the incoming QoS 2 ids and the internal sessions' own
/// limits were boxed, 360 before its window, queue, held output and gated publishers were
/// allocated on first use (`broker::lazy`), 272 after, with the one subscription of most
/// sessions inline, which saves a 48-byte allocation. A boxed `Session` of 272 or 280 bytes
/// takes a 288-byte glibc chunk, one of up to 264 a 272-byte chunk: the read-back budget is
/// no longer referenced from each session (the router passes its own), 264 bytes.
#[test]
fn a_session_and_its_per_message_slots_stay_small() {
    use std::mem::size_of;
    let session = size_of::<Session>();
    assert!(session <= 264, "Session is {session} bytes");
    let inflight = size_of::<super::Inflight>();
    assert!(inflight <= 32, "an in-flight slot is {inflight} bytes");
    let held = size_of::<super::Held>();
    assert!(held <= 32, "a held-output slot is {held} bytes");
}

/// After every session drained its queue (more than one read-back and window each), the
/// router keeps nothing per message: no queue, window or held-output slots, no budget
/// charged or reserved, nobody waiting to read.
#[test]
fn after_a_drain_the_router_holds_no_per_message_state() {
    let (n, each) = (12, 150u32);
    let mut h = Harness::new(|_, _| {});
    for i in 0..n {
        let s = h.connect(&format!("s{i}"), true, HOUR, 16);
        h.subscribe(&s, &format!("t/{i}"), QoS::AtLeastOnce);
        h.settle();
        h.disconnect(s);
    }
    let p = h.connect("p", true, 0, 10);
    h.settle();
    let mut pid = 0u16;
    for m in 0..each {
        for i in 0..n {
            pid = pid % 60_000 + 1;
            h.publish(&p, &format!("t/{i}"), &m.to_string(), pid, None);
        }
        h.settle();
    }
    let mut clients: Vec<Client> = (0..n)
        .map(|i| h.connect(&format!("s{i}"), false, HOUR, 16))
        .collect();
    for c in &mut clients {
        assert_eq!(first_receipts(&h.drain(c)), numbers(0..each));
    }
    h.settle();
    for i in 0..n {
        let sid =
            h.r.sessions
                .sid_of(format!("s{i}").as_str())
                .expect("session");
        let s = &h.r.sessions[&sid];
        assert!(s.is_online());
        assert_eq!((s.queue_len, s.spilled_from()), (0, None), "s{i} drained");
        assert_eq!(
            (
                s.queue.is_allocated(),
                s.inflight.is_allocated(),
                s.held.is_allocated(),
                s.gated.is_allocated()
            ),
            (false, false, false, false),
            "s{i} keeps slots"
        );
    }
    assert_eq!(h.r.pool.used(), 0, "read-back budget all given back");
    assert!(h.r.read_wait.is_empty() && h.r.read_reserved.is_empty());
}

#[test]
fn subscriptions_are_found_replaced_and_removed_by_filter() {
    use super::SubscriptionData;
    use crate::broker::session::Subscriptions;
    let data = |qos| SubscriptionData {
        options: crate::protocol::SubscriptionOptions {
            qos,
            ..Default::default()
        },
        identifier: None,
    };
    let mut subs = Subscriptions::default();
    for f in ["b/#", "a/+", "$share/g/c", "a"] {
        assert_eq!(subs.insert(f, data(QoS::AtMostOnce)), None);
    }
    assert_eq!(
        subs.insert(String::from("a/+"), data(QoS::AtLeastOnce)),
        Some(data(QoS::AtMostOnce))
    );
    assert_eq!(subs.len(), 4);
    assert_eq!(subs.get("a/+"), Some(&data(QoS::AtLeastOnce)));
    assert!(subs.contains_key("$share/g/c") && !subs.contains_key("c"));
    assert_eq!(
        subs.keys().collect::<Vec<_>>(),
        ["$share/g/c", "a", "a/+", "b/#"]
    );
    assert_eq!(subs.remove("a"), Some(data(QoS::AtMostOnce)));
    assert_eq!(subs.remove("a"), None);
    for f in ["a/+", "b/#", "$share/g/c"] {
        assert!(subs.remove(f).is_some());
    }
    assert!(subs.is_empty());
}

/// Most sessions of a gateway hold exactly one subscription: it is kept in the session
/// itself, not in a vector of its own (48 bytes with the allocator's header, in each of
/// 10,000 sessions). A second one moves them to a vector; the last one left moves back.
#[test]
fn a_single_subscription_needs_no_allocation_of_its_own() {
    use super::SubscriptionData;
    use crate::broker::session::Subscriptions;
    let data = SubscriptionData {
        options: Default::default(),
        identifier: None,
    };
    let mut subs = Subscriptions::default();
    subs.insert("a/b", data.clone());
    assert_eq!(subs.allocated_slots(), 0, "one subscription");
    subs.insert("a/c", data.clone());
    assert!(subs.allocated_slots() >= 2, "two subscriptions");
    assert!(subs.remove("a/b").is_some());
    assert_eq!(subs.allocated_slots(), 0, "one left");
    assert_eq!(subs.keys().collect::<Vec<_>>(), ["a/c"]);
}

/// The router's indexes of its sessions (by session id, by client id, by connection) cost a
/// few bytes per session: at 10,000 connected sessions three hash maps of 16,384 slots of
/// 17, 25 and 17 bytes (a copy of the key and the id in each) held 0.96 MiB.
#[test]
fn the_session_indexes_hold_a_few_bytes_per_session() {
    let n = 1000;
    let mut h = Harness::new(|_, _| {});
    let clients: Vec<Client> = (0..n)
        .map(|i| h.connect(&format!("client-{i}"), true, 0, 8))
        .collect();
    h.settle();
    assert_eq!(h.r.sessions.len(), n);
    let per = (h.r.sessions.heap_bytes() + h.r.by_conn.heap_bytes()) as f64 / n as f64;
    assert!(per <= 40.0, "{per:.1} bytes per session");
    for (i, c) in clients.iter().enumerate() {
        let sid =
            h.r.sessions
                .sid_of(format!("client-{i}").as_str())
                .expect("session");
        assert_eq!(h.r.by_conn.get(&c.conn, &h.r.sessions), Some(sid));
        assert_eq!(&*h.r.sessions[&sid].client_id, format!("client-{i}"));
    }
    assert_eq!(h.r.sessions.sid_of("client-x"), None);
}

/// Each offline session with a Session Expiry Interval has a timer in the router's heap,
/// and the heap keeps its slots (a vector grown by doubling: 16,384 slots at 10,000
/// sessions). A 40-byte `Timer` (an `Instant`, a 64-bit session id) held 640 KiB there.
#[test]
fn an_expiry_timer_stays_small() {
    let timer = std::mem::size_of::<super::Timer>();
    assert!(timer <= 24, "a timer is {timer} bytes");
}

/// A resumed session keeps the client id of the connection that resumed it, not a copy of
/// its own: after a reconnect storm every connected session held its id twice (the
/// session's from when it was created, the connection's from its CONNECT), 10,000 32-byte
/// allocations more at 10,000 sessions (issue 17 item 1).
#[test]
fn a_resumed_session_shares_the_client_id_of_its_connection() {
    let mut h = Harness::new(|_, _| {});
    let first = h.connect("sensor-7", true, HOUR, 10);
    h.settle();
    h.disconnect(first);
    h.settle();
    let id: std::sync::Arc<str> = "sensor-7".into();
    let _again = h.connect_as(id.clone(), false, HOUR, 10);
    h.settle();
    let sid = h.r.sessions.sid_of("sensor-7").expect("the session");
    let s = h.r.sessions.get(&sid).expect("the session");
    assert!(
        std::sync::Arc::ptr_eq(&s.client_id, &id),
        "the session holds its own copy of the client id"
    );
}
