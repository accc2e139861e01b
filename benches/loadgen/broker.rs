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
    _dir: TempDir,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl BrokerProc {
    pub fn holdfast(bin: &Path) -> io::Result<BrokerProc> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let data = dir.path().join("data");
        let conf = dir.path().join("holdfast.toml");
        fs::write(
            &conf,
            format!(
                "data_dir = {data:?}\n\n\
                 [[listener]]\nbind = \"127.0.0.1:{port}\"\n\n\
                 [mqtt]\nmax_inflight = {MAX_INFLIGHT}\nmax_queued_messages = {MAX_QUEUED}\n\n\
                 [log]\nlevel = \"warn\"\n"
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&conf);
        Self::spawn("holdfast", cmd, port, dir)
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
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        Self::spawn("mosquitto", cmd, port, dir)
    }

    fn spawn(name: &'static str, mut cmd: Command, port: u16, dir: TempDir) -> io::Result<Self> {
        let log = dir.path().join(format!("{name}.log"));
        let out = fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name} ({cmd:?}): {e}")))?;
        let mut b = BrokerProc {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
            _dir: dir,
        };
        b.wait_ready(Duration::from_secs(15))?;
        Ok(b)
    }

    /// Polls until the broker accepts TCP connections.
    fn wait_ready(&mut self, limit: Duration) -> io::Result<()> {
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
            std::thread::sleep(Duration::from_millis(20));
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

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
