//! Subscription tree: topic filters -> subscribed sessions, with `+`/`#` wildcards,
//! `$`-topic rules and `$share/{group}/{filter}` groups (round robin within a group).
//!
//! Responsibility: answer "who receives a PUBLISH to this topic, at which QoS, with which
//! subscription identifiers" in O(levels × matching branches), independent of the total
//! number of subscriptions. Pure data structure, no I/O.
//!
//! Layout: a trie with one node per filter level. A node has literal children (hash map
//! keyed by level), a `+` child, a `#` slot (subscriptions whose filter ends in `#` right
//! below this node) and its own subscriptions (filters ending exactly at this node). Each
//! subscription slot holds direct subscribers (`session -> data`, a vector sorted by
//! session: most slots have one or a few) and shared groups (`group -> members`, ordered,
//! with a round-robin cursor).
//!
//! Invariants:
//! - `len` equals the number of stored subscriptions (direct entries + shared members).
//! - No empty node below the root survives an `unsubscribe`: every non-root node has a
//!   subscription, a `#` slot, or a child (pruning happens on the unsubscribe path), so
//!   memory does not grow with subscribe/unsubscribe churn. Empty `#` slots and empty
//!   shared groups are removed too.
//! - A `#` level is only treated as the multi-level wildcard when it is the last level;
//!   callers pass valid filters (see `protocol::topic::valid_topic_filter`), but an invalid
//!   one is stored consistently (never panics).
//! - All walks (match, subscribe, unsubscribe, drop) are iterative, so a very deep filter
//!   cannot overflow the stack.

use std::collections::{BTreeMap, HashMap};

use crate::protocol::types::{QoS, SubscriptionOptions};

/// Assigned by the router per client session.
pub type SessionId = u64;

#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionData {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// One receiving session for a PUBLISH.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub session: SessionId,
    /// Highest QoS among this session's matching non-shared subscriptions (or the shared one).
    pub qos: QoS,
    /// True if any matching subscription has Retain As Published.
    pub retain_as_published: bool,
    /// Subscription identifiers of all matching subscriptions of this session (sorted,
    /// no duplicates).
    pub identifiers: Vec<u32>,
    /// Delivery chosen through a `$share` group.
    pub shared: bool,
}

#[derive(Debug, Default)]
struct SharedGroup {
    /// In subscription order; the cursor walks it round robin.
    members: Vec<(SessionId, SubscriptionData)>,
    cursor: usize,
}

impl SharedGroup {
    /// Picks the next member round robin, preferring eligible ones.
    fn pick(&mut self, eligible: &mut impl FnMut(SessionId) -> bool) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor % n;
        let chosen = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| eligible(self.members[i].0))
            .unwrap_or(start);
        self.cursor = (chosen + 1) % n;
        Some(chosen)
    }
}

/// The subscriptions attached to one trie position.
#[derive(Debug, Default)]
struct Subs {
    /// Direct subscribers sorted by session. A sorted vector, not a hash map: most topics
    /// of a gateway have one or a few subscribers, and an empty hash map with one entry
    /// costs ~130 bytes against 24 here (issue 17: 10,000 sessions each on a topic of its
    /// own). Matching walks all entries either way; a subscribe or unsubscribe moves at most
    /// the entries behind it (24 bytes each).
    direct: Vec<(SessionId, SubscriptionData)>,
    shared: BTreeMap<Box<str>, SharedGroup>,
}

impl Subs {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
    }

    /// Returns true if it replaced an existing subscription.
    fn insert(&mut self, group: Option<&str>, session: SessionId, data: SubscriptionData) -> bool {
        match group {
            None => match self.direct.binary_search_by_key(&session, |(s, _)| *s) {
                Ok(i) => {
                    self.direct[i].1 = data;
                    true
                }
                Err(i) => {
                    if self.direct.len() == self.direct.capacity() {
                        // Grow by half, not to 4 at once: most slots keep one subscriber.
                        self.direct.reserve_exact(self.direct.len() / 2 + 1);
                    }
                    self.direct.insert(i, (session, data));
                    false
                }
            },
            Some(g) => {
                let grp = match self.shared.get_mut(g) {
                    Some(grp) => grp,
                    None => self.shared.entry(Box::from(g)).or_default(),
                };
                match grp.members.iter_mut().find(|(s, _)| *s == session) {
                    Some(m) => {
                        m.1 = data;
                        true
                    }
                    None => {
                        grp.members.push((session, data));
                        false
                    }
                }
            }
        }
    }

    /// Returns true if it existed.
    fn remove(&mut self, group: Option<&str>, session: SessionId) -> bool {
        match group {
            None => match self.direct.binary_search_by_key(&session, |(s, _)| *s) {
                Ok(i) => {
                    self.direct.remove(i);
                    if self.direct.len() < self.direct.capacity() / 4 {
                        self.direct.shrink_to_fit();
                    }
                    true
                }
                Err(_) => false,
            },
            Some(g) => {
                let Some(grp) = self.shared.get_mut(g) else {
                    return false;
                };
                let Some(i) = grp.members.iter().position(|(s, _)| *s == session) else {
                    return false;
                };
                grp.members.remove(i);
                if grp.members.is_empty() {
                    self.shared.remove(g);
                } else if grp.cursor > i {
                    // Keep pointing at the same next member.
                    grp.cursor -= 1;
                }
                true
            }
        }
    }

    /// Appends the matches of this slot: direct ones unmerged, one per shared group.
    fn collect(
        &mut self,
        publisher: Option<SessionId>,
        eligible: &mut impl FnMut(SessionId) -> bool,
        out: &mut Vec<Match>,
    ) {
        for &(session, ref data) in &self.direct {
            if data.options.no_local && publisher == Some(session) {
                continue;
            }
            out.push(Match {
                session,
                qos: data.options.qos,
                retain_as_published: data.options.retain_as_published,
                identifiers: data.identifier.into_iter().collect(),
                shared: false,
            });
        }
        for grp in self.shared.values_mut() {
            if let Some(i) = grp.pick(eligible) {
                let (session, data) = &grp.members[i];
                out.push(Match {
                    session: *session,
                    qos: data.options.qos,
                    retain_as_published: data.options.retain_as_published,
                    identifiers: data.identifier.into_iter().collect(),
                    shared: true,
                });
            }
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscriptions to `<path to this node>/#`.
    hash: Option<Box<Subs>>,
    /// Subscriptions whose filter ends at this node.
    subs: Subs,
}

impl Node {
    fn edges(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some())
    }

    fn is_empty(&self) -> bool {
        self.edges() == 0 && self.hash.is_none() && self.subs.is_empty()
    }

    /// The child for a non-`#` filter level, if any.
    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    /// Allocates the key; `subscribe` only comes here when the path is incomplete.
    fn child_or_insert(&mut self, level: &str) -> &mut Node {
        if level == "+" {
            self.plus.get_or_insert_with(Box::default)
        } else {
            self.children.entry(Box::from(level)).or_default()
        }
    }

    fn remove_child(&mut self, level: &str) {
        if level == "+" {
            self.plus = None;
        } else {
            self.children.remove(level);
        }
    }
}

impl Drop for Node {
    /// Iterative, so that dropping a very deep chain cannot overflow the stack.
    fn drop(&mut self) {
        if self.edges() == 0 {
            return;
        }
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        stack.extend(self.plus.take().map(|b| *b));
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
            stack.extend(n.plus.take().map(|b| *b));
        }
    }
}

/// Splits off the filter/topic level starting at byte `pos`; returns it and the start of
/// the next level (`None` when it was the last one).
#[inline]
fn level_at(s: &str, pos: usize) -> (&str, Option<usize>) {
    let rest = &s[pos..];
    match rest.find('/') {
        Some(i) => (&rest[..i], Some(pos + i + 1)),
        None => (rest, None),
    }
}

/// Yields `(level, is_last)` for each level of a filter.
fn levels(filter: &str) -> impl Iterator<Item = (&str, bool)> {
    let mut it = filter.split('/').peekable();
    std::iter::from_fn(move || {
        let l = it.next()?;
        Some((l, it.peek().is_none()))
    })
}

#[derive(Debug, Default)]
pub struct SubscriptionTree {
    root: Node,
    len: usize,
}

impl SubscriptionTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot a filter maps to, if its path exists.
    fn slot_mut(&mut self, filter: &str) -> Option<&mut Subs> {
        let mut node = &mut self.root;
        for (level, last) in levels(filter) {
            if last && level == "#" {
                return node.hash.as_deref_mut();
            }
            node = node.child_mut(level)?;
        }
        Some(&mut node.subs)
    }

    fn slot_or_insert(&mut self, filter: &str) -> &mut Subs {
        let mut node = &mut self.root;
        for (level, last) in levels(filter) {
            if last && level == "#" {
                return node.hash.get_or_insert_with(Box::default);
            }
            node = node.child_or_insert(level);
        }
        &mut node.subs
    }

    /// Adds or replaces a subscription. `share_group` is `Some(group)` for
    /// `$share/{group}/{filter}` where `filter` is the part after the group. Returns true if
    /// the same (filter, group, session) already existed (it is replaced).
    pub fn subscribe(
        &mut self,
        filter: &str,
        share_group: Option<&str>,
        session: SessionId,
        data: SubscriptionData,
    ) -> bool {
        // Fast path (existing path) first, so that no level key is allocated.
        let existed = match self.slot_mut(filter) {
            Some(slot) => slot.insert(share_group, session, data),
            None => self
                .slot_or_insert(filter)
                .insert(share_group, session, data),
        };
        if !existed {
            self.len += 1;
        }
        existed
    }

    /// Returns true if it existed. Prunes empty nodes so memory does not grow with churn.
    pub fn unsubscribe(
        &mut self,
        filter: &str,
        share_group: Option<&str>,
        session: SessionId,
    ) -> bool {
        // Pass 1: walk down, remove, and remember the deepest node that must stay
        // (`cut`: the edge below it, at filter level index `cut`, leads to a chain that is
        // empty once the subscription is gone).
        let mut node = &mut self.root;
        let mut cut = 0usize;
        let mut depth = 0usize;
        let mut removed = false;
        let mut target_empty = false;
        for (level, last) in levels(filter) {
            if last && level == "#" {
                if let Some(h) = node.hash.as_deref_mut() {
                    removed = h.remove(share_group, session);
                    if h.is_empty() {
                        node.hash = None;
                    }
                }
                target_empty = node.is_empty();
                break;
            }
            if depth == 0 || node.edges() > 1 || node.hash.is_some() || !node.subs.is_empty() {
                cut = depth;
            }
            match node.child_mut(level) {
                Some(n) => node = n,
                None => return false,
            }
            depth += 1;
            if last {
                removed = node.subs.remove(share_group, session);
                target_empty = node.is_empty();
            }
        }
        if !removed {
            return false;
        }
        self.len -= 1;
        // Pass 2: cut the empty chain (never the root itself).
        if target_empty && depth > 0 {
            let mut node = &mut self.root;
            for (i, (level, _)) in levels(filter).enumerate() {
                if i == cut {
                    node.remove_child(level);
                    break;
                }
                match node.child_mut(level) {
                    Some(n) => node = n,
                    None => break,
                }
            }
        }
        true
    }

    /// Removes every subscription of a session (used when a session ends); `filters` is the
    /// list the caller keeps per session: iterator of (filter, share_group).
    pub fn unsubscribe_all<'a>(
        &mut self,
        session: SessionId,
        filters: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) {
        for (filter, group) in filters {
            self.unsubscribe(filter, group, session);
        }
    }

    /// Appends to `out` one [`Match`] per receiving session for a PUBLISH to `topic` (a
    /// valid topic name):
    /// - non-shared matches are merged per session (highest QoS, all identifiers, RAP if
    ///   any); a `no_local` subscription is skipped when `publisher == Some(session)`;
    /// - each matching shared group yields one `shared: true` match for one member, chosen
    ///   round robin among members for which `eligible` is true (among all members if none
    ///   is); a session can thus receive one shared and one direct copy;
    /// - filters whose first level is `+` or `#` do not match topics starting with `$`.
    ///
    /// Order in `out`: merged direct matches sorted by session, then shared matches.
    pub fn matches(
        &mut self,
        topic: &str,
        publisher: Option<SessionId>,
        mut eligible: impl FnMut(SessionId) -> bool,
        out: &mut Vec<Match>,
    ) {
        let start = out.len();
        let dollar = topic.starts_with('$');

        // Root: the topic always has at least one level.
        let root = &mut self.root;
        if !dollar {
            if let Some(h) = root.hash.as_deref_mut() {
                h.collect(publisher, &mut eligible, out);
            }
        }
        let (level, next) = level_at(topic, 0);
        let mut stack: Vec<(&mut Node, Option<usize>)> = Vec::new();
        let Node { children, plus, .. } = root;
        if let Some(c) = children.get_mut(level) {
            stack.push((c, next));
        }
        if !dollar {
            if let Some(p) = plus.as_deref_mut() {
                stack.push((p, next));
            }
        }

        while let Some((node, pos)) = stack.pop() {
            let Node {
                children,
                plus,
                hash,
                subs,
            } = node;
            // `x/#` matches `x` itself and everything below.
            if let Some(h) = hash.as_deref_mut() {
                h.collect(publisher, &mut eligible, out);
            }
            match pos {
                None => subs.collect(publisher, &mut eligible, out),
                Some(p) => {
                    let (level, next) = level_at(topic, p);
                    if let Some(c) = children.get_mut(level) {
                        stack.push((c, next));
                    }
                    if let Some(pl) = plus.as_deref_mut() {
                        stack.push((pl, next));
                    }
                }
            }
        }

        merge_direct(out, start);
    }

    #[cfg(test)]
    /// Number of subscriptions (direct + shared members).
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of trie nodes, root included (1 for an empty tree).
    #[cfg(test)]
    fn node_count(&self) -> usize {
        let mut n = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            n += 1;
            stack.extend(node.children.values());
            stack.extend(node.plus.as_deref());
        }
        n
    }
}

/// Sorts `out[start..]` (direct first, by session; then shared, by session) and merges
/// adjacent direct matches of the same session in place.
fn merge_direct(out: &mut Vec<Match>, start: usize) {
    if out.len() - start < 2 {
        return;
    }
    out[start..].sort_unstable_by_key(|m| (m.shared, m.session));
    let mut w = start;
    for r in start + 1..out.len() {
        let (head, tail) = out.split_at_mut(r);
        let (acc, cur) = (&mut head[w], &mut tail[0]);
        if !acc.shared && !cur.shared && acc.session == cur.session {
            acc.qos = acc.qos.max(cur.qos);
            acc.retain_as_published |= cur.retain_as_published;
            acc.identifiers.append(&mut cur.identifiers);
        } else {
            w += 1;
            out.swap(w, r);
        }
    }
    out.truncate(w + 1);
    for m in &mut out[start..] {
        if m.identifiers.len() > 1 {
            m.identifiers.sort_unstable();
            m.identifiers.dedup();
        }
    }
}

#[cfg(test)]
mod tests {
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
}
