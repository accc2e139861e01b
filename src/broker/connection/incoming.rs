//! What a connected client sends: each packet checked (topics, ACL, `$SYS`, limits,
//! topic aliases) and handed to the router, or answered here.

use super::*;

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Checks one packet from the client and passes it on. `Err` closes the connection;
    /// `Ok(Some(event))`: the router's channel is full, the caller waits to send `event`
    /// (not waited for here: this stays a plain function, so a packet and its event are
    /// not part of every connection task's state).
    pub(super) fn on_incoming(
        &mut self,
        conn: ConnId,
        st: &mut State,
        packet: Packet,
        now: Instant,
    ) -> Result<Option<RouterEvent>, Close> {
        let ev = match packet {
            Packet::Publish(p) => {
                let Some(p) = self.check_publish(st, p)? else {
                    return Ok(None);
                };
                RouterEvent::Publish {
                    conn,
                    publish: p,
                    received: now,
                }
            }
            Packet::PubAck(a) => RouterEvent::PubAck {
                conn,
                packet_id: a.packet_id,
            },
            Packet::PubRec(a) => RouterEvent::PubRec {
                conn,
                packet_id: a.packet_id,
                reason: a.reason_code,
            },
            Packet::PubRel(a) => RouterEvent::PubRel {
                conn,
                packet_id: a.packet_id,
            },
            Packet::PubComp(a) => RouterEvent::PubComp {
                conn,
                packet_id: a.packet_id,
            },
            Packet::Subscribe(s) => {
                for f in &s.filters {
                    if f.options.no_local && f.filter.starts_with("$share/") {
                        return Err(Close::Protocol(
                            reason::PROTOCOL_ERROR,
                            "No Local on a shared subscription",
                        ));
                    }
                }
                let Some(s) = self.check_subscribe(st, s) else {
                    return Ok(None);
                };
                RouterEvent::Subscribe { conn, subscribe: s }
            }
            Packet::Unsubscribe(u) => RouterEvent::Unsubscribe {
                conn,
                unsubscribe: u,
            },
            Packet::PingReq => {
                protocol::encode(&Packet::PingResp, self.version, &mut self.wbuf);
                return Ok(None);
            }
            Packet::Disconnect(d) => {
                let expiry = d.properties.session_expiry_interval;
                if let Some(e) = expiry {
                    if st.connect_expiry == 0 && e != 0 {
                        return Err(Close::Protocol(
                            reason::PROTOCOL_ERROR,
                            "Session Expiry Interval raised from 0 on DISCONNECT",
                        ));
                    }
                }
                return Err(Close::ClientDisconnect {
                    reason: d.reason_code,
                    expiry,
                });
            }
            Packet::Connect(_) => {
                return Err(Close::Protocol(reason::PROTOCOL_ERROR, "second CONNECT"))
            }
            Packet::Auth(_) => return Err(Close::Protocol(
                reason::PROTOCOL_ERROR,
                "AUTH without an authentication method (enhanced authentication is not supported)",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Err(Close::Protocol(
                    reason::PROTOCOL_ERROR,
                    "server-to-client packet sent by a client",
                ))
            }
        };
        match self.shared.router.try_send(ev) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(ev)) => Ok(Some(ev)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Close::Server(reason::SERVER_SHUTTING_DOWN))
            }
        }
    }

    /// Applies the ACL to a SUBSCRIBE: denied filters are removed and their positions
    /// remembered, so that `on_outgoing` can put 0x87 (3.x: 0x80) back into the router's
    /// SUBACK in the right places. `None`: every filter was denied and the SUBACK was
    /// answered here.
    pub(super) fn check_subscribe(
        &mut self,
        st: &mut State,
        mut s: crate::protocol::Subscribe,
    ) -> Option<crate::protocol::Subscribe> {
        self.refresh_acl(st);
        let Some(acl) = &st.acl else {
            return Some(s);
        };
        let mut denied = Vec::new();
        let mut i = 0;
        s.filters.retain(|f| {
            let ok = acl.can_subscribe(&f.filter);
            if !ok {
                denied.push(i);
            }
            i += 1;
            ok
        });
        if denied.is_empty() {
            return Some(s);
        }
        info!(client_id = %st.client_id, user = ?st.username, denied = denied.len(), "subscription denied by ACL");
        if s.filters.is_empty() {
            let ack = crate::protocol::SubAck {
                packet_id: s.packet_id,
                properties: Default::default(),
                reason_codes: vec![reason::NOT_AUTHORIZED; denied.len()],
            };
            protocol::encode(&Packet::SubAck(ack), self.version, &mut self.wbuf);
            return None;
        }
        st.rare().denied_subs.insert(s.packet_id, denied);
        Some(s)
    }

    /// Validates an incoming PUBLISH and resolves its topic alias. `Ok(None)` means the
    /// message was answered here and goes no further.
    pub(super) fn check_publish(
        &mut self,
        st: &mut State,
        mut p: Publish,
    ) -> Result<Option<Publish>, Close> {
        let cfg = &self.shared.cfg;
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(Close::Protocol(
                reason::PROTOCOL_ERROR,
                "Subscription Identifier in a client PUBLISH",
            ));
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > st.in_alias_max {
                return Err(Close::Protocol(
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias out of range",
                ));
            }
            if p.topic.is_empty() {
                match st.rare().in_aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(Close::Protocol(
                            reason::PROTOCOL_ERROR,
                            "unknown topic alias",
                        ))
                    }
                }
            } else if valid_topic(&p.topic, cfg) {
                st.rare().in_aliases.insert(alias, p.topic.clone());
            }
        }
        if !valid_topic(&p.topic, cfg) {
            return Err(Close::Protocol(
                reason::TOPIC_NAME_INVALID,
                "invalid topic name",
            ));
        }
        if p.qos as u8 > cfg.max_qos {
            return Err(Close::Protocol(
                reason::QOS_NOT_SUPPORTED,
                "QoS above the server maximum",
            ));
        }
        if p.retain && !cfg.retain_available {
            return Err(Close::Protocol(
                reason::RETAIN_NOT_SUPPORTED,
                "retain not supported",
            ));
        }
        // Receive Maximum is a v5 promise (MQTT-3.3.4-7); 3.x clients never heard of it, so
        // they are not held to it (their window is their own business).
        if p.qos != QoS::AtMostOnce
            && self.version.is_v5()
            && st.incoming_unacked.insert(p.packet_id) > usize::from(cfg.max_inflight)
        {
            return Err(Close::Protocol(
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                "more unacknowledged QoS 1/2 publishes than Receive Maximum",
            ));
        }
        self.refresh_acl(st);
        let sys = crate::auth::is_sys_topic(&p.topic);
        if sys
            || st
                .acl
                .as_ref()
                .is_some_and(|acl| !acl.can_publish(&p.topic))
        {
            // Not authorized: v5 gets PUBACK/PUBREC 0x87; 3.x clients cannot be told, so
            // the message is acknowledged as usual and dropped. QoS 0: dropped.
            debug!(client_id = %st.client_id, user = ?st.username, topic = %p.topic, sys, "publish not authorized");
            let code = if self.version.is_v5() {
                reason::NOT_AUTHORIZED
            } else {
                reason::SUCCESS
            };
            // 3.x QoS 2: the PUBREL that follows reaches the router, which answers PUBCOMP
            // for the unknown packet id.
            self.answer_unrouted(st, &p, code);
            return Ok(None);
        }
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            // MQTT-3.3.2-4 allows refusing it: answer with 0x99 and do not route it.
            self.answer_unrouted(st, &p, reason::PAYLOAD_FORMAT_INVALID);
            return Ok(None);
        }
        Ok(Some(p))
    }

    /// Acknowledges a publish that is not routed (PUBACK / PUBREC with `code`; nothing for
    /// QoS 0) and forgets its packet id.
    pub(super) fn answer_unrouted(&mut self, st: &mut State, p: &Publish, code: u8) {
        let ack = crate::protocol::PubAckLike::with_reason(p.packet_id, code);
        let packet = match p.qos {
            QoS::AtMostOnce => return,
            QoS::AtLeastOnce => Packet::PubAck(ack),
            QoS::ExactlyOnce => Packet::PubRec(ack),
        };
        st.incoming_unacked.remove(p.packet_id);
        protocol::encode(&packet, self.version, &mut self.wbuf);
    }
}

pub(super) fn valid_topic(t: &str, cfg: &MqttConfig) -> bool {
    topic::valid_topic_name(t)
        && t.len() <= cfg.max_topic_length
        && topic::level_count(t) <= cfg.max_topic_levels
}

/// Uses an outgoing topic alias when the client allows them: the first message on a topic
/// carries topic + new alias, later ones only the alias. Once the client's maximum is
/// reached, further topics go out in full.
pub(super) fn apply_out_alias(st: &mut State, p: &mut Publish) {
    let out_max = usize::from(st.out_alias_max);
    let aliases = &mut st.rare().out_aliases;
    if let Some(&alias) = aliases.get(&p.topic) {
        p.properties.topic_alias = Some(alias);
        p.topic = Arc::from("");
    } else if aliases.len() < out_max {
        let alias = aliases.len() as u16 + 1;
        aliases.insert(p.topic.clone(), alias);
        p.properties.topic_alias = Some(alias);
    }
}

/// MQTT-3.1.2-29: with Request Problem Information = 0 the server sends no Reason String or
/// User Properties except on PUBLISH, CONNACK and DISCONNECT.
pub(super) fn strip_problem_info(p: &mut Packet) {
    let props = match p {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            &mut a.properties
        }
        Packet::SubAck(a) => &mut a.properties,
        Packet::UnsubAck(a) => &mut a.properties,
        _ => return,
    };
    props.reason_string = None;
    props.user_properties.clear();
}
