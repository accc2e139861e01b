//! Retained messages indexed by topic, queried by filter on SUBSCRIBE.
//!
//! Responsibility: hold at most one retained message per topic name and enumerate those
//! matching a topic filter while only walking the trie branches the filter can reach
//! (`a/b/+` on 100k topics visits `a`, `a/b` and its children, nothing else). Pure data
//! structure, no I/O; the message type `T` is opaque.
//!
//! Invariants:
//! - One trie node per topic level; a node holds a value iff a message is retained for
//!   exactly that topic. Topic strings are not stored: they are rebuilt from the path
//!   while walking (one reused buffer per query).
//! - `len` equals the number of stored messages.
//! - Every non-root node holds a value or has a child: deleting (via `set(_, None)` or
//!   `retain`) prunes the chain of nodes left empty.
//! - Wildcards on the first filter level (`#`, `+`) skip topics starting with `$` (4.7.2).
//! - All walks (set, query, drop) are iterative, so a very deep topic cannot overflow the
//!   stack.

use std::collections::HashMap;

struct Node<T> {
    children: HashMap<Box<str>, Node<T>>,
    value: Option<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

impl<T> Drop for Node<T> {
    /// Iterative, so that dropping a very deep chain cannot overflow the stack.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack: Vec<Node<T>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

/// What remains of the filter when a node is reached.
#[derive(Clone, Copy)]
enum Rest {
    /// Next filter level starts at this byte offset.
    Level(usize),
    /// The filter is exhausted: the node itself matches.
    Done,
    /// Under a `#`: the node and all its descendants match.
    All,
}

struct Frame<'a, T> {
    node: &'a Node<T>,
    key: &'a str,
    /// Length of the topic buffer for the parent node.
    parent_len: usize,
    /// 1 for first-level nodes (no `/` before the key).
    depth: usize,
    rest: Rest,
}

pub struct RetainedStore<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for RetainedStore<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> RetainedStore<T> {
    pub fn new() -> Self {
        RetainedStore {
            root: Node::default(),
            len: 0,
        }
    }

    /// Stores or replaces (`Some`) or deletes (`None`) the retained message of a topic
    /// name; returns the previous one.
    pub fn set(&mut self, topic: &str, msg: Option<T>) -> Option<T> {
        match msg {
            Some(m) => {
                // Fast path: existing path, no key allocation.
                if let Some(node) = self.node_mut(topic) {
                    let prev = node.value.replace(m);
                    if prev.is_none() {
                        self.len += 1;
                    }
                    return prev;
                }
                let mut node = &mut self.root;
                for level in topic.split('/') {
                    node = node.children.entry(Box::from(level)).or_default();
                }
                self.len += 1;
                node.value.replace(m)
            }
            None => self.remove(topic),
        }
    }

    fn node_mut(&mut self, topic: &str) -> Option<&mut Node<T>> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        Some(node)
    }

    fn remove(&mut self, topic: &str) -> Option<T> {
        // Pass 1: take the value and find the deepest node that must stay (`cut`: the
        // edge below it, at level index `cut`, leads to a chain that is now empty).
        let mut node = &mut self.root;
        let mut cut = 0usize;
        for (depth, level) in topic.split('/').enumerate() {
            if depth == 0 || node.value.is_some() || node.children.len() > 1 {
                cut = depth;
            }
            node = node.children.get_mut(level)?;
        }
        let prev = node.value.take()?;
        self.len -= 1;
        if node.children.is_empty() {
            // Pass 2: cut the empty chain.
            let mut node = &mut self.root;
            for (depth, level) in topic.split('/').enumerate() {
                if depth == cut {
                    node.children.remove(level);
                    break;
                }
                match node.children.get_mut(level) {
                    Some(n) => node = n,
                    None => break,
                }
            }
        }
        Some(prev)
    }

    #[cfg(test)]
    pub fn get(&self, topic: &str) -> Option<&T> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    /// Calls `f(topic, msg)` for every retained message whose topic matches `filter` (a
    /// valid filter, no `$share` prefix), honouring the `$` rule.
    pub fn for_each_match(&self, filter: &str, f: impl FnMut(&str, &T)) {
        self.walk(Rest::Level(0), filter, f);
    }

    /// Removes every entry for which `keep` returns false (used for message expiry sweeps).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &T) -> bool) {
        let mut doomed: Vec<String> = Vec::new();
        self.walk(Rest::All, "", |topic, msg| {
            if !keep(topic, msg) {
                doomed.push(topic.to_owned());
            }
        });
        for topic in doomed {
            self.remove(&topic);
        }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Depth-first walk from the root. `start` is `Rest::Level(0)` to match `filter`, or
    /// `Rest::All` to visit everything (the `$` rule does not apply then).
    fn walk(&self, start: Rest, filter: &str, mut f: impl FnMut(&str, &T)) {
        let mut buf = String::new();
        let mut stack: Vec<Frame<'_, T>> = Vec::new();
        let all = matches!(start, Rest::All);
        // Root: it never holds a value; its children are first-level topics.
        push_children(&mut stack, &self.root, 0, 1, start, filter, all);

        while let Some(fr) = stack.pop() {
            buf.truncate(fr.parent_len);
            if fr.depth > 1 {
                buf.push('/');
            }
            buf.push_str(fr.key);
            let len = buf.len();
            match fr.rest {
                Rest::All | Rest::Done => {
                    if let Some(v) = &fr.node.value {
                        f(&buf, v);
                    }
                    if matches!(fr.rest, Rest::All) {
                        push_all(&mut stack, fr.node, len, fr.depth + 1, Rest::All);
                    }
                }
                Rest::Level(p) => {
                    push_children(
                        &mut stack,
                        fr.node,
                        len,
                        fr.depth + 1,
                        fr.rest,
                        filter,
                        true,
                    );
                    // `x/#` matches `x` itself.
                    if level_at(filter, p).0 == "#" {
                        if let Some(v) = &fr.node.value {
                            f(&buf, v);
                        }
                    }
                }
            }
        }
    }
}

/// Splits off the level starting at byte `pos`; returns it and what follows.
#[inline]
fn level_at(s: &str, pos: usize) -> (&str, Rest) {
    let rest = &s[pos..];
    match rest.find('/') {
        Some(i) => (&rest[..i], Rest::Level(pos + i + 1)),
        None => (rest, Rest::Done),
    }
}

fn push_all<'a, T>(
    stack: &mut Vec<Frame<'a, T>>,
    node: &'a Node<T>,
    parent_len: usize,
    depth: usize,
    rest: Rest,
) {
    stack.extend(node.children.iter().map(|(k, n)| Frame {
        node: n,
        key: k,
        parent_len,
        depth,
        rest,
    }));
}

/// Pushes the children of `node` reachable with filter position `rest`.
/// `dollar_ok`: whether wildcards may match `$`-prefixed keys (false at the root).
fn push_children<'a, T>(
    stack: &mut Vec<Frame<'a, T>>,
    node: &'a Node<T>,
    parent_len: usize,
    depth: usize,
    rest: Rest,
    filter: &str,
    dollar_ok: bool,
) {
    let Rest::Level(p) = rest else {
        if matches!(rest, Rest::All) {
            push_all(stack, node, parent_len, depth, Rest::All);
        }
        return;
    };
    let (level, next) = level_at(filter, p);
    let wild_next = match level {
        "#" => Rest::All,
        "+" => next,
        _ => {
            if let Some((k, n)) = node.children.get_key_value(level) {
                stack.push(Frame {
                    node: n,
                    key: k,
                    parent_len,
                    depth,
                    rest: next,
                });
            }
            return;
        }
    };
    stack.extend(
        node.children
            .iter()
            .filter(|(k, _)| dollar_ok || !k.starts_with('$'))
            .map(|(k, n)| Frame {
                node: n,
                key: k,
                parent_len,
                depth,
                rest: wild_next,
            }),
    );
}

#[cfg(test)]
impl<T> RetainedStore<T> {
    /// Number of trie nodes, root included (1 for an empty store).
    fn node_count(&self) -> usize {
        let mut n = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            n += 1;
            stack.extend(node.children.values());
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::topic;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn query(s: &RetainedStore<u32>, filter: &str) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        s.for_each_match(filter, |t, m| v.push((t.to_owned(), *m)));
        v.sort();
        v
    }

    fn pairs(v: &[(&str, u32)]) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = v.iter().map(|(t, m)| (t.to_string(), *m)).collect();
        v.sort();
        v
    }

    #[test]
    fn set_replace_delete_get() {
        let mut s = RetainedStore::new();
        assert!(s.is_empty());
        assert_eq!(s.set("a/b", Some(1)), None);
        assert_eq!(s.set("a/b", Some(2)), Some(1));
        assert_eq!(s.set("a", Some(3)), None);
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("a/b"), Some(&2));
        assert_eq!(s.get("a"), Some(&3));
        assert_eq!(s.get("a/b/c"), None);
        assert_eq!(s.get("x"), None);
        assert_eq!(s.set("x/y", None), None);
        assert_eq!(s.set("a/b/c", None), None);
        assert_eq!(s.node_count(), 3);
        assert_eq!(s.set("a", None), Some(3));
        assert_eq!(s.node_count(), 3); // a is still on the path to a/b
        assert_eq!(s.set("a", None), None);
        assert_eq!(s.set("a/b", None), Some(2));
        assert_eq!(s.node_count(), 1);
        assert!(s.is_empty());

        s.set("p/q/r/s", Some(1));
        s.set("p/x", Some(2));
        assert_eq!(s.set("p/q/r/s", None), Some(1));
        assert_eq!(s.node_count(), 3); // root, p, x
        assert_eq!(s.get("p/x"), Some(&2));
    }

    #[test]
    fn matching() {
        let mut s = RetainedStore::new();
        for (i, t) in [
            "sport",
            "sport/",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "/finance",
            "$SYS/monitor/Clients",
            "$SYS",
            "a//b",
            "a/$x",
        ]
        .iter()
        .enumerate()
        {
            s.set(t, Some(i as u32));
        }
        assert_eq!(
            query(&s, "sport/#"),
            pairs(&[
                ("sport", 0),
                ("sport/", 1),
                ("sport/tennis", 2),
                ("sport/tennis/player1", 3),
                ("sport/tennis/player1/ranking", 4)
            ])
        );
        assert_eq!(
            query(&s, "sport/+"),
            pairs(&[("sport/", 1), ("sport/tennis", 2)])
        );
        assert_eq!(
            query(&s, "sport/tennis/+"),
            pairs(&[("sport/tennis/player1", 3)])
        );
        assert_eq!(query(&s, "+"), pairs(&[("sport", 0)]));
        assert_eq!(
            query(&s, "+/+"),
            pairs(&[
                ("sport/", 1),
                ("sport/tennis", 2),
                ("/finance", 5),
                ("a/$x", 9)
            ])
        );
        assert_eq!(query(&s, "/+"), pairs(&[("/finance", 5)]));
        assert_eq!(query(&s, "a/+/b"), pairs(&[("a//b", 8)]));
        assert_eq!(query(&s, "a/+"), pairs(&[("a/$x", 9)]));
        assert_eq!(query(&s, "#").len(), 8);
        assert!(query(&s, "#").iter().all(|(t, _)| !t.starts_with('$')));
        assert_eq!(query(&s, "+/monitor/Clients"), vec![]);
        assert_eq!(
            query(&s, "$SYS/#"),
            pairs(&[("$SYS", 7), ("$SYS/monitor/Clients", 6)])
        );
        assert_eq!(
            query(&s, "$SYS/monitor/+"),
            pairs(&[("$SYS/monitor/Clients", 6)])
        );
        assert_eq!(query(&s, "sport/tennis"), pairs(&[("sport/tennis", 2)]));
        assert_eq!(query(&s, "nothing/#"), vec![]);
    }

    #[test]
    fn retain_sweeps_and_prunes() {
        let mut s = RetainedStore::new();
        for i in 0..50u32 {
            s.set(&format!("d/{}/v", i % 7), Some(i)); // replaced
            s.set(&format!("e/{i}"), Some(i));
        }
        assert_eq!(s.len(), 57);
        s.retain(|t, v| t.starts_with("e/") && v % 2 == 0);
        assert_eq!(s.len(), 25);
        assert_eq!(s.node_count(), 1 + 1 + 25);
        s.retain(|_, _| false);
        assert!(s.is_empty());
        assert_eq!(s.node_count(), 1);
    }

    #[test]
    fn deep_topics_do_not_overflow() {
        let deep = vec!["x"; 200_000].join("/");
        let mut s = RetainedStore::new();
        s.set(&deep, Some(1u32));
        assert_eq!(query(&s, "#").len(), 1);
        assert_eq!(query(&s, "x/#").len(), 1);
        assert_eq!(s.get(&deep), Some(&1));
        assert_eq!(s.set(&deep, None), Some(1));
        assert_eq!(s.node_count(), 1);
        s.set(&deep, Some(2));
        drop(s);
    }

    /// Independent naive matcher for the oracle.
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
                Some(tl) if *fl == "+" || fl == tl => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    const LEVELS: &[&str] = &["a", "b", "", "$SYS", "$x", "c"];

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(LEVELS), 1..5)
            .prop_map(|v| v.join("/"))
            .prop_filter("non-empty topic", |t| !t.is_empty())
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![3 => prop::sample::select(LEVELS), 1 => Just("+")];
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn store_matches_reference(
            ops in prop::collection::vec((topic_strategy(), prop::option::of(0u32..100)), 0..60),
            filters in prop::collection::vec(filter_strategy(), 1..10),
            threshold in 0u32..100,
        ) {
            let mut store = RetainedStore::new();
            let mut model: BTreeMap<String, u32> = BTreeMap::new();
            for (t, v) in &ops {
                let prev = store.set(t, *v);
                let mprev = match v {
                    Some(v) => model.insert(t.clone(), *v),
                    None => model.remove(t),
                };
                prop_assert_eq!(prev, mprev);
                prop_assert_eq!(store.len(), model.len());
            }
            for (t, v) in &model {
                prop_assert_eq!(store.get(t), Some(v));
            }
            for f in &filters {
                prop_assert!(topic::valid_topic_filter(f));
                let got = query(&store, f);
                let want: Vec<(String, u32)> = model
                    .iter()
                    .filter(|(t, _)| naive_match(f, t))
                    .map(|(t, v)| (t.clone(), *v))
                    .collect();
                for (t, _) in &want {
                    prop_assert!(topic::matches(f, t));
                }
                prop_assert_eq!(got, want, "filter {:?}", f);
            }
            store.retain(|_, v| *v >= threshold);
            model.retain(|_, v| *v >= threshold);
            prop_assert_eq!(query(&store, "#").len() + query(&store, "$SYS/#").len()
                + query(&store, "$x/#").len(), model.len());
            prop_assert_eq!(store.len(), model.len());
            let topics: Vec<String> = model.keys().cloned().collect();
            for t in topics {
                prop_assert!(store.set(&t, None).is_some());
            }
            prop_assert!(store.is_empty());
            prop_assert_eq!(store.node_count(), 1);
        }
    }
}
