//! Broker processes under test: spawned on a free 127.0.0.1 port with a temporary
//! config, killed when dropped (also while unwinding from a panic).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Queue limits used for both brokers so that neither drops messages in the scenarios.
pub const MAX_QUEUED: usize = 100_000;
pub const MAX_INFLIGHT: u16 = 64;

pub struct BrokerProc {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    /// Program and arguments, for `restart`.
    argv: (PathBuf, Vec<std::ffi::OsString>),
    dir: TempDir,
}

/// Settings for the durable scenarios (`durable_compare`).
#[derive(Debug, Clone)]
pub struct DurableOpts {
    /// Holdfast `[store] synchronous` ("full" / "normal"); ignored for Mosquitto.
    pub synchronous: &'static str,
    pub max_queued: usize,
}

/// What `restart` measured.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// SIGTERM until the process exited.
    pub stop: Duration,
    /// Process spawn until a TCP connect succeeded (the kernel accepted it: Holdfast binds
    /// its listeners before it loads the store, so this is not yet readiness).
    pub tcp: Duration,
    /// Process spawn until a probe client got its CONNACK (the broker serves clients).
    pub connack: Duration,
}

/// Counters from `/proc/PID/io`.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCounters {
    pub wchar: u64,
    pub write_bytes: u64,
}

pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl BrokerProc {
    pub fn holdfast(bin: &Path) -> io::Result<BrokerProc> {
        Self::holdfast_with("holdfast", bin, "", MAX_QUEUED)
    }

    /// Holdfast with the given `[store] synchronous` and queue limit (durable sessions
    /// always go to `<tmp>/data/holdfast.db`).
    pub fn holdfast_durable(
        name: &'static str,
        bin: &Path,
        opts: &DurableOpts,
    ) -> io::Result<BrokerProc> {
        let store = format!("[store]\nsynchronous = \"{}\"\n\n", opts.synchronous);
        Self::holdfast_with(name, bin, &store, opts.max_queued)
    }

    /// Holdfast with `extra` TOML (e.g. `[store]`, `[[bridge]]` tables) inserted before
    /// `[log]`.
    pub fn holdfast_custom(
        name: &'static str,
        bin: &Path,
        extra: &str,
        max_queued: usize,
    ) -> io::Result<BrokerProc> {
        Self::holdfast_with(name, bin, extra, max_queued)
    }

    /// Mosquitto listening on `port` (0 = a free one), with `extra` configuration lines
    /// after the listener and logging lines; `{dir}` in `extra` is replaced by the
    /// broker's temporary directory (e.g. for `persistence_location {dir}/`). Bridge
    /// sections (`connection ...`) go last in `extra`.
    pub fn mosquitto_custom(
        name: &'static str,
        bin: &Path,
        port: u16,
        extra: &str,
    ) -> io::Result<BrokerProc> {
        let dir = tempfile::tempdir()?;
        let port = if port == 0 { free_port()? } else { port };
        let conf = dir.path().join("mosquitto.conf");
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n\
                 {extra}\n"
            ),
        )?;
        let args = vec!["-c".into(), conf.into_os_string()];
        Self::spawn(name, (bin.to_path_buf(), args), port, dir)
    }

    fn holdfast_with(
        name: &'static str,
        bin: &Path,
        extra: &str,
        max_queued: usize,
    ) -> io::Result<BrokerProc> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let data = dir.path().join("data");
        let conf = dir.path().join("holdfast.toml");
        fs::write(
            &conf,
            format!(
                "data_dir = {data:?}\n\n\
                 [[listener]]\nbind = \"127.0.0.1:{port}\"\n\n\
                 [mqtt]\nmax_inflight = {MAX_INFLIGHT}\nmax_queued_messages = {max_queued}\n\n\
                 {extra}\
                 [log]\nlevel = \"warn\"\n"
            ),
        )?;
        let args = vec!["run".into(), "--config".into(), conf.into_os_string()];
        Self::spawn(name, (bin.to_path_buf(), args), port, dir)
    }

    /// Mosquitto with `persistence true` in a temporary directory and the default
    /// `autosave_interval` (1800 s).
    pub fn mosquitto_durable(
        name: &'static str,
        bin: &Path,
        opts: &DurableOpts,
    ) -> io::Result<BrokerProc> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        let data = dir.path().join("data");
        fs::create_dir_all(&data)?;
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence true\n\
                 persistence_location {}/\n\
                 autosave_interval 1800\n\
                 user root\n\
                 max_queued_messages {}\n\
                 max_inflight_messages {MAX_INFLIGHT}\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n",
                data.display(),
                opts.max_queued
            ),
        )?;
        let args = vec!["-c".into(), conf.into_os_string()];
        Self::spawn(name, (bin.to_path_buf(), args), port, dir)
    }

    pub fn mosquitto(bin: &Path) -> io::Result<BrokerProc> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 max_queued_messages {MAX_QUEUED}\n\
                 max_inflight_messages {MAX_INFLIGHT}\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n"
            ),
        )?;
        let args = vec!["-c".into(), conf.into_os_string()];
        Self::spawn("mosquitto", (bin.to_path_buf(), args), port, dir)
    }

    fn start_child(
        name: &str,
        argv: &(PathBuf, Vec<std::ffi::OsString>),
        log: &Path,
    ) -> io::Result<Child> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(&argv.0);
        cmd.args(&argv.1)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        cmd.spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name} ({cmd:?}): {e}")))
    }

    fn spawn(
        name: &'static str,
        argv: (PathBuf, Vec<std::ffi::OsString>),
        port: u16,
        dir: TempDir,
    ) -> io::Result<Self> {
        let log = dir.path().join("broker.log");
        let child = Self::start_child(name, &argv, &log)?;
        let mut b = BrokerProc {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
            argv,
            dir,
        };
        b.wait_ready(Duration::from_secs(15))?;
        Ok(b)
    }

    /// SIGTERM, wait for the exit (graceful shutdown), start again with the same
    /// configuration, port and data, and wait until it accepts TCP connections.
    pub fn restart(&mut self, limit: Duration) -> io::Result<Restart> {
        let stop = self.stop(limit)?;
        // The port was in use a moment ago; listeners set SO_REUSEADDR, so it is free now.
        let t = Instant::now();
        self.child = Self::start_child(self.name, &self.argv, &self.log)?;
        let mut tcp = None;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited during restart ({status}); log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            let left = limit.saturating_sub(t.elapsed());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "{} not ready within {limit:?} after restart; log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            if let Ok(mut sock) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
            {
                let at = t.elapsed();
                tcp.get_or_insert(at);
                if probe_connack(&mut sock, left).unwrap_or(false) {
                    return Ok(Restart {
                        stop,
                        tcp: tcp.unwrap_or(at),
                        connack: t.elapsed(),
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM and wait for the exit (graceful shutdown; Mosquitto saves its persistence
    /// file). Returns how long it took. The port is free afterwards.
    pub fn stop(&mut self, limit: Duration) -> io::Result<Duration> {
        let t = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "kill -TERM {} failed",
                self.pid()
            )));
        }
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                return Err(io::Error::other(format!(
                    "{} did not exit within {limit:?} of SIGTERM",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts a stopped broker again (same configuration, port and data) and waits until
    /// it accepts TCP connections (polled every 2 ms).
    pub fn start(&mut self, limit: Duration) -> io::Result<Duration> {
        let t = Instant::now();
        self.child = Self::start_child(self.name, &self.argv, &self.log)?;
        self.wait_ready_every(limit, Duration::from_millis(2))?;
        Ok(t.elapsed())
    }

    /// Size in bytes of every file under the broker's temporary directory's `data/`.
    pub fn data_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = fs::read_dir(p) else { return 0 };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.dir.path().join("data"))
    }

    /// `/proc/PID/io` write counters (whole process, all threads).
    pub fn io(&self) -> Option<IoCounters> {
        let s = fs::read_to_string(format!("/proc/{}/io", self.pid())).ok()?;
        let get = |k: &str| -> Option<u64> {
            s.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))?
                .trim()
                .parse()
                .ok()
        };
        Some(IoCounters {
            wchar: get("wchar")?,
            write_bytes: get("write_bytes")?,
        })
    }

    /// Polls until the broker accepts TCP connections.
    fn wait_ready(&mut self, limit: Duration) -> io::Result<()> {
        self.wait_ready_every(limit, Duration::from_millis(20))
    }

    fn wait_ready_every(&mut self, limit: Duration, poll: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited during startup ({status}); log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(io::Error::other(format!(
                    "{} did not accept connections on {} within {limit:?}; log:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                )));
            }
            std::thread::sleep(poll);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (and if not, why).
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); log:\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// A `/proc/PID/status` field in KiB, e.g. `VmRSS` or `VmHWM`.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// CPU time (user + system) the broker has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        proc_cpu_time(&self.pid().to_string())
    }

    /// The broker's whole stdout/stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last few KiB of the broker's stdout/stderr.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

/// CPU time (user + system) used so far by process `pid` (a number or `self`), from
/// `/proc/PID/stat`.
pub fn proc_cpu_time(pid: &str) -> Option<Duration> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// Sends a 3.1.1 CONNECT (clean session, client id "probe") on a blocking socket and waits
/// up to `limit` for a successful CONNACK; then disconnects.
fn probe_connack(sock: &mut TcpStream, limit: Duration) -> io::Result<bool> {
    use std::io::Write;
    const CONNECT: [u8; 19] = [
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5, b'p', b'r', b'o', b'b', b'e',
    ];
    sock.write_all(&CONNECT)?;
    sock.set_read_timeout(Some(limit.max(Duration::from_millis(1))))?;
    let mut ack = [0u8; 4];
    sock.read_exact(&mut ack)?;
    let ok = ack[0] == 0x20 && ack[3] == 0;
    let _ = sock.write_all(&[0xe0, 0]);
    Ok(ok)
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
