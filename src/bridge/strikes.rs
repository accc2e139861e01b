//! Finding the message an upstream refuses by closing the connection (a 3.1.1 upstream's
//! packet size limit, AWS IoT on a topic its policy forbids), so it can be set aside instead
//! of blocking the outbox for ever; without ever setting aside a message that is fine.
//!
//! A *strike* is a connected period that the upstream ended (EOF, reset, DISCONNECT; never
//! a timeout on our side) while the *suspect*, the first message sent after the last
//! acknowledgement, was in flight. Strikes alone cannot convict: the upstream may have
//! taken the suspect and choked on the next one, its PUBACK lost in the reset. So after
//! `reject_after_closes` strikes in a row the bridge *isolates*: the messages that were in
//! flight go one at a time. One acknowledged clears itself; a close with a single message
//! in flight (and nothing acknowledged since it was sent) convicts that message, which is
//! set aside when the router resends it. Isolation ends when the messages that were in
//! flight are through, or at any period that did not end in a close.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub(super) struct Strikes {
    /// `reject_after_closes` (0 = never).
    limit: u32,
    state: Mutex<State>,
    /// A message is convicted (fast path for [`Strikes::set_aside`]).
    convicted: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The suspect (outbox, packet id) and its strikes in a row.
    suspect: Option<(usize, u16)>,
    count: u32,
    /// Messages still to send one at a time (0 = not isolating).
    isolate_left: u32,
    convicted: Option<(usize, u16)>,
}

impl Strikes {
    pub fn new(limit: u32) -> Strikes {
        Strikes {
            limit,
            state: Mutex::new(State::default()),
            convicted: AtomicBool::new(false),
        }
    }

    /// At the start of a connected period: how many messages to send one at a time.
    pub fn isolating(&self) -> u32 {
        self.state.lock().map(|s| s.isolate_left).unwrap_or(0)
    }

    /// An acknowledgement while isolating: how many are still to go one at a time.
    pub fn acked(&self) -> u32 {
        let Ok(mut s) = self.state.lock() else {
            return 0;
        };
        s.isolate_left = s.isolate_left.saturating_sub(1);
        if s.isolate_left == 0 {
            s.suspect = None;
            s.count = 0;
        }
        s.isolate_left
    }

    /// A connected period ended (not by shutdown): `suspect` as defined above,
    /// `isolated` whether it was still isolating, `in_flight` what was unacknowledged.
    pub fn lost(
        &self,
        suspect: Option<(usize, u16)>,
        closed_by_peer: bool,
        isolated: bool,
        in_flight: usize,
    ) {
        if self.limit == 0 {
            return;
        }
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let Some(suspect) = suspect.filter(|_| closed_by_peer) else {
            *s = State::default();
            self.convicted.store(false, Ordering::Relaxed);
            return;
        };
        if isolated && in_flight == 1 {
            s.convicted = Some(suspect);
            s.isolate_left = 0;
            s.suspect = None;
            s.count = 0;
            self.convicted.store(true, Ordering::Relaxed);
            return;
        }
        if s.suspect == Some(suspect) {
            s.count += 1;
        } else {
            s.suspect = Some(suspect);
            s.count = 1;
        }
        if s.count >= self.limit && s.isolate_left == 0 {
            s.isolate_left = in_flight.clamp(1, u32::MAX as usize) as u32;
        }
    }

    /// Whether outbox `k`'s message `packet_id` is the convicted one (then it is set
    /// aside by the caller, and forgotten here).
    pub fn set_aside(&self, k: usize, packet_id: u16) -> bool {
        if !self.convicted.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.convicted != Some((k, packet_id)) {
            return false;
        }
        *s = State::default();
        self.convicted.store(false, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_message_alone_in_flight_at_a_close_is_set_aside() {
        let s = Strikes::new(3);
        // The head (1) is fine, its PUBACK lost in the reset; 2 makes the upstream close.
        for _ in 0..3 {
            assert_eq!(s.isolating(), 0);
            s.lost(Some((0, 1)), true, false, 2);
        }
        assert!(!s.set_aside(0, 1), "strikes alone do not convict");
        assert_eq!(s.isolating(), 2);
        // Isolated: 1 goes alone and is acknowledged, then 2 alone, and the upstream closes.
        assert_eq!(s.acked(), 1);
        s.lost(Some((0, 2)), true, true, 1);
        assert!(!s.set_aside(0, 1));
        assert!(s.set_aside(0, 2));
        assert!(!s.set_aside(0, 2), "once");
        assert_eq!(s.isolating(), 0);
    }

    #[test]
    fn timeouts_and_other_messages_clear_the_count() {
        let s = Strikes::new(2);
        s.lost(Some((0, 1)), true, false, 1);
        s.lost(Some((0, 1)), false, false, 1); // a black hole: not the message's fault
        s.lost(Some((0, 1)), true, false, 1);
        assert_eq!(s.isolating(), 0);
        s.lost(Some((0, 1)), true, false, 1);
        assert_eq!(s.isolating(), 1);
        // Isolated and acknowledged: innocent, back to normal.
        assert_eq!(s.acked(), 0);
        s.lost(Some((0, 1)), true, false, 1);
        assert_eq!(s.isolating(), 0);
        let never = Strikes::new(0);
        for _ in 0..10 {
            never.lost(Some((0, 1)), true, true, 1);
        }
        assert!(!never.set_aside(0, 1));
    }
}
