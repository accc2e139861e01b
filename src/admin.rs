//! Operator commands: `holdfast sessions list|show|drop` and `holdfast backup`, and the
//! broker's admin socket.
//!
//! # Reading the store
//! `list` and `show` open `<data_dir>/holdfast.db` read-only. The store runs in WAL mode,
//! so a reader sees the last committed state and never blocks the broker's writer (and
//! vice versa); they work the same with the broker running or stopped.
//!
//! # Dropping a session
//! A running broker owns its sessions in memory, so editing the database under it would
//! desynchronise the two. The broker therefore listens on a Unix domain socket,
//! `admin_socket` (default `<data_dir>/holdfast.sock`; the packaged configuration puts it in
//! systemd's runtime directory, `/run/holdfast/holdfast.sock`), mode 0600: only the broker's
//! user may use it. It speaks a line protocol, one request per connection:
//!
//! ```text
//! drop <client id, percent-encoded>\n   ->  ok dropped\n | ok not-found\n | err <message>\n
//! ping\n                                ->  ok holdfast <version>\n
//! bridges\n                             ->  ok <JSON array>\n
//! status\n                              ->  ok <JSON object>\n   (`holdfast status`)
//! ```
//!
//! Every byte of the client id other than `A-Z a-z 0-9 - _ . ~` is sent as `%XX`, so any
//! UTF-8 id (spaces, newlines, `%` itself) travels intact. `ok dropped` is sent once the
//! deletion is committed to the database (or after a few seconds if the commit is slow).
//!
//! `sessions drop` asks the broker when the socket answers. When nothing listens (no
//! socket file, or a stale one: connection refused) no broker is running on this data
//! directory, and the command deletes the session's rows itself in one transaction. Any
//! other failure (permission denied, no answer) is an error and the database is left alone.
//!
//! The socket is created when the broker starts (a stale file left by a crash is replaced;
//! a live one, answering, means another broker already uses the data directory and the
//! start is refused). Any other failure to create it (a filesystem without Unix sockets,
//! such as FAT/exFAT, a missing directory) is a loud warning: the gateway runs without it,
//! and `sessions drop` must not be used while it runs. It is removed when the broker stops, after the store is closed. During a
//! graceful shutdown it stays in place answering `err broker is shutting down`, so a
//! concurrent `sessions drop` never mistakes a stopping broker for a stopped one.
//!
//! # Backups
//! `backup` copies the live database with SQLite's online backup API, 256 pages per step
//! with a short pause between steps, from inside one read transaction: the copy is the
//! snapshot of the moment the backup started, the broker keeps committing meanwhile (WAL
//! readers do not block the writer), and the backup never restarts. The copy is written
//! to a temporary file next to the target, switched to rollback-journal mode (a single
//! self-contained file), checked with `PRAGMA integrity_check`, synced and renamed into
//! place.

use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use std::sync::Arc;

use crate::bridge::BridgeShared;
use crate::broker::client::BrokerHandle;
use crate::observe::Observer;
use crate::protocol::{self, Packet, ProtocolVersion, Publish};
use crate::store::{db_path, queue_range, schema, split_queue_id};

/// File name of the admin socket inside the data directory.
pub const SOCKET_NAME: &str = "holdfast.sock";

/// Longest request line the admin socket accepts (a 65535-byte client id, fully
/// percent-encoded, plus the command).
const MAX_REQUEST: u64 = 3 * 65_535 + 64;

/// How long one admin request may take on either side.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the broker waits for a dropped session's deletion to be committed before it
/// answers anyway.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Where the broker listens for admin requests.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

// ----- client id encoding --------------------------------------------------------------

/// Percent-encodes every byte except `A-Z a-z 0-9 - _ . ~`.
pub fn encode_client_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Inverse of [`encode_client_id`]; the result must be UTF-8.
pub fn decode_client_id(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
                out.push(hex);
                i += 3;
            }
            b if b.is_ascii_graphic() => {
                out.push(b);
                i += 1;
            }
            b => return Err(format!("unencoded byte 0x{b:02x} at byte {i}")),
        }
    }
    String::from_utf8(out).map_err(|_| "client id is not UTF-8".to_string())
}

// ----- the broker side: admin socket -----------------------------------------------------

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
            match std::str::from_utf8(&line) {
                Ok(req) => handle_request(req, ctx).await,
                Err(_) => "err request is not UTF-8".to_string(),
            }
        }
        Ok(_) => "err request too long or not terminated by a newline".to_string(),
        Err(e) => format!("err {e}"),
    };
    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
    let _ = w.shutdown().await;
}

async fn handle_request(req: &str, ctx: &Ctx) -> String {
    let (shutdown, db, bridges, observer) = (&ctx.shutdown, &ctx.db, &ctx.bridges, &ctx.observer);
    let (cmd, arg) = req.split_once(' ').unwrap_or((req, ""));
    match cmd {
        "ping" => format!("ok holdfast {}", env!("CARGO_PKG_VERSION")),
        "bridges" => format!(
            "ok {}",
            serde_json::Value::Array(bridges_json(bridges, db).await)
        ),
        "status" => {
            let mut v = crate::observe::status::json(observer).await;
            v["bridges"] = serde_json::Value::Array(bridges_json(bridges, db).await);
            format!("ok {v}")
        }
        "drop" => match decode_client_id(arg) {
            Ok(id) if is_internal(&id) => format!("err {}", internal_refusal(&id)),
            Ok(id) => drop_on_broker(id, &ctx.broker, shutdown, db).await,
            Err(e) => format!("err bad client id: {e}"),
        },
        _ => "err unknown command (expected `drop <client id>`, `status`, `bridges` or `ping`)"
            .to_string(),
    }
}

/// Every bridge's live status, with the age of its oldest queued message.
async fn bridges_json(bridges: &BridgeShared, db: &Path) -> Vec<serde_json::Value> {
    let mut items = Vec::new();
    for j in crate::bridge::all_status_json(bridges).await {
        let mut v: serde_json::Value = match serde_json::from_str(&j) {
            Ok(v) => v,
            Err(_) => continue,
        };
        // Over all its outboxes (one per priority).
        let ids: Vec<String> = v["outboxes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let db = db.to_path_buf();
        let oldest = tokio::task::spawn_blocking(move || {
            ids.iter().filter_map(|id| oldest_enqueued(&db, id)).min()
        })
        .await
        .ok()
        .flatten();
        v["oldest_enqueued_ms"] = serde_json::json!(oldest);
        items.push(v);
    }
    items
}

async fn drop_on_broker(
    client_id: String,
    broker: &BrokerHandle,
    shutdown: &CancellationToken,
    db: &Path,
) -> String {
    if shutdown.is_cancelled() {
        return "err broker is shutting down".to_string();
    }
    // The session's row id, to wait for its deletion to be committed.
    let sid = {
        let (db, id) = (db.to_path_buf(), client_id.clone());
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Option<i64>> {
            open_ro(&db)?
                .query_row("SELECT sid FROM session WHERE client_id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()
        })
        .await
        .ok()
        .and_then(|r| {
            r.map_err(|e| debug!(error = %e, "admin: session lookup"))
                .ok()
        })
        .flatten()
    };
    match broker.drop_session(&client_id).await {
        true => {
            info!(client_id, "session dropped via the admin socket");
            if let Some(sid) = sid {
                let db = db.to_path_buf();
                let gone = tokio::task::spawn_blocking(move || wait_deleted(&db, sid))
                    .await
                    .unwrap_or(false);
                if !gone {
                    warn!(
                        client_id,
                        "dropped session not yet deleted on disk after {COMMIT_WAIT:?}"
                    );
                }
            }
            "ok dropped".to_string()
        }
        // Also when the router stopped meanwhile: its sessions are not dropped.
        false => "ok not-found".to_string(),
    }
}

/// Polls until the session row `sid` is gone (committed), up to [`COMMIT_WAIT`].
fn wait_deleted(db: &Path, sid: i64) -> bool {
    let Ok(conn) = open_ro(db) else {
        return false;
    };
    let deadline = Instant::now() + COMMIT_WAIT;
    loop {
        let present = conn
            .query_row("SELECT 1 FROM session WHERE sid = ?1", [sid], |_| Ok(()))
            .optional();
        match present {
            Ok(None) => return true,
            Ok(Some(())) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return false,
        }
    }
}

fn open_ro(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

// ----- the operator side: reading the store ----------------------------------------------

/// Opens the store read-only, with clear errors for a missing or foreign file.
pub fn open_store_read_only(data_dir: &Path) -> anyhow::Result<Connection> {
    let db = db_path(data_dir);
    if !db.exists() {
        bail!(
            "database {} does not exist (check data_dir; the broker creates it on its first start)",
            db.display()
        );
    }
    crate::store::powercut::install_from_env(&db)?;
    let conn = open_ro(&db).with_context(|| format!("opening database {}", db.display()))?;
    check_schema(&conn, &db)?;
    Ok(conn)
}

fn check_schema(conn: &Connection, db: &Path) -> anyhow::Result<()> {
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .with_context(|| format!("reading database {}", db.display()))?;
    if version == 0 {
        bail!(
            "database {} has no Holdfast schema (never started, or not a Holdfast database)",
            db.display()
        );
    }
    if version > schema::latest_version() {
        bail!(
            "database {} has schema version {version}, newer than this binary supports ({})",
            db.display(),
            schema::latest_version()
        );
    }
    Ok(())
}

/// One durable session, as `sessions list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    #[serde(skip)]
    pub sid: i64,
    pub client_id: String,
    /// `3.1`, `3.1.1` or `5.0`.
    pub protocol: &'static str,
    /// The store says connected (`disconnected_at` NULL): online, or the broker stopped
    /// abruptly while it was.
    pub online: bool,
    pub disconnected_at_ms: Option<i64>,
    /// Session Expiry Interval; `None` = never expires.
    pub expiry_interval_secs: Option<u32>,
    /// When an offline session expires (Unix ms); `None` while online or if it never does.
    pub expires_at_ms: Option<i64>,
    /// Rows in the queue, in flight included, and their payload bytes.
    pub queued: u64,
    pub queued_bytes: u64,
    /// Rows already sent (PUBLISH or PUBREL out, awaiting the acknowledgement).
    pub inflight: u64,
    /// Messages dropped by a queue or disk policy.
    pub dropped: u64,
    pub subscriptions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionInfo {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub identifier: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueuedInfo {
    pub seq: u64,
    /// `queued`, `sent` (PUBLISH out) or `released` (PUBREL out).
    pub state: &'static str,
    pub packet_id: Option<u16>,
    pub qos: Option<u8>,
    pub topic: Option<String>,
    pub size: u64,
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WillInfo {
    pub topic: Option<String>,
    pub qos: Option<u8>,
    pub retain: Option<bool>,
    pub payload_bytes: Option<usize>,
    pub delay_secs: u32,
}

/// Everything about one session, as `sessions show` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionDetail {
    pub session: SessionSummary,
    pub subscriptions: Vec<SubscriptionInfo>,
    /// The first queued messages, in delivery order (at most the requested limit).
    pub queue: Vec<QueuedInfo>,
    pub incoming_qos2: Vec<u16>,
    pub will: Option<WillInfo>,
}

const NEVER: i64 = u32::MAX as i64;

fn protocol_name(level: i64) -> &'static str {
    match level {
        3 => "3.1",
        4 => "3.1.1",
        5 => "5.0",
        _ => "?",
    }
}

fn summary_from_row(conn: &Connection, r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionSummary> {
    let sid: i64 = r.get(0)?;
    let expiry: i64 = r.get(3)?;
    let disconnected_at: Option<i64> = r.get(4)?;
    let (lo, hi) = queue_range(sid as u64);
    let (queued, bytes, inflight): (i64, i64, i64) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(state >= 1), 0)
             FROM queue WHERE id BETWEEN ?1 AND ?2",
        )?
        .query_row(params![lo, hi], |q| Ok((q.get(0)?, q.get(1)?, q.get(2)?)))?;
    let subscriptions: i64 = conn
        .prepare_cached("SELECT count(*) FROM subscription WHERE sid = ?1")?
        .query_row([sid], |q| q.get(0))?;
    // Stored times are on the store's time line (`crate::clock`); shown as wall clock.
    let disconnected_at = disconnected_at.map(|t| t + crate::store::wall_offset_ms(conn));
    Ok(SessionSummary {
        sid,
        client_id: r.get(1)?,
        protocol: protocol_name(r.get(2)?),
        online: disconnected_at.is_none(),
        disconnected_at_ms: disconnected_at,
        expiry_interval_secs: (expiry < NEVER).then_some(expiry.max(0) as u32),
        expires_at_ms: match disconnected_at {
            Some(at) if expiry < NEVER => Some(at + expiry * 1000),
            _ => None,
        },
        queued: queued.max(0) as u64,
        queued_bytes: bytes.max(0) as u64,
        inflight: inflight.max(0) as u64,
        dropped: r.get::<_, i64>(5)?.max(0) as u64,
        subscriptions: subscriptions.max(0) as u64,
    })
}

const SESSION_COLUMNS: &str =
    "SELECT sid, client_id, protocol, expiry_interval, disconnected_at, dropped FROM session";

/// Every durable session, ordered by client id. Reads one consistent snapshot.
pub fn list_sessions(data_dir: &Path) -> anyhow::Result<Vec<SessionSummary>> {
    let conn = open_store_read_only(data_dir)?;
    let db = db_path(data_dir);
    let read = || -> rusqlite::Result<Vec<SessionSummary>> {
        conn.execute_batch("BEGIN")?;
        let mut st = conn.prepare(&format!("{SESSION_COLUMNS} ORDER BY client_id"))?;
        let rows = st.query_map([], |r| summary_from_row(&conn, r))?;
        let out = rows.collect::<rusqlite::Result<Vec<_>>>();
        drop(st);
        conn.execute_batch("COMMIT")?;
        out
    };
    read().with_context(|| format!("reading sessions from {}", db.display()))
}

/// One session, with up to `queue_limit` queued messages. `Ok(None)` if there is none.
pub fn show_session(
    data_dir: &Path,
    client_id: &str,
    queue_limit: u32,
) -> anyhow::Result<Option<SessionDetail>> {
    let conn = open_store_read_only(data_dir)?;
    let db = db_path(data_dir);
    let read = || -> rusqlite::Result<Option<SessionDetail>> {
        conn.execute_batch("BEGIN")?;
        let out = read_detail(&conn, client_id, queue_limit);
        conn.execute_batch("COMMIT")?;
        out
    };
    read().with_context(|| format!("reading session {client_id:?} from {}", db.display()))
}

fn read_detail(
    conn: &Connection,
    client_id: &str,
    queue_limit: u32,
) -> rusqlite::Result<Option<SessionDetail>> {
    let Some(session) = conn
        .query_row(
            &format!("{SESSION_COLUMNS} WHERE client_id = ?1"),
            [client_id],
            |r| summary_from_row(conn, r),
        )
        .optional()?
    else {
        return Ok(None);
    };
    let sid = session.sid;
    let mut st = conn.prepare(
        "SELECT filter, options, identifier FROM subscription WHERE sid = ?1 ORDER BY filter",
    )?;
    let subscriptions = st
        .query_map([sid], |r| {
            let o: i64 = r.get(1)?;
            Ok(SubscriptionInfo {
                filter: r.get(0)?,
                qos: (o & 3) as u8,
                no_local: o & 4 != 0,
                retain_as_published: o & 8 != 0,
                retain_handling: ((o >> 4) & 3) as u8,
                identifier: r.get::<_, Option<i64>>(2)?.map(|v| v as u32),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let (lo, hi) = queue_range(sid as u64);
    let mut st = conn.prepare(
        "SELECT id, state, packet_id, expires_at, size, packet FROM queue
         WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT ?3",
    )?;
    let queue = st
        .query_map(params![lo, hi, queue_limit], |r| {
            let publish = decode_publish(r.get::<_, Vec<u8>>(5)?);
            Ok(QueuedInfo {
                seq: split_queue_id(r.get(0)?).1,
                state: match r.get::<_, i64>(1)? {
                    0 => "queued",
                    1 => "sent",
                    2 => "released",
                    _ => "?",
                },
                packet_id: r.get::<_, Option<i64>>(2)?.map(|p| p as u16),
                qos: publish.as_ref().map(|p| p.qos as u8),
                topic: publish.map(|p| p.topic.to_string()),
                size: r.get::<_, i64>(4)?.max(0) as u64,
                expires_at_ms: r
                    .get::<_, Option<i64>>(3)?
                    .map(|t| t + crate::store::wall_offset_ms(conn)),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut st =
        conn.prepare("SELECT packet_id FROM incoming_qos2 WHERE sid = ?1 ORDER BY packet_id")?;
    let incoming_qos2 = st
        .query_map([sid], |r| Ok(r.get::<_, i64>(0)? as u16))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let will = conn.query_row(
        "SELECT will, will_delay FROM session WHERE sid = ?1",
        [sid],
        |r| {
            let blob: Option<Vec<u8>> = r.get(0)?;
            let delay: i64 = r.get(1)?;
            Ok(blob.map(|b| {
                let p = decode_publish(b);
                WillInfo {
                    topic: p.as_ref().map(|p| p.topic.to_string()),
                    qos: p.as_ref().map(|p| p.qos as u8),
                    retain: p.as_ref().map(|p| p.retain),
                    payload_bytes: p.as_ref().map(|p| p.payload.len()),
                    delay_secs: delay.max(0) as u32,
                }
            }))
        },
    )?;
    Ok(Some(SessionDetail {
        session,
        subscriptions,
        queue,
        incoming_qos2,
        will,
    }))
}

/// Decodes a stored message or will (an encoded v5 PUBLISH).
fn decode_publish(blob: Vec<u8>) -> Option<Publish> {
    let mut buf = BytesMut::from(Bytes::from(blob));
    match protocol::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
        Ok(Some(Packet::Publish(p))) => Some(p),
        _ => None,
    }
}

// ----- text output ------------------------------------------------------------------------

/// `5s`, `4m10s`, `3h2m`, `6d23h`.
pub fn human_secs(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Client ids are printed as they are unless they contain spaces, quotes or control
/// characters; then they are quoted and escaped.
pub fn display_id(id: &str) -> String {
    if id.is_empty()
        || id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    {
        format!("\"{}\"", id.escape_debug())
    } else {
        id.to_string()
    }
}

fn state_text(s: &SessionSummary, now_ms: i64) -> String {
    match s.disconnected_at_ms {
        None => "online".to_string(),
        Some(at) => format!("offline {}", human_secs((now_ms - at) / 1000)),
    }
}

fn expiry_text(s: &SessionSummary, now_ms: i64) -> String {
    match (s.expiry_interval_secs, s.expires_at_ms) {
        (None, _) => "never".to_string(),
        (Some(_), Some(at)) if at <= now_ms => "due".to_string(),
        (Some(_), Some(at)) => format!("in {}", human_secs((at - now_ms + 999) / 1000)),
        (Some(i), None) => human_secs(i64::from(i)),
    }
}

fn bytes_text(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, v) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(v);
            } else {
                let _ = write!(line, "{v:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `sessions list` table.
pub fn format_list(sessions: &[SessionSummary], now_ms: i64) -> String {
    let mut rows = vec![[
        "CLIENT ID",
        "PROTO",
        "STATE",
        "EXPIRY",
        "QUEUED",
        "BYTES",
        "INFLIGHT",
        "DROPPED",
        "SUBS",
    ]
    .map(String::from)
    .to_vec()];
    for s in sessions {
        rows.push(vec![
            display_id(&s.client_id),
            s.protocol.to_string(),
            state_text(s, now_ms),
            expiry_text(s, now_ms),
            s.queued.to_string(),
            s.queued_bytes.to_string(),
            s.inflight.to_string(),
            s.dropped.to_string(),
            s.subscriptions.to_string(),
        ]);
    }
    let mut out = table(&rows);
    let _ = writeln!(out, "{} durable session(s)", sessions.len());
    out
}

/// The `sessions show` report.
pub fn format_detail(d: &SessionDetail, now_ms: i64) -> String {
    let s = &d.session;
    let mut out = String::new();
    let _ = writeln!(out, "client id:       {}", display_id(&s.client_id));
    let _ = writeln!(out, "protocol:        MQTT {}", s.protocol);
    let _ = writeln!(out, "state:           {}", state_text(s, now_ms));
    let interval = s
        .expiry_interval_secs
        .map_or("never".to_string(), |i| human_secs(i64::from(i)));
    let _ = writeln!(
        out,
        "session expiry:  {interval}{}",
        match s.expires_at_ms {
            Some(_) => format!(" (expires {})", expiry_text(s, now_ms)),
            None => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "queue:           {} message(s), {} ({} in flight), {} dropped",
        s.queued,
        bytes_text(s.queued_bytes),
        s.inflight,
        s.dropped
    );
    let will = match &d.will {
        None => "none".to_string(),
        Some(w) => format!(
            "{} (QoS {}, {}retain, {} bytes, delay {})",
            w.topic
                .as_deref()
                .map_or("<undecodable>".to_string(), display_id),
            w.qos.unwrap_or(0),
            if w.retain == Some(true) { "" } else { "no " },
            w.payload_bytes.unwrap_or(0),
            human_secs(i64::from(w.delay_secs))
        ),
    };
    let _ = writeln!(out, "pending will:    {will}");
    let qos2 = if d.incoming_qos2.is_empty() {
        "none".to_string()
    } else {
        d.incoming_qos2
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "incoming QoS 2:  {qos2}");
    let _ = writeln!(out, "\nsubscriptions ({}):", d.subscriptions.len());
    if !d.subscriptions.is_empty() {
        let mut rows = vec![
            ["FILTER", "QOS", "NO-LOCAL", "RAP", "RETAIN-HANDLING", "ID"]
                .map(String::from)
                .to_vec(),
        ];
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        for sub in &d.subscriptions {
            rows.push(vec![
                display_id(&sub.filter),
                sub.qos.to_string(),
                yes_no(sub.no_local),
                yes_no(sub.retain_as_published),
                sub.retain_handling.to_string(),
                sub.identifier.map_or("-".to_string(), |i| i.to_string()),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(
        out,
        "\nqueued messages (first {} of {}):",
        d.queue.len(),
        s.queued
    );
    if !d.queue.is_empty() {
        let mut rows = vec![
            ["SEQ", "STATE", "PKT-ID", "QOS", "SIZE", "EXPIRES", "TOPIC"]
                .map(String::from)
                .to_vec(),
        ];
        for q in &d.queue {
            rows.push(vec![
                q.seq.to_string(),
                q.state.to_string(),
                q.packet_id.map_or("-".to_string(), |p| p.to_string()),
                q.qos.map_or("?".to_string(), |q| q.to_string()),
                q.size.to_string(),
                match q.expires_at_ms {
                    None => "never".to_string(),
                    Some(at) if at <= now_ms => "expired".to_string(),
                    Some(at) => format!("in {}", human_secs((at - now_ms + 999) / 1000)),
                },
                q.topic
                    .as_deref()
                    .map_or("<undecodable>".to_string(), display_id),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

// ----- dropping a session ------------------------------------------------------------------

/// How `sessions drop` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropOutcome {
    /// The running broker dropped it (disconnecting the client, publishing its will).
    DroppedByBroker,
    /// No broker was running; the rows were deleted from the database.
    DeletedOffline { queued: u64, had_will: bool },
    /// No such session (on the running broker, or in the database).
    NotFound { broker_running: bool },
}

/// Unix ms (wall clock, as of the store's clock anchor) when the oldest message still
/// queued for `client_id` was enqueued.
pub fn oldest_enqueued(db: &Path, client_id: &str) -> Option<i64> {
    let conn = open_ro(db).ok()?;
    let sid: i64 = conn
        .query_row(
            "SELECT sid FROM session WHERE client_id = ?1",
            [client_id],
            |r| r.get(0),
        )
        .ok()?;
    let (lo, hi) = crate::store::queue_range(sid as u64);
    conn.query_row(
        "SELECT enqueued_at FROM queue WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT 1",
        [lo, hi],
        |r| r.get::<_, Option<i64>>(0),
    )
    .ok()
    .flatten()
    .map(|t| t + crate::store::wall_offset_ms(&conn))
}

/// The running gateway's `status` object (see `observe::status`), or None when no broker
/// is running on this data directory.
pub fn gateway_status(data_dir: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    gateway_status_at(&socket_path(data_dir))
}

/// [`gateway_status`], asking the admin socket at `socket`.
pub fn gateway_status_at(socket: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    match ask_broker(socket, "status")? {
        Ask::NoBroker => Ok(None),
        Ask::Answer(line) => {
            let Some(json) = line.strip_prefix("ok ") else {
                bail!("the broker answered: {line}");
            };
            Ok(Some(serde_json::from_str(json)?))
        }
    }
}

/// Bridge status: from the running gateway, or (None) when no broker is running.
pub fn bridge_status(data_dir: &Path) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
    bridge_status_at(&socket_path(data_dir))
}

/// [`bridge_status`], asking the admin socket at `socket`.
pub fn bridge_status_at(socket: &Path) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
    match ask_broker(socket, "bridges")? {
        Ask::NoBroker => Ok(None),
        Ask::Answer(line) => {
            let Some(json) = line.strip_prefix("ok ") else {
                bail!("the broker answered: {line}");
            };
            let v: serde_json::Value = serde_json::from_str(json)?;
            Ok(Some(v.as_array().cloned().unwrap_or_default()))
        }
    }
}

/// Formats bridge status for people.
pub fn format_bridges(items: &[serde_json::Value], now_ms: i64) -> String {
    let mut rows = vec![[
        "BRIDGE",
        "ADDRESS",
        "STATE",
        "BACKLOG",
        "BYTES",
        "INFLIGHT",
        "OLDEST",
        "SENT",
        "ACKED",
        "REJECTED",
        "DROPPED",
        "LAST ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for v in items {
        let since = v["since_ms"].as_i64().unwrap_or(now_ms);
        let state = if v["connected"].as_bool().unwrap_or(false) {
            format!("connected {}", human_secs((now_ms - since) / 1000))
        } else {
            format!("down {}", human_secs((now_ms - since) / 1000))
        };
        // Messages wait and nothing was acknowledged for `stall_secs`.
        let state = if v["stalled"].as_bool().unwrap_or(false) {
            format!("STALLED, {state}")
        } else {
            state
        };
        let outbox = &v["outbox"];
        let oldest = v["oldest_enqueued_ms"]
            .as_i64()
            .map(|t| human_secs((now_ms - t).max(0) / 1000))
            .unwrap_or_else(|| "-".into());
        rows.push(vec![
            v["name"].as_str().unwrap_or("?").to_string(),
            v["address"].as_str().unwrap_or("?").to_string(),
            state,
            outbox["queued"].as_u64().unwrap_or(0).to_string(),
            bytes_text(outbox["queued_bytes"].as_u64().unwrap_or(0)),
            outbox["inflight"].as_u64().unwrap_or(0).to_string(),
            oldest,
            v["sent"].as_u64().unwrap_or(0).to_string(),
            v["acked"].as_u64().unwrap_or(0).to_string(),
            v["rejected"].as_u64().unwrap_or(0).to_string(),
            outbox["dropped"].as_u64().unwrap_or(0).to_string(),
            v["last_error"].as_str().unwrap_or("-").to_string(),
        ]);
    }
    table(&rows)
}

/// Outcome of asking the admin socket.
enum Ask {
    /// The broker answered this line.
    Answer(String),
    /// Nothing listens: no broker on this data directory.
    NoBroker,
}

fn ask_broker(socket: &Path, request: &str) -> anyhow::Result<Ask> {
    use std::io::ErrorKind;
    let path = socket.to_path_buf();
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(Ask::NoBroker)
        }
        Err(e) => {
            return Err(anyhow!(e).context(format!(
                "cannot reach the broker's admin socket {}",
                path.display()
            )))
        }
    };
    let mut talk = || -> std::io::Result<String> {
        stream.set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        Ok(line.trim_end_matches('\n').to_string())
    };
    let line = talk().with_context(|| format!("talking to the broker on {}", path.display()))?;
    if line.is_empty() {
        bail!("the broker closed {} without answering", path.display());
    }
    Ok(Ask::Answer(line))
}

/// A session the gateway itself owns (a bridge outbox, a serial port): admin commands
/// leave it alone (dropping an outbox would silently stop the uplink until a restart).
fn is_internal(client_id: &str) -> bool {
    crate::broker::client::is_reserved(client_id)
}

fn internal_refusal(client_id: &str) -> String {
    format!(
        "{client_id:?} is an internal session of the gateway (a bridge outbox or a serial port), not a client's: it cannot be dropped; to discard a bridge's backlog, remove the bridge or its rules from the configuration and restart"
    )
}

/// Drops a session: through the running broker when there is one, else directly in the
/// database. Internal sessions are refused.
pub fn drop_session(data_dir: &Path, client_id: &str) -> anyhow::Result<DropOutcome> {
    drop_session_at(data_dir, &socket_path(data_dir), client_id)
}

/// [`drop_session`], asking the admin socket at `socket`.
pub fn drop_session_at(
    data_dir: &Path,
    socket: &Path,
    client_id: &str,
) -> anyhow::Result<DropOutcome> {
    if is_internal(client_id) {
        bail!("{}", internal_refusal(client_id));
    }
    let request = format!("drop {}", encode_client_id(client_id));
    match ask_broker(socket, &request)? {
        Ask::Answer(line) => match line.as_str() {
            "ok dropped" => Ok(DropOutcome::DroppedByBroker),
            "ok not-found" => Ok(DropOutcome::NotFound {
                broker_running: true,
            }),
            other => {
                let msg = other.strip_prefix("err ").unwrap_or(other);
                bail!("the broker refused to drop session {client_id:?}: {msg}")
            }
        },
        Ask::NoBroker => drop_offline(data_dir, client_id),
    }
}

fn drop_offline(data_dir: &Path, client_id: &str) -> anyhow::Result<DropOutcome> {
    let db = db_path(data_dir);
    if !db.exists() {
        bail!(
            "database {} does not exist (check data_dir; the broker creates it on its first start)",
            db.display()
        );
    }
    crate::store::powercut::install_from_env(&db)?;
    let mut conn = Connection::open_with_flags(
        &db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening database {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    check_schema(&conn, &db)?;
    let mut delete = || -> rusqlite::Result<DropOutcome> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(i64, bool)> = tx
            .query_row(
                "SELECT sid, will IS NOT NULL FROM session WHERE client_id = ?1",
                [client_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((sid, had_will)) = row else {
            return Ok(DropOutcome::NotFound {
                broker_running: false,
            });
        };
        let (lo, hi) = queue_range(sid as u64);
        tx.execute("DELETE FROM session WHERE sid = ?1", [sid])?;
        tx.execute("DELETE FROM subscription WHERE sid = ?1", [sid])?;
        tx.execute("DELETE FROM incoming_qos2 WHERE sid = ?1", [sid])?;
        let queued = tx.execute("DELETE FROM queue WHERE id BETWEEN ?1 AND ?2", [lo, hi])?;
        tx.commit()?;
        Ok(DropOutcome::DeletedOffline {
            queued: queued as u64,
            had_will,
        })
    };
    delete().with_context(|| {
        format!(
            "deleting session {client_id:?} from database {}",
            db.display()
        )
    })
}

// ----- backup ---------------------------------------------------------------------------------

/// Pages copied per backup step.
pub const BACKUP_STEP_PAGES: i32 = 256;
/// Pause between backup steps, so the broker's writer gets the disk.
pub const BACKUP_STEP_PAUSE: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages: u64,
    pub steps: u64,
    pub sessions: u64,
    pub queued: u64,
    pub duration: Duration,
}

/// Copies the store of `data_dir` to `dest` (see the module documentation).
pub fn backup(data_dir: &Path, dest: &Path, force: bool) -> anyhow::Result<BackupReport> {
    let t0 = Instant::now();
    let src = open_store_read_only(data_dir)?;
    let db = db_path(data_dir);
    if dest.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            dest.display()
        );
    }
    if dest.is_dir() {
        bail!("{} is a directory; give a file name", dest.display());
    }
    let name = dest
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", dest.display()))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!("directory {} does not exist", dir.display());
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = copy_and_verify(&src, &db, &tmp);
    let (pages, steps, sessions, queued) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dest).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("moving the backup into place at {}", dest.display())
    })?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    let bytes = std::fs::metadata(dest)
        .with_context(|| format!("reading {}", dest.display()))?
        .len();
    Ok(BackupReport {
        path: dest.to_path_buf(),
        bytes,
        pages,
        steps,
        sessions,
        queued,
        duration: t0.elapsed(),
    })
}

/// Returns (pages, steps, sessions, queued messages) of the verified copy at `tmp`.
fn copy_and_verify(
    src: &Connection,
    db: &Path,
    tmp: &Path,
) -> anyhow::Result<(u64, u64, u64, u64)> {
    let _ = std::fs::remove_file(tmp);
    let mut dst = Connection::open(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // One read transaction over the whole copy: a fixed snapshot, so the writer's commits
    // meanwhile neither block us nor restart the backup.
    src.execute_batch("BEGIN")
        .and_then(|_| src.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())))
        .with_context(|| format!("starting a read transaction on {}", db.display()))?;
    let mut steps = 0u64;
    let copied = (|| -> rusqlite::Result<u64> {
        let b = rusqlite::backup::Backup::new(src, &mut dst)?;
        loop {
            steps += 1;
            match b.step(BACKUP_STEP_PAGES)? {
                rusqlite::backup::StepResult::Done => break,
                rusqlite::backup::StepResult::More => std::thread::sleep(BACKUP_STEP_PAUSE),
                _ => std::thread::sleep(Duration::from_millis(50)), // busy / locked
            }
        }
        Ok(b.progress().pagecount.max(0) as u64)
    })();
    let _ = src.execute_batch("COMMIT");
    let pages = copied.with_context(|| format!("copying {} to {}", db.display(), tmp.display()))?;
    // A single self-contained file: leave WAL mode in the copy.
    dst.pragma_update(None, "journal_mode", "DELETE")
        .with_context(|| format!("finishing {}", tmp.display()))?;
    drop(dst);
    let check = Connection::open_with_flags(tmp, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("reopening {}", tmp.display()))?;
    let mut st = check.prepare("PRAGMA integrity_check")?;
    let problems = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .with_context(|| format!("checking {}", tmp.display()))?;
    drop(st);
    if problems != ["ok"] {
        bail!(
            "the copy failed PRAGMA integrity_check: {}",
            problems.join("; ")
        );
    }
    let sessions: i64 = check.query_row("SELECT count(*) FROM session", [], |r| r.get(0))?;
    let queued: i64 = check.query_row("SELECT count(*) FROM queue", [], |r| r.get(0))?;
    drop(check);
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    Ok((pages, steps, sessions.max(0) as u64, queued.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_round_trip_through_the_encoding() {
        for id in [
            "",
            "plain-id_1.2~",
            "with space",
            "new\nline",
            "100%",
            "üñí©ødé ✓",
            "drop x\n",
        ] {
            let enc = encode_client_id(id);
            assert!(enc.bytes().all(|b| b.is_ascii_graphic()), "{enc}");
            assert_eq!(decode_client_id(&enc).unwrap(), id);
        }
        assert!(decode_client_id("%zz").is_err());
        assert!(decode_client_id("%4").is_err());
        assert!(decode_client_id("a b").is_err());
        assert!(decode_client_id("%FF").is_err());
    }

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(250), "4m10s");
        assert_eq!(human_secs(3 * 3600 + 120), "3h2m");
        assert_eq!(human_secs(7 * 86_400), "7d0h");
        assert_eq!(display_id("a b"), "\"a b\"");
        assert_eq!(display_id("ab"), "ab");
    }
}
