//! Connection admission before any protocol work: a token bucket per source address
//! (`[mqtt] max_connection_rate` / `max_connection_burst`) and the per-user connection cap
//! (`[auth] max_connections_per_user`).
//!
//! # Rate limit
//! Each source address has a bucket of `burst` tokens that refills at `rate` tokens per
//! second; a new TCP connection takes one token or is closed right after `accept`, before
//! TLS or MQTT (cost: one hash-map lookup under a short lock). IPv6 addresses are keyed by
//! their /64 prefix (one host usually owns a whole /64); IPv4-mapped IPv6 addresses count
//! as their IPv4 address. Addresses in `connection_rate_exempt` are never limited.
//!
//! Invariants:
//! - Memory is bounded: a bucket that has refilled completely is indistinguishable from no
//!   bucket, so such buckets are swept away (at most once per refill period), and at most
//!   [`MAX_TRACKED`] addresses are tracked; beyond that, new addresses are admitted
//!   untracked (fail open, counted and logged once) rather than growing without bound.
//! - Logs do not flood: the first refusal of an episode logs a warning for that address; the
//!   episode ends (with one summary line) when the address is admitted again or its bucket
//!   is swept.
//! - Every refusal is counted ([`RateLimiter::refused`]).
//!
//! # Connections per user
//! [`UserLimit`] counts, per user name, the distinct client ids currently connected. A
//! CONNECT with a client id the user already has online is a takeover and is not counted
//! twice. The returned [`UserSlot`] releases its place when dropped, however the
//! connection ends. Anonymous clients (no user name) are not capped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Most source addresses tracked at once (about 64 bytes each).
pub const MAX_TRACKED: usize = 65_536;

/// An address or network (`10.0.0.0/8`, `::1`, `fd00::/8`) in `connection_rate_exempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network (e.g. 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        Ok(IpNet {
            addr: addr.to_canonical(),
            prefix,
        })
    }
}

impl IpNet {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_eq(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn mask_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let shift = bits - u32::from(prefix);
    shift >= bits || (a >> shift) == (b >> shift)
}

/// The bucket key: IPv4 as is, IPv6 by /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Connections refused in the current episode (0 = not limited).
    refused: u64,
}

/// The configured limit (changed by SIGHUP through [`RateLimiter::set`]).
#[derive(Debug)]
struct Settings {
    /// Tokens per second; 0 = no limit.
    rate: f64,
    burst: f64,
    exempt: Vec<IpNet>,
}

impl Settings {
    /// How long an empty bucket takes to fill up.
    fn refill_time(&self) -> Duration {
        Duration::from_secs_f64((self.burst / self.rate).min(86_400.0))
    }
}

#[derive(Debug)]
struct Buckets {
    settings: Settings,
    map: HashMap<IpAddr, Bucket>,
    next_sweep: Instant,
    /// An untracked admission was logged (reset when the table has room again).
    full_logged: bool,
}

/// Token buckets per source address.
#[derive(Debug)]
pub struct RateLimiter {
    /// `rate > 0`: lets the default (no limit) skip the lock.
    enabled: AtomicBool,
    buckets: Mutex<Buckets>,
    refused: AtomicU64,
}

impl RateLimiter {
    /// `rate` connections per second with bursts of `burst` (at least 1) per address;
    /// `rate == 0` admits everything.
    pub fn new(rate: f64, burst: u32, exempt: Vec<IpNet>) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            enabled: AtomicBool::new(rate > 0.0),
            buckets: Mutex::new(Buckets {
                settings: Settings {
                    rate,
                    burst: f64::from(burst.max(1)),
                    exempt,
                },
                map: HashMap::new(),
                next_sweep: now,
                full_logged: false,
            }),
            refused: AtomicU64::new(0),
        }
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Changes the limit (SIGHUP). Buckets are kept: one over the new burst is cut down at
    /// its address's next connection.
    pub fn set(&self, rate: f64, burst: u32, exempt: Vec<IpNet>) {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.settings = Settings {
            rate,
            burst: f64::from(burst.max(1)),
            exempt,
        };
        b.next_sweep = Instant::now();
        self.enabled.store(rate > 0.0, Ordering::Relaxed);
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.map.len()).unwrap_or(0)
    }

    /// Takes a token for a connection from `ip`; false = close it.
    pub fn admit(&self, ip: IpAddr) -> bool {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> bool {
        if !self.enabled.load(Ordering::Relaxed) {
            return true;
        }
        let Ok(mut guard) = self.buckets.lock() else {
            return true;
        };
        let b = &mut *guard;
        let cfg = &b.settings;
        if cfg.rate <= 0.0 || cfg.exempt.iter().any(|n| n.contains(ip)) {
            return true;
        }
        let key = key(ip);
        if now >= b.next_sweep {
            sweep(&mut b.map, cfg.refill_time(), now);
            b.next_sweep = now + cfg.refill_time().max(Duration::from_secs(1));
        }
        if !b.map.contains_key(&key) && b.map.len() >= MAX_TRACKED {
            if !b.full_logged {
                b.full_logged = true;
                warn!(
                    tracked = MAX_TRACKED,
                    "connection rate limit: too many source addresses; new ones are admitted untracked"
                );
            }
            return true;
        }
        b.full_logged = false;
        let bucket = b.map.entry(key).or_insert(Bucket {
            tokens: cfg.burst,
            last: now,
            refused: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * cfg.rate).min(cfg.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            if bucket.refused > 0 {
                info!(source = %key, refused = bucket.refused, "connection rate limit: source admitted again");
                bucket.refused = 0;
            }
            true
        } else {
            if bucket.refused == 0 {
                warn!(
                    source = %key,
                    rate = cfg.rate,
                    burst = cfg.burst,
                    "connection rate limit: refusing connections from this source (logged once per episode)"
                );
            }
            bucket.refused += 1;
            self.refused.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Removes buckets that have refilled completely (they admit like a new one would).
fn sweep(map: &mut HashMap<IpAddr, Bucket>, full: Duration, now: Instant) {
    map.retain(|ip, b| {
        let idle = now.saturating_duration_since(b.last) >= full;
        if idle && b.refused > 0 {
            info!(source = %ip, refused = b.refused, "connection rate limit: episode over");
        }
        !idle
    });
}

/// A user's online client ids → connections holding each.
type ClientIds = HashMap<Arc<str>, u32>;

/// [`UserLimit::claim`]: the user already has the maximum of other client ids online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverUserLimit;

/// Distinct client ids online per user name, capped.
#[derive(Debug)]
pub struct UserLimit {
    /// 0 = unlimited. Changed by SIGHUP ([`UserLimit::set_max`]).
    max: AtomicUsize,
    /// user → client id → connections holding it (2 briefly during a takeover).
    online: Mutex<HashMap<Arc<str>, ClientIds>>,
    refused: AtomicU64,
}

/// A place under a user's cap; released on drop.
#[derive(Debug)]
pub struct UserSlot {
    limit: Arc<UserLimit>,
    user: Arc<str>,
    client_id: Arc<str>,
}

impl UserLimit {
    pub fn new(max: usize) -> UserLimit {
        UserLimit {
            max: AtomicUsize::new(max),
            online: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        }
    }

    /// Changes the cap (SIGHUP). Connected clients stay; new CONNECTs see the new cap.
    /// Raising it from 0 tracks only clients that connect from then on.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// CONNECTs refused because of the cap since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Claims a place for `client_id` of `user`. `Ok(None)`: nothing to track (no cap, or
    /// anonymous). `Err`: the user already has `max` other client ids online.
    pub fn claim(
        self: &Arc<Self>,
        user: Option<&Arc<str>>,
        client_id: &Arc<str>,
    ) -> Result<Option<UserSlot>, OverUserLimit> {
        let Some(user) = user else {
            return Ok(None);
        };
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            return Ok(None);
        }
        let mut online = self.online.lock().unwrap_or_else(|e| e.into_inner());
        let ids = online.entry(user.clone()).or_default();
        if !ids.contains_key(client_id) && ids.len() >= max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(OverUserLimit);
        }
        *ids.entry(client_id.clone()).or_insert(0) += 1;
        Ok(Some(UserSlot {
            limit: self.clone(),
            user: user.clone(),
            client_id: client_id.clone(),
        }))
    }

    /// Distinct client ids `user` has online.
    pub fn online(&self, user: &str) -> usize {
        self.online
            .lock()
            .map(|o| o.get(user).map_or(0, HashMap::len))
            .unwrap_or(0)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut online = self.limit.online.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = online.get_mut(&self.user) {
            if let Some(n) = ids.get_mut(&self.client_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    ids.remove(&self.client_id);
                }
            }
            if ids.is_empty() {
                online.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_burst_is_admitted_then_refused_until_the_refill() {
        let l = RateLimiter::new(2.0, 3, Vec::new());
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert!((0..3).all(|_| l.admit_at(a, t0)));
        assert!(!l.admit_at(a, t0));
        assert!(!l.admit_at(a, t0 + Duration::from_millis(100)));
        assert_eq!(l.refused(), 2);
        // 2 tokens/s: one token after 0.5 s.
        assert!(l.admit_at(a, t0 + Duration::from_millis(600)));
        assert!(!l.admit_at(a, t0 + Duration::from_millis(650)));
        // Another address has its own bucket.
        assert!(l.admit_at(ip("192.0.2.2"), t0));
    }

    #[test]
    fn zero_rate_and_exempt_networks_are_not_limited() {
        let off = RateLimiter::new(0.0, 1, Vec::new());
        let t0 = Instant::now();
        assert!((0..100).all(|_| off.admit_at(ip("192.0.2.1"), t0)));
        assert_eq!(off.tracked(), 0);

        let exempt = vec![
            "127.0.0.0/8".parse().expect("net"),
            "::1".parse().expect("net"),
        ];
        let l = RateLimiter::new(1.0, 1, exempt);
        assert!((0..10).all(|_| l.admit_at(ip("127.0.0.5"), t0)));
        assert!((0..10).all(|_| l.admit_at(ip("::1"), t0)));
        assert!(l.admit_at(ip("::2"), t0));
        assert!(!l.admit_at(ip("::2"), t0));
    }

    #[test]
    fn ipv6_hosts_share_their_64_and_mapped_v4_is_v4() {
        let l = RateLimiter::new(1.0, 1, Vec::new());
        let t0 = Instant::now();
        assert!(l.admit_at(ip("2001:db8:1:2::1"), t0));
        assert!(!l.admit_at(ip("2001:db8:1:2::ffff"), t0));
        assert!(l.admit_at(ip("2001:db8:1:3::1"), t0));
        assert!(l.admit_at(ip("198.51.100.7"), t0));
        assert!(!l.admit_at(ip("::ffff:198.51.100.7"), t0));
    }

    #[test]
    fn idle_buckets_are_evicted_and_the_table_is_bounded() {
        let l = RateLimiter::new(10.0, 5, Vec::new());
        let t0 = Instant::now();
        for i in 0..1000u32 {
            assert!(l.admit_at(IpAddr::from(u32::to_be_bytes(0x0a00_0000 + i)), t0));
        }
        assert_eq!(l.tracked(), 1000);
        // Full after 0.5 s; the sweep runs at most once a second.
        l.admit_at(ip("192.0.2.1"), t0 + Duration::from_millis(1100));
        assert_eq!(l.tracked(), 1);

        let t1 = t0 + Duration::from_secs(5);
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.admit_at(IpAddr::from(u32::to_be_bytes(0x0b00_0000 + i)), t1);
        }
        assert_eq!(l.tracked(), MAX_TRACKED);
        // Untracked admissions fail open.
        assert!(l.admit_at(ip("203.0.113.9"), t1));
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "10.1.0.0/16".parse().expect("net");
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.1")));
        let all: IpNet = "0.0.0.0/0".parse().expect("net");
        assert!(all.contains(ip("8.8.8.8")));
        assert!(!all.contains(ip("::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("localhost".parse::<IpNet>().is_err());
        assert!("fd00::/8"
            .parse::<IpNet>()
            .expect("v6")
            .contains(ip("fd12::1")));
    }

    #[test]
    fn user_cap_counts_distinct_client_ids_and_releases_on_drop() {
        let l = Arc::new(UserLimit::new(2));
        let alice: Arc<str> = "alice".into();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let s1 = l.claim(Some(&alice), &a).expect("first");
        let _s2 = l.claim(Some(&alice), &b).expect("second");
        assert!(l.claim(Some(&alice), &c).is_err());
        assert_eq!(l.refused(), 1);
        // Takeover of `a` while the old connection still holds it: not counted twice.
        let takeover = l.claim(Some(&alice), &a).expect("takeover");
        assert_eq!(l.online("alice"), 2);
        drop(s1);
        assert_eq!(l.online("alice"), 2, "the new connection still holds `a`");
        drop(takeover);
        assert_eq!(l.online("alice"), 1);
        assert!(l.claim(Some(&alice), &c).is_ok());
        // Anonymous clients and other users are not affected.
        assert!(matches!(l.claim(None, &c), Ok(None)));
        assert!(l.claim(Some(&"bob".into()), &c).is_ok());
    }

    #[test]
    fn a_new_limit_applies_to_the_next_connection() {
        let l = RateLimiter::new(0.0, 10, Vec::new());
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert!((0..20).all(|_| l.admit_at(a, t0)));
        l.set(1.0, 2, Vec::new());
        assert!(l.admit_at(a, t0) && l.admit_at(a, t0));
        assert!(!l.admit_at(a, t0));
        l.set(1.0, 2, vec!["192.0.2.0/24".parse().expect("net")]);
        assert!(l.admit_at(a, t0));
        l.set(0.0, 2, Vec::new());
        assert!((0..20).all(|_| l.admit_at(a, t0)));

        let u = Arc::new(UserLimit::new(0));
        let (user, c1, c2): (Arc<str>, Arc<str>, Arc<str>) = ("u".into(), "1".into(), "2".into());
        assert!(matches!(u.claim(Some(&user), &c1), Ok(None)));
        u.set_max(1);
        let _s = u.claim(Some(&user), &c1).expect("first");
        assert!(u.claim(Some(&user), &c2).is_err());
    }

    #[test]
    fn user_cap_zero_is_unlimited() {
        let l = Arc::new(UserLimit::new(0));
        let u: Arc<str> = "u".into();
        for i in 0..100 {
            assert!(matches!(
                l.claim(Some(&u), &format!("c{i}").into()),
                Ok(None)
            ));
        }
        assert_eq!(l.online("u"), 0);
    }
}
