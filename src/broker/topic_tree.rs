//! Subscription tree: topic filters -> subscribed sessions, with `+`/`#` wildcards,
//! `$`-topic rules and `$share/{group}/{filter}` groups (round robin within a group).
//!
//! Responsibility: answer "who receives a PUBLISH to this topic, at which QoS, with which
//! subscription identifiers" in O(levels × matching branches), independent of the total
//! number of subscriptions. Pure data structure, no I/O.
//!
//! Layout: a trie with one node per filter level. A node has literal children (a packed
//! vector of (level, node), hash-indexed above a few entries: [`ChildSet`]; allocated with
//! the first child and freed with the last: most nodes are leaves, pinned at 56 bytes by a
//! size test), a `+` child, a `#` slot (subscriptions whose filter ends in `#` right
//! below this node) and its own subscriptions (filters ending exactly at this node). Each
//! subscription slot holds direct subscribers (`session -> data`, sorted by session: most
//! slots have one, kept inline, or a few) and shared groups (`group -> members`, ordered,
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

use std::collections::BTreeMap;

mod level;

use super::lazy::Few;
use crate::protocol::types::{QoS, SubscriptionOptions};
use level::Level;

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
    /// Direct subscribers sorted by session. Not a hash map: most topics of a gateway have
    /// one or a few subscribers, and a hash map with one entry costs ~130 bytes (issue 17:
    /// 10,000 sessions each on a topic of its own). The one subscriber of most topics is
    /// kept inline ([`Few`], 24 bytes like an empty `Vec`, no allocation); more go to a
    /// vector. Matching walks all entries either way; a subscribe or unsubscribe moves at
    /// most the entries behind it (24 bytes each).
    direct: Few<(SessionId, SubscriptionData)>,
    shared: SharedGroups,
}

/// The `$share` groups of a slot: allocated on the first one and freed with the last
/// (inline, an empty map would cost every node 16 bytes more; most slots never have one).
#[allow(
    clippy::box_collection,
    reason = "boxed for its size inline (8 bytes, not 24-48)"
)]
#[derive(Debug, Default)]
struct SharedGroups(Option<Box<BTreeMap<Box<str>, SharedGroup>>>);

impl SharedGroups {
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn get_mut(&mut self, group: &str) -> Option<&mut SharedGroup> {
        self.0.as_mut().and_then(|m| m.get_mut(group))
    }

    /// Adds a group not there yet (allocating its key).
    fn insert_new(&mut self, group: &str) -> &mut SharedGroup {
        self.0
            .get_or_insert_with(Default::default)
            .entry(Box::from(group))
            .or_default()
    }

    fn remove(&mut self, group: &str) {
        if let Some(m) = self.0.as_mut() {
            m.remove(group);
            if m.is_empty() {
                self.0 = None;
            }
        }
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut SharedGroup> {
        self.0.iter_mut().flat_map(|m| m.values_mut())
    }
}

/// A node's literal children, keyed by level: allocated on the first child and freed
/// with the last, because most nodes are leaves (a topic per sensor).
#[derive(Debug, Default)]
struct Children(Option<Box<ChildSet>>);

/// Child sets up to this size are searched by a linear scan (a few short keys compare in
/// less time than a hash takes); larger ones get a hash index.
const SCAN_MAX: usize = 8;

/// The children of one node: the entries (level, node) packed in a vector, and above
/// [`SCAN_MAX`] entries an index of their positions by the hash of their level.
///
/// Keys are [`Level`]s: short ones in place, no allocation of their own.
///
/// Not a `HashMap<Box<str>, Node>`: its slots are whole entries (72 bytes), a power of two
/// of them and up to half empty after a growth, so one level with 10,000 children (a topic
/// per session under one parent, issue 17) held 16,384 × 73 bytes (1.14 MiB), and a node
/// with one child a table of four slots (~350 bytes). Here the vector grows by about an
/// eighth and the index holds 4-byte positions: ~96 bytes per child at 10,000 children,
/// keys included (119 with a boxed key each), ~100 bytes for a single child. Lookups stay O(1) (one probe of the index, one compare
/// of the entry); a removal moves the last entry into the hole and fixes its position.
#[derive(Debug, Default)]
struct ChildSet {
    /// Unordered; no key twice.
    entries: Vec<(Level, Node)>,
    /// Positions in `entries`, by the hash of their key: `Some` above [`SCAN_MAX`]
    /// entries (dropped again at half that).
    index: Option<Box<ChildIndex>>,
}

#[derive(Debug)]
struct ChildIndex {
    positions: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
}

impl ChildIndex {
    /// An index of every entry.
    fn of(entries: &[(Level, Node)]) -> Box<ChildIndex> {
        let mut ix = Box::new(ChildIndex {
            positions: hashbrown::HashTable::with_capacity(entries.len()),
            hasher: std::hash::RandomState::new(),
        });
        for (i, (key, _)) in entries.iter().enumerate() {
            ix.add(entries, key.as_bytes(), i);
        }
        ix
    }

    fn hash(&self, level: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, level)
    }

    /// Indexes entry `i` (whose key is `level`; not indexed yet).
    fn add(&mut self, entries: &[(Level, Node)], level: &[u8], i: usize) {
        let hasher = &self.hasher;
        self.positions
            .insert_unique(self.hash(level), position(i), |&j| {
                std::hash::BuildHasher::hash_one(hasher, entries[j as usize].0.as_bytes())
            });
    }

    fn find(&self, entries: &[(Level, Node)], level: &[u8]) -> Option<usize> {
        self.positions
            .find(self.hash(level), |&j| {
                entries[j as usize].0.as_bytes() == level
            })
            .map(|&j| j as usize)
    }

    /// Entry `from` (key `level`) is now at `to` (`None`: gone).
    fn moved(&mut self, level: &[u8], from: usize, to: Option<usize>) {
        let from = position(from);
        if let Ok(e) = self.positions.find_entry(self.hash(level), |&j| j == from) {
            match to {
                Some(to) => *e.into_mut() = position(to),
                None => {
                    e.remove();
                }
            }
        }
    }
}

/// An entry's position as stored in the index.
fn position(i: usize) -> u32 {
    // A child set of 2^32 entries would take more than 300 GB: out of reach.
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl ChildSet {
    fn find(&self, level: &str) -> Option<usize> {
        let level = level.as_bytes();
        match &self.index {
            Some(ix) => ix.find(&self.entries, level),
            None => self.entries.iter().position(|(k, _)| k.as_bytes() == level),
        }
    }

    /// Adds a child not there yet (allocating its key).
    fn push(&mut self, level: &str) -> &mut Node {
        let n = self.entries.len();
        if n == self.entries.capacity() {
            // About an eighth more: a few copies per entry in all, and little left over.
            self.entries.reserve_exact((n / 8).max(1));
        }
        self.entries.push((Level::new(level), Node::default()));
        match &mut self.index {
            Some(ix) => ix.add(&self.entries, level.as_bytes(), n),
            None if n + 1 > SCAN_MAX => self.index = Some(ChildIndex::of(&self.entries)),
            None => {}
        }
        &mut self.entries[n].1
    }

    /// Removes the child at `i`; the last entry takes its place.
    fn remove_at(&mut self, i: usize) {
        let last = self.entries.len() - 1;
        if let Some(ix) = &mut self.index {
            ix.moved(self.entries[i].0.as_bytes(), i, None);
            if i != last {
                ix.moved(self.entries[last].0.as_bytes(), last, Some(i));
            }
        }
        self.entries.swap_remove(i);
        let n = self.entries.len();
        if n <= SCAN_MAX / 2 {
            self.index = None;
        }
        if n <= self.entries.capacity() / 2 {
            // After many unsubscribes: back to about an eighth above what is left
            // (growing to the half again costs as many pushes as were removed).
            self.entries.shrink_to(n + n / 8);
            if let Some(ix) = &mut self.index {
                let hasher = &ix.hasher;
                let entries = &self.entries;
                ix.positions.shrink_to(n, |&j| {
                    std::hash::BuildHasher::hash_one(hasher, entries[j as usize].0.as_bytes())
                });
            }
        }
    }
}

impl Children {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |c| c.entries.len())
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node> {
        let set = self.0.as_mut()?;
        let i = set.find(level)?;
        Some(&mut set.entries[i].1)
    }

    /// Allocates the key; only called when the path is incomplete.
    fn get_or_insert(&mut self, level: &str) -> &mut Node {
        let set = self.0.get_or_insert_with(Default::default);
        match set.find(level) {
            Some(i) => &mut set.entries[i].1,
            None => set.push(level),
        }
    }

    fn remove(&mut self, level: &str) {
        if let Some(set) = self.0.as_mut() {
            if let Some(i) = set.find(level) {
                set.remove_at(i);
            }
            if set.entries.is_empty() {
                self.0 = None;
            }
        }
    }

    /// Takes every child out (for an iterative drop).
    fn take_all(&mut self) -> impl Iterator<Item = Node> {
        self.0
            .take()
            .into_iter()
            .flat_map(|c| c.entries.into_iter().map(|(_, n)| n))
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &Node> {
        self.0.iter().flat_map(|c| c.entries.iter().map(|(_, n)| n))
    }

    /// Heap bytes of the child set itself and of its keys (not of the children's own
    /// tables).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |c| {
            let index = c.index.as_ref().map_or(0, |ix| {
                let buckets = if ix.positions.capacity() < 8 {
                    (ix.positions.capacity() + 1).next_power_of_two()
                } else {
                    (ix.positions.capacity() * 8 / 7).next_power_of_two()
                };
                std::mem::size_of::<ChildIndex>() + buckets * (4 + 1) + 16
            });
            std::mem::size_of::<ChildSet>()
                + c.entries.capacity() * std::mem::size_of::<(Level, Node)>()
                + c.entries.iter().map(|(k, _)| k.heap_bytes()).sum::<usize>()
                + index
        })
    }
}

impl Subs {
    /// Direct-subscriber slots allocated on the heap.
    #[cfg(test)]
    fn allocated_slots(&self) -> usize {
        match &self.direct {
            Few::Many(v) => v.capacity(),
            Few::None | Few::One(_) => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
    }

    /// Returns true if it replaced an existing subscription.
    fn insert(&mut self, group: Option<&str>, session: SessionId, data: SubscriptionData) -> bool {
        match group {
            None => match self
                .direct
                .as_slice()
                .binary_search_by_key(&session, |(s, _)| *s)
            {
                Ok(i) => {
                    self.direct.as_mut_slice()[i].1 = data;
                    true
                }
                Err(i) => {
                    self.direct.insert(i, (session, data));
                    false
                }
            },
            Some(g) => {
                let grp = match self.shared.get_mut(g) {
                    Some(grp) => grp,
                    None => self.shared.insert_new(g),
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
            None => match self
                .direct
                .as_slice()
                .binary_search_by_key(&session, |(s, _)| *s)
            {
                Ok(i) => self.direct.remove(i).is_some(),
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
    children: Children,
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
            self.children.get_or_insert(level)
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
        let mut stack: Vec<Node> = self.children.take_all().collect();
        stack.extend(self.plus.take().map(|b| *b));
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.take_all());
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
#[path = "topic_tree_tests.rs"]
mod tests;
