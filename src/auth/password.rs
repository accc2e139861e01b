//! The password file: one `user:PHC-hash` per line (Argon2id, `$argon2id$v=19$...`), `#`
//! comments and blank lines ignored. Written by `holdfast passwd FILE USER`.
//!
//! Verification runs Argon2 (tens of milliseconds and ~19 MiB on a Pi), so callers run
//! [`PasswordFile::verify`] on a blocking thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;

use super::AuthError;

/// Parsed password file: user name → PHC string.
#[derive(Debug, Clone)]
pub struct PasswordFile {
    path: PathBuf,
    users: HashMap<String, String>,
    /// Hash of a random password, verified against for unknown users so that a wrong user
    /// name takes as long as a wrong password.
    dummy: String,
}

impl PasswordFile {
    /// Reads and checks the file: every non-comment line must be `user:$argon2...` with a
    /// parseable PHC string; user names are unique.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|cause| AuthError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<PasswordFile, AuthError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| AuthError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("expected `user:$argon2id$...`".to_string()));
            };
            if user.is_empty() {
                return Err(err("empty user name".to_string()));
            }
            if let Err(e) = PasswordHash::new(hash) {
                return Err(err(format!(
                    "user `{user}`: not a PHC password hash ({e}); create entries with `holdfast passwd`"
                )));
            }
            if !hash.starts_with("$argon2") {
                return Err(err(format!(
                    "user `{user}`: only Argon2 hashes are supported; create entries with `holdfast passwd`"
                )));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(err(format!("user `{user}` appears twice")));
            }
        }
        Ok(PasswordFile {
            path: path.to_path_buf(),
            users,
            dummy: hash_password(&std::process::id().to_string().repeat(3)).unwrap_or_default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True if `user` exists and `password` matches. Slow (Argon2): call from a blocking
    /// thread. Unknown users cost the same as wrong passwords.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default().verify_password(password, &parsed).is_ok();
        ok && known
    }
}

/// Argon2id (default parameters: m = 19 MiB, t = 2, p = 1) with a random salt, as a PHC
/// string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let hash: Result<PasswordHash, _> = Argon2::default().hash_password(password.as_bytes());
    hash.map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Sets (adds or replaces) `user`'s hash in the password file text, keeping comments and
/// other lines. Returns the new text.
pub fn set_user(text: &str, user: &str, hash: &str) -> String {
    let mut out = String::with_capacity(text.len() + hash.len() + user.len() + 2);
    let mut replaced = false;
    for line in text.lines() {
        let is_user = line
            .trim()
            .split_once(':')
            .is_some_and(|(u, _)| u == user && !line.trim().starts_with('#'));
        if is_user {
            if !replaced {
                out.push_str(&format!("{user}:{hash}\n"));
                replaced = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    out
}

/// Checks a user name for the password file.
pub fn valid_user_name(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("the user name must not be empty".to_string());
    }
    if user.contains(':') || user.contains('\n') || user.contains('\r') || user.starts_with('#') {
        return Err("the user name must not contain `:` or newlines, nor start with `#`".into());
    }
    if user.trim() != user {
        return Err("the user name must not start or end with white space".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_and_errors_name_file_and_line() {
        let hash = hash_password("s3cret").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = format!("# users\n\nalice:{hash}\n");
        let path = Path::new("/etc/holdfast/passwd");
        let f = PasswordFile::parse(path, &text).expect("parses");
        assert_eq!(f.len(), 1);
        assert!(f.verify("alice", b"s3cret"));
        assert!(!f.verify("alice", b"wrong"));
        assert!(!f.verify("bob", b"s3cret"));

        for (bad, needle) in [
            ("alice\n", "expected `user:"),
            (":$argon2id$x\n", "empty user name"),
            ("bob:plaintext\n", "not a PHC password hash"),
        ] {
            let text = format!("# c\n{bad}");
            let e = PasswordFile::parse(path, &text).expect_err(bad).to_string();
            assert!(e.starts_with("/etc/holdfast/passwd:2: "), "{e}");
            assert!(e.contains(needle), "{e}");
        }
        let dup = format!("alice:{hash}\nalice:{hash}\n");
        let e = PasswordFile::parse(path, &dup)
            .expect_err("dup")
            .to_string();
        assert!(e.contains(":2: user `alice` appears twice"), "{e}");
    }

    #[test]
    fn set_user_adds_or_replaces() {
        let text = "# c\nalice:old\nbob:x\n";
        assert_eq!(set_user(text, "alice", "new"), "# c\nalice:new\nbob:x\n");
        assert_eq!(
            set_user(text, "carol", "h"),
            "# c\nalice:old\nbob:x\ncarol:h\n"
        );
        assert_eq!(set_user("", "a", "h"), "a:h\n");
        assert!(valid_user_name("a:b").is_err());
        assert!(valid_user_name("").is_err());
        assert!(valid_user_name("sensor-1").is_ok());
    }
}
