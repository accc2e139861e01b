//! Tests of the subscription tree, against a naive reference matcher among others.

use super::*;
use crate::protocol::topic;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn data(qos: u8, id: Option<u32>) -> SubscriptionData {
    SubscriptionData {
        options: SubscriptionOptions {
            qos: QoS::from_u8(qos).unwrap_or_default(),
            ..Default::default()
        },
        identifier: id,
    }
}

fn sessions(tree: &mut SubscriptionTree, topic: &str) -> Vec<SessionId> {
    let mut out = Vec::new();
    tree.matches(topic, None, |_| true, &mut out);
    out.iter().map(|m| m.session).collect()
}

#[test]
fn spec_4_7_1_2_multi_level() {
    let mut t = SubscriptionTree::new();
    t.subscribe("sport/tennis/player1/#", None, 1, data(0, None));
    t.subscribe("sport/#", None, 2, data(0, None));
    t.subscribe("#", None, 3, data(0, None));
    assert_eq!(sessions(&mut t, "sport/tennis/player1"), vec![1, 2, 3]);
    assert_eq!(
        sessions(&mut t, "sport/tennis/player1/ranking"),
        vec![1, 2, 3]
    );
    assert_eq!(
        sessions(&mut t, "sport/tennis/player1/score/wimbledon"),
        vec![1, 2, 3]
    );
    assert_eq!(sessions(&mut t, "sport"), vec![2, 3]);
    assert_eq!(sessions(&mut t, "sport/tennis"), vec![2, 3]);
    assert_eq!(sessions(&mut t, "other"), vec![3]);
}

#[test]
fn spec_4_7_1_3_single_level() {
    let mut t = SubscriptionTree::new();
    t.subscribe("sport/tennis/+", None, 1, data(0, None));
    t.subscribe("sport/+", None, 2, data(0, None));
    t.subscribe("+/+", None, 3, data(0, None));
    t.subscribe("/+", None, 4, data(0, None));
    t.subscribe("+", None, 5, data(0, None));
    t.subscribe("a/+/b", None, 6, data(0, None));
    assert_eq!(sessions(&mut t, "sport/tennis/player1"), vec![1]);
    assert_eq!(
        sessions(&mut t, "sport/tennis/player1/ranking"),
        Vec::<u64>::new()
    );
    assert_eq!(sessions(&mut t, "sport"), vec![5]);
    assert_eq!(sessions(&mut t, "sport/"), vec![2, 3]);
    assert_eq!(sessions(&mut t, "/finance"), vec![3, 4]);
    assert_eq!(sessions(&mut t, "a//b"), vec![6]);
}

#[test]
fn spec_4_7_2_dollar_topics() {
    let mut t = SubscriptionTree::new();
    t.subscribe("#", None, 1, data(0, None));
    t.subscribe("+/monitor/Clients", None, 2, data(0, None));
    t.subscribe("$SYS/#", None, 3, data(0, None));
    t.subscribe("$SYS/monitor/+", None, 4, data(0, None));
    t.subscribe("+", None, 5, data(0, None));
    t.subscribe("#", Some("g"), 6, data(0, None));
    assert_eq!(sessions(&mut t, "$SYS/monitor/Clients"), vec![3, 4]);
    assert_eq!(sessions(&mut t, "$SYS"), vec![3]);
    assert_eq!(sessions(&mut t, "x/monitor/Clients"), vec![1, 2, 6]);
    assert_eq!(sessions(&mut t, "x"), vec![1, 5, 6]);
}

#[test]
fn merge_rules_and_no_local() {
    let mut t = SubscriptionTree::new();
    t.subscribe("a/#", None, 1, data(0, Some(7)));
    t.subscribe("a/+", None, 1, data(2, Some(3)));
    let mut rap = data(1, Some(7));
    rap.options.retain_as_published = true;
    t.subscribe("a/b", None, 1, rap);
    let mut nl = data(1, Some(9));
    nl.options.no_local = true;
    t.subscribe("a/b", None, 2, nl);
    t.subscribe("a/b", Some("g"), 1, data(1, Some(5)));

    let mut out = Vec::new();
    t.matches("a/b", None, |_| true, &mut out);
    assert_eq!(
        out,
        vec![
            Match {
                session: 1,
                qos: QoS::ExactlyOnce,
                retain_as_published: true,
                identifiers: vec![3, 7],
                shared: false
            },
            Match {
                session: 2,
                qos: QoS::AtLeastOnce,
                retain_as_published: false,
                identifiers: vec![9],
                shared: false
            },
            Match {
                session: 1,
                qos: QoS::AtLeastOnce,
                retain_as_published: false,
                identifiers: vec![5],
                shared: true
            },
        ]
    );

    // no_local: session 2 publishing does not get its own message.
    let mut out = Vec::new();
    t.matches("a/b", Some(2), |_| true, &mut out);
    assert_eq!(
        out.iter()
            .map(|m| (m.session, m.shared))
            .collect::<Vec<_>>(),
        vec![(1, false), (1, true)]
    );
    // Session 1 has no no_local subscription: still receives its own message.
    let mut out = Vec::new();
    t.matches("a/b", Some(1), |_| true, &mut out);
    assert_eq!(out.len(), 3);
}

#[test]
fn appends_to_existing_output() {
    let mut t = SubscriptionTree::new();
    t.subscribe("a", None, 5, data(0, None));
    t.subscribe("+", None, 5, data(1, None));
    let sentinel = Match {
        session: 5,
        qos: QoS::AtMostOnce,
        retain_as_published: false,
        identifiers: vec![],
        shared: false,
    };
    let mut out = vec![sentinel.clone()];
    t.matches("a", None, |_| true, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], sentinel);
    assert_eq!(out[1].qos, QoS::AtLeastOnce);
}

#[test]
fn round_robin() {
    let mut t = SubscriptionTree::new();
    for s in [10, 20, 30] {
        t.subscribe("jobs/+", Some("workers"), s, data(1, None));
    }
    let mut counts: BTreeMap<SessionId, usize> = BTreeMap::new();
    for _ in 0..9 {
        let mut out = Vec::new();
        t.matches("jobs/x", None, |_| true, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].shared);
        *counts.entry(out[0].session).or_default() += 1;
    }
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(10, 3), (20, 3), (30, 3)]
    );

    // Ineligible member skipped.
    let mut counts: BTreeMap<SessionId, usize> = BTreeMap::new();
    for _ in 0..10 {
        let mut out = Vec::new();
        t.matches("jobs/x", None, |s| s != 20, &mut out);
        *counts.entry(out[0].session).or_default() += 1;
    }
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(10, 5), (30, 5)]
    );

    // None eligible: round robin among all.
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let mut out = Vec::new();
        t.matches("jobs/x", None, |_| false, &mut out);
        assert_eq!(out.len(), 1);
        seen.insert(out[0].session);
    }
    assert_eq!(seen.len(), 3);

    // Two groups on the same filter, and the same group name on another filter: one
    // match each.
    t.subscribe("jobs/+", Some("audit"), 40, data(0, None));
    t.subscribe("jobs/#", Some("workers"), 50, data(0, None));
    let mut out = Vec::new();
    t.matches("jobs/x", None, |_| true, &mut out);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|m| m.shared));

    // Removing a member keeps distribution fair among the rest.
    assert!(t.unsubscribe("jobs/+", Some("workers"), 20));
    let mut counts: BTreeMap<SessionId, usize> = BTreeMap::new();
    for _ in 0..4 {
        let mut out = Vec::new();
        t.matches("jobs/y/z", None, |_| true, &mut out);
        assert_eq!(out.len(), 1);
        *counts.entry(out[0].session).or_default() += 1;
    }
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), vec![(50, 4)]);
    let mut counts: BTreeMap<SessionId, usize> = BTreeMap::new();
    for _ in 0..4 {
        let mut out = Vec::new();
        t.matches("jobs/y", None, |s| s != 40 && s != 50, &mut out);
        for m in out.iter().filter(|m| m.session == 10 || m.session == 30) {
            *counts.entry(m.session).or_default() += 1;
        }
    }
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(10, 2), (30, 2)]
    );
}

#[test]
fn replace_unsubscribe_prune() {
    let mut t = SubscriptionTree::new();
    assert!(t.is_empty());
    assert!(!t.subscribe("a/b/c", None, 1, data(0, None)));
    assert!(t.subscribe("a/b/c", None, 1, data(2, Some(4))));
    assert_eq!(t.len(), 1);
    let mut out = Vec::new();
    t.matches("a/b/c", None, |_| true, &mut out);
    assert_eq!(out[0].qos, QoS::ExactlyOnce);
    assert_eq!(out[0].identifiers, vec![4]);

    assert!(!t.subscribe("a/b/c", Some("g"), 1, data(0, None)));
    assert!(t.subscribe("a/b/c", Some("g"), 1, data(1, None)));
    assert!(!t.subscribe("a/b", None, 1, data(0, None)));
    assert!(!t.subscribe("a/+/#", None, 2, data(0, None)));
    assert!(!t.subscribe("a/b/c/d/e", None, 2, data(0, None)));
    assert_eq!(t.len(), 5);

    assert!(!t.unsubscribe("a/b/c", None, 9));
    assert!(!t.unsubscribe("a/x", None, 1));
    assert!(!t.unsubscribe("a/b/c", Some("h"), 1));
    assert!(!t.unsubscribe("a/#", None, 2));
    assert!(t.unsubscribe("a/b/c/d/e", None, 2));
    assert_eq!(t.node_count(), 5); // root, a, b, c, +
    assert!(t.unsubscribe("a/b/c", None, 1));
    assert!(!t.unsubscribe("a/b/c", None, 1));
    assert_eq!(t.node_count(), 5);
    assert!(t.unsubscribe("a/b/c", Some("g"), 1));
    assert_eq!(t.node_count(), 4); // root, a, b, +
    assert!(t.unsubscribe("a/+/#", None, 2));
    assert_eq!(t.node_count(), 3);
    t.unsubscribe_all(1, [("a/b", None), ("a/b/c", Some("g"))]);
    assert_eq!(t.node_count(), 1);
    assert!(t.is_empty());
    assert_eq!(sessions(&mut t, "a/b"), Vec::<u64>::new());
}

#[test]
fn deep_filters_do_not_overflow() {
    let deep = vec!["x"; 200_000].join("/");
    let mut t = SubscriptionTree::new();
    t.subscribe(&deep, None, 1, data(0, None));
    t.subscribe(&format!("{deep}/#"), None, 2, data(0, None));
    assert_eq!(sessions(&mut t, &deep), vec![1, 2]);
    assert!(t.unsubscribe(&deep, None, 1));
    assert!(t.unsubscribe(&format!("{deep}/#"), None, 2));
    assert_eq!(t.node_count(), 1);
    t.subscribe(&deep, None, 1, data(0, None));
    drop(t); // iterative Drop
}

// ---- property tests -------------------------------------------------------------

/// Independent naive matcher: split both into vectors and compare level by level.
fn naive_match(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if t[0].starts_with('$') && (f[0] == "+" || f[0] == "#") {
        return false;
    }
    for (i, fl) in f.iter().enumerate() {
        if *fl == "#" {
            return true;
        }
        match t.get(i) {
            None => return false,
            Some(tl) => {
                if *fl != "+" && fl != tl {
                    return false;
                }
            }
        }
    }
    f.len() == t.len()
}

const TOPIC_LEVELS: &[&str] = &["a", "b", "", "$SYS", "$x", "c"];

fn topic_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOPIC_LEVELS), 1..5)
        .prop_map(|v| v.join("/"))
        .prop_filter("non-empty topic", |t| !t.is_empty())
}

fn filter_strategy() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        3 => prop::sample::select(TOPIC_LEVELS),
        1 => Just("+"),
    ];
    (prop::collection::vec(level, 0..4), any::<bool>()).prop_filter_map(
        "non-empty filter",
        |(mut v, hash)| {
            if hash {
                v.push("#");
            }
            Some(v.join("/")).filter(|f| !f.is_empty())
        },
    )
}

#[derive(Debug, Clone)]
struct Sub {
    filter: String,
    group: Option<&'static str>,
    session: SessionId,
    qos: u8,
    id: Option<u32>,
    no_local: bool,
    rap: bool,
}

fn sub_strategy() -> impl Strategy<Value = Sub> {
    (
        filter_strategy(),
        prop_oneof![4 => Just(None), 1 => Just(Some("g1")), 1 => Just(Some("g2"))],
        0u64..6,
        0u8..3,
        prop::option::of(1u32..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(filter, group, session, qos, id, no_local, rap)| Sub {
            filter,
            group,
            session,
            qos,
            id,
            no_local: no_local && group.is_none(),
            rap,
        })
}

fn sub_data(s: &Sub) -> SubscriptionData {
    SubscriptionData {
        options: SubscriptionOptions {
            qos: QoS::from_u8(s.qos).unwrap_or_default(),
            no_local: s.no_local,
            retain_as_published: s.rap,
            retain_handling: 0,
        },
        identifier: s.id,
    }
}

type Key = (String, Option<&'static str>, SessionId);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tree_matches_reference(
        subs in prop::collection::vec(sub_strategy(), 0..40),
        topics in prop::collection::vec(topic_strategy(), 1..10),
        publisher in prop::option::of(0u64..6),
    ) {
        let mut tree = SubscriptionTree::new();
        let mut model: BTreeMap<Key, Sub> = BTreeMap::new();
        for s in &subs {
            let existed = tree.subscribe(&s.filter, s.group, s.session, sub_data(s));
            let was = model.insert((s.filter.clone(), s.group, s.session), s.clone());
            prop_assert_eq!(existed, was.is_some());
        }
        prop_assert_eq!(tree.len(), model.len());

        for topic in &topics {
            prop_assert!(topic::valid_topic_name(topic));
            let mut out = Vec::new();
            tree.matches(topic, publisher, |_| true, &mut out);

            // Direct: expected per session.
            let mut expected: BTreeMap<SessionId, (u8, bool, BTreeSet<u32>)> = BTreeMap::new();
            // Shared: expected (filter, group) -> members.
            let mut groups: BTreeMap<(String, &str), BTreeSet<SessionId>> = BTreeMap::new();
            for s in model.values() {
                prop_assert_eq!(naive_match(&s.filter, topic), topic::matches(&s.filter, topic));
                if !naive_match(&s.filter, topic) {
                    continue;
                }
                match s.group {
                    None => {
                        if s.no_local && publisher == Some(s.session) {
                            continue;
                        }
                        let e = expected.entry(s.session).or_insert((0, false, BTreeSet::new()));
                        e.0 = e.0.max(s.qos);
                        e.1 |= s.rap;
                        e.2.extend(s.id);
                    }
                    Some(g) => {
                        groups.entry((s.filter.clone(), g)).or_default().insert(s.session);
                    }
                }
            }
            let direct: Vec<&Match> = out.iter().filter(|m| !m.shared).collect();
            prop_assert_eq!(direct.len(), expected.len());
            for m in direct {
                let e = expected.get(&m.session);
                prop_assert!(e.is_some(), "unexpected session {}", m.session);
                if let Some((qos, rap, ids)) = e {
                    prop_assert_eq!(m.qos as u8, *qos);
                    prop_assert_eq!(m.retain_as_published, *rap);
                    prop_assert_eq!(&m.identifiers, &ids.iter().copied().collect::<Vec<_>>());
                }
            }
            let shared: Vec<&Match> = out.iter().filter(|m| m.shared).collect();
            prop_assert_eq!(shared.len(), groups.len());
            for m in shared {
                let member_of = groups.iter().any(|((f, g), members)| {
                    members.contains(&m.session)
                        && model.get(&(f.clone(), Some(*g), m.session)).is_some_and(|s| {
                            s.qos == m.qos as u8 && s.id.into_iter().collect::<Vec<_>>() == m.identifiers
                        })
                });
                prop_assert!(member_of, "shared match {:?} not a member", m);
            }
        }
    }

    #[test]
    fn churn_leaves_tree_empty(
        ops in prop::collection::vec((sub_strategy(), any::<bool>()), 0..60),
    ) {
        let mut tree = SubscriptionTree::new();
        let mut model: BTreeSet<Key> = BTreeSet::new();
        for (s, add) in &ops {
            let key = (s.filter.clone(), s.group, s.session);
            if *add {
                let existed = tree.subscribe(&s.filter, s.group, s.session, sub_data(s));
                prop_assert_eq!(existed, !model.insert(key));
            } else {
                let existed = tree.unsubscribe(&s.filter, s.group, s.session);
                prop_assert_eq!(existed, model.remove(&key));
            }
            prop_assert_eq!(tree.len(), model.len());
        }
        // Remove per session as the router would.
        for session in 0..6 {
            let filters: Vec<(&str, Option<&str>)> = model
                .iter()
                .filter(|k| k.2 == session)
                .map(|k| (k.0.as_str(), k.1))
                .collect();
            tree.unsubscribe_all(session, filters);
        }
        prop_assert_eq!(tree.len(), 0);
        prop_assert!(tree.is_empty());
        prop_assert_eq!(tree.node_count(), 1);
        prop_assert!(tree.root.is_empty());
    }
}

/// A node is what a topic of its own costs each of 10,000 sessions, in its parent's table
/// (issue 17: with 112-byte nodes the table of one level with 10,000 children was 2 MiB,
/// the largest single allocation of a gateway with 10,000 sessions). Leaves have no
/// children and no shared groups, so those are boxed and allocated on first use.
#[test]
fn a_trie_node_stays_small() {
    let node = std::mem::size_of::<Node>();
    assert!(node <= 56, "a trie node is {node} bytes");
}
#[test]
fn a_node_whose_children_and_groups_are_gone_gives_their_tables_back() {
    let mut tree = SubscriptionTree::default();
    tree.subscribe("a/b", None, 0, data(1, None));
    for s in 1..100 {
        tree.subscribe(&format!("a/b/{s}"), None, s, data(1, None));
        tree.subscribe("a/b", Some("g"), s, data(1, None));
    }
    for s in 1..100 {
        assert!(tree.unsubscribe(&format!("a/b/{s}"), None, s));
        assert!(tree.unsubscribe("a/b", Some("g"), s));
    }
    let a = tree.root.children.get_mut("a").expect("a");
    let b = a.children.get_mut("b").expect("b");
    assert!(b.children.0.is_none(), "an emptied child table is kept");
    assert!(b.subs.shared.0.is_none(), "an emptied group table is kept");
    assert_eq!(sessions(&mut tree, "a/b"), vec![0]);
    assert!(sessions(&mut tree, "a/b/1").is_empty());
    assert_eq!(tree.len(), 1);
}

/// Most topics of a gateway have exactly one subscriber (a sensor's session): it is kept in
/// the node itself, not in a vector of its own (a 32-byte allocation for each of 10,000
/// leaves). A second one moves them to a vector, and the last one left moves back.
#[test]
fn a_topic_with_one_subscriber_needs_no_allocation_of_its_own() {
    let mut tree = SubscriptionTree::default();
    tree.subscribe("a/b", None, 7, data(1, None));
    let slots = |tree: &mut SubscriptionTree| {
        let b = tree
            .root
            .children
            .get_mut("a")
            .and_then(|a| a.children.get_mut("b"));
        b.map(|b| b.subs.allocated_slots())
    };
    assert_eq!(slots(&mut tree), Some(0), "one subscriber");
    tree.subscribe("a/b", None, 3, data(1, None));
    assert_eq!(slots(&mut tree), Some(2), "two subscribers");
    assert_eq!(sessions(&mut tree, "a/b"), vec![3, 7]);
    assert!(tree.unsubscribe("a/b", None, 3));
    assert_eq!(slots(&mut tree), Some(0), "one left");
    assert_eq!(sessions(&mut tree, "a/b"), vec![7]);
}

/// Heap bytes of a child set per child: one level with 10,000 children (a topic per
/// session under one parent, as in issue 17's benchmark) was a hash table of 16,384 slots
/// of 73 bytes (1.14 MiB, 61% full after its last growth); a node with one child (a device
/// level above its one measurement) held a table of 4 slots.
#[test]
fn a_level_with_many_children_holds_little_more_than_its_entries() {
    let entry = std::mem::size_of::<(Level, Node)>();
    let mut tree = SubscriptionTree::default();
    let n = 10_000u64;
    for s in 0..n {
        tree.subscribe(&format!("scale/{s}"), None, s, data(1, None));
    }
    let scale = tree.root.children.get_mut("scale").expect("scale");
    let per = scale.children.heap_bytes() as f64 / n as f64;
    assert!(
        per <= (entry + 24) as f64,
        "{per:.1} bytes per child of {entry}-byte entries"
    );
    for s in 0..n {
        assert_eq!(sessions(&mut tree, &format!("scale/{s}")), vec![s]);
    }
    // Removals move entries: every other one goes, from both ends, then all but three.
    for s in (0..n).filter(|s| s % 2 == 0) {
        let s = if s % 4 == 0 { s } else { n - s };
        assert!(tree.unsubscribe(&format!("scale/{s}"), None, s));
    }
    for s in 0..n {
        let want = if s % 2 == 1 { vec![s] } else { vec![] };
        assert_eq!(sessions(&mut tree, &format!("scale/{s}")), want);
    }
    for s in (3..n).filter(|s| s % 2 == 1) {
        assert!(tree.unsubscribe(&format!("scale/{s}"), None, s));
    }
    assert_eq!(tree.len(), 1);
    assert_eq!(sessions(&mut tree, "scale/1"), vec![1]);
    let scale = tree.root.children.get_mut("scale").expect("scale");
    assert!(scale.children.heap_bytes() <= entry + 64, "shrunk");
    let mut one = SubscriptionTree::default();
    one.subscribe("dev/7/temp", None, 1, data(1, None));
    let seven = one.root.children.get_mut("dev").expect("dev");
    let bytes = seven.children.heap_bytes();
    assert!(bytes <= entry + 64, "{bytes} bytes for one child");
}
