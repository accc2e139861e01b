//! The ACL file: which topics a client may publish to (write) and subscribe to (read).
//!
//! Format (Mosquitto-like), one rule per line, `#` comments:
//!
//! ```text
//! # Rules before the first `user` line apply to anonymous clients.
//! topic read public/#
//!
//! user alice                       # following `topic` rules apply to user alice
//! topic readwrite alice/#
//! topic deny alice/secret/#
//!
//! # `pattern` rules apply to every client, wherever they appear; %u is the user name,
//! # %c the client id.
//! pattern write devices/%c/up
//! pattern read devices/%c/down/#
//! pattern readwrite users/%u/#
//! ```
//!
//! Access is `read`, `write`, `readwrite` (the default when omitted) or `deny`.
//! Once an ACL file is configured everything not granted is denied; `deny` wins over any
//! grant. A pattern using `%u` does not apply to anonymous clients, and a pattern does not
//! apply when the substituted user name or client id contains `+`, `#` or `/` (which would
//! widen the rule).
//!
//! Publishing to topic T needs a `write` rule matching T and no `deny` rule matching T.
//! Subscribing to filter F needs a `read` rule whose filter covers F (every topic F matches,
//! the rule matches too) and no `deny` rule covering F; shared subscriptions are checked on
//! their inner filter. A granted filter that overlaps a `deny` rule (some topic matches
//! both, as `#` and `deny secret/#`) is [`SubscribeCheck::Filtered`]: granted, and each
//! delivery to it is checked with [`ClientAcl::can_read`] (Mosquitto's behaviour). Filters
//! that overlap no deny rule need no check per delivery.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::protocol::topic;

use super::AuthError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn parse(s: &str) -> Option<Access> {
        Some(match s {
            "read" => Access::Read,
            "write" => Access::Write,
            "readwrite" => Access::ReadWrite,
            "deny" => Access::Deny,
            _ => return None,
        })
    }

    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    filter: Box<str>,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    path: PathBuf,
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    pub fn load(path: &Path) -> Result<Acl, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|cause| AuthError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Acl, AuthError> {
        let mut acl = Acl {
            path: path.to_path_buf(),
            ..Acl::default()
        };
        let mut current: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| AuthError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line
                .split_once(char::is_whitespace)
                .map(|(k, r)| (k, r.trim()))
                .unwrap_or((line, ""));
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    current = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (access, filter) = match rest.split_once(char::is_whitespace) {
                        Some((a, f)) if Access::parse(a).is_some() => {
                            (Access::parse(a).unwrap_or(Access::Deny), f.trim())
                        }
                        _ => (Access::ReadWrite, rest),
                    };
                    if filter.is_empty() || Access::parse(filter).is_some() {
                        return Err(err(format!(
                            "`{keyword}` needs a topic filter: `{keyword} [read|write|readwrite|deny] FILTER`"
                        )));
                    }
                    if filter.contains(char::is_whitespace) {
                        return Err(err(format!(
                            "`{filter}`: unknown access (expected read, write, readwrite or deny) or a filter with spaces"
                        )));
                    }
                    if !topic::valid_topic_filter(filter) {
                        return Err(err(format!("`{filter}` is not a valid topic filter")));
                    }
                    let rule = Rule {
                        access,
                        filter: filter.into(),
                    };
                    match (keyword, &current) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(user)) => acl.users.entry(user.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown keyword `{other}` (expected `user`, `topic` or `pattern`)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rules that apply to one client, with `%u` / `%c` substituted. Computed once per
    /// connection.
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let own = match username {
            Some(u) => self.users.get(u),
            None => Some(&self.anonymous),
        };
        let mut rules: Vec<Rule> = own.map(|r| r.to_vec()).unwrap_or_default();
        let safe = |s: &str| !s.contains(['+', '#', '/']);
        for p in &self.patterns {
            let uses_user = p.filter.contains("%u");
            let uses_client = p.filter.contains("%c");
            let mut filter = p.filter.to_string();
            if uses_user {
                match username {
                    Some(u) if safe(u) => filter = filter.replace("%u", u),
                    _ => continue,
                }
            }
            if uses_client {
                if !safe(client_id) {
                    continue;
                }
                filter = filter.replace("%c", client_id);
            }
            rules.push(Rule {
                access: p.access,
                filter: filter.into(),
            });
        }
        // Deny rules first: checked before any grant.
        rules.sort_by_key(|r| r.access != Access::Deny);
        ClientAcl { rules }
    }
}

/// The rules of one connected client.
#[derive(Debug, Clone, Default)]
pub struct ClientAcl {
    rules: Vec<Rule>,
}

impl ClientAcl {
    /// May the client publish to `topic_name`?
    pub fn can_publish(&self, topic_name: &str) -> bool {
        for r in &self.rules {
            if topic::matches(&r.filter, topic_name) {
                if r.access == Access::Deny {
                    return false;
                }
                if r.access.writes() {
                    return true;
                }
            }
        }
        false
    }

    /// May the client subscribe to `filter` (possibly `$share/group/...`)?
    pub fn can_subscribe(&self, filter: &str) -> bool {
        self.check_subscribe(filter) != SubscribeCheck::Denied
    }

    /// How a subscription to `filter` (possibly `$share/group/...`) is granted.
    pub fn check_subscribe(&self, filter: &str) -> SubscribeCheck {
        let filter = match topic::parse_shared(filter) {
            Ok(Some((_, inner))) => inner,
            Ok(None) => filter,
            Err(_) => return SubscribeCheck::Denied,
        };
        let deny = |r: &&Rule| r.access == Access::Deny;
        if self
            .rules
            .iter()
            .filter(deny)
            .any(|r| covers(&r.filter, filter))
        {
            return SubscribeCheck::Denied;
        }
        if !self
            .rules
            .iter()
            .any(|r| r.access.reads() && covers(&r.filter, filter))
        {
            return SubscribeCheck::Denied;
        }
        if self
            .rules
            .iter()
            .filter(deny)
            .any(|r| overlaps(&r.filter, filter))
        {
            SubscribeCheck::Filtered
        } else {
            SubscribeCheck::Granted
        }
    }

    /// May a message on `topic_name` be delivered to the client (a `read` rule matches it
    /// and no `deny` rule does)? Asked per delivery only for [`SubscribeCheck::Filtered`]
    /// subscriptions.
    pub fn can_read(&self, topic_name: &str) -> bool {
        for r in &self.rules {
            if topic::matches(&r.filter, topic_name) {
                if r.access == Access::Deny {
                    return false;
                }
                if r.access.reads() {
                    return true;
                }
            }
        }
        false
    }
}

/// The ACL's answer to a SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeCheck {
    /// No `read` rule covers it, or a `deny` rule does: SUBACK 0x87 (3.x: 0x80).
    Denied,
    /// Granted; no `deny` rule overlaps it, so deliveries need no check.
    Granted,
    /// Granted, but some topics it matches are denied: each delivery is checked.
    Filtered,
}

/// Does `rule` match every topic that `filter` matches?
pub fn covers(rule: &str, filter: &str) -> bool {
    let dollar = filter.starts_with('$');
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    let mut first = true;
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return !(first && dollar),
            (Some("+"), Some(level)) => {
                if level == "#" || (first && dollar) {
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

/// Is there a topic that both filters match?
pub fn overlaps(a: &str, b: &str) -> bool {
    // Wildcard first levels never match `$` topics; a literal `$x` first level only does.
    if a.starts_with('$') != b.starts_with('$') {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) => {
                if p != q {
                    return false;
                }
            }
        }
    }
}

/// Shared handle used by connections.
pub type SharedClientAcl = Arc<ClientAcl>;

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic write shared/in

user bob
topic read alice/status
topic alice/bob-rw

pattern write devices/%c/up
pattern read devices/%c/down/#
pattern readwrite users/%u/#
";

    fn acl() -> Acl {
        Acl::parse(Path::new("acl"), FILE).expect("parses")
    }

    #[test]
    fn publish_matrix() {
        let acl = acl();
        let alice = acl.for_client(Some("alice"), "dev1");
        assert!(alice.can_publish("alice/x"));
        assert!(alice.can_publish("alice"));
        assert!(!alice.can_publish("alice/secret/x"));
        assert!(alice.can_publish("shared/in"));
        assert!(!alice.can_publish("public/x"));
        assert!(alice.can_publish("devices/dev1/up"));
        assert!(!alice.can_publish("devices/dev2/up"));
        assert!(!alice.can_publish("devices/dev1/down/x"));
        assert!(alice.can_publish("users/alice/a/b"));
        assert!(!alice.can_publish("users/bob/a"));

        let bob = acl.for_client(Some("bob"), "dev2");
        assert!(!bob.can_publish("alice/status"));
        assert!(bob.can_publish("alice/bob-rw"));
        assert!(bob.can_publish("devices/dev2/up"));

        let anon = acl.for_client(None, "dev3");
        assert!(!anon.can_publish("public/x"));
        assert!(anon.can_publish("devices/dev3/up"));
        assert!(!anon.can_publish("users/%u/x"));

        // Unknown user: only patterns.
        let eve = acl.for_client(Some("eve"), "e");
        assert!(!eve.can_publish("public/x"));
        assert!(eve.can_publish("users/eve/x"));
        // Wildcards in names do not widen patterns.
        let sneaky = acl.for_client(Some("#"), "+");
        assert!(!sneaky.can_publish("users/x/y"));
        assert!(!sneaky.can_publish("devices/x/up"));
    }

    #[test]
    fn subscribe_matrix() {
        let acl = acl();
        let alice = acl.for_client(Some("alice"), "dev1");
        // Granted, but it overlaps `deny alice/secret/#`: filtered per delivery.
        assert_eq!(alice.check_subscribe("alice/#"), SubscribeCheck::Filtered);
        assert_eq!(alice.check_subscribe("alice/+/x"), SubscribeCheck::Filtered);
        assert_eq!(
            alice.check_subscribe("alice/public/#"),
            SubscribeCheck::Granted
        );
        // Wholly inside the deny rule, or not covered by a read rule: refused.
        assert_eq!(
            alice.check_subscribe("alice/secret/+"),
            SubscribeCheck::Denied
        );
        assert!(!alice.can_subscribe("#"));
        assert!(alice.can_read("alice/x/y"));
        assert!(!alice.can_read("alice/secret/x"));
        assert!(!alice.can_read("public/x"));
        assert!(alice.can_subscribe("alice/public/+"));
        assert!(!alice.can_subscribe("shared/in"));
        assert!(alice.can_subscribe("devices/dev1/down/#"));
        assert!(alice.can_subscribe("$share/g/devices/dev1/down/+"));
        assert!(!alice.can_subscribe("devices/+/down/#"));
        let anon = acl.for_client(None, "dev3");
        assert!(anon.can_subscribe("public/#"));
        assert!(anon.can_subscribe("public/a/+"));
        assert!(!anon.can_subscribe("+/a"));
        let bob = acl.for_client(Some("bob"), "dev2");
        assert!(bob.can_subscribe("alice/status"));
        assert!(!bob.can_subscribe("alice/+"));
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(covers("#", "a/b"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("+/b", "$x/b"));
        assert!(overlaps("a/#", "a"));
        assert!(overlaps("a/+/c", "a/b/+"));
        assert!(!overlaps("a/+/c", "a/b/d"));
        assert!(!overlaps("#", "$SYS/#"));
        assert!(overlaps("+/#", "x"));
        assert!(!overlaps("a/b", "a/b/c"));
    }

    #[test]
    fn errors_name_file_and_line() {
        for (text, needle) in [
            ("user\n", "`user` needs a user name"),
            ("topic read\n", "needs a topic filter"),
            ("topic read a/#/b\n", "not a valid topic filter"),
            ("topic raed a/b\n", "unknown access"),
            ("allow a\n", "unknown keyword `allow`"),
        ] {
            let e = Acl::parse(Path::new("/etc/holdfast/acl"), &format!("# x\n{text}"))
                .expect_err(text)
                .to_string();
            assert!(e.starts_with("/etc/holdfast/acl:2: "), "{e}");
            assert!(e.contains(needle), "{e}");
        }
    }
}
