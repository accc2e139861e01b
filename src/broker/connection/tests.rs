//! Sizes of a connection task's states: each connected client holds its task for life, so
//! the size of the future is a per-session cost (issue 17 item 1).

use super::*;

fn shared() -> (Arc<Shared>, Arc<ListenerContext>) {
    let (router, _rx) = mpsc::channel(1);
    let traffic = Arc::new(super::super::traffic::ListenerTraffic::new("test"));
    let shared = Arc::new(Shared {
        cfg: Arc::new(MqttConfig::default()),
        router,
        shutdown: CancellationToken::new(),
        next_conn_id: AtomicU64::new(1),
        connected: AtomicUsize::new(0),
        rate_limit: super::super::ratelimit::RateLimiter::new(0.0, 0, Vec::new()),
        user_limit: Arc::new(super::super::ratelimit::UserLimit::new(0)),
        traffic: vec![traffic.clone()],
        handshakes: Default::default(),
        parking: None,
    });
    let ctx = Arc::new(ListenerContext {
        name: "test".into(),
        allow_anonymous: true,
        auth: Arc::new(crate::auth::Auth::open()),
        websocket: None,
        traffic,
    });
    (shared, ctx)
}

/// Most of a connected client's memory is its task (issue 17 item 1: 3,160 bytes of
/// future in a debug build before the handshake and the goodbye were boxed and the main
/// loop kept nothing large across its awaits). A bound with some room, not the exact size:
/// the compiler's layout changes between versions.
const TASK_FUTURE_MAX: usize = 1024;

#[tokio::test]
async fn a_plain_tcp_connection_task_stays_small() {
    let (shared, ctx) = shared();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (stream, peer) = l.accept().await.expect("accept");
    let slot = shared.handshakes.try_claim(10, peer).expect("slot");
    let task = super::super::listener::plain_task(stream, peer, shared, ctx, slot);
    let size = std::mem::size_of_val(&task);
    assert!(
        size <= TASK_FUTURE_MAX,
        "a connection task's future is {size} bytes (at most {TASK_FUTURE_MAX}): something \
         large is held across an await of the connection's main loop"
    );
}

#[test]
fn the_router_to_connection_message_is_small() {
    // Each queued packet costs this much in the connection's queue (packets are boxed).
    assert!(std::mem::size_of::<Outgoing>() <= 16);
}

/// What a parked (idle) client holds besides its link and the router's session: its slot in
/// the lot, with the parked state inline (issue 17 item 1). It was a 192-byte box (280 with
/// the peer address, the per-user slot and the unacknowledged-publish set inline), a
/// 16-byte slot and a 48-byte waker: 256 bytes of heap in three allocations; 168 bytes
/// with the keep-alive as a 16-byte `Option<Duration>`.
const PARKED_MAX: usize = 152;

#[test]
fn a_parked_connection_stays_small() {
    let size = std::mem::size_of::<park::Slot>();
    assert!(
        size <= PARKED_MAX,
        "a parked connection's slot is {size} bytes (at most {PARKED_MAX})"
    );
}
