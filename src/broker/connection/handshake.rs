//! The CONNECT handshake of a connection: the will, the ACL, the per-user connection
//! slot, the password and the accepted parameters (`Connection::accept`).

use super::*;

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Refuses a will the client may not publish (its ACL, or `$SYS`) with 0x87 Not
    /// authorized (3.1.1: return code 5). Checked again when the will is published.
    pub(super) fn check_will(&self, st: &State, request: &Accepted) -> Result<(), u8> {
        let Some(w) = &request.will else {
            return Ok(());
        };
        if crate::broker::router::will_allowed(st.acl.as_deref(), &w.topic) {
            return Ok(());
        }
        info!(peer = %self.peer, client_id = %st.client_id, user = ?st.username, topic = %w.topic, "will refused: not authorized");
        Err(reason::NOT_AUTHORIZED)
    }

    /// Re-derives the client's ACL if a SIGHUP reloaded the ACL file since.
    pub(super) fn refresh_acl(&self, st: &mut State) {
        if st.acl.is_none() && !self.ctx.auth.checks_acl() {
            return;
        }
        let generation = self.ctx.auth.generation();
        if generation != st.acl_generation {
            st.acl_generation = generation;
            st.acl = self.ctx.auth.acl_for(st.username.as_deref(), &st.client_id);
        }
    }

    /// Takes a place under `auth.max_connections_per_user` for this user and client id
    /// (a takeover of a connected client id does not take a second one). Boxed: held for
    /// the connection's life, and only when that limit is set.
    pub(super) fn claim_user_slot(
        &self,
        st: &State,
    ) -> Result<Option<Box<crate::broker::ratelimit::UserSlot>>, u8> {
        self.shared
            .user_limit
            .claim(st.username.as_ref(), &st.client_id)
            .map(|slot| slot.map(Box::new))
            .map_err(|_| {
                info!(
                    peer = %self.peer,
                    listener = %self.ctx.name,
                    user = ?st.username,
                    client_id = %st.client_id,
                    "connections per user limit reached"
                );
                reason::QUOTA_EXCEEDED
            })
    }

    /// Checks the password of a user name from CONNECT against the password file (on a
    /// blocking thread). Client-certificate users and anonymous clients pass (the latter
    /// were already checked against `allow_anonymous`).
    pub(super) async fn authenticate(
        &self,
        st: &State,
        password: Option<bytes::Bytes>,
    ) -> Result<(), u8> {
        if self.cert_user.is_some() || !self.ctx.auth.checks_passwords() {
            return Ok(());
        }
        let Some(user) = &st.username else {
            return Ok(());
        };
        match self
            .ctx
            .auth
            .verify_password(user, password.as_deref())
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                info!(peer = %self.peer, listener = %self.ctx.name, user = %user, "bad user name or password");
                Err(reason::BAD_USER_NAME_OR_PASSWORD)
            }
            Err(busy) => {
                info!(peer = %self.peer, listener = %self.ctx.name, user = %user, cause = %busy, "CONNECT refused: password check not started within auth.hash_queue_timeout_ms");
                Err(reason::SERVER_UNAVAILABLE)
            }
        }
    }

    /// Checks the CONNECT and works out the session parameters and the CONNACK.
    /// `Err(reason)` refuses the connection.
    pub(super) fn accept(&self, c: Box<Connect>) -> Result<(Accepted, State), u8> {
        let cfg = &self.shared.cfg;
        let v5 = c.protocol.is_v5();
        if self.shared.connected.load(Ordering::Relaxed) >= cfg.max_connections {
            info!(peer = %self.peer, max = cfg.max_connections, "connection limit reached");
            return Err(reason::QUOTA_EXCEEDED);
        }
        if v5 && c.properties.authentication_method.is_some() {
            return Err(reason::BAD_AUTHENTICATION_METHOD);
        }
        let username: Option<Arc<str>> = match &self.cert_user {
            Some(name) => Some(name.as_str().into()),
            None => c.username.as_deref().map(Arc::from),
        };
        if !self.ctx.allow_anonymous && username.is_none() {
            return Err(reason::NOT_AUTHORIZED);
        }
        let mut assigned = None;
        let client_id: Arc<str> = if c.client_id.is_empty() {
            // MQTT-3.1.3-6/-8: only with clean start; 3.1 requires an id.
            if !c.clean_start || c.protocol == ProtocolVersion::V31 {
                return Err(reason::CLIENT_IDENTIFIER_NOT_VALID);
            }
            let id = assign_client_id();
            assigned = Some(id.clone());
            id.into()
        } else if crate::broker::client::is_reserved(&c.client_id) {
            // Reserved for internal clients (`client::Reserved`).
            return Err(reason::CLIENT_IDENTIFIER_NOT_VALID);
        } else {
            c.client_id.as_str().into()
        };
        if let Some(w) = &c.will {
            if !valid_topic(&w.topic, cfg) {
                return Err(reason::TOPIC_NAME_INVALID);
            }
            if w.qos as u8 > cfg.max_qos {
                return Err(reason::QOS_NOT_SUPPORTED);
            }
            if w.retain && !cfg.retain_available {
                return Err(reason::RETAIN_NOT_SUPPORTED);
            }
        }
        let requested_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            cfg.v3_session_expiry_secs
        };
        let expiry = requested_expiry.min(cfg.max_session_expiry_secs);
        // `server_keep_alive` overrides every client; `max_keep_alive` only lowers longer
        // keep-alives (and 0), as Mosquitto's max_keepalive: a 3.x client cannot be told
        // and is refused.
        let capped = cfg.max_keep_alive > 0
            && (c.keep_alive == 0 || c.keep_alive > cfg.max_keep_alive)
            && cfg.server_keep_alive.is_none();
        if capped && !v5 {
            info!(peer = %self.peer, keep_alive = c.keep_alive, max = cfg.max_keep_alive, "CONNECT refused: keep-alive above mqtt.max_keep_alive");
            return Err(reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        let keep_alive = match cfg.server_keep_alive {
            Some(k) => k,
            None if capped => cfg.max_keep_alive,
            None => c.keep_alive,
        };
        let client_receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        let params = ClientParams {
            protocol: c.protocol,
            window: cfg.max_inflight.min(client_receive_max).max(1),
            max_packet_size: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
            compact_packet_ids: false,
        };
        let mut props = ConnAckProperties::default();
        if v5 {
            if expiry != requested_expiry {
                props.session_expiry_interval = Some(expiry);
            }
            props.receive_maximum = Some(cfg.max_inflight);
            if cfg.max_qos < 2 {
                props.maximum_qos = Some(cfg.max_qos);
            }
            if !cfg.retain_available {
                props.retain_available = Some(0);
            }
            props.maximum_packet_size = Some(cfg.max_packet_size);
            props.assigned_client_identifier = assigned;
            props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifiers_available = Some(1);
            props.shared_subscription_available = Some(1);
            if cfg.server_keep_alive.is_some() || capped {
                props.server_keep_alive = Some(keep_alive);
            }
        }
        let state = State {
            client_id: client_id.clone(),
            username,
            acl: None,
            acl_generation: 0,
            rare: None,
            keep_alive_ms: std::num::NonZeroU32::new(u32::from(keep_alive) * 1500),
            connect_expiry: expiry,
            in_alias_max: if v5 { cfg.topic_alias_maximum } else { 0 },
            out_alias_max: if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            incoming_unacked: Unacked::default(),
            request_problem_info: c.properties.request_problem_information != Some(0),
            park_shift: 0,
        };
        let Connect {
            clean_start, will, ..
        } = *c;
        let request = Accepted {
            client_id,
            clean_start,
            expiry_interval: expiry,
            will,
            params,
            connack: ConnAck {
                session_present: false,
                reason_code: reason::SUCCESS,
                properties: props,
            },
        };
        Ok((request, state))
    }
}

/// A unique client id for clients that connect with an empty one (v5 Assigned Client
/// Identifier). Random per process, counter per connection.
pub(super) fn assign_client_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("holdfast-{:016x}", h.finish())
}

/// A connection attached to its session: what its main loop needs.
pub(super) struct Attached<R, W> {
    pub(super) conn: Connection<R, W>,
    pub(super) conn_id: ConnId,
    pub(super) state: State,
    pub(super) rx: LinkRx,
    /// Held until the connection ends: its place under `max_connections_per_user`.
    pub(super) _user_slot: Option<Box<crate::broker::ratelimit::UserSlot>>,
    /// When the client last sent something (the keep-alive clock).
    pub(super) last_read: Instant,
}

/// A CONNECT that passed the checks: the router request minus the connection link.
pub(super) struct Accepted {
    pub(super) client_id: Arc<str>,
    pub(super) clean_start: bool,
    pub(super) expiry_interval: u32,
    pub(super) will: Option<crate::protocol::Will>,
    pub(super) params: ClientParams,
    pub(super) connack: ConnAck,
}
