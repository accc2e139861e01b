//! The one place that wires the gateway together: it starts and stops the store, the
//! broker core (router and listeners), the bridges, the serial ports, the observers and
//! the admin socket, in a fixed order, with every long-lived task on one
//! [`TaskTracker`].
//!
//! # Start order
//! 1. Files: password and ACL files, listener and bridge certificates (a bad file stops
//!    start-up naming it, before anything is opened or bound); the metrics address.
//! 2. The admin socket is bound (not served): a live one means another gateway uses this
//!    data directory, and start-up stops before touching the store.
//! 3. The store is opened (recovery, migrations).
//! 4. The broker core: the router takes over the store with the bridges' standing
//!    outboxes, then the listeners are bound (a client that can connect is served).
//! 5. Bridges and serial ports attach through the client API (`broker::client`).
//! 6. Observers: `$SYS` publisher, `/metrics` and `/healthz`.
//! 7. The admin socket starts answering.
//!
//! # Stop order ([`Gateway::shutdown`], bounded by `mqtt.shutdown_timeout_secs`)
//! 1. The shutdown token is cancelled: listeners stop accepting, bridges, serial ports
//!    and observers start to wind down, the admin socket refuses new commands.
//! 2. The router publishes wills, DISCONNECTs every client (internal ones included),
//!    commits and closes the store.
//! 3. The task tracker is closed and awaited: connections, bridges, serial ports,
//!    observers.
//! 4. The router task is joined.
//! 5. Last, the admin socket is removed: while it exists a `sessions drop` asks (and is
//!    refused) instead of editing the database under the stopping gateway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{AdminHandle, AdminSocket, AdminSocketError};
use crate::bridge::{BridgeConfig, BridgeShared, BridgeStatus, Rates};
use crate::broker::client::BrokerHandle;
use crate::broker::{Broker, BrokerError, OpenStore};
use crate::config::Config;
use crate::observe::Observer;

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("bridge: {0}")]
    BridgeTls(#[from] crate::bridge::TlsSetupError),
    #[error(transparent)]
    Admin(#[from] AdminSocketError),
    #[error("cannot serve metrics on {bind} (from [metrics] bind): {source}")]
    MetricsBind {
        bind: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// A running gateway.
pub struct Gateway {
    broker: Broker,
    shutdown: CancellationToken,
    /// Connections, bridges, serial ports and observers.
    tracker: TaskTracker,
    shutdown_timeout: Duration,
    /// None when the admin socket could not be created (warned at start-up).
    admin: Option<AdminHandle>,
    bridges: Arc<BridgeShared>,
    observer: Arc<Observer>,
    metrics_addr: Option<SocketAddr>,
    /// Drain limits of each bridge, by name (SIGHUP changes them).
    bridge_rates: HashMap<String, watch::Sender<Rates>>,
}

impl Gateway {
    /// Starts everything in the order of the module documentation. Returns once the
    /// listeners accept connections.
    pub async fn start(cfg: &Config) -> Result<Gateway, StartError> {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // 1. Files.
        let prepared = Broker::prepare(cfg)?;
        let bridge_tls = cfg
            .bridge
            .iter()
            .map(|b| {
                b.tls
                    .then(|| crate::bridge::tls_client_config(b))
                    .transpose()
                    .map_err(StartError::from)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics_listener =
            match cfg.metrics.socket_addr()? {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| {
                    StartError::MetricsBind {
                        bind: cfg.metrics.bind.clone().unwrap_or_default(),
                        source,
                    }
                })?),
                None => None,
            };
        // 2. The admin socket. Any failure other than "another broker answers" (no Unix
        // sockets on this filesystem, a missing runtime directory) is loud but not fatal:
        // the gateway's job is MQTT, not the admin socket.
        let admin = match AdminSocket::bind(&cfg.admin_socket_path(), &cfg.data_dir) {
            Ok(a) => Some(a),
            Err(e @ AdminSocketError::AlreadyRunning { .. }) => return Err(e.into()),
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
        // 3. The store.
        let opts = crate::store::StoreOptions {
            path: crate::store::db_path(&cfg.data_dir),
            synchronous: cfg.store.synchronous,
            max_bytes: cfg.store.max_bytes,
            min_free_percent: cfg.store.min_free_percent,
            budget_policy: cfg.store.budget_policy,
            on_corrupt: cfg.store.on_corrupt,
            integrity_check: cfg.store.integrity_check,
            commit_delay: Duration::from_millis(cfg.store.commit_delay_ms),
            page_size: cfg.store.page_size,
            cache_kib: cfg.store.cache_size_kib,
        };
        let t0 = std::time::Instant::now();
        // Start-up: blocking is fine. Recovery and migrations of a big database on an SD card
        // can take long, so systemd's start timeout is extended meanwhile.
        let (store, recovered, events) = {
            let _extend = crate::observe::notify::extend_startup("opening the store");
            crate::store::Store::open(&opts)?
        };
        info!(
            path = %opts.path.display(),
            sessions = recovered.sessions.len(),
            ms = t0.elapsed().as_millis() as u64,
            "store opened"
        );
        let store_probe = store.probe();
        // 4. The broker core, with the bridges' outboxes standing from the first moment.
        let standing = cfg
            .bridge
            .iter()
            .flat_map(crate::bridge::internal_sessions)
            .collect();
        let open = OpenStore {
            store,
            recovered,
            events,
        };
        let broker = Broker::start(
            cfg,
            prepared,
            open,
            standing,
            shutdown.clone(),
            tracker.clone(),
        )
        .await?;
        let handle = broker.handle();
        // 5. Bridges and serial ports.
        let bridges = BridgeShared::new(handle.clone());
        let mut bridge_rates = HashMap::new();
        for (b, tls) in cfg.bridge.iter().zip(bridge_tls) {
            let mut b = b.clone();
            b.resolve_client_id(cfg.device_id.as_deref(), &cfg.machine_id_file);
            info!(bridge = %b.name, address = %b.address, tls = b.tls, client_id = %b.effective_client_id(), "starting bridge");
            let (rates_tx, rates) = watch::channel((b.max_rate, b.max_bytes_rate));
            bridge_rates.insert(b.name.clone(), rates_tx);
            tracker.spawn(crate::bridge::run(
                b,
                tls,
                bridges.clone(),
                shutdown.clone(),
                rates,
            ));
        }
        let serial = crate::serial::SerialRegistry::default();
        for s in &cfg.serial {
            info!(port = %s.name, path = %s.path, format = ?s.format, "starting serial port");
            tracker.spawn(crate::serial::run(
                s.clone(),
                handle.clone(),
                serial.clone(),
            ));
        }
        // 6. Observers.
        let observer = Arc::new(Observer::new(
            handle.clone(),
            store_probe,
            bridges.clone(),
            serial,
            cfg.data_dir.clone(),
        ));
        tracker.spawn(crate::observe::sys::run(
            observer.clone(),
            Duration::from_secs(cfg.sys.interval_secs),
            shutdown.clone(),
        ));
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = metrics_listener {
            if let Some(a) = metrics_addr {
                info!(addr = %a, "serving /metrics and /healthz");
            }
            tracker.spawn(crate::observe::http::serve(
                l,
                observer.clone(),
                shutdown.clone(),
            ));
        }
        // 7. The admin socket answers.
        let admin = admin.map(|a| {
            a.serve(
                handle.clone(),
                bridges.clone(),
                observer.clone(),
                shutdown.clone(),
            )
        });
        Ok(Gateway {
            broker,
            shutdown,
            tracker,
            shutdown_timeout: Duration::from_secs(cfg.mqtt.shutdown_timeout_secs),
            admin,
            bridges,
            observer,
            metrics_addr,
            bridge_rates,
        })
    }

    /// Graceful shutdown in the order of the module documentation, bounded by
    /// `mqtt.shutdown_timeout_secs`.
    pub async fn shutdown(self) {
        info!("shutting down");
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.shutdown.cancel();
        self.broker.end_sessions(deadline).await;
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
        self.broker.join(deadline).await;
        if let Some(admin) = self.admin {
            admin.close().await;
        }
        info!("stopped");
    }

    /// SIGHUP: re-reads the password, ACL and certificate files (see [`Broker::reload`]).
    pub fn reload(&self) -> usize {
        self.broker.reload()
    }

    /// SIGHUP: applies new connection limits (see [`Broker::set_connection_limits`]).
    pub fn set_connection_limits(
        &self,
        mqtt: &crate::config::MqttConfig,
        auth: &crate::auth::AuthConfig,
    ) -> Result<(), crate::config::ConfigError> {
        self.broker.set_connection_limits(mqtt, auth)
    }

    /// SIGHUP: applies new drain limits (`max_rate`, `max_bytes_rate`) to the running
    /// bridges of the same name, at once (also in the middle of a drain). Returns the
    /// names of the bridges whose limits changed. Bridges added or removed, and their other
    /// settings, need a restart.
    pub fn set_bridge_rates(&self, bridges: &[BridgeConfig]) -> Vec<String> {
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

    /// The broker core's client API.
    pub fn broker(&self) -> BrokerHandle {
        self.broker.handle()
    }

    /// Drops a session (`holdfast sessions drop`); true if it existed.
    pub async fn drop_session(&self, client_id: &str) -> bool {
        self.broker.handle().drop_session(client_id).await
    }

    /// The bridges' live status (without outbox figures).
    pub fn bridge_status(&self) -> Vec<BridgeStatus> {
        self.bridges.statuses()
    }

    /// The addresses the MQTT listeners actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        self.broker.local_addrs()
    }

    /// Where `/metrics` and `/healthz` are served, if `metrics.bind` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The gateway's figures and health checks (`observe`).
    pub fn observer(&self) -> Arc<Observer> {
        self.observer.clone()
    }

    /// Cancelled when a graceful shutdown starts.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
