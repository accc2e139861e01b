//! Typed settings: the one place that turns files and environment variables into a
//! [`Config`].
//!
//! Layering (later wins): built-in defaults < TOML file < `HOLDFAST_*` environment variables
//! (`__` separates nesting levels, e.g. `HOLDFAST_MQTT__MAX_INFLIGHT=32`,
//! `HOLDFAST_LOG__LEVEL=debug`). Loading uses the `config` crate; each source is first
//! deserialized on its own so that every error can say where the bad value came from.
//!
//! Invariants kept here:
//! - Unknown keys and badly typed values are errors naming the key and its origin (the file
//!   path, or the environment variable); nothing is silently ignored.
//! - [`Config::load`] / [`Config::load_from`] only return configurations that pass
//!   [`Config::validate`], so the rest of the program may rely on its ranges.
//!
//! Every key is documented in `docs/configuration.md` and `examples/holdfast.toml`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod error;
mod listener;
mod log;
mod mqtt;
mod store;
#[cfg(test)]
mod tests;

pub use error::*;
pub use listener::*;
pub use log::*;
pub use mqtt::*;
pub use store::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite store and other state live.
    pub data_dir: PathBuf,
    /// The admin socket (`holdfast sessions drop`, `status`, `bridge status`). Default
    /// `<data_dir>/holdfast.sock`; the packaged configuration uses
    /// `/run/holdfast/holdfast.sock` (systemd `RuntimeDirectory=`), so a data directory on
    /// a filesystem without Unix sockets (FAT/exFAT, some FUSE) works. Failing to create
    /// it is a warning, not fatal.
    pub admin_socket: Option<PathBuf>,
    /// Threads of the async runtime (connections, router, bridges, serial ports); the
    /// store writer always has its own. 0 = one per CPU core.
    pub worker_threads: usize,
    /// TCP listeners, `[[listener]]` tables. At least one.
    pub listener: Vec<ListenerConfig>,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub store: StoreConfig,
    /// Password and ACL files (`docs/security.md`).
    pub auth: crate::auth::AuthConfig,
    /// `$SYS/holdfast/...` status topics.
    pub sys: crate::observe::SysConfig,
    /// Prometheus `/metrics` and `/healthz` over HTTP (off unless `bind` is set).
    pub metrics: crate::observe::MetricsConfig,
    /// Upstream bridges, `[[bridge]]` tables (none by default).
    pub bridge: Vec<crate::bridge::BridgeConfig>,
    /// Serial sensor ports, `[[serial]]` tables (none by default).
    pub serial: Vec<crate::serial::SerialConfig>,
    /// This gateway's name in default identifiers (a bridge's upstream client id is
    /// `holdfast-<device_id>-<bridge name>`); unset = derived from `/etc/machine-id`.
    pub device_id: Option<String>,
    /// Where the machine id is read (not a configuration key: a seam for tests).
    #[serde(skip)]
    pub machine_id_file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("holdfast-data"),
            admin_socket: None,
            worker_threads: 1,
            listener: vec![ListenerConfig::new("127.0.0.1:1883")],
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
            store: StoreConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            sys: Default::default(),
            metrics: Default::default(),
            bridge: Vec::new(),
            serial: Vec::new(),
            device_id: None,
            machine_id_file: PathBuf::from("/etc/machine-id"),
        }
    }
}

impl Config {
    /// Loads the configuration: built-in defaults < TOML file (if given; it must exist) <
    /// `HOLDFAST_*` environment variables (`__` separates levels:
    /// `HOLDFAST_MQTT__MAX_INFLIGHT=32`, `HOLDFAST_DATA_DIR=/var/lib/holdfast`,
    /// `HOLDFAST_LOG__LEVEL=debug`). The result has passed [`Config::validate`].
    ///
    /// `HOLDFAST_INTEROP` and `HOLDFAST_TEST_*` are test switches, not configuration keys,
    /// and are ignored here.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = HashMap::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().map(str::to_string) else {
                continue;
            };
            if !is_config_env_var(&name) {
                continue;
            }
            let value = value.into_string().map_err(|_| ConfigError::Syntax {
                origin: Origin::Env(name.clone()),
                message: "value is not valid UTF-8".to_string(),
            })?;
            env.insert(name, value);
        }
        Config::load_from(file, env)
    }

    /// Like [`Config::load`], but takes the environment as a map (tests pass their own).
    /// Every entry whose name starts with `HOLDFAST_` (any case) is treated as a key.
    pub fn load_from(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let file_source = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
                    path: path.to_path_buf(),
                    cause,
                })?;
                let origin = Origin::File(path.to_path_buf());
                let source = config::File::from_str(&text, config::FileFormat::Toml);
                // The file on its own: errors here are the file's.
                config::Config::builder()
                    .add_source(source.clone())
                    .build()
                    .and_then(|c| c.try_deserialize::<Config>())
                    .map_err(|e| ConfigError::from_config_crate(e, origin.clone()))?;
                Some((source, origin))
            }
            None => None,
        };

        // The environment on its own: errors here name the variable.
        config::Config::builder()
            .add_source(env_source(&env))
            .build()
            .and_then(|c| c.try_deserialize::<Config>())
            .map_err(|e| {
                let mut err = ConfigError::from_config_crate(e, Origin::Environment);
                if let ConfigError::Invalid { key, message, .. } = &mut err {
                    if key == "listener" {
                        *message = "listeners cannot be set from the environment; \
                                    use [[listener]] tables in the config file"
                            .to_string();
                    }
                }
                let origin = err
                    .key()
                    .and_then(|key| env_origin(&env, key))
                    .unwrap_or(Origin::Environment);
                err.with_origin(origin)
            })?;

        // Both layered. Defaults come from the `#[serde(default)]` impls above.
        let mut builder = config::Config::builder();
        if let Some((source, _)) = &file_source {
            builder = builder.add_source(source.clone());
        }
        let merged_origin = |key: Option<&str>| {
            key.and_then(|k| env_origin(&env, k))
                .or_else(|| file_source.as_ref().map(|(_, o)| o.clone()))
                .unwrap_or(Origin::Config)
        };
        let cfg: Config = builder
            .add_source(env_source(&env))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                let err = ConfigError::from_config_crate(e, Origin::Config);
                let origin = merged_origin(err.key());
                err.with_origin(origin)
            })?;

        cfg.validate().map_err(|err| {
            let origin = merged_origin(err.key());
            err.with_origin(origin)
        })?;
        Ok(cfg)
    }

    /// Checks value ranges and formats. Errors name the key; their origin is
    /// [`Origin::Config`] (the loaders replace it with the file or variable).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "must not be empty"));
        }
        if let Some(d) = &self.device_id {
            if d.is_empty()
                || d.len() > 64
                || d.chars().any(|c| c.is_whitespace() || "/+#".contains(c))
            {
                return Err(ConfigError::invalid(
                    "device_id",
                    "must be 1 to 64 characters without spaces, '/', '+' or '#'",
                ));
            }
        }
        if self.worker_threads > 256 {
            return Err(ConfigError::invalid(
                "worker_threads",
                format!(
                    "must be 0 (one per CPU core) to 256 (got {})",
                    self.worker_threads
                ),
            ));
        }
        if self.listener.is_empty() {
            return Err(ConfigError::invalid(
                "listener",
                "at least one [[listener]] is required",
            ));
        }
        let mut seen: Vec<SocketAddr> = Vec::with_capacity(self.listener.len());
        for (i, listener) in self.listener.iter().enumerate() {
            let key = format!("listener[{i}].bind");
            let addr = listener
                .socket_addr()
                .map_err(|message| ConfigError::invalid(&key, message))?;
            if addr.port() != 0 && seen.contains(&addr) {
                return Err(ConfigError::invalid(
                    key,
                    format!("`{}` is already used by another listener", listener.bind),
                ));
            }
            seen.push(addr);
        }
        for (i, listener) in self.listener.iter().enumerate() {
            listener.validate(i, self)?;
        }
        self.log.validate()?;
        self.mqtt.validate()?;
        self.auth.validate()?;
        self.store.validate()?;
        self.sys.validate()?;
        self.metrics.validate()?;
        for (i, b) in self.bridge.iter().enumerate() {
            b.validate(i)?;
            if self.bridge[..i].iter().any(|o| o.name == b.name) {
                return Err(ConfigError::invalid(
                    format!("bridge[{i}].name"),
                    format!("`{}` is used by another bridge", b.name),
                ));
            }
        }
        for (i, s) in self.serial.iter().enumerate() {
            s.validate(i)?;
            if self.serial[..i].iter().any(|o| o.name == s.name) {
                return Err(ConfigError::invalid(
                    format!("serial[{i}].name"),
                    format!("`{}` is used by another serial port", s.name),
                ));
            }
        }
        Ok(())
    }

    /// Where the admin socket is: `admin_socket`, or `<data_dir>/holdfast.sock`.
    pub fn admin_socket_path(&self) -> PathBuf {
        match &self.admin_socket {
            Some(p) => p.clone(),
            None => crate::admin::socket_path(&self.data_dir),
        }
    }

    /// Every file the configuration refers to, with its key: password and ACL files,
    /// listener certificates, bridge certificates.
    pub fn referenced_files(&self) -> Vec<(String, &Path)> {
        let mut all: Vec<(String, &Option<PathBuf>)> = vec![
            ("auth.password_file".into(), &self.auth.password_file),
            ("auth.acl_file".into(), &self.auth.acl_file),
        ];
        for (i, l) in self.listener.iter().enumerate() {
            all.push((format!("listener[{i}].tls_cert"), &l.tls_cert));
            all.push((format!("listener[{i}].tls_key"), &l.tls_key));
            all.push((format!("listener[{i}].tls_client_ca"), &l.tls_client_ca));
        }
        for (i, b) in self.bridge.iter().enumerate() {
            all.push((format!("bridge[{i}].ca_file"), &b.ca_file));
            all.push((format!("bridge[{i}].cert_file"), &b.cert_file));
            all.push((format!("bridge[{i}].key_file"), &b.key_file));
        }
        all.into_iter()
            .filter_map(|(k, p)| p.as_deref().map(|p| (k, p)))
            .collect()
    }

    /// `holdfast check-config`: every referenced file can be opened for reading. The error
    /// names the key, the file it refers to and `config_file` (where the key was set).
    pub fn check_files(&self, config_file: Option<&Path>) -> Result<(), ConfigError> {
        for (key, path) in self.referenced_files() {
            if let Err(e) = std::fs::File::open(path) {
                let err =
                    ConfigError::invalid(key, format!("cannot read `{}`: {e}", path.display()));
                return Err(match config_file {
                    Some(f) => err.with_origin(Origin::File(f.to_path_buf())),
                    None => err,
                });
            }
        }
        Ok(())
    }

    /// [`Config::to_toml`] with secrets (bridge passwords) replaced by `"<redacted>"`, for
    /// printing.
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        for b in &mut shown.bridge {
            if b.password.is_some() {
                b.password = Some("<redacted>".to_string());
            }
        }
        shown.to_toml()
    }

    /// The effective configuration as TOML (for `holdfast check-config`). Loading the
    /// output again gives the same `Config`.
    pub fn to_toml(&self) -> String {
        match toml::to_string(self) {
            Ok(text) => text,
            // Only a non-UTF-8 `data_dir` set programmatically can get here; loaded
            // configurations always come from strings.
            Err(e) => format!("# cannot render the configuration as TOML: {e}\n"),
        }
    }
}
