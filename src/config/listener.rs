//! `[[listener]]`: TCP, TLS and WebSocket listeners and their checks.

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `HOST:PORT`, e.g. `127.0.0.1:1883` or `0.0.0.0:1883`. Port 0 picks a free port.
    pub bind: String,
    /// Overrides `mqtt.allow_anonymous` for this listener. A listener on a non-loopback
    /// address that would accept unauthenticated clients is refused unless this is
    /// explicitly `true` (see `docs/security.md`).
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// PEM certificate chain: makes this a TLS listener (with `tls_key`). Reloaded on SIGHUP.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`. Reloaded on SIGHUP.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for client certificates; a verified client certificate's CN
    /// (or first DNS/e-mail SAN) becomes the client's user name.
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse TLS clients without a valid certificate (needs `tls_client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`) instead of bare MQTT; with
    /// `tls_cert` / `tls_key` it is `wss://`.
    #[serde(default)]
    pub websocket: bool,
    /// Request path of the WebSocket upgrade (needs `websocket = true`); `/mqtt` when unset.
    #[serde(default)]
    pub websocket_path: Option<String>,
}

impl ListenerConfig {
    /// A plain TCP listener on `bind` with every other setting at its default.
    pub fn new(bind: impl Into<String>) -> ListenerConfig {
        ListenerConfig {
            bind: bind.into(),
            allow_anonymous: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            require_client_cert: false,
            websocket: false,
            websocket_path: None,
        }
    }

    /// The upgrade path of a WebSocket listener (`websocket_path`, default `/mqtt`).
    pub fn websocket_path(&self) -> &str {
        self.websocket_path
            .as_deref()
            .unwrap_or(DEFAULT_WEBSOCKET_PATH)
    }

    /// Whether clients without a user name (or client certificate) may connect here.
    pub fn allows_anonymous(&self, mqtt: &MqttConfig) -> bool {
        self.allow_anonymous.unwrap_or(mqtt.allow_anonymous) && !self.require_client_cert
    }

    /// TLS settings and the network-exposure rule: a listener on a non-loopback address
    /// must verify its clients (password file or required client certificate) and refuse
    /// anonymous ones, unless `allow_anonymous = true` is set on it explicitly.
    pub(super) fn validate(&self, i: usize, cfg: &Config) -> Result<(), ConfigError> {
        let key = |k: &str| format!("listener[{i}].{k}");
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    key("tls_key"),
                    "`tls_cert` is set, so `tls_key` is required",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("tls_cert"),
                    "`tls_key` is set, so `tls_cert` is required",
                ))
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::invalid(
                key("tls_client_ca"),
                "client certificates need a TLS listener (`tls_cert` and `tls_key`)",
            ));
        }
        if self.require_client_cert && self.tls_client_ca.is_none() {
            return Err(ConfigError::invalid(
                key("require_client_cert"),
                "needs `tls_client_ca` (the CA that signs client certificates)",
            ));
        }
        if let Some(path) = &self.websocket_path {
            if !self.websocket {
                return Err(ConfigError::invalid(
                    key("websocket_path"),
                    "only applies to WebSocket listeners; set `websocket = true` as well",
                ));
            }
            check_websocket_path(path)
                .map_err(|m| ConfigError::invalid(key("websocket_path"), m))?;
        }
        let loopback = self.socket_addr().is_ok_and(|a| a.ip().is_loopback());
        if loopback || self.allow_anonymous == Some(true) {
            return Ok(());
        }
        if self.allows_anonymous(&cfg.mqtt) {
            return Err(ConfigError::invalid(
                key("allow_anonymous"),
                format!(
                    "listener `{}` is on a non-loopback address and would accept anonymous \
                     clients (mqtt.allow_anonymous); set `allow_anonymous = false` on it and \
                     configure `[auth] password_file` or client certificates, or set \
                     `allow_anonymous = true` on this listener to allow it explicitly",
                    self.bind
                ),
            ));
        }
        if cfg.auth.password_file.is_none() && !self.require_client_cert {
            return Err(ConfigError::invalid(
                key("allow_anonymous"),
                format!(
                    "listener `{}` is on a non-loopback address but cannot verify clients: \
                     user names are not checked without `[auth] password_file`; configure \
                     it (or `require_client_cert = true`), or set `allow_anonymous = true` \
                     on this listener to allow unverified clients explicitly",
                    self.bind
                ),
            ));
        }
        Ok(())
    }

    /// The address to bind: `bind` parsed as `IP:PORT` (IPv6 in brackets, `[::]:1883`);
    /// `localhost:PORT` means `127.0.0.1:PORT`. No DNS lookups.
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        if let Ok(addr) = self.bind.parse::<SocketAddr>() {
            return Ok(addr);
        }
        if let Some(port) = self.bind.strip_prefix("localhost:") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
            }
        }
        Err(format!(
            "`{}` is not an address: expected IP:PORT such as `0.0.0.0:1883`, \
             `127.0.0.1:1883`, `[::]:1883` or `localhost:1883`",
            self.bind
        ))
    }
}

/// Upgrade path of a WebSocket listener without `websocket_path`.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// A WebSocket path is compared byte for byte with the request's path (query removed), so
/// it must look like one: `/`, then visible ASCII without `?` or `#`.
pub(super) fn check_websocket_path(path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() <= 256
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{path}` is not a request path: expected `/` followed by up to 255 visible ASCII \
             characters without `?` or `#`, e.g. `/mqtt`"
        ))
    }
}
