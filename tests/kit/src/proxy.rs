//! A fault-injecting TCP proxy: the model of the LTE link between the gateway and the
//! cloud. Listens on 127.0.0.1:0 and forwards every accepted connection to `target`.
//!
//! Faults (all can be switched at any time, from any thread):
//! - `cut()`: closes every current connection (both sides), keeps accepting;
//! - `blackhole(true)`: stops moving bytes in both directions without closing anything
//!   (a half-open link: the peers' writes land in kernel buffers, nothing comes back);
//!   connections accepted meanwhile are silent too. Bytes already read are held, not
//!   dropped, and flow again when the blackhole is switched off (as TCP would deliver them);
//! - `refuse(true)`: new connections are closed right after accept;
//! - `latency(d)`: each chunk is delivered `d` after it was read (both directions);
//! - `throttle(bytes_per_sec)`: each direction is limited to that rate (0 = unlimited).
//!
//! The throttle takes bytes off the sender at the link's rate; latency is added after that
//! (bytes "on the air" do not count against anything). [`Proxy::start_small_buffer`]
//! models the far end of a radio link: the proxy's sockets get a small kernel receive
//! buffer and it reads at most that much at a time, so a throttled link pushes back on the
//! sender within kilobytes instead of absorbing megabytes (as loopback-sized buffers
//! would).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

struct Inner {
    target: std::sync::Mutex<SocketAddr>,
    /// Cancelled by `cut()`; replaced by a fresh token for later connections.
    epoch: std::sync::Mutex<CancellationToken>,
    blackhole: watch::Sender<bool>,
    refuse: AtomicBool,
    latency_us: AtomicU64,
    throttle_bps: AtomicU64,
    /// Kernel receive buffer and largest read; 0 = the system's defaults, 16 KiB reads.
    buffer: usize,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    open: AtomicUsize,
    shutdown: CancellationToken,
}

/// The proxy; stops (closing everything) when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_with(target, 0).await
    }

    /// A proxy whose sockets have a `bytes` receive buffer and which reads at most `bytes`
    /// at a time (see the module doc).
    pub async fn start_small_buffer(target: SocketAddr, bytes: usize) -> Proxy {
        Proxy::start_with(target, bytes.max(1024)).await
    }

    async fn start_with(target: SocketAddr, buffer: usize) -> Proxy {
        let socket = tokio::net::TcpSocket::new_v4().expect("proxy socket");
        if buffer > 0 {
            // Inherited by accepted sockets (set before listen, as the window scale is
            // negotiated at the handshake).
            socket
                .set_recv_buffer_size(buffer as u32)
                .expect("SO_RCVBUF");
        }
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("proxy bind");
        let listener = socket.listen(128).expect("proxy listen");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            target: std::sync::Mutex::new(target),
            epoch: std::sync::Mutex::new(CancellationToken::new()),
            blackhole: watch::channel(false).0,
            refuse: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            throttle_bps: AtomicU64::new(0),
            buffer,
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = i.shutdown.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                };
                i.accepted.fetch_add(1, Ordering::SeqCst);
                if i.refuse.load(Ordering::SeqCst) {
                    i.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let token = i.epoch.lock().unwrap().child_token();
                tokio::spawn(connection(i.clone(), client, token));
            }
        });
        Proxy { addr, inner }
    }

    /// Closes every current connection; later ones are accepted as usual.
    pub fn cut(&self) {
        let mut e = self.inner.epoch.lock().unwrap();
        e.cancel();
        *e = CancellationToken::new();
    }

    /// Half-open link on/off (see the module doc).
    pub fn blackhole(&self, on: bool) {
        self.inner.blackhole.send_replace(on);
    }

    /// Close new connections right after accept (on/off).
    pub fn refuse(&self, on: bool) {
        self.inner.refuse.store(on, Ordering::SeqCst);
    }

    /// The link is down: cut what is open and refuse new connections. `restore` undoes it.
    pub fn outage(&self) {
        self.refuse(true);
        self.cut();
    }

    /// Back to a healthy link (no refuse, no blackhole, no latency, no throttle).
    pub fn restore(&self) {
        self.refuse(false);
        self.blackhole(false);
        self.latency(Duration::ZERO);
        self.throttle(0);
    }

    pub fn latency(&self, d: Duration) {
        self.inner
            .latency_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Bytes per second per direction (0 = unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.inner
            .throttle_bps
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Points new connections elsewhere (e.g. a restarted upstream on a new port).
    pub fn retarget(&self, target: SocketAddr) {
        *self.inner.target.lock().unwrap() = target;
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at accept because of `refuse`.
    pub fn refused(&self) -> usize {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// Connections currently being forwarded.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
        self.cut();
    }
}

/// Decrements the open-connection count however a connection task ends.
struct OpenGuard(Arc<Inner>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(inner: Arc<Inner>, client: TcpStream, token: CancellationToken) {
    inner.open.fetch_add(1, Ordering::SeqCst);
    let _guard = OpenGuard(inner.clone());
    let target = *inner.target.lock().unwrap();
    let connect = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if inner.buffer > 0 {
            socket.set_recv_buffer_size(inner.buffer as u32)?;
        }
        socket.connect(target).await
    };
    let server = tokio::select! {
        _ = token.cancelled() => return,
        _ = inner.shutdown.cancelled() => return,
        s = connect => match s {
            Ok(s) => s,
            Err(_) => return, // closing the client is what an unreachable target looks like
        },
    };
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Whichever side ends first ends the connection (both sockets are dropped: FIN).
    tokio::select! {
        _ = token.cancelled() => {}
        _ = inner.shutdown.cancelled() => {}
        _ = pipe(inner.clone(), cr, sw) => {}
        _ = pipe(inner.clone(), sr, cw) => {}
    }
}

/// Waits until the blackhole is off.
async fn open_link(inner: &Inner) {
    let mut rx = inner.blackhole.subscribe();
    let _ = rx.wait_for(|on| !*on).await;
}

/// One direction: a reader feeding timestamped chunks to a writer (so latency does not
/// cost throughput), both stopping while the link is blackholed.
async fn pipe(
    inner: Arc<Inner>,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    // Small reads with a small buffer, so the sender feels the link's pace at once.
    let chunk = if inner.buffer > 0 {
        inner.buffer.min(16 * 1024)
    } else {
        16 * 1024
    };
    // The reader takes bytes off the sender at the link's rate (the throttle), the writer
    // delivers each chunk `latency` later: bytes "on the air" do not slow the link down.
    let reader = {
        let inner = inner.clone();
        async move {
            let mut buf = vec![0u8; chunk];
            loop {
                open_link(&inner).await;
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let bps = inner.throttle_bps.load(Ordering::SeqCst);
                if bps > 0 {
                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
                }
                let due =
                    Instant::now() + Duration::from_micros(inner.latency_us.load(Ordering::SeqCst));
                if tx.send((due, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            open_link(&inner).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The reader ends on EOF; the writer then flushes what is queued and ends.
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An echo server on 127.0.0.1:0.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Result<(), String> {
        s.write_all(msg).await.map_err(|e| e.to_string())?;
        let mut got = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut got)).await {
            Err(_) => Err("timeout".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(_)) => {
                assert_eq!(got, msg);
                Ok(())
            }
        }
    }

    /// True if the peer closed the connection (read returns 0 or an error) within `t`.
    async fn closed_within(s: &mut TcpStream, t: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(t, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_cuts_refuses_blackholes_delays_and_throttles() {
        let p = Proxy::start(echo().await).await;
        let s = Duration::from_secs(2);
        let mut a = TcpStream::connect(p.addr).await.unwrap();
        roundtrip(&mut a, b"hello", s).await.unwrap();

        // cut: the open connection closes, a new one works.
        p.cut();
        assert!(
            closed_within(&mut a, s).await,
            "cut closes open connections"
        );
        let mut b = TcpStream::connect(p.addr).await.unwrap();
        roundtrip(&mut b, b"again", s).await.unwrap();

        // refuse: new connections are closed at once, the open one keeps working.
        p.refuse(true);
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        assert!(
            closed_within(&mut c, s).await,
            "refused connection is closed"
        );
        roundtrip(&mut b, b"still", s).await.unwrap();
        p.refuse(false);

        // blackhole: nothing moves, nothing closes; afterwards the held bytes arrive.
        p.blackhole(true);
        assert_eq!(
            roundtrip(&mut b, b"lost?", Duration::from_millis(300)).await,
            Err("timeout".into())
        );
        let mut d = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(
            roundtrip(&mut d, b"new", Duration::from_millis(300)).await,
            Err("timeout".into()),
            "new connections are silent too"
        );
        p.blackhole(false);
        let mut got = [0u8; 5];
        tokio::time::timeout(s, b.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"lost?", "held bytes flow again");
        let mut got = [0u8; 3];
        tokio::time::timeout(s, d.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"new");

        // latency: a round trip crosses the proxy twice.
        p.latency(Duration::from_millis(100));
        let t0 = Instant::now();
        roundtrip(&mut b, b"slow", s).await.unwrap();
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
        p.latency(Duration::ZERO);

        // throttle: 20 KB at 40 KB/s each way takes about 0.5 s at least.
        p.throttle(40_000);
        let big = vec![7u8; 20_000];
        let t0 = Instant::now();
        roundtrip(&mut b, &big, Duration::from_secs(5))
            .await
            .unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
        p.restore();

        assert!(p.accepted() >= 4 && p.refused() == 1);
        drop(p);
    }
}
