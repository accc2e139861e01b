//! Debian's Mosquitto as an upstream broker for bridge tests: started on a free
//! 127.0.0.1 port with persistence in a temp dir, stopped with SIGTERM (it saves its
//! database) or killed on drop. Tests skip loudly without it unless `HOLDFAST_INTEROP=1`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::have_mosquitto_tools;

pub fn mosquitto_bin() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Mosquitto available (or skip loudly; HOLDFAST_INTEROP=1 makes absence fail).
pub fn have_mosquitto() -> bool {
    if !have_mosquitto_tools() {
        return false;
    }
    if mosquitto_bin().is_none() {
        if std::env::var("HOLDFAST_INTEROP").as_deref() == Ok("1") {
            panic!("HOLDFAST_INTEROP=1 but the mosquitto broker is not installed");
        }
        eprintln!(
            "\n*** SKIPPED: /usr/sbin/mosquitto not installed (apt-get install mosquitto) ***\n"
        );
        return false;
    }
    true
}

/// A Mosquitto broker on 127.0.0.1 with persistence in a temp dir; killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::free_port();
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nmax_queued_messages 20000\nlog_dest stderr\n",
            dir.path().display()
        );
        if user == "root" {
            // Otherwise it switches to the `mosquitto` user, which cannot write the temp dir.
            conf.push_str("user root\n");
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.spawn().await;
        m
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new(mosquitto_bin().unwrap())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("mosquitto exited: {st}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "mosquitto does not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops it with SIGTERM (it saves its database) and waits for the exit.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "-TERM");
            wait_child(&mut c, Duration::from_secs(10)).await;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

pub async fn wait_child(c: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = c.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("child {} did not exit within {within:?}", c.id());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
