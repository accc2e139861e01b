//! Time that survives restarts without trusting a wall clock that steps.
//!
//! Gateways without a real-time clock (Raspberry Pis) boot at 1970 or at a fake-hwclock
//! time and NTP steps the clock later, possibly by decades. Every expiry that outlives a run
//! (session expiry, will delay, message expiry, retained-message expiry, bridge
//! `max_age_secs`) is therefore kept on Holdfast's own **time line**, not on the wall clock:
//!
//! - Within a run the time line is `base + monotonic time since start` ([`Clock`]): a wall
//!   clock step while running moves no deadline.
//! - The store keeps an **anchor** ([`Anchor`]): the time line and the wall clock read at the
//!   same moment, and whether the wall clock was synchronised then. It is written at start-up,
//!   with every expiry sweep (`store.sweep_interval_secs`) and at shutdown.
//! - At start-up the time line continues from the anchor, plus the offline time *only when
//!   the wall clock can measure it* ([`resume`]): both readings are plausible (not before
//!   [`WALL_CLOCK_FLOOR_MS`]), the clock did not go backwards, and it did not become
//!   synchronised in between (which means it was stepped by an unknown amount). Otherwise the
//!   offline time counts as zero: countdowns resume where they stopped, so nothing expires
//!   for time that did not pass (things may live longer than asked; never shorter).
//! - A store without an anchor (new, or written by an older Holdfast) starts the time line
//!   at the wall clock, which is what older versions stored.
//!
//! Invariant: a stored deadline is only ever compared with the time line of the store that
//! holds it, never with the wall clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall clock before this (2026-01-01T00:00:00Z, earlier than any release of this code)
/// is certainly wrong: an RTC-less board that booted at 1970, or a flat RTC battery.
pub const WALL_CLOCK_FLOOR_MS: i64 = 1_767_225_600_000;

/// TEST ONLY: seconds added to the wall clock (may be negative), so tests can start the
/// real binary "in 1970" or step its clock between runs. Never set it in production.
pub const TEST_WALL_CLOCK_OFFSET_ENV: &str = "HOLDFAST_TEST_WALL_CLOCK_OFFSET_SECS";

/// The wall clock in Unix milliseconds (shifted by [`TEST_WALL_CLOCK_OFFSET_ENV`] in tests).
/// For what people read (log-like timestamps, status); deadlines use [`Clock`].
pub fn wall_ms() -> i64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    real.saturating_add(test_offset_ms())
}

fn test_offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var(TEST_WALL_CLOCK_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |s| s.saturating_mul(1000))
    })
}

/// Whether the wall clock can be believed now: the kernel says it is synchronised
/// (`adjtimex`, no `STA_UNSYNC`) and it is not before [`WALL_CLOCK_FLOOR_MS`].
pub fn synchronised() -> bool {
    kernel_synchronised() && wall_ms() >= WALL_CLOCK_FLOOR_MS
}

/// The kernel's view (`adjtimex` with `modes = 0`, a read; available in glibc and musl,
/// unlike `ntp_adjtime`): an NTP client has disciplined the clock.
fn kernel_synchronised() -> bool {
    // SAFETY: a zeroed `timex` with `modes = 0` only reads the kernel's state.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

/// The time line of one run: `base_ms` at start, advanced by a monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: std::time::Instant,
    base_ms: i64,
}

impl Clock {
    /// A time line that reads `base_ms` now.
    pub fn starting_at(base_ms: i64) -> Clock {
        Clock {
            origin: std::time::Instant::now(),
            base_ms,
        }
    }

    /// A time line equal to the wall clock now (no store: tests, tools).
    pub fn from_wall() -> Clock {
        Clock::starting_at(wall_ms())
    }

    /// Milliseconds on the time line.
    pub fn now_ms(&self) -> i64 {
        let run = self.origin.elapsed().as_millis().min(i64::MAX as u128) as i64;
        self.base_ms.saturating_add(run)
    }

    /// The anchor to persist now.
    pub fn anchor(&self) -> Anchor {
        Anchor {
            line_ms: self.now_ms(),
            wall_ms: wall_ms(),
            synced: synchronised(),
        }
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::from_wall()
    }
}

/// What the store keeps to continue the time line at the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The time line then.
    pub line_ms: i64,
    /// The wall clock then.
    pub wall_ms: i64,
    /// Whether the wall clock was synchronised then ([`synchronised`]).
    pub synced: bool,
}

/// How the offline time between two runs was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// No anchor: the time line starts at the wall clock.
    Fresh,
    /// The wall clock measured the offline time; it is counted.
    Counted { offline: Duration },
    /// The wall clock cannot measure it; it counts as zero.
    NotCounted { why: &'static str },
}

/// Where the time line continues at a start with the wall clock at `wall_ms` (synchronised
/// or not), given the anchor of the last run. Pure, so every case is unit-tested.
pub fn resume(anchor: Option<Anchor>, wall_ms: i64, synced: bool) -> (i64, Resumed) {
    let Some(a) = anchor else {
        return (wall_ms, Resumed::Fresh);
    };
    let why = if wall_ms < a.wall_ms {
        Some("the wall clock went backwards")
    } else if a.wall_ms < WALL_CLOCK_FLOOR_MS {
        Some("the wall clock was not set in the last run")
    } else if wall_ms < WALL_CLOCK_FLOOR_MS {
        Some("the wall clock is not set")
    } else if !a.synced && synced {
        Some("the wall clock was synchronised since the last run (stepped by an unknown amount)")
    } else {
        None
    };
    match why {
        Some(why) => (a.line_ms, Resumed::NotCounted { why }),
        None => {
            let offline = wall_ms - a.wall_ms;
            (
                a.line_ms.saturating_add(offline),
                Resumed::Counted {
                    offline: Duration::from_millis(offline as u64),
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNCED_THEN: i64 = WALL_CLOCK_FLOOR_MS + 1_000_000;

    fn anchor(line_ms: i64, wall_ms: i64, synced: bool) -> Anchor {
        Anchor {
            line_ms,
            wall_ms,
            synced,
        }
    }

    #[test]
    fn a_new_store_starts_at_the_wall_clock() {
        assert_eq!(resume(None, 123, false), (123, Resumed::Fresh));
    }

    #[test]
    fn offline_time_measured_by_a_trustworthy_clock_counts() {
        let a = anchor(5_000, SYNCED_THEN, true);
        let (base, how) = resume(Some(a), SYNCED_THEN + 60_000, true);
        assert_eq!(base, 65_000);
        assert_eq!(
            how,
            Resumed::Counted {
                offline: Duration::from_secs(60)
            }
        );
        // A board without NTP at all (never synchronised) still counts its RTC's time.
        let a = anchor(5_000, SYNCED_THEN, false);
        assert_eq!(resume(Some(a), SYNCED_THEN + 1_000, false).0, 6_000);
    }

    #[test]
    fn a_clock_that_went_backwards_counts_no_offline_time() {
        let a = anchor(5_000, SYNCED_THEN, true);
        let (base, how) = resume(Some(a), SYNCED_THEN - 3_600_000, true);
        assert_eq!(base, 5_000);
        assert!(matches!(how, Resumed::NotCounted { .. }));
    }

    #[test]
    fn a_run_at_1970_then_a_start_at_the_real_time_counts_no_offline_time() {
        let day = 86_400_000;
        let a = anchor(day, day, false);
        let (base, how) = resume(Some(a), SYNCED_THEN, true);
        assert_eq!(base, day);
        assert!(matches!(how, Resumed::NotCounted { .. }));
        // Even if the kernel does not say synchronised (no NTP client reports it).
        assert_eq!(resume(Some(a), SYNCED_THEN, false).0, day);
    }

    #[test]
    fn a_start_at_1970_counts_no_offline_time() {
        let a = anchor(5_000, SYNCED_THEN, true);
        assert_eq!(resume(Some(a), SYNCED_THEN, true).0, 5_000);
        let a = anchor(5_000, 1_000, false);
        assert_eq!(resume(Some(a), 2_000, false).0, 5_000);
    }

    #[test]
    fn a_clock_synchronised_since_the_last_run_counts_no_offline_time() {
        // fake-hwclock time in the last run, NTP stepped it forward before this start.
        let a = anchor(5_000, SYNCED_THEN, false);
        let (base, how) = resume(Some(a), SYNCED_THEN + 10 * 86_400_000, true);
        assert_eq!(base, 5_000);
        assert!(matches!(how, Resumed::NotCounted { .. }));
    }

    #[test]
    fn the_time_line_advances_with_the_monotonic_clock() {
        let c = Clock::starting_at(1_000);
        let a = c.now_ms();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.now_ms();
        assert!(a >= 1_000 && b >= a + 20, "{a} {b}");
    }
}
