//! Idle plain-TCP connections without a task (issue 17 item 1).
//!
//! A connected client's memory is mostly its task (~1 KiB with tokio's header, allocated
//! 128-byte aligned) and tokio's registration of its socket (`ScheduledIo`, 256 B in an
//! `Arc`, also 128-byte aligned). Sensors are quiet nearly all the time, so a plain-TCP
//! connection that has been quiet for `mqtt.park_idle_ms` (nothing read, written or queued
//! for it, nothing half read or unwritten) ends its task and leaves a [`Parked`] in a slot
//! of the [`Lot`]'s pages: its socket, taken back from tokio and added to the lot's own
//! epoll set (mio), and its state (152 bytes with the slot, no allocation of its own). One
//! task, the lot's, waits on that set for every parked
//! connection, and resumes one (a new task with the same state, its socket registered with
//! tokio again) when:
//! - its socket is readable (data, or the peer closed it);
//! - the router queues a packet for it or drops its link: the link names its slot
//!   ([`ParkedAt`]) in place of a task's waker;
//! - its keep-alive ran out (checked every [`SWEEP`]; the resumed loop closes it, so a
//!   parked client is closed up to `SWEEP` later than an active one);
//! - the gateway shuts down (every parked connection is resumed; none parks after that).
//!
//! Invariants:
//! - the router never sees parking: the session stays attached, its link open, and
//!   `connected` still counts the client;
//! - nothing is lost or delayed: only a connection with nothing buffered in either
//!   direction parks; the epoll set reports data already waiting when the socket is added,
//!   so bytes that arrived while it was parking resume it at once; a packet the router
//!   queues wakes it through the link;
//! - resumed connections run on the gateway's task tracker, and the lot's task (on the
//!   tracker too) ends only once nothing is parked after shutdown, so a graceful shutdown
//!   still waits for every connection's goodbye.
//!
//! TLS and WebSocket connections never park (their streams keep state of their own).

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;

use mio::unix::SourceFd;
use tokio::io::unix::AsyncFd;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::*;

/// How often parked connections' keep-alives are checked.
pub const SWEEP: Duration = Duration::from_millis(500);
/// Socket events taken from the epoll set per call.
const EVENTS: usize = 256;
/// A connection resumed within twice its wait before parking doubles that wait, up to
/// `mqtt.park_idle_ms << MAX_SHIFT`: a client that talks every few tens of milliseconds (a
/// fast sensor, a publisher waiting for its PUBACKs during a slow commit) stops paying a
/// park and a resume (~10 µs of CPU) per packet.
const MAX_SHIFT: u8 = 6;
/// A connection parked at least this long waits `mqtt.park_idle_ms` again next time.
const RESET_AFTER: Duration = Duration::from_secs(1);
/// Slots per page of the lot. Parked connections are kept in pages of this many, allocated
/// as the lot grows: no allocation per parked connection (which would also leave holes in
/// the heap between the short-lived allocations of a reconnect storm), no reallocation of
/// one large array. Pages stay allocated: the lot holds at most as many slots as
/// connections were ever parked at once.
const PAGE: usize = 64;

/// Parked connections keep their instants as milliseconds since this (8 bytes, not 16).
/// Set when the first lot starts, before any connection exists.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn to_millis(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX)
}

fn from_millis(ms: u64) -> Instant {
    *EPOCH + Duration::from_millis(ms)
}

type TcpAttached = Attached<OwnedReadHalf, OwnedWriteHalf>;

/// Where idle connections wait (one per broker).
pub struct Lot {
    /// Adds and removes sockets of the lot's epoll set (the set itself is the lot task's).
    registry: mio::Registry,
    slots: Mutex<Slots>,
    /// Wakes the lot's task: a parked connection's link has a packet (see `Slots::woken`).
    notify: tokio::sync::Notify,
    /// Resumed connections run here.
    tracker: TaskTracker,
    /// Shutting down: nothing parks any more.
    closing: AtomicBool,
    /// Connections parked now.
    parked: AtomicUsize,
}

#[derive(Default)]
struct Slots {
    /// Pages of [`PAGE`] slots; slot `i` is `pages[i / PAGE][i % PAGE]`.
    pages: Vec<Box<[Slot]>>,
    free: Vec<u32>,
    /// Parked connections whose link woke them, for the lot's task to resume.
    woken: Vec<Key>,
}

#[derive(Default)]
pub(super) struct Slot {
    /// Bumped each time the slot is emptied: a stale key no longer matches.
    generation: u32,
    parked: Option<Parked>,
}

/// A slot and its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    index: u32,
    generation: u32,
}

/// A connection waiting without a task: everything its main loop needs to go on.
pub(super) struct Parked {
    stream: std::net::TcpStream,
    conn_id: ConnId,
    state: State,
    rx: LinkRx,
    user_slot: Option<Box<crate::broker::ratelimit::UserSlot>>,
    /// The last packet read, in milliseconds since [`EPOCH`].
    last_read: u64,
    /// When it parked, in milliseconds since [`EPOCH`].
    parked_at: u64,
    version: ProtocolVersion,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
}

impl Parked {
    /// When the keep-alive runs out (1.5 × the client's keep-alive after its last packet).
    fn keep_alive_deadline(&self) -> Option<Instant> {
        self.state
            .keep_alive()
            .map(|k| from_millis(self.last_read) + k)
    }
}

/// Where a parked connection waits: its lot and its slot there. The connection's link
/// holds this in place of a waker (`link::Waiter::Parked`), so parking allocates nothing.
#[derive(Debug)]
pub(super) struct ParkedAt {
    lot: Weak<Lot>,
    key: Key,
}

impl ParkedAt {
    /// Has the lot resume the connection, if it is still parked in that slot.
    pub(super) fn wake(self) {
        if let Some(lot) = self.lot.upgrade() {
            lot.lock().woken.push(self.key);
            lot.notify.notify_one();
        }
    }
}

impl Slots {
    fn slot(&self, index: u32) -> Option<&Slot> {
        let i = index as usize;
        self.pages.get(i / PAGE)?.get(i % PAGE)
    }

    fn slot_mut(&mut self, index: u32) -> Option<&mut Slot> {
        let i = index as usize;
        self.pages.get_mut(i / PAGE)?.get_mut(i % PAGE)
    }

    /// Slots in all pages.
    fn len(&self) -> usize {
        self.pages.len() * PAGE
    }

    fn reserve(&mut self) -> Key {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let first = self.len();
                self.pages
                    .push((0..PAGE).map(|_| Slot::default()).collect());
                // At most one slot per connection: far below u32::MAX. The page's other
                // slots are free, lowest first.
                let index = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
                self.free.extend((first + 1..first + PAGE).rev().map(index));
                index(first)
            }
        };
        let generation = self.slot(index).map_or(0, |s| s.generation);
        Key { index, generation }
    }

    /// Empties slot `index` (its generation moves on) and gives it back.
    fn take(&mut self, index: u32) -> Option<Parked> {
        let slot = self.slot_mut(index)?;
        let parked = slot.parked.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        Some(parked)
    }

    /// Gives back a reserved slot that was not filled.
    fn release(&mut self, key: Key) {
        if let Some(slot) = self.slot_mut(key.index) {
            slot.generation = slot.generation.wrapping_add(1);
            self.free.push(key.index);
        }
    }
}

impl Lot {
    /// Creates the lot and starts its task on `tracker`.
    pub fn start(shutdown: CancellationToken, tracker: TaskTracker) -> std::io::Result<Arc<Lot>> {
        LazyLock::force(&EPOCH);
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the `Poll` owns its epoll descriptor and closes it only when dropped,
        // which is when the `AsyncFd` is dropped; `as_raw_fd` always returns that one.
        let fd = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }?;
        let lot = Arc::new(Lot {
            registry,
            slots: Mutex::new(Slots::default()),
            notify: tokio::sync::Notify::new(),
            tracker: tracker.clone(),
            closing: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
        });
        tracker.spawn(lot.clone().run(fd, shutdown));
        Ok(lot)
    }

    /// Connections waiting without a task now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Nothing panics while holding it; a poisoned lot is still a consistent lot.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parks `p`, or resumes it at once if it must not wait (a packet is already queued for
    /// it, its link is closed, the gateway is shutting down, the socket cannot be added).
    fn admit(self: &Arc<Self>, mut p: Parked) {
        let mut slots = self.lock();
        let key = slots.reserve();
        let at = ParkedAt {
            lot: Arc::downgrade(self),
            key,
        };
        let fd = p.stream.as_raw_fd();
        let parked = !self.closing.load(Ordering::Acquire)
            && p.rx.wait_parked(at)
            && match self.registry.register(
                &mut SourceFd(&fd),
                mio::Token(key.index as usize),
                mio::Interest::READABLE,
            ) {
                Ok(()) => true,
                Err(e) => {
                    debug!(client_id = %p.state.client_id, cause = %e, "idle connection not parked");
                    false
                }
            };
        if !parked {
            slots.release(key);
            drop(slots);
            self.tracker.spawn(resumed(p));
            return;
        }
        if let Some(slot) = slots.slot_mut(key.index) {
            slot.parked = Some(p);
        }
        self.parked.fetch_add(1, Ordering::Relaxed);
    }

    /// The lot's task: resumes parked connections as their sockets, links, keep-alives or
    /// the shutdown call for it.
    async fn run(self: Arc<Self>, mut poll: AsyncFd<mio::Poll>, shutdown: CancellationToken) {
        let mut events = mio::Events::with_capacity(EVENTS);
        let mut readable: Vec<u32> = Vec::new();
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = false;
        loop {
            let mut all = false;
            let mut expired = false;
            tokio::select! {
                r = poll.readable_mut() => match r {
                    Ok(mut ready) => {
                        loop {
                            match ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                                Err(e) => {
                                    warn!(cause = %e, "idle connections: epoll_wait failed");
                                    break;
                                }
                            }
                            let before = readable.len();
                            // Tokens are slot indices (below u32::MAX).
                            readable.extend(events.iter().map(|e| e.token().0 as u32));
                            if readable.len() - before < EVENTS {
                                break;
                            }
                        }
                        ready.clear_ready();
                    }
                    Err(e) => {
                        warn!(cause = %e, "idle connections: the epoll set failed; none parks any more");
                        all = true;
                    }
                },
                _ = self.notify.notified() => {}
                _ = sweep.tick() => expired = true,
                _ = shutdown.cancelled(), if !closing => all = true,
            }
            let resume = {
                let mut slots = self.lock();
                if all {
                    self.closing.store(true, Ordering::Release);
                    closing = true;
                }
                let mut resume = Vec::new();
                for i in readable.drain(..) {
                    resume.extend(slots.take(i));
                }
                for key in std::mem::take(&mut slots.woken) {
                    let current = slots
                        .slot(key.index)
                        .is_some_and(|s| s.generation == key.generation);
                    if current {
                        resume.extend(slots.take(key.index));
                    }
                }
                if all || expired {
                    let now = Instant::now();
                    for i in 0..slots.len() {
                        // Below u32::MAX (see `Slots::reserve`).
                        let i = i as u32;
                        let due = slots
                            .slot(i)
                            .and_then(|s| s.parked.as_ref())
                            .is_some_and(|p| {
                                all || p.keep_alive_deadline().is_some_and(|d| d <= now)
                            });
                        if due {
                            resume.extend(slots.take(i));
                        }
                    }
                }
                resume
            };
            for p in resume {
                let _ = self
                    .registry
                    .deregister(&mut SourceFd(&p.stream.as_raw_fd()));
                self.parked.fetch_sub(1, Ordering::Relaxed);
                self.tracker.spawn(resumed(p));
            }
            if closing && self.parked() == 0 {
                return;
            }
        }
    }
}

/// A plain-TCP connection's task after its (boxed) handshake, or a parked connection's
/// after it resumed ([`Resume`]): the main loop until the connection closes (then the
/// goodbye, boxed) or parks. One `async fn` with the connection as a local, not one calling
/// another with it: that would hold the connection twice in the task.
pub(super) async fn served(handshake: impl Future<Output = Option<TcpAttached>> + Unpin) {
    let Some(mut live) = handshake.await else {
        return;
    };
    let close = loop {
        match live.run().await {
            Ended::Closed(close) => break close,
            Ended::Idle => match open_lot(&live.conn.shared) {
                Some(lot) => {
                    park(lot, live);
                    return;
                }
                // The gateway is shutting down: stay, and wait for the router's goodbye.
                None => live.conn.parkable = false,
            },
        }
    };
    Box::pin(live.goodbye(close)).await;
}

/// The lot, if connections may park now (not once the gateway is shutting down).
fn open_lot(shared: &Shared) -> Option<Arc<Lot>> {
    shared
        .parking
        .as_ref()
        .filter(|lot| !lot.closing.load(Ordering::Acquire))
        .cloned()
}

/// Hands an idle connection to `lot` (which resumes it at once if it must not wait).
fn park(lot: Arc<Lot>, live: TcpAttached) {
    let Attached {
        conn,
        conn_id,
        mut state,
        rx,
        _user_slot: user_slot,
        last_read,
    } = live;
    // Not kept while parked (the address is asked again on resume): 32 bytes less each.
    let Connection {
        meter,
        reader,
        writer,
        version,
        shared,
        ctx,
        ..
    } = conn;
    state.incoming_unacked.shrink();
    drop(meter); // its counts go to the listener's
    let stream = reader
        .into_inner()
        .reunite(writer)
        .map_err(std::io::Error::other)
        .and_then(|s| s.into_std());
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            // Cannot happen with the halves of one socket; if it did, the socket is gone.
            debug!(client_id = %state.client_id, cause = %e, "idle connection lost its socket");
            lot.tracker
                .spawn(lost(shared, conn_id, Box::new((state, rx, user_slot))));
            return;
        }
    };
    lot.admit(Parked {
        stream,
        conn_id,
        state,
        rx,
        user_slot,
        last_read: to_millis(last_read),
        parked_at: to_millis(Instant::now()),
        version,
        shared,
        ctx,
    });
}

/// A parked connection's new task.
fn resumed(p: Parked) -> impl Future<Output = ()> + Send {
    served(Resume(Some(p)))
}

/// How a resumed connection's task starts, in place of a handshake: the parked state
/// becomes a live connection (its socket registered with tokio again) when the task first
/// runs, so a connection woken while the runtime is busy (thousands at once after a
/// reconnect storm) holds only its parked state until then.
struct Resume(Option<Parked>);

impl Future for Resume {
    type Output = Option<TcpAttached>;

    fn poll(mut self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(self.0.take().and_then(Parked::into_attached))
    }
}

impl Parked {
    /// The live connection again; `None` if its socket could not be registered (the
    /// router is then told it is gone, as for any lost socket).
    fn into_attached(self) -> Option<TcpAttached> {
        let Parked {
            stream,
            conn_id,
            mut state,
            rx,
            user_slot,
            last_read,
            parked_at,
            version,
            shared,
            ctx,
        } = self;
        let parked_for = from_millis(parked_at).elapsed();
        let last_read = from_millis(last_read);
        let waited = Duration::from_millis(shared.cfg.park_idle_ms << state.park_shift);
        if parked_for >= RESET_AFTER {
            state.park_shift = 0;
        } else if parked_for < waited * 2 {
            state.park_shift = (state.park_shift + 1).min(MAX_SHIFT);
        }
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                debug!(client_id = %state.client_id, cause = %e, "a parked connection could not resume");
                let gone = lost(shared.clone(), conn_id, Box::new((state, rx, user_slot)));
                match &shared.parking {
                    Some(lot) => lot.tracker.spawn(gone),
                    None => tokio::spawn(gone),
                };
                return None;
            }
        };
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (reader, writer) = stream.into_split();
        let mut conn = Connection::new(reader, writer, peer, shared, ctx, None, true);
        conn.version = version;
        Some(Attached {
            conn,
            conn_id,
            state,
            rx,
            _user_slot: user_slot,
            last_read,
        })
    }
}

/// The goodbye of a connection whose socket is gone while it was idle: the router publishes
/// its will, as for any lost socket.
async fn lost(
    shared: Arc<Shared>,
    conn_id: ConnId,
    held: Box<(
        State,
        LinkRx,
        Option<Box<crate::broker::ratelimit::UserSlot>>,
    )>,
) {
    tell_router_gone(&shared, conn_id, WillAction::Publish, None).await;
    drop(held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_slot_is_reused_under_a_new_generation() {
        let mut slots = Slots::default();
        let first = slots.reserve();
        assert_eq!(
            first,
            Key {
                index: 0,
                generation: 0
            }
        );
        // Reserved and not filled (the connection resumed at once): given back, generation on.
        slots.release(first);
        let second = slots.reserve();
        assert_eq!(
            second,
            Key {
                index: 0,
                generation: 1
            }
        );
        // Nothing parked in it: nothing to take, and the slot stays reserved.
        assert!(slots.take(second.index).is_none());
        let third = slots.reserve();
        assert_eq!(third.index, 1, "a reserved slot is not handed out twice");
        // A stale key (generation 0) no longer matches slot 0.
        assert_ne!(slots.slot(0).map(|s| s.generation), Some(first.generation));
    }
}
