//! Deterministic tests of the router's queue bookkeeping against the real store, with the
//! store's answers arriving late (`harness`). Issue 12, items 3-6.

use super::harness::*;
use crate::config::QueuePolicy;
use crate::protocol::QoS;

const HOUR: u32 = 3600;

/// A durable subscriber "s" to `t/#` that is offline, and a publisher "p".
fn offline_subscriber(h: &mut Harness) -> Client {
    let s = h.connect("s", true, HOUR, 10);
    h.subscribe(&s, "t/#", QoS::AtLeastOnce);
    h.settle();
    h.disconnect(s);
    let p = h.connect("p", true, 0, 10);
    h.settle();
    p
}

fn publish_range(h: &mut Harness, p: &Client, range: std::ops::Range<u32>) {
    for i in range {
        h.publish(p, "t/a", &i.to_string(), (i % 60_000 + 1) as u16, None);
    }
    h.settle();
}

/// Item 3: `drop-oldest` while a read-back is outstanding. The store answers the read with
/// the oldest rows, then deletes those same rows for the queue limit: they must not be
/// delivered (they were dropped, and counted), and the newest must not be stranded.
#[test]
fn drop_oldest_while_a_read_back_is_outstanding_drops_exactly_the_oldest() {
    let mut h = Harness::new(|c, _| {
        c.durable_max_queued_messages = 300;
        c.queue_policy = QueuePolicy::DropOldest;
    });
    let p = offline_subscriber(&mut h);
    publish_range(&mut h, &p, 0..300);
    let mut s = h.connect("s", false, HOUR, 10);
    // The read-back of the first rows is answered by the store, but late: meanwhile five
    // more messages arrive and push the five oldest out.
    h.freeze();
    for i in 300..305 {
        h.publish(&p, "t/a", &i.to_string(), (i + 1) as u16, None);
    }
    let got = h.drain(&mut s);
    assert_eq!(
        got,
        numbers(5..305),
        "the five oldest dropped, the rest in order"
    );
    assert_eq!(h.counts("s"), (0, 0), "router and disk agree: nothing left");
    assert_eq!(h.r.sessions[&h.r.by_client["s"]].dropped, 5);
}

/// Item 3: an expiry sweep that removes rows the router has just read back (the answer
/// arrives before the removal) must not subtract them twice.
#[test]
fn an_expiry_sweep_racing_a_read_back_does_not_strand_the_queue() {
    let mut h = Harness::new(|_, _| {});
    let p = offline_subscriber(&mut h);
    for i in 0..5u32 {
        h.publish(&p, "t/a", &format!("x{i}"), (i + 1) as u16, Some(1));
    }
    publish_range(&mut h, &p, 0..1022);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut s = h.connect("s", false, HOUR, 10);
    h.freeze();
    h.r.sweep();
    let got = h.drain(&mut s);
    assert_eq!(
        got,
        numbers(0..1022),
        "every message that did not expire, in order"
    );
    assert_eq!(h.counts("s"), (0, 0));
}

/// Item 4: a reconnect while a read-back is outstanding. The disconnect puts the in-memory
/// queue back on disk (the read position moves back); the late answer for the old
/// position must not be taken, or the rows in between are skipped.
#[test]
fn a_reconnect_while_a_read_back_is_outstanding_skips_nothing() {
    let mut h = Harness::new(|_, _| {});
    let p = offline_subscriber(&mut h);
    publish_range(&mut h, &p, 0..400);
    let s = h.connect("s", false, HOUR, 10);
    // First answer taken: 10 in flight, the rest of it in memory, the next read asked for.
    assert!(h.settle_until_rows(1));
    h.freeze();
    h.disconnect(s);
    let mut s = h.connect("s", false, HOUR, 10);
    let got = h.drain(&mut s);
    assert_eq!(first_receipts(&got), numbers(0..400), "nothing skipped");
    assert_eq!(h.counts("s"), (0, 0));
}
