//! SIGHUP: what a running gateway changes without a restart.
//!
//! On SIGHUP, `main` calls [`Reloader::reload`]:
//! 1. the broker re-reads the password file, the ACL file and the listeners' TLS
//!    certificates (`Broker::reload`; a file that fails to load keeps its previous version);
//! 2. the configuration file is read again, with the same `HOLDFAST_*` environment as at
//!    start. If it does not load or validate, the error (naming the key and the file) is
//!    logged and *nothing* of it is applied;
//! 3. otherwise the reloadable settings are applied ([`Reloader::apply`]) and every other
//!    changed key is listed in one warning: it keeps its old value until a restart.
//!
//! Reloadable keys ([`RELOADABLE_KEYS`]): `log.level` (ignored while `RUST_LOG` is set,
//! which wins), and the connection limits `mqtt.max_connection_rate`,
//! `mqtt.max_connection_burst`, `mqtt.connection_rate_exempt` and
//! `auth.max_connections_per_user` (for connections accepted from then on), and each
//! bridge's drain limits `max_rate` / `max_bytes_rate` (matched by `name`; applied at once,
//! also in the middle of a drain). Everything else needs a restart.
//!
//! To make another setting reloadable, apply it in [`Reloader::apply`] (the gateway is at
//! hand) and copy it into `applied`: the configuration in force, against which the
//! pending-restart keys are computed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tracing::{error, info, warn};

use crate::app::Gateway;
use crate::config::Config;
use crate::observe::{LevelChange, LogControl};

/// Keys a SIGHUP applies (documented in README and docs/operations.md).
pub const RELOADABLE_KEYS: &[&str] = &[
    "log.level",
    "mqtt.max_connection_rate",
    "mqtt.max_connection_burst",
    "mqtt.connection_rate_exempt",
    "auth.max_connections_per_user",
    "bridge.max_rate",
    "bridge.max_bytes_rate",
];

/// Holds the configuration in force and applies new versions of it.
pub struct Reloader {
    /// The `--config` file (None: defaults and environment only).
    file: Option<PathBuf>,
    /// What is in force: the start-up configuration plus every reloaded setting.
    applied: Config,
    log: LogControl,
}

impl Reloader {
    pub fn new(file: Option<PathBuf>, started_with: Config, log: LogControl) -> Reloader {
        Reloader {
            file,
            applied: started_with,
            log,
        }
    }

    /// The configuration in force.
    pub fn applied(&self) -> &Config {
        &self.applied
    }

    /// The whole SIGHUP (see the module doc). Returns the keys that changed in the file
    /// but need a restart, or None when the file did not load.
    pub fn reload(&mut self, broker: &Gateway) -> Option<Vec<String>> {
        broker.reload();
        match Config::load(self.file.as_deref()) {
            Ok(new) => Some(self.apply(&new, broker)),
            Err(e) => {
                error!(cause = %e, "configuration not reloaded; the previous settings stay in force");
                None
            }
        }
    }

    /// Applies the reloadable settings of `new` and warns about the others. Returns the
    /// keys whose new values need a restart.
    pub fn apply(&mut self, new: &Config, broker: &Gateway) -> Vec<String> {
        self.apply_log_level(new);
        self.apply_connection_limits(new, broker);
        self.apply_bridge_rates(new, broker);
        let pending = changed_keys(&self.applied, new);
        if pending.is_empty() {
            info!("configuration reloaded");
        } else {
            warn!(
                keys = %pending.join(", "),
                "configuration reloaded, but these changed settings need a restart; their previous values stay in force"
            );
        }
        pending
    }

    fn apply_connection_limits(&mut self, new: &Config, broker: &Gateway) {
        let mut a = self.applied.clone();
        a.mqtt.max_connection_rate = new.mqtt.max_connection_rate;
        a.mqtt.max_connection_burst = new.mqtt.max_connection_burst;
        a.mqtt.connection_rate_exempt = new.mqtt.connection_rate_exempt.clone();
        a.auth.max_connections_per_user = new.auth.max_connections_per_user;
        if a == self.applied {
            return;
        }
        match broker.set_connection_limits(&a.mqtt, &a.auth) {
            Ok(()) => {
                info!(
                    max_connection_rate = a.mqtt.max_connection_rate,
                    max_connection_burst = a.mqtt.max_connection_burst,
                    connection_rate_exempt = ?a.mqtt.connection_rate_exempt,
                    max_connections_per_user = a.auth.max_connections_per_user,
                    "connection limits changed"
                );
                self.applied = a;
            }
            Err(e) => error!(cause = %e, "connection limits not changed"),
        }
    }

    /// Drain limits of the bridges that exist (by name) both in force and in `new`.
    fn apply_bridge_rates(&mut self, new: &Config, broker: &Gateway) {
        let mut a = self.applied.clone();
        for b in &mut a.bridge {
            if let Some(n) = new.bridge.iter().find(|n| n.name == b.name) {
                b.max_rate = n.max_rate;
                b.max_bytes_rate = n.max_bytes_rate;
            }
        }
        if a == self.applied {
            return;
        }
        for name in broker.set_bridge_rates(&a.bridge) {
            if let Some(b) = a.bridge.iter().find(|b| b.name == name) {
                info!(bridge = %name, max_rate = b.max_rate, max_bytes_rate = b.max_bytes_rate, "bridge drain limits changed");
            }
        }
        self.applied = a;
    }

    fn apply_log_level(&mut self, new: &Config) {
        if new.log.level == self.applied.log.level {
            return;
        }
        match self.log.set_level(&new.log.level) {
            Ok(LevelChange::Applied) => {
                info!(from = %self.applied.log.level, to = %new.log.level, "log level changed");
                self.applied.log.level = new.log.level.clone();
            }
            Ok(LevelChange::OverriddenByRustLog) => {
                warn!("log.level changed, but RUST_LOG is set and wins; unset it and restart to use log.level");
                self.applied.log.level = new.log.level.clone();
            }
            Ok(LevelChange::NotInstalled) => {
                self.applied.log.level = new.log.level.clone();
            }
            Err(e) => error!(cause = %e, "log level not changed"),
        }
    }
}

/// Dotted keys (`mqtt.max_inflight`, `bridge[0].address`) whose values differ.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (flatten_config(old), flatten_config(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn flatten_config(cfg: &Config) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    if let Ok(table) = toml::from_str::<toml::Table>(&cfg.to_toml()) {
        flatten(String::new(), toml::Value::Table(table), &mut out);
    }
    out
}

fn flatten(prefix: String, value: toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(key, v, out);
            }
        }
        toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {
            for (i, v) in items.into_iter().enumerate() {
                flatten(format!("{prefix}[{i}]"), v, out);
            }
        }
        leaf => {
            out.insert(prefix, leaf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_leaves_and_table_array_entries() {
        let old = Config::default();
        assert!(changed_keys(&old, &old).is_empty());
        let mut new = old.clone();
        new.log.level = "debug".into();
        new.mqtt.max_inflight = 7;
        new.listener[0].bind = "127.0.0.1:1884".into();
        new.listener
            .push(crate::config::ListenerConfig::new("127.0.0.1:1885"));
        assert_eq!(
            changed_keys(&old, &new),
            vec![
                "listener[0].bind",
                "listener[1].bind",
                "listener[1].require_client_cert",
                "listener[1].websocket",
                "log.level",
                "mqtt.max_inflight",
            ]
        );
    }

    #[test]
    fn every_reloadable_key_exists() {
        let cfg = Config {
            bridge: vec![crate::bridge::BridgeConfig::example()],
            ..Config::default()
        };
        let keys = flatten_config(&cfg);
        for k in RELOADABLE_KEYS {
            // `bridge.max_rate` stands for `bridge[i].max_rate`.
            let k = k.replacen("bridge.", "bridge[0].", 1);
            assert!(keys.contains_key(&k), "{k}");
        }
    }
}
