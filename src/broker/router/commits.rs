//! The router's commit bookkeeping in one place: the store ops collected for the next
//! token, the tokens submitted and not yet reported, and what waits for each (held output,
//! undo records for a refused commit, early acknowledgements for relays).
//!
//! Invariants: tokens are numbered in submission order and the store reports them in that
//! order (`completed` only grows); output that acknowledges or exposes something durable is
//! held with the token of its ops and released only when that token is reported committed;
//! a refused token undoes exactly what its `Pending` records.

use super::*;

pub(super) struct Commits {
    /// Store ops collected for the token `next_token`, not yet submitted.
    pub(super) ops: Vec<Op>,
    /// `ops.len()` when the current event started: output of this event is held only if
    /// the event itself added ops.
    pub(super) event_ops_start: usize,
    pub(super) next_token: u64,
    pub(super) cur: Pending,
    pub(super) pending: HashMap<u64, Pending>,
    /// Highest token the store has reported (tokens complete in order).
    pub(super) completed: u64,
    /// QoS 1 messages whose only durable copy is a bridge outbox row not committed yet:
    /// (outbox session, seq) → (publisher session, its packet id, the token its PUBACK
    /// waits for). When the upstream accepts the message first, the PUBACK need not wait
    /// for the commit: the message is safe at the next hop (and the writer then skips the
    /// row altogether, see `store::writer::transient_rows`). Pruned as tokens commit.
    pub(super) early: HashMap<(SessionId, u64), (SessionId, u16, u64)>,
    /// Set while `ops` holds only bridge outbox bookkeeping that nothing waits for (see
    /// `submit_unless_lazy`): when it must be submitted at the latest.
    pub(super) lazy_until: Option<Instant>,
    /// The keys of `early` in token order, for pruning.
    pub(super) early_order: std::collections::VecDeque<(u64, (SessionId, u64))>,
}

impl Commits {
    pub(super) fn new() -> Commits {
        Commits {
            ops: Vec::new(),
            event_ops_start: 0,
            next_token: 1,
            cur: Pending::default(),
            pending: HashMap::new(),
            completed: 0,
            early: HashMap::new(),
            lazy_until: None,
            early_order: std::collections::VecDeque::new(),
        }
    }
}

/// What waits for one store token.
#[derive(Default)]
pub(super) struct Pending {
    /// Sessions with held output carrying this token.
    pub(super) sids: Vec<SessionId>,
    /// Messages queued or sent under this token: undone if the commit fails.
    /// (session, seq, payload bytes).
    pub(super) enqueued: Vec<(SessionId, u64, u64)>,
    /// Incoming QoS 2 packet ids recorded under this token: forgotten if it fails.
    pub(super) qos2: Vec<(SessionId, u16)>,
    /// Queue-limit drops made under this token: taken back if it fails (the store refuses
    /// them with the message they made room for).
    pub(super) drops: Vec<DropUndo>,
    /// Subscriptions stored under this token, with what they replaced: taken back if it
    /// fails (the SUBACK reports the failure; a subscription that is not on disk would
    /// vanish at the next restart).
    pub(super) subs: Vec<(SessionId, String, Option<SubscriptionData>)>,
}

/// How to take back one queue-limit drop whose token failed.
pub(super) enum DropUndo {
    /// Popped from the in-memory queue: it goes back.
    Popped(SessionId, Box<Queued>),
    /// The oldest row on disk (`Op::DeleteOldest`), with the bytes estimated for it.
    Oldest(SessionId, u64),
    /// Deferred to the answer of an outstanding read-back (`Session::drops_pending`).
    Pending(SessionId, u64),
}
