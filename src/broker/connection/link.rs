//! The router → connection queue: [`ConnLink`] (the router's end, cloneable) and
//! [`LinkRx`] (the connection's end, or an internal client's through `client::ClientRx`).
//!
//! Every connected session holds one, so it is built for size (issue 17 item 1): one
//! allocation of 72 bytes (a mutex around the queue, who waits for it — the receiver's
//! task, or its slot in the lot while the connection is parked — and the sender count)
//! instead of a tokio unbounded channel, whose channel state is padded to cache lines and
//! which allocates a block of 32 slots up front (over 1 KiB per connection). The queue
//! (a boxed `VecDeque`) is given back whenever the receiver empties it, so an idle
//! connection holds none.
//!
//! Semantics are those of the unbounded channel it replaces:
//! - `send` never waits and never fails; after the receiver is gone the packet is dropped
//!   (the connection is closing, and its `Disconnected` event follows);
//! - packets are received in the order they were sent;
//! - the receiver sees the end (`None`) once every `ConnLink` is dropped and the queue is
//!   empty.
//!
//! `ConnLink::backlog` is the number of packets sent and not yet taken by the receiver (the
//! router bounds a slow client's QoS 0 backlog with it); it is the queue's length, so it is
//! right for internal clients too.
//!
//! The mutex is held only to push, pop or swap a waker; never across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

pub use tokio::sync::mpsc::error::TryRecvError;

use super::park::ParkedAt;
use super::{ConnId, Outgoing};

#[derive(Debug)]
struct Queue {
    /// Allocated while packets are queued, given back (with its buffer) whenever the
    /// receiver empties it: an idle link holds 8 bytes of it, not 32 (what every connected
    /// client pays, against a second allocation per burst of packets).
    #[allow(clippy::box_collection)]
    items: Option<Box<VecDeque<Outgoing>>>,
    /// Live `ConnLink` handles; the receiver ends when it reaches 0.
    senders: u32,
    /// False once the `LinkRx` is dropped: sends are discarded.
    receiving: bool,
    /// Who waits for a packet.
    waiter: Waiter,
}

/// Who a send (or the last sender going) wakes.
#[derive(Debug, Default)]
enum Waiter {
    #[default]
    None,
    /// The receiver's task.
    Task(Waker),
    /// A parked connection (`park`): the lot resumes it. Kept here rather than as a
    /// `Waker` of its own, which would be one more allocation per parked connection.
    Parked(ParkedAt),
}

impl Waiter {
    fn wake(self) {
        match self {
            Waiter::None => {}
            Waiter::Task(w) => w.wake(),
            Waiter::Parked(at) => at.wake(),
        }
    }
}

#[derive(Debug)]
struct Shared(Mutex<Queue>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No code panics while holding it; a poisoned queue is still a consistent queue.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The router's handle on a connection.
#[derive(Debug)]
pub struct ConnLink {
    pub id: ConnId,
    shared: Arc<Shared>,
}

/// The receiving end of a [`ConnLink`].
#[derive(Debug)]
pub struct LinkRx {
    shared: Arc<Shared>,
}

impl ConnLink {
    /// A new link and its receiving end.
    pub fn new(id: ConnId) -> (ConnLink, LinkRx) {
        let shared = Arc::new(Shared(Mutex::new(Queue {
            items: None,
            senders: 1,
            receiving: true,
            waiter: Waiter::None,
        })));
        let link = ConnLink {
            id,
            shared: shared.clone(),
        };
        (link, LinkRx { shared })
    }

    /// Queues `out` for the connection (dropped if the connection is gone).
    pub fn send(&self, out: Outgoing) {
        let waiter = {
            let mut q = self.shared.lock();
            if !q.receiving {
                return;
            }
            q.items.get_or_insert_default().push_back(out);
            std::mem::take(&mut q.waiter)
        };
        waiter.wake();
    }

    /// Packets sent to the connection and not yet taken by it.
    pub fn backlog(&self) -> usize {
        self.shared.lock().items.as_ref().map_or(0, |i| i.len())
    }
}

impl Clone for ConnLink {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        ConnLink {
            id: self.id,
            shared: self.shared.clone(),
        }
    }
}

impl Drop for ConnLink {
    fn drop(&mut self) {
        let waiter = {
            let mut q = self.shared.lock();
            q.senders -= 1;
            if q.senders > 0 {
                return;
            }
            std::mem::take(&mut q.waiter)
        };
        waiter.wake();
    }
}

impl LinkRx {
    /// The next packet; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next packet if one is queued.
    pub fn try_recv(&mut self) -> Result<Outgoing, TryRecvError> {
        let mut q = self.shared.lock();
        match pop(&mut q) {
            Some(out) => Ok(out),
            None if q.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Makes the lot slot `at` the one a send (or the last sender going) wakes, if nothing
    /// is queued and a sender is left; false otherwise (the caller must receive instead of
    /// waiting). For a connection that waits without a task (`park`).
    pub(super) fn wait_parked(&mut self, at: ParkedAt) -> bool {
        let mut q = self.shared.lock();
        if q.items.is_some() || q.senders == 0 {
            return false;
        }
        q.waiter = Waiter::Parked(at);
        true
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let mut q = self.shared.lock();
        if let Some(out) = pop(&mut q) {
            return Poll::Ready(Some(out));
        }
        if q.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut q.waiter {
            Waiter::Task(w) if w.will_wake(cx.waker()) => {}
            w => *w = Waiter::Task(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for LinkRx {
    fn drop(&mut self) {
        let left = {
            let mut q = self.shared.lock();
            q.receiving = false;
            q.waiter = Waiter::None;
            std::mem::take(&mut q.items)
        };
        // Dropped outside the lock.
        drop(left);
    }
}

/// The front packet; an emptied queue gives its buffer back.
fn pop(q: &mut Queue) -> Option<Outgoing> {
    let items = q.items.as_mut()?;
    let out = items.pop_front();
    if items.is_empty() {
        q.items = None;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(id: u16) -> Outgoing {
        let ack = crate::protocol::PubAckLike::with_reason(id, 0);
        Outgoing::Packet(Box::new(crate::protocol::Packet::PubAck(ack)))
    }

    fn id(out: Outgoing) -> u16 {
        match out {
            Outgoing::Packet(p) => match *p {
                crate::protocol::Packet::PubAck(a) => a.packet_id,
                other => panic!("unexpected {other:?}"),
            },
            Outgoing::Disconnect(code) => panic!("unexpected disconnect {code}"),
        }
    }

    /// Every connected client holds one link (issue 17 item 1): one allocation of the
    /// `Arc`'s counts and this, in glibc's 80-byte size class (at most 72 bytes requested;
    /// 88, the 96-byte class, with the queue's `VecDeque` inline).
    #[test]
    fn a_link_stays_small() {
        let size = 16 + std::mem::size_of::<Shared>();
        assert!(
            size <= 72,
            "a link's allocation is {size} bytes (at most 72)"
        );
    }

    #[test]
    fn packets_arrive_in_order_and_the_backlog_counts_what_was_not_taken() {
        let (link, mut rx) = ConnLink::new(1);
        for i in 1..=100 {
            link.send(packet(i));
        }
        assert_eq!(link.backlog(), 100);
        for i in 1..=60 {
            assert_eq!(id(rx.try_recv().expect("queued")), i);
        }
        assert_eq!(link.backlog(), 40);
        let clone = link.clone();
        clone.send(packet(101));
        let rest: Vec<u16> = std::iter::from_fn(|| rx.try_recv().ok()).map(id).collect();
        assert_eq!(rest, (61..=101).collect::<Vec<_>>());
        assert_eq!(link.backlog(), 0);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    }

    #[tokio::test]
    async fn the_receiver_ends_after_the_last_sender_and_the_queue() {
        let (link, mut rx) = ConnLink::new(1);
        let clone = link.clone();
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(out) = rx.recv().await {
                got.push(id(out));
            }
            got
        });
        tokio::task::yield_now().await;
        link.send(packet(1));
        drop(link);
        clone.send(packet(2));
        drop(clone);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the receiver saw the end")
            .expect("task");
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn sends_after_the_receiver_is_gone_are_dropped() {
        let (link, rx) = ConnLink::new(1);
        link.send(packet(1));
        drop(rx);
        link.send(packet(2));
        assert_eq!(link.backlog(), 0);
    }
}
