//! Topic names and filters: validation, `$share/` parsing and matching (MQTT 4.7, 4.8.2).
//!
//! Responsibility: the syntactic rules every other module relies on. The same rules apply
//! to MQTT 3.1.1 and 5.0.
//!
//! Invariants and conventions:
//! - A topic is split into levels on every `/`; empty levels are real levels (`a//b` has
//!   three levels, `/finance` starts with an empty level). `""` is never a valid name or
//!   filter.
//! - A valid topic *name* contains no wildcard (`+`, `#`) and no U+0000.
//! - A valid topic *filter* uses `+` only as a whole level and `#` only as the whole last
//!   level; it contains no U+0000.
//! - Filters whose first level is a wildcard (`#`, `+`) never match topic names starting
//!   with `$` (4.7.2); `$SYS/#` does.
//! - Nothing here allocates or panics, whatever the input.

/// Largest encodable UTF-8 string in MQTT (two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// A filter starting with `$share/` that is not a valid shared subscription filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid shared subscription filter")]
pub struct InvalidSharedFilter;

const SHARE_PREFIX: &str = "$share/";

/// A valid topic name: non-empty, at most 65535 bytes, no `+`, `#` or U+0000.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && !topic.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// A valid topic filter: non-empty, at most 65535 bytes, no U+0000, `+` only as a whole
/// level and `#` only as the whole last level.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Number of `/`-separated levels (`"a"` → 1, `"a//b"` → 3, `"/"` → 2).
pub fn level_count(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'/').count() + 1
}

/// Splits a `$share/{group}/{filter}` filter.
///
/// - `Ok(None)`: not a shared subscription (does not start with `$share/`).
/// - `Ok(Some((group, filter)))`: a valid shared subscription; `filter` is a valid topic
///   filter.
/// - `Err(InvalidSharedFilter)`: starts with `$share/` but the group is empty or contains
///   `+`, `#` or U+0000, or the filter part is missing, empty or not a valid filter.
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, InvalidSharedFilter> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Err(InvalidSharedFilter);
    };
    if group.is_empty() || group.bytes().any(|b| b == b'+' || b == b'#' || b == 0) {
        return Err(InvalidSharedFilter);
    }
    if !valid_topic_filter(inner) {
        return Err(InvalidSharedFilter);
    }
    Ok(Some((group, inner)))
}

/// Reference matcher: does the (valid) `filter` match the (valid) topic name `topic`?
///
/// Used by the retained store's callers and as the oracle in tests; the subscription tree
/// implements the same rules on its trie.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(_)) => {
                if first && topic.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) => {
                if a != b {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_topic_name("a"));
        assert!(valid_topic_name("/"));
        assert!(valid_topic_name("a//b"));
        assert!(valid_topic_name("$SYS/broker"));
        assert!(valid_topic_name("sport/tennis/player1"));
        assert!(valid_topic_name("ünïcode/ä"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("a/#"));
        assert!(!valid_topic_name("a+b"));
        assert!(!valid_topic_name("a\0b"));
        assert!(!valid_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)));
        assert!(valid_topic_name(&"x".repeat(MAX_TOPIC_LEN)));
    }

    #[test]
    fn filters_spec_4_7_1() {
        // 4.7.1.2 multi-level wildcard
        assert!(valid_topic_filter("sport/tennis/#"));
        assert!(valid_topic_filter("#"));
        assert!(valid_topic_filter("sport/#"));
        assert!(!valid_topic_filter("sport/tennis#"));
        assert!(!valid_topic_filter("sport/tennis/#/ranking"));
        assert!(!valid_topic_filter("#/"));
        assert!(!valid_topic_filter("##"));
        // 4.7.1.3 single-level wildcard
        assert!(valid_topic_filter("+"));
        assert!(valid_topic_filter("+/tennis/#"));
        assert!(valid_topic_filter("sport/+/player1"));
        assert!(valid_topic_filter("/+"));
        assert!(valid_topic_filter("+/+"));
        assert!(!valid_topic_filter("sport+"));
        assert!(!valid_topic_filter("sport/+x"));
        assert!(!valid_topic_filter("++"));
        // other
        assert!(valid_topic_filter("a//b"));
        assert!(valid_topic_filter("/"));
        assert!(!valid_topic_filter(""));
        assert!(!valid_topic_filter("a/\0"));
    }

    #[test]
    fn levels() {
        assert_eq!(level_count("a"), 1);
        assert_eq!(level_count("/"), 2);
        assert_eq!(level_count("a//b"), 3);
        assert_eq!(level_count("/finance"), 2);
        assert_eq!(level_count("sport/tennis/player1"), 3);
    }

    #[test]
    fn shared() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$SYS/x"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/b"), Ok(Some(("g", "a/b"))));
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(("g", "#"))));
        assert_eq!(parse_shared("$share/g//"), Ok(Some(("g", "/"))));
        assert_eq!(
            parse_shared("$share/consumer1/sport/tennis/+"),
            Ok(Some(("consumer1", "sport/tennis/+")))
        );
        assert_eq!(parse_shared("$share/"), Err(InvalidSharedFilter));
        assert_eq!(parse_shared("$share/g"), Err(InvalidSharedFilter));
        assert_eq!(parse_shared("$share/g/"), Err(InvalidSharedFilter));
        assert_eq!(parse_shared("$share//a"), Err(InvalidSharedFilter));
        assert_eq!(parse_shared("$share/g+/a"), Err(InvalidSharedFilter));
        assert_eq!(parse_shared("$share/#/a"), Err(InvalidSharedFilter));
        assert_eq!(parse_shared("$share/g/a/#/b"), Err(InvalidSharedFilter));
    }

    #[test]
    fn matching_spec_examples() {
        // 4.7.1.2
        for t in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(matches("sport/tennis/player1/#", t), "{t}");
        }
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "sport/tennis"));
        assert!(!matches("sport/tennis/#", "sport/tenni"));
        // 4.7.1.3
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("a/+/b", "a//b"));
        // 4.7.2
        assert!(!matches("#", "$SYS/monitor/Clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$SYS"));
        assert!(matches("$SYS", "$SYS"));
        // $ only matters on the first level
        assert!(matches("a/+", "a/$x"));
        assert!(matches("a/#", "a/$x"));
        // exact
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }
}
