//! Deterministic tests of the router's queue bookkeeping against the real store, with the
//! store's answers arriving late (`harness`). Issue 12, items 3-6.

use super::harness::*;
use super::{Outgoing, Packet, Publish, RouterEvent};
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

/// Issue 17 item 1: `n` durable subscribers "s{i}" to "t/{i}" with `each` messages
/// ("0".."each") queued for each while offline; then all reconnect with window `window`.
fn many_offline_subscribers(h: &mut Harness, n: usize, each: u32, window: u16) -> Vec<Client> {
    for i in 0..n {
        let s = h.connect(&format!("s{i}"), true, HOUR, window);
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
    (0..n)
        .map(|i| h.connect(&format!("s{i}"), false, HOUR, window))
        .collect()
}

/// Issue 17 item 1: 30 sessions reconnect at once under a read-back budget that holds one
/// window of one session: each gets all its messages, in order; the budget is never
/// exceeded; sessions take turns (nobody finishes before everybody started); and
/// everything charged is given back.
#[test]
fn many_sessions_draining_under_a_tiny_read_back_budget_get_everything_in_order() {
    const BUDGET: u64 = 4096;
    let (n, each) = (30, 40);
    let mut h = Harness::new(|c, _| c.read_back_budget_bytes = BUDGET);
    let mut subs = many_offline_subscribers(&mut h, n, each, 10);
    let mut got = vec![Vec::new(); n];
    let (mut peak, mut started_when_first_done) = (0, None);
    loop {
        h.settle();
        peak = peak.max(h.r.pool.used());
        let mut any = false;
        for (i, c) in subs.iter_mut().enumerate() {
            for p in c.publishes() {
                any = true;
                got[i].push(String::from_utf8_lossy(&p.payload).into_owned());
                peak = peak.max(h.r.pool.used());
                h.puback(c, p.packet_id);
            }
        }
        if started_when_first_done.is_none() && got.iter().any(|g| g.len() == each as usize) {
            started_when_first_done = Some(got.iter().filter(|g| !g.is_empty()).count());
        }
        if !any {
            break;
        }
    }
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &numbers(0..each), "session s{i}: everything, in order");
    }
    assert!(peak <= BUDGET, "at most the budget in memory, saw {peak}");
    assert_eq!(
        started_when_first_done,
        Some(n),
        "first come, first served: every session was served before any finished"
    );
    assert_eq!(h.r.pool.used(), 0, "every charge given back");
    assert!(h.r.read_wait.is_empty() && h.r.read_reserved.is_empty());
    for i in 0..n {
        assert_eq!(h.counts(&format!("s{i}")), (0, 0));
    }
}

/// Issue 17 item 1: a message larger than the whole budget still moves (alone), and live
/// messages for an online session beyond the budget wait on disk, in order.
#[test]
fn messages_beyond_the_read_back_budget_wait_on_disk_and_still_arrive_in_order() {
    let mut h = Harness::new(|c, _| c.read_back_budget_bytes = 4096);
    let mut subs = many_offline_subscribers(&mut h, 1, 0, 2);
    let p = h.connect("p", true, 0, 10);
    h.settle();
    let big = "x".repeat(10_000);
    let mut want = Vec::new();
    for i in 0..30u32 {
        // Every fifth one larger than the budget; nothing acked yet: the window (2) fills,
        // the rest must not pile up in memory.
        let payload = if i % 5 == 0 {
            format!("{i}{big}")
        } else {
            i.to_string()
        };
        h.publish(&p, "t/0", &payload, (i + 1) as u16, None);
        want.push(payload);
    }
    h.settle();
    let s = &h.r.sessions[&h.r.sessions.sid_of("s0").expect("session")];
    assert!(s.spilled_from().is_some(), "the rest waits on disk");
    assert!(
        h.r.pool.used() <= 4096 + 10_400,
        "one oversized message at most beyond it"
    );
    let got = h.drain(&mut subs[0]);
    assert_eq!(got, want);
    assert_eq!(h.r.pool.used(), 0);
    assert_eq!(h.counts("s0"), (0, 0));
}

/// Issue 17 item 1: a backlog of messages each half the budget is read back a row or two
/// at a time, not a window at a time: the budget holds during the whole drain.
#[test]
fn a_backlog_of_large_messages_is_read_back_within_the_budget() {
    const BUDGET: u64 = 8192;
    let mut h = Harness::new(|c, _| c.read_back_budget_bytes = BUDGET);
    let mut subs = many_offline_subscribers(&mut h, 1, 0, 10);
    let c = subs.pop().expect("one subscriber");
    h.disconnect(c);
    let p = h.connect("p", true, 0, 10);
    h.settle();
    let want: Vec<String> = (0..20u32)
        .map(|i| format!("{i:04}{}", "y".repeat(3000)))
        .collect();
    for (i, m) in want.iter().enumerate() {
        h.publish(&p, "t/0", m, (i + 1) as u16, None);
    }
    h.settle();
    let mut c = h.connect("s0", false, HOUR, 10);
    let (mut got, mut peak) = (Vec::new(), 0);
    loop {
        h.settle();
        peak = peak.max(h.r.pool.used());
        let ps = c.publishes();
        if ps.is_empty() {
            break;
        }
        for p in ps {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
            h.puback(&c, p.packet_id);
            peak = peak.max(h.r.pool.used());
        }
    }
    assert_eq!(got, want, "everything, in order");
    assert!(
        peak <= BUDGET,
        "within the budget during the drain, saw {peak}"
    );
    assert_eq!(h.r.pool.used(), 0);
}

/// Issue 17 item 1: an offline durable session's in-flight window is on disk only (its
/// bodies let go, budget given back); when the client is back the window is read back and
/// resent first (same packet ids, DUP), in order, then the rest of the queue. Also after a
/// restart, whose recovery keeps no bodies in memory either.
#[test]
fn an_offline_sessions_in_flight_window_waits_on_disk_and_is_resent_first_in_order() {
    let mut h = Harness::new(|_, _| {});
    let mut subs = many_offline_subscribers(&mut h, 1, 0, 4);
    let p = h.connect("p", true, 0, 10);
    h.settle();
    for i in 0..10u32 {
        h.publish(&p, "t/0", &i.to_string(), (i + 1) as u16, None);
    }
    h.settle();
    let first: Vec<(u16, String)> = subs[0]
        .publishes()
        .into_iter()
        .map(|p| {
            (
                p.packet_id,
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        })
        .collect();
    assert_eq!(first.len(), 4, "a window's worth sent, none acknowledged");
    let c = subs.pop().expect("one subscriber");
    h.disconnect(c);
    h.settle();
    let sid = h.r.sessions.sid_of("s0").expect("session");
    let s = &h.r.sessions[&sid];
    assert_eq!(s.inflight.len(), 4);
    assert!(
        s.inflight.iter().all(|m| m.message.is_none()),
        "no bodies in memory while offline"
    );
    assert_eq!(h.r.pool.used(), 0, "nothing charged while offline");

    let mut h = h.restart();
    let sid = h.r.sessions.sid_of("s0").expect("session");
    assert!(h.r.sessions[&sid]
        .inflight
        .iter()
        .all(|m| m.message.is_none()));
    assert_eq!(h.r.pool.used(), 0);
    let mut c = h.connect("s0", false, HOUR, 4);
    h.settle();
    let resent = c.publishes();
    assert_eq!(
        resent
            .iter()
            .map(|p| (
                p.packet_id,
                String::from_utf8_lossy(&p.payload).into_owned()
            ))
            .collect::<Vec<_>>(),
        first,
        "the window again, same packet ids, in order"
    );
    assert!(resent.iter().all(|p| p.dup), "resent with DUP");
    for p in &resent {
        h.puback(&c, p.packet_id);
    }
    let rest = h.drain(&mut c);
    assert_eq!(rest, numbers(4..10), "then the rest, in order");
    assert_eq!(h.r.pool.used(), 0);
    assert_eq!(h.counts("s0"), (0, 0));
}

/// Issue 17 item 1: timers of earlier connections are skipped when they fire, but a
/// client that comes and goes must not leave one behind per visit: the heap stays bounded
/// by the sessions, and the live timer is kept.
#[test]
fn a_session_that_comes_and_goes_does_not_pile_up_expiry_timers() {
    let mut h = Harness::new(|_, _| {});
    for _ in 0..2500 {
        let c = h.connect("s", false, HOUR, 10);
        h.disconnect(c);
    }
    h.settle();
    let bound = 2 * h.r.sessions.len() + super::TIMER_SLACK;
    assert!(
        h.r.timers.len() <= bound,
        "{} timers for {} session(s)",
        h.r.timers.len(),
        h.r.sessions.len()
    );
    let s = &h.r.sessions[&h.r.sessions.sid_of("s").expect("session")];
    assert!(
        h.r.timers
            .iter()
            .any(|t| t.0.session() == s.id && t.0.generation == s.generation),
        "the live expiry timer is still armed"
    );
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
    assert_eq!(
        h.r.sessions[&h.r.sessions.sid_of("s").expect("session")].dropped,
        5
    );
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

/// Item 5: a QoS 2 PUBLISH resent on a new connection (takeover of a session with expiry
/// 0, or a reconnect) while its first copy's commit is still on its way: the PUBREC must
/// wait for that commit, not go out at once.
#[test]
fn a_resent_qos2_publish_is_not_acknowledged_before_its_commit() {
    let mut h = Harness::new(|_, _| {});
    let _ = offline_subscriber(&mut h);
    let q = h.connect("q", true, 0, 10);
    h.settle();
    h.publish_qos(&q, QoS::ExactlyOnce, false, "t/a", b"once", 7, None);
    h.freeze(); // committed on disk, the router not told yet
    let mut q2 = h.connect("q", false, 0, 10); // takeover
    h.publish_qos(&q2, QoS::ExactlyOnce, true, "t/a", b"once", 7, None);
    assert_eq!(
        Harness::acks(&mut q2),
        vec![],
        "no PUBREC before the commit is reported"
    );
    h.settle();
    assert_eq!(Harness::acks(&mut q2), vec![(7, 0)]);
}

/// Item 5: the first copy's commit fails (disk budget) after the connection it came on is
/// gone; the resend must not be acknowledged as received, since the message was not stored.
#[test]
fn a_resent_qos2_publish_whose_first_commit_failed_is_not_acknowledged_as_stored() {
    let mut h = Harness::new(|_, o| o.max_bytes = 64 * 1024);
    let mut s = {
        let s = h.connect("s", true, HOUR, 10);
        h.subscribe(&s, "t/#", QoS::ExactlyOnce);
        h.settle();
        h.disconnect(s);
        h.settle();
        None::<Client>
    };
    let q = h.connect("q", true, 0, 10);
    h.settle();
    let big = vec![b'x'; 200 * 1024];
    h.publish_qos(&q, QoS::ExactlyOnce, false, "t/a", &big, 9, None);
    h.freeze();
    let mut q2 = h.connect("q", false, 0, 10);
    h.settle(); // the commit failed: the message was refused
    h.publish_qos(&q2, QoS::ExactlyOnce, true, "t/a", &big, 9, None);
    h.settle();
    let acks = Harness::acks(&mut q2);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0], (9, crate::protocol::reason::QUOTA_EXCEEDED));
    let _ = s.take();
}

/// Item 6: a SUBSCRIBE whose commit the store refuses (here in the same batch as a message
/// too large for the disk budget) must not be reported as granted, nor stay active.
#[test]
fn a_subscription_the_store_refused_is_not_granted() {
    let mut h = Harness::new(|_, o| o.max_bytes = 64 * 1024);
    let mut s = h.connect("s", true, HOUR, 10);
    h.settle();
    let _ = s.take();
    let big = bytes::Bytes::from(vec![b'x'; 200 * 1024]);
    h.events(vec![
        RouterEvent::Publish {
            conn: s.conn,
            publish: Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: "big/r".into(),
                packet_id: 3,
                properties: Default::default(),
                payload: big,
            },
            received: tokio::time::Instant::now(),
        },
        RouterEvent::Subscribe {
            conn: s.conn,
            subscribe: crate::protocol::Subscribe {
                packet_id: 4,
                subscription_identifier: None,
                user_properties: Vec::new(),
                filters: vec![crate::protocol::SubscribeFilter {
                    filter: "t/#".into(),
                    options: crate::protocol::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                }],
            },
        },
    ]);
    h.settle();
    let subacks: Vec<Vec<u8>> = s
        .take()
        .into_iter()
        .filter_map(|o| match o {
            Outgoing::Packet(p) => match *p {
                Packet::SubAck(a) => Some(a.reason_codes),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(subacks, vec![vec![crate::protocol::reason::QUOTA_EXCEEDED]]);
    let sid = h.r.sessions.sid_of("s").expect("session");
    assert!(h.r.sessions[&sid].subscriptions.is_empty(), "taken back");
    let p = h.connect("p", true, 0, 10);
    h.publish(&p, "t/a", "1", 1, None);
    h.settle();
    assert!(s.publishes().is_empty(), "not subscribed");
}

/// Item 6: with `reject-new` at the disk budget and `drop-oldest` at the queue limit, a
/// message the store refuses must not delete a stored one to make room (a retrying
/// publisher would erase the backlog).
#[test]
fn a_refused_message_does_not_drop_a_stored_one() {
    let mut h = Harness::new(|c, o| {
        o.max_bytes = 64 * 1024;
        c.durable_max_queued_messages = 3;
        c.queue_policy = QueuePolicy::DropOldest;
    });
    let p = offline_subscriber(&mut h);
    publish_range(&mut h, &p, 0..3);
    let big = vec![b'x'; 200 * 1024];
    for retry in 0..5u16 {
        h.publish_qos(&p, QoS::AtLeastOnce, true, "t/a", &big, 100 + retry, None);
        h.settle();
    }
    assert_eq!(h.counts("s"), (3, 3));
    let mut s = h.connect("s", false, HOUR, 10);
    assert_eq!(
        h.drain(&mut s),
        numbers(0..3),
        "the stored backlog is whole"
    );
    assert_eq!(
        h.r.sessions[&h.r.sessions.sid_of("s").expect("session")].dropped,
        0
    );
}

// ----- model-based test ----------------------------------------------------------------------

mod model {
    //! Random interleavings of a publisher, a durable subscriber that comes and goes without
    //! waiting for the store (reconnects, receives with and without acknowledging), store
    //! answers that arrive late, disk budget refusals, an optional queue limit and restarts,
    //! against a simple reference: every message acknowledged to the publisher is delivered
    //! once (redeliveries only of messages the subscriber saw and did not acknowledge), in
    //! publish order, unless the queue limit dropped it (counted); a refused message is never
    //! delivered; and whenever the store has caught up, the router's count of waiting
    //! messages equals the unsent rows on disk.

    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::super::harness::*;
    use crate::config::QueuePolicy;
    use crate::protocol::QoS;
    use crate::store::BudgetPolicy;

    #[derive(Debug, Clone)]
    enum Action {
        /// The publisher sends n QoS 1 messages (their PUBACKs come when they come).
        Publish(u8),
        /// The subscriber takes what it was sent and acknowledges it.
        Receive,
        /// The subscriber takes what it was sent and acknowledges nothing.
        ReceiveNoAck,
        Disconnect,
        Reconnect,
        /// The store's answers so far reach the router (without this they wait).
        Settle,
        /// The gateway stops (everything submitted is committed) and starts again.
        Restart,
    }

    fn action(restarts: bool) -> impl Strategy<Value = Action> {
        prop_oneof![
            // Publishing and receiving dominate; bursts overflow the 64 KiB-ish window of
            // free pages under the budget and the 20-message limit.
            5 => (1..30u8).prop_map(Action::Publish),
            4 => Just(Action::Receive),
            1 => Just(Action::ReceiveNoAck),
            // Reconnects without a settle in between are the races of issue 12.
            2 => Just(Action::Disconnect),
            3 => Just(Action::Reconnect),
            3 => Just(Action::Settle),
            if restarts { 1 } else { 0 } => Just(Action::Restart),
        ]
    }

    struct World {
        h: Harness,
        p: Option<Client>,
        s: Option<Client>,
        next_id: u32,
        /// Packet id → message id of publishes not acknowledged yet.
        in_flight: HashMap<u16, u32>,
        acked: Vec<u32>,
        refused: HashSet<u32>,
        /// Unknown fate: in flight when the gateway stopped.
        unknown: HashSet<u32>,
        /// (message id, DUP) in arrival order.
        got: Vec<(u32, bool)>,
        /// Seen and not acknowledged on the current connection.
        unacked: HashSet<u32>,
        seen: HashSet<u32>,
        dropped_before: u64,
    }

    impl World {
        fn take_acks(&mut self) {
            let Some(p) = self.p.as_mut() else { return };
            for (pid, code) in Harness::acks(p) {
                let Some(id) = self.in_flight.remove(&pid) else {
                    continue;
                };
                if code == 0 {
                    self.acked.push(id);
                } else {
                    self.refused.insert(id);
                }
            }
        }

        fn take_publishes(&mut self, ack: bool) {
            let Some(s) = self.s.as_mut() else { return };
            let ps = s.publishes();
            for p in ps {
                let id: u32 = std::str::from_utf8(&p.payload[..8])
                    .expect("utf8")
                    .parse()
                    .expect("id");
                assert!(
                    !self.seen.contains(&id) || p.dup,
                    "message {id} delivered twice without DUP"
                );
                self.got.push((id, p.dup));
                self.seen.insert(id);
                if ack {
                    self.h.puback(s, p.packet_id);
                    self.unacked.remove(&id);
                } else {
                    self.unacked.insert(id);
                }
            }
        }

        fn apply(&mut self, a: &Action) {
            match a {
                Action::Publish(n) => {
                    if self.p.is_none() {
                        self.p = Some(self.h.connect("p", true, 0, 64));
                    }
                    for _ in 0..*n {
                        let id = self.next_id;
                        self.next_id += 1;
                        let pid = (id % 60_000 + 1) as u16;
                        let mut payload = format!("{id:08}").into_bytes();
                        payload.resize(2048, b'.');
                        let p = self.p.as_ref().expect("publisher");
                        self.in_flight.insert(pid, id);
                        self.h
                            .publish_qos(p, QoS::AtLeastOnce, false, "t/a", &payload, pid, None);
                        self.take_acks();
                    }
                }
                Action::Receive => self.take_publishes(true),
                Action::ReceiveNoAck => self.take_publishes(false),
                Action::Disconnect => {
                    if let Some(s) = self.s.take() {
                        self.take_publishes_from(s);
                    }
                }
                Action::Reconnect => {
                    if let Some(s) = self.s.take() {
                        self.take_publishes_from(s);
                    }
                    self.unacked.clear();
                    self.s = Some(self.h.connect("s", false, 3600, 10));
                }
                Action::Settle => {
                    self.h.settle();
                    self.take_acks();
                    self.check_counts();
                }
                Action::Restart => {
                    self.take_acks();
                    self.unknown
                        .extend(self.in_flight.drain().map(|(_, id)| id));
                    self.p = None;
                    self.s = None;
                    self.unacked.clear();
                    let sid = self.h.r.sessions.sid_of("s").expect("session");
                    self.dropped_before += self.h.r.sessions[&sid].dropped;
                    let h = std::mem::replace(&mut self.h, Harness::new(|_, _| {}));
                    self.h = h.restart();
                }
            }
        }

        /// The subscriber's connection ends: what it was sent and did not read is lost
        /// with it (it was not acknowledged, so it comes again).
        fn take_publishes_from(&mut self, s: Client) {
            self.h.disconnect(s);
        }

        fn check_counts(&mut self) {
            let (counted, on_disk) = self.h.counts("s");
            assert_eq!(
                counted, on_disk,
                "router's queue count vs unsent rows on disk"
            );
        }

        fn finish(mut self) {
            self.h.settle();
            self.take_acks();
            if let Some(s) = self.s.take() {
                self.h.disconnect(s);
            }
            self.unacked.clear();
            let mut s = self.h.connect("s", false, 3600, 10);
            self.h.settle();
            self.s = None;
            loop {
                self.h.settle();
                let ps = s.publishes();
                if ps.is_empty() {
                    break;
                }
                for p in ps {
                    let id: u32 = std::str::from_utf8(&p.payload[..8])
                        .expect("utf8")
                        .parse()
                        .expect("id");
                    self.got.push((id, p.dup));
                    self.h.puback(&s, p.packet_id);
                }
            }
            self.take_acks();
            self.check_counts();
            let sid = self.h.r.sessions.sid_of("s").expect("session");
            let dropped = self.dropped_before + self.h.r.sessions[&sid].dropped;
            // First receipts, in order of arrival, are in publish order.
            let mut first = Vec::new();
            let mut seen = HashSet::new();
            for (id, _) in &self.got {
                if seen.insert(*id) {
                    first.push(*id);
                }
            }
            assert!(
                first.windows(2).all(|w| w[0] < w[1]),
                "deliveries out of order: {first:?}"
            );
            for id in &first {
                assert!(
                    !self.refused.contains(id),
                    "refused message {id} was delivered (refused {:?}, got {:?})",
                    self.refused,
                    self.got
                );
                assert!(
                    self.acked.contains(id)
                        || self.unknown.contains(id)
                        || self.in_flight.values().any(|v| v == id),
                    "message {id} was never published"
                );
            }
            let lost: Vec<u32> = self
                .acked
                .iter()
                .filter(|id| !seen.contains(id))
                .copied()
                .collect();
            assert!(
                lost.len() as u64 <= dropped,
                "acknowledged messages lost beyond the {dropped} counted drops: {lost:?}"
            );
            assert_eq!(
                self.h.counts("s"),
                (0, 0),
                "queue empty on both sides at the end"
            );
        }
    }

    fn run(actions: &[Action], limit: Option<u64>) {
        let mut h = Harness::new(|c, o| {
            o.max_bytes = 256 * 1024;
            o.budget_policy = BudgetPolicy::RejectNew;
            if let Some(l) = limit {
                c.durable_max_queued_messages = l;
                c.queue_policy = QueuePolicy::DropOldest;
            }
        });
        let s = h.connect("s", true, 3600, 10);
        h.subscribe(&s, "t/#", QoS::AtLeastOnce);
        h.settle();
        let mut w = World {
            h,
            p: None,
            s: Some(s),
            next_id: 0,
            in_flight: HashMap::new(),
            acked: Vec::new(),
            refused: HashSet::new(),
            unknown: HashSet::new(),
            got: Vec::new(),
            unacked: HashSet::new(),
            seen: HashSet::new(),
            dropped_before: 0,
        };
        for a in actions {
            w.apply(a);
        }
        w.finish();
    }

    proptest! {
        // 24 cases in CI; PROPTEST_CASES=1000 for a longer search.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
            ..ProptestConfig::default()
        })]

        #[test]
        fn budget_refusals_late_answers_reconnects_and_restarts_lose_nothing(
            actions in proptest::collection::vec(action(true), 1..60)
        ) {
            run(&actions, None);
        }

        #[test]
        fn a_queue_limit_drops_only_what_it_counts(
            actions in proptest::collection::vec(action(false), 1..60)
        ) {
            run(&actions, Some(20));
        }
    }
}
