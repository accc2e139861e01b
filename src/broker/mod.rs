//! The local MQTT broker.
//!
//! - `listener`: binds the configured addresses and accepts sockets; `ratelimit` decides
//!   right after accept whether a source address may connect (and caps connections per
//!   user at CONNECT);
//! - `connection`: one task per client: handshake, checks, keep-alive, aliases, I/O
//!   (bytes counted per listener by `traffic`);
//! - `router`: one task that owns every `session`, the subscription `topic_tree` and the
//!   `retained` messages; connections talk to it only through `RouterEvent`s;
//! - `readback`: the gateway-wide budget for durable message bodies in memory
//!   (`mqtt.read_back_budget_bytes`), charged per message and given back on drop.
//!
//! Shutdown order: stop accepting → the router publishes wills and sends every client
//! DISCONNECT (0x8B for v5) → connections flush and close → tasks are awaited up to the
//! configured shutdown timeout.

pub mod connection;
pub mod listener;
pub mod ratelimit;
pub mod readback;
pub mod retained;
pub mod router;
pub mod session;
pub mod tls;
pub mod topic_tree;
pub mod traffic;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use connection::Shared;
use router::{Router, RouterEvent};

/// Capacity of the router's event channel: publishers wait when it is full.
const ROUTER_CHANNEL: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {bind} (from [[listener]] bind): {source}")]
    Bind {
        bind: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("bridge: {0}")]
    Bridge(String),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminSocketError),
    #[error("[auth]: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("TLS listener {bind}: {source}")]
    Tls { bind: String, source: tls::TlsError },
    #[error("cannot serve metrics on {bind} (from [metrics] bind): {source}")]
    MetricsBind {
        bind: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    router_tx: mpsc::Sender<RouterEvent>,
    router: JoinHandle<()>,
    shutdown_timeout: Duration,
    /// None when the admin socket could not be created (warned at start-up).
    admin: Option<crate::admin::AdminHandle>,
    auth: Arc<crate::auth::Auth>,
    tls: Vec<tls::TlsListener>,
    observer: Arc<crate::observe::Observer>,
    metrics_addr: Option<SocketAddr>,
    /// Drain limits of each bridge, by name (SIGHUP changes them).
    bridge_rates:
        std::collections::HashMap<String, tokio::sync::watch::Sender<crate::bridge::Rates>>,
}

impl Broker {
    /// Binds every listener and starts the router. Returns once the broker accepts
    /// connections.
    pub async fn start(cfg: &Config) -> Result<Broker, BrokerError> {
        let mqtt = Arc::new(cfg.mqtt.clone());
        let (router_tx, router_rx) = mpsc::channel(ROUTER_CHANNEL);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let auth = Arc::new(crate::auth::Auth::load(&cfg.auth)?);
        let mut tls_listeners = Vec::new();
        let mut contexts = Vec::new();
        let mut traffic = Vec::new();
        for l in &cfg.listener {
            let tls = tls::TlsListener::from_config(l).map_err(|source| BrokerError::Tls {
                bind: l.bind.clone(),
                source,
            })?;
            tls_listeners.extend(tls.clone());
            let counters = Arc::new(traffic::ListenerTraffic::new(l.bind.clone()));
            traffic.push(counters.clone());
            let ctx = Arc::new(connection::ListenerContext {
                name: l.bind.clone(),
                allow_anonymous: l.allows_anonymous(&cfg.mqtt),
                auth: auth.clone(),
                websocket: l.websocket.then(|| l.websocket_path().to_string()),
                traffic: counters,
            });
            contexts.push((ctx, tls));
        }
        // Bridge TLS files are read first: a bad file stops start-up with its name.
        let bridge_tls = cfg
            .bridge
            .iter()
            .map(|b| {
                b.tls
                    .then(|| crate::bridge::tls_client_config(b))
                    .transpose()
                    .map_err(BrokerError::Bridge)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics_listener =
            match cfg.metrics.socket_addr()? {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| {
                    BrokerError::MetricsBind {
                        bind: cfg.metrics.bind.clone().unwrap_or_default(),
                        source,
                    }
                })?),
                None => None,
            };
        let opts = crate::store::StoreOptions {
            path: crate::store::db_path(&cfg.data_dir),
            synchronous: cfg.store.synchronous,
            max_bytes: cfg.store.max_bytes,
            min_free_percent: cfg.store.min_free_percent,
            budget_policy: cfg.store.budget_policy,
            on_corrupt: cfg.store.on_corrupt,
            integrity_check: cfg.store.integrity_check,
            commit_delay: std::time::Duration::from_millis(cfg.store.commit_delay_ms),
            page_size: cfg.store.page_size,
        };
        // Before the store: refuses to start if another broker answers on the socket. Any
        // other failure (no Unix sockets on this filesystem, a missing runtime directory) is
        // loud but not fatal: the gateway's job is MQTT, not the admin socket.
        let admin = match crate::admin::AdminSocket::bind(&cfg.admin_socket_path(), &cfg.data_dir) {
            Ok(a) => Some(a),
            Err(e @ crate::admin::AdminSocketError::AlreadyRunning { .. }) => return Err(e.into()),
            Err(e) => {
                warn!(
                    cause = %e,
                    "RUNNING WITHOUT THE ADMIN SOCKET: `holdfast status`, `bridge status` and \
                     `sessions drop` cannot reach this gateway (do not use `sessions drop` while it \
                     runs); set `admin_socket` to a path on a filesystem with Unix sockets, such \
                     as /run/holdfast/holdfast.sock"
                );
                None
            }
        };
        let t0 = std::time::Instant::now();
        // Start-up: blocking is fine. Recovery and migrations of a big database on an SD card
        // can take long, so systemd's start timeout is extended meanwhile.
        let (store, recovered, store_rx) = {
            let _extend = crate::observe::notify::extend_startup("opening the store");
            crate::store::Store::open(&opts)?
        };
        info!(
            path = %opts.path.display(),
            sessions = recovered.sessions.len(),
            ms = t0.elapsed().as_millis() as u64,
            "store opened"
        );
        // Listeners are bound only once the store is open: a client that can connect is
        // served, and a broker that cannot open its store never looks alive.
        let mut listeners = Vec::new();
        for l in &cfg.listener {
            let bind = l.bind.replacen("localhost:", "127.0.0.1:", 1);
            let listener = TcpListener::bind(&bind)
                .await
                .map_err(|source| BrokerError::Bind {
                    bind: l.bind.clone(),
                    source,
                })?;
            listeners.push(listener);
        }
        let local_addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>();
        let store_probe = store.probe();
        if auth.checks_acl() {
            // The first event the router handles: recovered sessions get their owners' rules.
            let _ = router_tx.try_send(RouterEvent::Reauthorize { auth: auth.clone() });
        }
        let router = tokio::spawn(
            Router::new(
                mqtt.clone(),
                router_rx,
                store,
                store_rx,
                recovered,
                Duration::from_secs(cfg.store.sweep_interval_secs),
                cfg.bridge
                    .iter()
                    .flat_map(crate::bridge::internal_sessions)
                    .collect(),
            )
            .run(),
        );
        let shared = Arc::new(Shared {
            cfg: mqtt.clone(),
            router: router_tx.clone(),
            shutdown: shutdown.clone(),
            next_conn_id: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
            bridges: Default::default(),
            rate_limit: ratelimit::RateLimiter::new(
                cfg.mqtt.max_connection_rate,
                cfg.mqtt.max_connection_burst,
                cfg.mqtt.rate_exempt_networks()?,
            ),
            user_limit: Arc::new(ratelimit::UserLimit::new(cfg.auth.max_connections_per_user)),
            traffic,
            handshakes: Default::default(),
        });
        for (l, (ctx, tls)) in listeners.into_iter().zip(contexts) {
            tokio::spawn(listener::accept_loop(
                l,
                shared.clone(),
                tracker.clone(),
                ctx,
                tls,
            ));
        }
        let mut bridge_rates = std::collections::HashMap::new();
        for (b, tls) in cfg.bridge.iter().zip(bridge_tls) {
            let mut b = b.clone();
            b.resolve_client_id(cfg.device_id.as_deref(), &cfg.machine_id_file);
            info!(bridge = %b.name, address = %b.address, tls = b.tls, client_id = %b.effective_client_id(), "starting bridge");
            let (rates_tx, rates) = tokio::sync::watch::channel((b.max_rate, b.max_bytes_rate));
            bridge_rates.insert(b.name.clone(), rates_tx);
            tracker.spawn(crate::bridge::run(
                b,
                tls,
                shared.clone(),
                shutdown.clone(),
                rates,
            ));
        }
        for s in &cfg.serial {
            info!(port = %s.name, path = %s.path, format = ?s.format, "starting serial port");
            tracker.spawn(crate::serial::run(s.clone(), shared.clone()));
        }
        for (a, l) in local_addrs.iter().zip(&cfg.listener) {
            match l.websocket {
                false => info!(addr = %a, "listening for MQTT"),
                true => {
                    info!(addr = %a, path = l.websocket_path(), "listening for MQTT over WebSocket")
                }
            }
        }
        let observer = Arc::new(crate::observe::Observer::new(
            router_tx.clone(),
            store_probe,
            shared.clone(),
            cfg.data_dir.clone(),
        ));
        tokio::spawn(crate::observe::sys::run(
            observer.clone(),
            Duration::from_secs(cfg.sys.interval_secs),
            shutdown.clone(),
        ));
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = metrics_listener {
            if let Ok(a) = l.local_addr() {
                info!(addr = %a, "serving /metrics and /healthz");
            }
            tokio::spawn(crate::observe::http::serve(
                l,
                observer.clone(),
                shutdown.clone(),
            ));
        }
        let admin = admin.map(|a| {
            a.serve(
                router_tx.clone(),
                shutdown.clone(),
                shared.clone(),
                observer.clone(),
            )
        });
        Ok(Broker {
            shared: shared.clone(),
            local_addrs,
            shutdown,
            tracker,
            router_tx,
            router,
            shutdown_timeout: Duration::from_secs(cfg.mqtt.shutdown_timeout_secs),
            admin,
            auth,
            tls: tls_listeners,
            observer,
            metrics_addr,
            bridge_rates,
        })
    }

    /// SIGHUP: re-reads the password and ACL files and the TLS certificates. Established
    /// connections are kept; they and every stored session follow the new ACL from now on
    /// (subscriptions it no longer grants are removed). Whatever fails to load is logged and
    /// its previous version stays in force. Returns the number of failures.
    pub fn reload(&self) -> usize {
        let mut failed = 0;
        if self.auth.reload().is_err() {
            failed += 1;
        } else if self.auth.checks_acl() {
            // Sessions (online or not) take on the new rules; their subscriptions are
            // re-checked (`router::security`).
            let ev = RouterEvent::Reauthorize {
                auth: self.auth.clone(),
            };
            if let Err(mpsc::error::TrySendError::Full(ev)) = self.router_tx.try_send(ev) {
                let tx = self.router_tx.clone();
                tokio::spawn(async move { tx.send(ev).await });
            }
        }
        for t in &self.tls {
            match t.reload() {
                Ok(()) => info!(cert = %t.cert_path().display(), "TLS certificate reloaded"),
                Err(e) => {
                    warn!(cause = %e, "TLS certificate not reloaded; keeping the previous one");
                    failed += 1;
                }
            }
        }
        failed
    }

    /// SIGHUP: applies new drain limits (`max_rate`, `max_bytes_rate`) to the running
    /// bridges of the same name, at once (also in the middle of a drain). Returns the
    /// names of the bridges whose limits changed. Bridges added or removed, and their other
    /// settings, need a restart.
    pub fn set_bridge_rates(&self, bridges: &[crate::bridge::BridgeConfig]) -> Vec<String> {
        let mut changed = Vec::new();
        for b in bridges {
            match self.bridge_rates.get(&b.name) {
                Some(tx) => {
                    let new = (b.max_rate, b.max_bytes_rate);
                    if tx.send_if_modified(|r| std::mem::replace(r, new) != new) {
                        changed.push(b.name.clone());
                    }
                }
                None => {
                    warn!(bridge = %b.name, "new bridge in the configuration: it starts at the next restart")
                }
            }
        }
        changed
    }

    /// SIGHUP: applies new connection limits (`mqtt.max_connection_rate`,
    /// `max_connection_burst`, `connection_rate_exempt`, `auth.max_connections_per_user`)
    /// to connections accepted from now on; established ones stay.
    pub fn set_connection_limits(
        &self,
        mqtt: &crate::config::MqttConfig,
        auth: &crate::auth::AuthConfig,
    ) -> Result<(), crate::config::ConfigError> {
        self.shared.rate_limit.set(
            mqtt.max_connection_rate,
            mqtt.max_connection_burst,
            mqtt.rate_exempt_networks()?,
        );
        self.shared
            .user_limit
            .set_max(auth.max_connections_per_user);
        Ok(())
    }

    /// Drops a session (see `RouterEvent::DropSession`); true if it existed.
    pub async fn drop_session(&self, client_id: &str) -> bool {
        let (reply, rx) = oneshot::channel();
        let ev = RouterEvent::DropSession {
            client_id: client_id.to_string(),
            reply,
        };
        if self.router_tx.send(ev).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The bridges' live status (without outbox figures).
    pub fn bridge_status(&self) -> Vec<crate::bridge::BridgeStatus> {
        self.shared
            .bridges
            .lock()
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A sender for router events (for in-process admin endpoints).
    pub fn router_sender(&self) -> mpsc::Sender<RouterEvent> {
        self.router_tx.clone()
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Where `/metrics` and `/healthz` are served, if `metrics.bind` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The gateway's figures and health checks (`observe`).
    pub fn observer(&self) -> Arc<crate::observe::Observer> {
        self.observer.clone()
    }

    /// Cancelled when a graceful shutdown starts.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Graceful shutdown: stop accepting, publish wills, DISCONNECT every client (v5 reason
    /// 0x8B), wait for connections to close, bounded by `mqtt.shutdown_timeout_secs`.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.shutdown.cancel();
        let (done_tx, done_rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        if self
            .router_tx
            .send(RouterEvent::Shutdown { done: done_tx })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout_at(deadline, done_rx).await;
        }
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tracker.len(),
                "shutdown timeout: dropping remaining connections"
            );
        }
        drop(self.router_tx);
        let _ = tokio::time::timeout_at(deadline, self.router).await;
        // Last: while the socket exists a `sessions drop` asks (and is refused) instead of
        // editing the database under the stopping broker.
        if let Some(admin) = self.admin {
            admin.close().await;
        }
        info!("stopped");
    }
}
