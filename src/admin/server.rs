//! The gateway's side of the admin socket: a Unix domain socket, mode 0600 (only the
//! gateway's user may use it), answering one typed [`Request`] per connection (see
//! `wire`).
//!
//! The socket is created when the gateway starts (a stale file left by a crash is
//! replaced; a live one, answering, means another gateway already uses the data directory
//! and the start is refused). Any other failure to create it (a filesystem without Unix
//! sockets, such as FAT/exFAT, a missing directory) is a loud warning: the gateway runs
//! without it, and `sessions drop` must not be used while it runs. It is removed when the
//! gateway stops, after the store is closed. During a graceful shutdown it stays in place
//! answering "broker is shutting down", so a concurrent `sessions drop` never mistakes a
//! stopping gateway for a stopped one.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::wire::{BridgeReport, Reply, Request, MAX_REQUEST};
use super::REQUEST_TIMEOUT;
use crate::bridge::BridgeShared;
use crate::broker::client::{is_reserved, BrokerHandle};
use crate::observe::Observer;
use crate::store::{db_path, inspect};

/// How long the gateway waits for a dropped session's deletion to be committed before it
/// answers anyway.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    #[error(
        "another holdfast is already running with this data directory (it answers on {})",
        path.display()
    )]
    AlreadyRunning { path: PathBuf },
    #[error("{} exists and is not a socket; move it away", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot create the admin socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The bound (not yet served) admin socket.
pub struct AdminSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    db: PathBuf,
    ino: (u64, u64),
}

impl AdminSocket {
    /// Creates the socket at `path` with mode 0600, replacing a stale socket file.
    /// Refuses if a broker answers on the existing socket. `data_dir` locates the store.
    pub fn bind(path: &Path, data_dir: &Path) -> Result<AdminSocket, AdminSocketError> {
        let path = path.to_path_buf();
        let io_err = |source| AdminSocketError::Io {
            path: path.clone(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(AdminSocketError::NotASocket { path });
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => return Err(AdminSocketError::AlreadyRunning { path }),
                Err(e) => {
                    info!(path = %path.display(), error = %e, "replacing a stale admin socket")
                }
            },
            Err(_) => {}
        }
        // Bind under a temporary name, restrict it, then rename into place: the socket is
        // never reachable under its public name with looser permissions.
        let tmp = dir.join(format!(".holdfast-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err)?;
        let setup = (|| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, &path)?;
            listener.set_nonblocking(true)?;
            let meta = std::fs::symlink_metadata(&path)?;
            Ok((meta.dev(), meta.ino()))
        })();
        match setup {
            Ok(ino) => Ok(AdminSocket {
                listener,
                path,
                db: db_path(data_dir),
                ino,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io_err(e))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts answering requests. `shutdown` is the broker's shutdown token: once it is
    /// cancelled requests are refused, but the socket stays until [`AdminHandle::close`].
    pub fn serve(
        self,
        broker: BrokerHandle,
        bridges: Arc<BridgeShared>,
        observer: Arc<Observer>,
        shutdown: CancellationToken,
    ) -> AdminHandle {
        let stop = CancellationToken::new();
        let task = match tokio::net::UnixListener::from_std(self.listener) {
            Ok(listener) => {
                info!(path = %self.path.display(), "admin socket listening");
                let ctx = Arc::new(Ctx {
                    broker,
                    bridges,
                    observer,
                    shutdown,
                    db: self.db,
                });
                tokio::spawn(accept_loop(listener, ctx, stop.clone()))
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "admin socket unusable");
                tokio::spawn(async {})
            }
        };
        AdminHandle {
            stop,
            task: Some(task),
            path: self.path,
            ino: self.ino,
        }
    }
}

/// A serving admin socket. Closing (or dropping) it stops the server and removes the
/// socket file, if it is still ours.
pub struct AdminHandle {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    path: PathBuf,
    ino: (u64, u64),
}

impl AdminHandle {
    /// Stops answering and removes the socket file.
    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        // Drop removes the file.
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What answering a request needs.
struct Ctx {
    broker: BrokerHandle,
    bridges: Arc<BridgeShared>,
    observer: Arc<Observer>,
    /// The gateway's shutdown token: once cancelled, requests are refused.
    shutdown: CancellationToken,
    /// The store's database file.
    db: PathBuf,
}

async fn accept_loop(listener: tokio::net::UnixListener, ctx: Arc<Ctx>, stop: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve_one(stream, &ctx)).await;
                    });
                }
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
}

async fn serve_one(stream: tokio::net::UnixStream, ctx: &Ctx) {
    let (r, mut w) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(r.take(MAX_REQUEST));
    let mut line = Vec::new();
    let reply = match reader.read_until(b'\n', &mut line).await {
        Ok(_) if line.last() == Some(&b'\n') => {
            line.pop();
            match std::str::from_utf8(&line).map_err(|_| "request is not UTF-8".to_string()) {
                Ok(text) => match Request::from_line(text) {
                    Ok(req) => handle_request(req, ctx).await,
                    Err(e) => Reply::error(e),
                },
                Err(e) => Reply::error(e),
            }
        }
        Ok(_) => Reply::error("request too long or not terminated by a newline"),
        Err(e) => Reply::error(e.to_string()),
    };
    let _ = w.write_all(reply.to_line().as_bytes()).await;
    let _ = w.shutdown().await;
}

async fn handle_request(req: Request, ctx: &Ctx) -> Reply {
    match req {
        Request::Ping => Reply::Pong {
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
        Request::Bridges => Reply::Bridges {
            bridges: bridge_reports(&ctx.bridges, &ctx.db).await,
        },
        Request::Status => {
            let mut status = crate::observe::status::gather(&ctx.observer).await;
            status.bridges = bridge_reports(&ctx.bridges, &ctx.db).await;
            Reply::Status {
                status: Box::new(status),
            }
        }
        Request::Drop { client_id } if is_reserved(&client_id) => {
            Reply::error(super::client::internal_refusal(&client_id))
        }
        Request::Drop { client_id } => drop_on_broker(client_id, ctx).await,
    }
}

/// Every bridge's live status, with the age of its oldest queued message.
async fn bridge_reports(bridges: &BridgeShared, db: &Path) -> Vec<BridgeReport> {
    let mut out = Vec::new();
    for (status, outbox) in crate::bridge::all_status(bridges).await {
        // Over all its outboxes (one per priority).
        let (db, ids) = (db.to_path_buf(), status.outboxes.clone());
        let oldest = tokio::task::spawn_blocking(move || {
            ids.iter()
                .filter_map(|id| inspect::oldest_enqueued(&db, id))
                .min()
        })
        .await
        .ok()
        .flatten();
        out.push(BridgeReport {
            status,
            outbox,
            oldest_enqueued_ms: oldest,
        });
    }
    out
}

async fn drop_on_broker(client_id: String, ctx: &Ctx) -> Reply {
    if ctx.shutdown.is_cancelled() {
        return Reply::error("broker is shutting down");
    }
    // The session's row id, to wait for its deletion to be committed.
    let sid = {
        let (db, id) = (ctx.db.clone(), client_id.clone());
        tokio::task::spawn_blocking(move || inspect::session_sid(&db, &id))
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| debug!(error = %e, "admin: session lookup"))
                    .ok()
            })
            .flatten()
    };
    if !ctx.broker.drop_session(&client_id).await {
        // Also when the router stopped meanwhile: its sessions are not dropped.
        return Reply::NotFound;
    }
    info!(client_id, "session dropped via the admin socket");
    if let Some(sid) = sid {
        let db = ctx.db.clone();
        let gone =
            tokio::task::spawn_blocking(move || inspect::wait_deleted(&db, sid, COMMIT_WAIT))
                .await
                .unwrap_or(false);
        if !gone {
            warn!(
                client_id,
                "dropped session not yet deleted on disk after {COMMIT_WAIT:?}"
            );
        }
    }
    Reply::Dropped
}
