//! Client authentication and authorization: the password file (`[auth] password_file`,
//! Argon2id PHC strings written by `holdfast passwd`) and the ACL file (`[auth] acl_file`).
//! TLS client certificates are verified by the listener (`broker::tls`); their name reaches
//! the connection as the user name.
//!
//! Both files are read at start-up (errors name the file and line) and again on SIGHUP
//! ([`Auth::reload`]; a bad file keeps the previous version). Connections keep the rules
//! they were given when they connected.

pub mod acl;
pub mod password;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use acl::{Acl, ClientAcl};
pub use password::PasswordFile;

/// `[auth]` settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `user:$argon2id$...` lines; when set, clients sending a user name must send its
    /// password (CONNACK 0x86 / 3.1.1 return code 4 otherwise).
    pub password_file: Option<PathBuf>,
    /// Topic access rules per user / pattern; when set, everything not granted is denied.
    pub acl_file: Option<PathBuf>,
    /// Most client ids one user name may have connected at once (0 = unlimited); the
    /// CONNECT over it gets CONNACK 0x97 Quota exceeded (3.1.1: 0x03 Server unavailable).
    /// A takeover of a connected client id does not count twice; anonymous clients are
    /// not capped. Reloaded on SIGHUP.
    pub max_connections_per_user: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{}: cannot read: {cause}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Debug, Default)]
struct Loaded {
    passwords: Option<Arc<PasswordFile>>,
    acl: Option<Arc<Acl>>,
}

/// The broker's authentication state, shared by every listener.
#[derive(Debug)]
pub struct Auth {
    cfg: AuthConfig,
    loaded: RwLock<Arc<Loaded>>,
    /// Bounds concurrent Argon2 verifications (each takes ~19 MiB and a core for tens of
    /// milliseconds): a burst of CONNECTs queues here instead of exhausting memory.
    verifying: Semaphore,
}

impl Auth {
    /// No password file, no ACL: user names are taken as given, everything is allowed.
    pub fn open() -> Auth {
        Auth {
            cfg: AuthConfig::default(),
            loaded: RwLock::new(Arc::new(Loaded::default())),
            verifying: Semaphore::new(1),
        }
    }

    pub fn load(cfg: &AuthConfig) -> Result<Auth, AuthError> {
        let loaded = Self::read(cfg)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Auth {
            cfg: cfg.clone(),
            loaded: RwLock::new(Arc::new(loaded)),
            verifying: Semaphore::new(cores.clamp(1, 4)),
        })
    }

    fn read(cfg: &AuthConfig) -> Result<Loaded, AuthError> {
        let passwords = match &cfg.password_file {
            Some(p) => {
                let f = PasswordFile::load(p)?;
                info!(path = %p.display(), users = f.len(), "password file loaded");
                Some(Arc::new(f))
            }
            None => None,
        };
        let acl = match &cfg.acl_file {
            Some(p) => {
                let a = Acl::load(p)?;
                info!(path = %p.display(), "ACL file loaded");
                Some(Arc::new(a))
            }
            None => None,
        };
        Ok(Loaded { passwords, acl })
    }

    /// Re-reads the files (SIGHUP). On error the previous contents stay in force.
    pub fn reload(&self) -> Result<(), AuthError> {
        if self.cfg.password_file.is_none() && self.cfg.acl_file.is_none() {
            return Ok(());
        }
        match Self::read(&self.cfg) {
            Ok(l) => {
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(l);
                Ok(())
            }
            Err(e) => {
                warn!(cause = %e, "auth files not reloaded; keeping the previous ones");
                Err(e)
            }
        }
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when a password file is configured.
    pub fn checks_passwords(&self) -> bool {
        self.cfg.password_file.is_some()
    }

    /// Checks `user`'s password against the password file, on a blocking thread. True when
    /// no password file is configured.
    pub async fn verify_password(&self, user: &str, password: Option<&[u8]>) -> bool {
        let Some(file) = self.current().passwords.clone() else {
            return true;
        };
        let Ok(_permit) = self.verifying.acquire().await else {
            return false;
        };
        let user = user.to_string();
        // A missing password is verified as an empty one (same cost), then refused.
        let given = password.is_some();
        let password = password.unwrap_or_default().to_vec();
        let ok = tokio::task::spawn_blocking(move || file.verify(&user, &password))
            .await
            .unwrap_or(false);
        ok && given
    }

    /// The ACL rules for one client, or `None` when no ACL file is configured (everything
    /// allowed).
    pub fn acl_for(&self, username: Option<&str>, client_id: &str) -> Option<Arc<ClientAcl>> {
        let acl = self.current().acl.clone()?;
        Some(Arc::new(acl.for_client(username, client_id)))
    }
}
