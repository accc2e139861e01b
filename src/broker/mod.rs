//! The local MQTT broker core: listeners, connections and the router.
//!
//! - `client`: the typed handle through which the gateway's internal clients (bridge
//!   outboxes, serial ports) use the core, and the client-id prefixes reserved for them;
//!   the only way in from outside `broker` besides the listeners;
//! - `listener`: binds the configured addresses and accepts sockets; `ratelimit` decides
//!   right after accept whether a source address may connect (and caps connections per
//!   user at CONNECT);
//! - `connection`: one task per active client: handshake, checks, keep-alive, aliases, I/O
//!   (bytes counted per listener by `traffic`); idle plain-TCP clients wait without a task
//!   in `connection::park`;
//! - `router`: one task that owns every `session`, the subscription `topic_tree` and the
//!   `retained` messages; connections talk to it only through `RouterEvent`s;
//! - `readback`: the gateway-wide budget for durable message bodies in memory
//!   (`mqtt.read_back_budget_bytes`), charged per message and given back on drop;
//! - `heap`: gives memory freed after a burst (a drain, a large merge) back to the kernel;
//!   `lazy`: collections that cost one pointer while empty (what 10,000 idle sessions
//!   each carry).
//!
//! [`Broker`] holds only the listeners and the router. The store, bridges, serial ports,
//! admin socket and observers are started and stopped around it by `crate::app`.
//!
//! Shutdown order (driven by `app`): stop accepting → the router publishes wills, sends
//! every client DISCONNECT (0x8B for v5), commits and closes the store
//! ([`Broker::end_sessions`]) → connections flush and close (awaited by the gateway's task
//! tracker) → the router task is joined ([`Broker::join`]).

pub mod client;
pub(crate) mod connection;
pub(crate) mod heap;
pub(crate) mod lazy;
pub(crate) mod listener;
pub mod ratelimit;
pub(crate) mod readback;
pub(crate) mod retained;
pub(crate) mod router;
pub(crate) mod session;
pub mod tls;
pub(crate) mod topic_tree;
pub(crate) mod traffic;
pub(crate) mod ws;

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
    #[error("[auth]: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("TLS listener {bind}: {source}")]
    Tls { bind: String, source: tls::TlsError },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// What the broker reads from files before anything is opened or bound: the password and
/// ACL files and the listeners' certificates (a bad file stops start-up naming it).
pub struct Prepared {
    auth: Arc<crate::auth::Auth>,
    tls: Vec<tls::TlsListener>,
    contexts: Vec<(Arc<connection::ListenerContext>, Option<tls::TlsListener>)>,
    traffic: Vec<Arc<traffic::ListenerTraffic>>,
}

/// The store as the router takes it over (`crate::store::Store::open`).
pub struct OpenStore {
    pub store: crate::store::Store,
    pub recovered: crate::store::Recovered,
    pub events: mpsc::UnboundedReceiver<crate::store::StoreEvent>,
}

/// A running broker core: the listeners and the router.
pub struct Broker {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    router_tx: mpsc::Sender<RouterEvent>,
    router: JoinHandle<()>,
    auth: Arc<crate::auth::Auth>,
    tls: Vec<tls::TlsListener>,
}

impl Broker {
    /// Reads the password, ACL and certificate files of `cfg`.
    pub fn prepare(cfg: &Config) -> Result<Prepared, BrokerError> {
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
        Ok(Prepared {
            auth,
            tls: tls_listeners,
            contexts,
            traffic,
        })
    }

    /// Binds every listener, starts the router on `store` with the `standing` sessions
    /// (bridge outboxes) and starts accepting. Connection tasks are spawned on `tracker`;
    /// `shutdown` stops the accept loops. Listeners are bound only once the store is open:
    /// a client that can connect is served, and a broker that cannot open its store never
    /// looks alive.
    pub async fn start(
        cfg: &Config,
        prepared: Prepared,
        store: OpenStore,
        standing: Vec<client::StandingSession>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Broker, BrokerError> {
        let Prepared {
            auth,
            tls,
            contexts,
            traffic,
        } = prepared;
        let mqtt = Arc::new(cfg.mqtt.clone());
        let (router_tx, router_rx) = mpsc::channel(ROUTER_CHANNEL);
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
        if auth.checks_acl() {
            // The first event the router handles: recovered sessions get their owners' rules.
            let _ = router_tx.try_send(RouterEvent::Reauthorize { auth: auth.clone() });
        }
        heap::spawn_trimmer(shutdown.clone());
        let router = tokio::spawn(
            Router::new(
                mqtt.clone(),
                router_rx,
                store.store,
                store.events,
                store.recovered,
                Duration::from_secs(cfg.store.sweep_interval_secs),
                standing,
            )
            .run(),
        );
        let parking = match cfg.mqtt.park_idle_ms {
            0 => None,
            _ => match connection::park::Lot::start(shutdown.clone(), tracker.clone()) {
                Ok(lot) => Some(lot),
                Err(e) => {
                    warn!(cause = %e, "idle connections keep their tasks: their epoll set could not be created");
                    None
                }
            },
        };
        let shared = Arc::new(Shared {
            parking,
            cfg: mqtt,
            router: router_tx.clone(),
            shutdown,
            next_conn_id: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
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
        for (a, l) in local_addrs.iter().zip(&cfg.listener) {
            match l.websocket {
                false => info!(addr = %a, "listening for MQTT"),
                true => {
                    info!(addr = %a, path = l.websocket_path(), "listening for MQTT over WebSocket")
                }
            }
        }
        Ok(Broker {
            shared,
            local_addrs,
            router_tx,
            router,
            auth,
            tls,
        })
    }

    /// The client API for internal clients and the gateway's wiring.
    pub fn handle(&self) -> client::BrokerHandle {
        client::BrokerHandle::new(self.shared.clone())
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

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Graceful shutdown, first half (the accept loops stopped with the shutdown token):
    /// the router publishes wills, sends every client (internal ones included)
    /// DISCONNECT (v5 reason 0x8B), commits and closes the store. Bounded by `deadline`.
    pub async fn end_sessions(&self, deadline: tokio::time::Instant) {
        let (done_tx, done_rx) = oneshot::channel();
        if self
            .router_tx
            .send(RouterEvent::Shutdown { done: done_tx })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout_at(deadline, done_rx).await;
        }
    }

    /// Graceful shutdown, last half: waits (up to `deadline`) for the router task to end.
    pub async fn join(self, deadline: tokio::time::Instant) {
        drop(self.router_tx);
        let _ = tokio::time::timeout_at(deadline, self.router).await;
    }
}
