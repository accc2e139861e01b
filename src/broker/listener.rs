//! TCP listeners: bind, accept, and hand each socket to its own connection task. TLS
//! listeners finish the handshake (bounded by the connect timeout) in that task first;
//! WebSocket listeners then the HTTP upgrade (`ws`), within the same deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use futures_util::future::Either;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::connection::{serve, serve_tcp, HandshakeSlot, ListenerContext, Shared};
use super::tls::{certificate_name, TlsListener};
use super::ws;

fn connect_timeout(shared: &Shared) -> Duration {
    Duration::from_secs(shared.cfg.connect_timeout_secs)
}

/// Accepts connections until shutdown; each connection runs on `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    ctx: Arc<ListenerContext>,
    tls: Option<TlsListener>,
) {
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => break,
        };
        if !shared.rate_limit.admit(peer.ip()) {
            continue; // dropping the socket closes it (counted and logged by the limiter)
        }
        // Unauthenticated sockets are capped: each may hold a TLS session, a CONNECT
        // buffer and a password check (dropping the socket closes it; counted, logged).
        let Some(slot) = shared
            .handshakes
            .try_claim(shared.cfg.max_handshaking, peer)
        else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let ctx = ctx.clone();
        match &tls {
            None => {
                tracker.spawn(plain_task(stream, peer, shared, ctx, slot));
            }
            Some(tls) => {
                tracker.spawn(tls_task(tls, stream, peer, shared, ctx, slot));
            }
        }
    }
    info!(listener = ?local, "listener stopped");
}

/// The task of a plain TCP (or WebSocket) connection. Plain functions returning the task's
/// future, not `async` blocks: whatever an `async` block captures stays in every state of
/// the task for its whole life, and only the connection's main loop should (the WebSocket
/// path is boxed for the same reason: its state would otherwise size every TCP task).
pub(super) fn plain_task(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
    slot: HandshakeSlot,
) -> impl Future<Output = ()> + Send {
    if ctx.websocket.is_some() {
        let deadline = Instant::now() + connect_timeout(&shared);
        return Either::Left(Box::pin(ws::serve(
            stream, peer, shared, ctx, None, deadline, slot,
        )));
    }
    Either::Right(serve_tcp(stream, peer, shared, ctx, slot))
}

/// The task of a TLS connection: the TLS handshake (and on wss the HTTP upgrade) within the
/// connect timeout, boxed; it returns the connection's future, which the task then runs
/// inline.
fn tls_task(
    tls: &TlsListener,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ctx: Arc<ListenerContext>,
    slot: HandshakeSlot,
) -> impl Future<Output = ()> + Send {
    let acceptor = tls.acceptor.clone();
    let start = Box::pin(async move {
        // One deadline for the TLS handshake and, on wss, the HTTP upgrade.
        let deadline = Instant::now() + connect_timeout(&shared);
        let stream = match timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%peer, cause = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return None;
            }
        };
        let cert_user = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| certificate_name(c));
        if ctx.websocket.is_some() {
            return Some(Either::Left(Box::pin(ws::serve(
                stream, peer, shared, ctx, cert_user, deadline, slot,
            ))));
        }
        let (r, w) = tokio::io::split(stream);
        Some(Either::Right(serve(
            r, w, peer, shared, ctx, cert_user, slot,
        )))
    });
    async move {
        if let Some(connection) = start.await {
            connection.await;
        }
    }
}
