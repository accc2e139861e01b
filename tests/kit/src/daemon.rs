//! The real `holdfast` binary as a child process for restart and crash tests: a temp data
//! dir and config file, start / SIGTERM / SIGKILL / restart on the same port and data dir,
//! stderr kept in a log file (printed when a test panics). The one way the tests run the
//! daemon (`holdfast run`); one-shot commands run `crate::bin()` directly.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// One broker installation: data dir, config, port. The process may be started, stopped
/// and killed many times; the data dir stays.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    /// The data dir (`<dir>/data` unless given).
    pub data: PathBuf,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// How many times the process was started.
    pub starts: u32,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes the config (`[log] level = "warn"`, one listener on a free port, data dir in
    /// a temp dir) followed by `extra` (whole TOML sections, e.g. `"[mqtt]\nmax_inflight = 5\n"`).
    /// Does not start the process.
    pub fn new(extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        Daemon::with_dirs(dir, data, extra)
    }

    /// Like `new`, with the data dir at `data` (e.g. a restored backup, or a second run on
    /// the data of an earlier `Daemon`).
    pub fn with_data_dir(data: &Path, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Daemon::with_dirs(dir, data.to_path_buf(), extra)
    }

    fn with_dirs(dir: tempfile::TempDir, data: PathBuf, extra: &str) -> Daemon {
        let port = crate::free_port();
        let config = dir.path().join("holdfast.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n[log]\nlevel = \"warn\"\n{extra}",
                data.display()
            ),
        )
        .expect("write config");
        let log = dir.path().join("holdfast.log");
        Daemon {
            dir,
            data,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            config,
            log,
            child: None,
            starts: 0,
            env: Vec::new(),
        }
    }

    /// `new` + `start`.
    pub async fn started(extra: &str) -> Daemon {
        let mut d = Daemon::new(extra);
        d.start().await;
        d
    }

    pub fn db_path(&self) -> PathBuf {
        self.data.join("holdfast.db")
    }

    /// Starts the process and returns at once (it may still be recovering).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "holdfast is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        self.starts += 1;
        use std::io::Write;
        let mut marker = log.try_clone().expect("log");
        let _ = writeln!(marker, "----- test: start #{} -----", self.starts);
        let mut cmd = Command::new(crate::bin());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // The crash test's own switches are not configuration keys: the broker refuses
        // unknown HOLDFAST_* variables, so they are not passed on.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HOLDFAST_CRASH_") {
                cmd.env_remove(&k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().expect("spawn holdfast");
        self.child = Some(child);
    }

    /// Starts the process and waits until it accepts TCP connections. (The listener is
    /// bound before the store is recovered, so clients may still wait for their CONNACK.)
    pub async fn start(&mut self) {
        self.spawn();
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(self.addr).await.is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("holdfast exited early: {status}\n{}", self.log_text());
                }
            }
            assert!(
                Instant::now() < deadline,
                "holdfast did not start listening\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (`"HUP"`, `"TERM"`, ...) and returns at once.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid().expect("holdfast is not running"), signal);
    }

    /// SIGHUP (reload); returns at once.
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// SIGKILL and reap.
    pub fn sigkill(&mut self) {
        let mut c = self.child.take().expect("holdfast is not running");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGKILL and reap; true if the process was still running when the signal came
    /// (false: it had exited on its own, e.g. because its store did not open).
    pub fn sigkill_alive(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let mut c = self.child.take().expect("holdfast is not running");
        let _ = c.kill();
        c.wait().map(|s| s.signal() == Some(9)).unwrap_or(false)
    }

    /// SIGTERM; waits for a successful exit.
    pub async fn sigterm(&mut self) {
        let mut c = self.child.take().expect("holdfast is not running");
        send_signal(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = c.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "holdfast exited with {status} after SIGTERM\n{}",
                    self.log_text()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "holdfast did not exit within 15 s of SIGTERM\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (up to `within`) for the process to exit by itself, e.g. after `signal("TERM")`.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("holdfast is not running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = c.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "holdfast did not exit within {within:?}\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, then start again on the same data dir and port.
    pub async fn kill_and_restart(&mut self) {
        self.sigkill();
        self.start().await;
    }

    /// SIGTERM, then start again on the same data dir and port.
    pub async fn term_and_restart(&mut self) {
        self.sigterm().await;
        self.start().await;
    }

    /// Waits (up to 10 s) until the store has committed that `client_id` is offline: a
    /// DISCONNECT gets no answer, so this is the only way to know before killing the broker.
    pub async fn wait_offline_committed(&self, client_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let offline = rusqlite::Connection::open_with_flags(
                self.db_path(),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .and_then(|db| {
                db.query_row(
                    "SELECT disconnected_at IS NOT NULL FROM session WHERE client_id = ?1",
                    [client_id],
                    |r| r.get::<_, bool>(0),
                )
            });
            if offline.unwrap_or(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{client_id} is not marked offline in the store"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the broker wrote to stderr so far (all starts).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- holdfast log ({}) -----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}
