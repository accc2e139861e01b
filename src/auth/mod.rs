//! Client authentication and authorization: the password file (`[auth] password_file`,
//! Argon2id PHC strings written by `holdfast passwd`) and the ACL file (`[auth] acl_file`).
//! TLS client certificates are verified by the listener (`broker::tls`); their name reaches
//! the connection as the user name.
//!
//! Both files are read at start-up (errors name the file and line) and again on SIGHUP
//! ([`Auth::reload`]; a bad file keeps the previous version). Every successful reload bumps
//! [`Auth::generation`]: connections re-derive their rules when it changed, and the router
//! re-checks every session's stored subscriptions (`broker::router::security`).
//!
//! Password checks run Argon2 (~19 MiB and tens of milliseconds each) on blocking threads,
//! at most `max_concurrent_hashes` at once; a CONNECT that waits longer than
//! `hash_queue_timeout_ms` for a slot is refused (Server unavailable), so a burst of
//! unauthenticated CONNECTs can neither exhaust memory nor queue without bound. A slot is
//! held until its hash finishes, even when the connection gave up meanwhile.

pub mod acl;
pub mod password;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use acl::{Acl, ClientAcl, SubscribeCheck};
pub use password::PasswordFile;

/// `[auth]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Argon2 password checks running at once (each ~19 MiB and one core for tens of
    /// milliseconds). Default 2: 38 MiB at most on a 512 MB Raspberry Pi.
    pub max_concurrent_hashes: usize,
    /// How long a CONNECT waits for a free hashing slot before it is refused with CONNACK
    /// 0x88 Server unavailable (3.1.1: return code 3), in milliseconds.
    pub hash_queue_timeout_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            password_file: None,
            acl_file: None,
            max_connections_per_user: 0,
            max_concurrent_hashes: 2,
            hash_queue_timeout_ms: 2000,
        }
    }
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if !(1..=64).contains(&self.max_concurrent_hashes) {
            return Err(crate::config::ConfigError::invalid(
                "auth.max_concurrent_hashes",
                format!("must be 1 to 64 (got {})", self.max_concurrent_hashes),
            ));
        }
        if self.hash_queue_timeout_ms == 0 || self.hash_queue_timeout_ms > 60_000 {
            return Err(crate::config::ConfigError::invalid(
                "auth.hash_queue_timeout_ms",
                format!("must be 1 to 60000 (got {})", self.hash_queue_timeout_ms),
            ));
        }
        Ok(())
    }
}

/// A password check that could not run: every hashing slot stayed busy for
/// `auth.hash_queue_timeout_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("every password hashing slot is busy")]
pub struct HashingBusy;

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
    /// milliseconds): a burst of CONNECTs queues here (for at most `hash_timeout`) instead
    /// of exhausting memory.
    verifying: Arc<Semaphore>,
    hash_timeout: Duration,
    /// Bumped by every successful reload.
    generation: AtomicU64,
}

impl Auth {
    /// No password file, no ACL: user names are taken as given, everything is allowed.
    pub fn open() -> Auth {
        let cfg = AuthConfig::default();
        Auth {
            verifying: Arc::new(Semaphore::new(cfg.max_concurrent_hashes)),
            hash_timeout: Duration::from_millis(cfg.hash_queue_timeout_ms),
            cfg,
            loaded: RwLock::new(Arc::new(Loaded::default())),
            generation: AtomicU64::new(0),
        }
    }

    pub fn load(cfg: &AuthConfig) -> Result<Auth, AuthError> {
        let loaded = Self::read(cfg)?;
        Ok(Auth {
            cfg: cfg.clone(),
            loaded: RwLock::new(Arc::new(loaded)),
            verifying: Arc::new(Semaphore::new(cfg.max_concurrent_hashes.max(1))),
            hash_timeout: Duration::from_millis(cfg.hash_queue_timeout_ms.max(1)),
            generation: AtomicU64::new(0),
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
                self.generation.fetch_add(1, Ordering::Release);
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

    /// Bumped by every successful [`Auth::reload`]: rules derived before are stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// True when an ACL file is configured.
    pub fn checks_acl(&self) -> bool {
        self.cfg.acl_file.is_some()
    }

    /// True when a password file is configured.
    pub fn checks_passwords(&self) -> bool {
        self.cfg.password_file.is_some()
    }

    /// Checks `user`'s password against the password file, on a blocking thread. True when
    /// no password file is configured; `Err` when no hashing slot freed up in time.
    pub async fn verify_password(
        &self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<bool, HashingBusy> {
        let Some(file) = self.current().passwords.clone() else {
            return Ok(true);
        };
        let permit =
            match tokio::time::timeout(self.hash_timeout, self.verifying.clone().acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(_)) | Err(_) => return Err(HashingBusy),
            };
        let user = user.to_string();
        // A missing password is verified as an empty one (same cost), then refused.
        let given = password.is_some();
        let password = password.unwrap_or_default().to_vec();
        // The permit moves into the blocking task: it is released when the hash is done,
        // not when a connection that gave up stops waiting for it.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            file.verify(&user, &password)
        })
        .await
        .unwrap_or(false);
        Ok(ok && given)
    }

    /// The ACL rules for one client, or `None` when no ACL file is configured (everything
    /// allowed).
    pub fn acl_for(&self, username: Option<&str>, client_id: &str) -> Option<Arc<ClientAcl>> {
        let acl = self.current().acl.clone()?;
        Some(Arc::new(acl.for_client(username, client_id)))
    }
}

/// Who a session belongs to: the identity that created it. Another identity may neither
/// resume it nor end it (its CONNECT is refused with 0x87 Not authorized, 3.1.1 return code
/// 5), so a user cannot read, take over or wipe another user's queued messages by guessing
/// a client id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SessionOwner {
    /// Not recorded: an internal session, or one stored before owners were (the first
    /// identity to resume it claims it).
    #[default]
    Unknown,
    /// A client without a user name (or certificate).
    Anonymous,
    /// A user name (password file, or unchecked when there is none) or the name of a
    /// verified client certificate.
    User(Arc<str>),
}

impl SessionOwner {
    pub fn from_username(user: Option<&str>) -> SessionOwner {
        match user {
            Some(u) => SessionOwner::User(u.into()),
            None => SessionOwner::Anonymous,
        }
    }

    /// The user name the ACL is derived for (None: anonymous or unknown).
    pub fn username(&self) -> Option<&str> {
        match self {
            SessionOwner::User(u) => Some(u),
            _ => None,
        }
    }

    /// The store's form (`session.owner`): `user:<name>` or `anonymous`; None if unknown.
    pub fn to_stored(&self) -> Option<Arc<str>> {
        match self {
            SessionOwner::Unknown => None,
            SessionOwner::Anonymous => Some("anonymous".into()),
            SessionOwner::User(u) => Some(format!("user:{u}").into()),
        }
    }

    pub fn from_stored(s: Option<&str>) -> SessionOwner {
        match s {
            Some("anonymous") => SessionOwner::Anonymous,
            Some(s) => match s.strip_prefix("user:") {
                Some(u) => SessionOwner::User(u.into()),
                None => SessionOwner::Unknown,
            },
            None => SessionOwner::Unknown,
        }
    }

    /// May a client with identity `other` attach to a session owned by `self`?
    pub fn admits(&self, other: &SessionOwner) -> bool {
        *self == SessionOwner::Unknown || self == other
    }
}

/// What a network client brings to the router at CONNECT besides the request itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub owner: SessionOwner,
    /// The ACL in force for this client (None: no ACL file).
    pub acl: Option<Arc<ClientAcl>>,
}

/// Topics of the gateway itself (`$SYS/...`): clients may not publish there (nor put a will
/// there), whatever the ACL says.
pub fn is_sys_topic(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_through_the_store_form() {
        for o in [
            SessionOwner::Anonymous,
            SessionOwner::User("alice".into()),
            SessionOwner::User("user:x".into()),
        ] {
            let stored = o.to_stored();
            assert_eq!(SessionOwner::from_stored(stored.as_deref()), o);
        }
        assert_eq!(SessionOwner::from_stored(None), SessionOwner::Unknown);
        assert!(SessionOwner::Unknown.admits(&SessionOwner::Anonymous));
        let alice = SessionOwner::User("alice".into());
        assert!(alice.admits(&alice));
        assert!(!alice.admits(&SessionOwner::User("bob".into())));
        assert!(!alice.admits(&SessionOwner::Anonymous));
        assert!(!SessionOwner::Anonymous.admits(&alice));
        assert!(is_sys_topic("$SYS/holdfast/x") && is_sys_topic("$SYS"));
        assert!(!is_sys_topic("$SYSTEM/x") && !is_sys_topic("a/$SYS"));
    }
}
