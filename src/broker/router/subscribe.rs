//! SUBSCRIBE and UNSUBSCRIBE: filter checks, limits, granted QoS, retained messages on
//! subscribe.

use super::*;

impl Router {
    pub(super) fn on_subscribe(&mut self, conn: ConnId, sub: Subscribe) {
        let Some(sid) = self.by_conn.get(&conn, &self.sessions) else {
            return;
        };
        let cfg = self.cfg.clone();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut codes = Vec::with_capacity(sub.filters.len());
        // (filter, granted QoS, subscription identifier) whose retained messages to send.
        let mut want_retained: Vec<(String, QoS, Option<u32>)> = Vec::new();
        for f in &sub.filters {
            let (inner, group) = match topic::parse_shared(&f.filter) {
                Ok(Some((g, inner))) => (inner, Some(g)),
                Ok(None) => (f.filter.as_str(), None),
                Err(_) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if !valid_filter(inner, &cfg) {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            let is_new = !s.subscriptions.contains_key(&f.filter);
            if is_new
                && cfg.max_subscriptions_per_client > 0
                && s.subscriptions.len() >= cfg.max_subscriptions_per_client
            {
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let granted = f.options.qos.min(max_qos(&cfg));
            let mut options = f.options;
            options.qos = granted;
            let data = SubscriptionData {
                options,
                identifier: sub.subscription_identifier,
            };
            let existed = self.tree.subscribe(inner, group, sid, data.clone());
            if s.durable {
                // Taken back if the store refuses it (the SUBACK then says so).
                let before = s.subscriptions.get(&f.filter).cloned();
                self.commits.cur.subs.push((sid, f.filter.clone(), before));
                self.commits.ops.push(Op::Subscribe {
                    sid,
                    filter: f.filter.clone(),
                    options: options_to_byte(&options),
                    identifier: sub.subscription_identifier,
                });
            }
            s.subscriptions.insert(f.filter.clone(), data);
            codes.push(granted as u8);
            // Retained messages are not sent for shared subscriptions (MQTT-4.8.2).
            let send_retained = match f.options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if group.is_none() && send_retained {
                want_retained.push((inner.to_string(), granted, sub.subscription_identifier));
            }
        }
        let token = event_token(
            self.commits.ops.len(),
            self.commits.event_ops_start,
            self.commits.next_token,
        );
        let ack = Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            properties: AckProperties::default(),
            reason_codes: codes,
        });
        hold(
            s,
            token,
            Held::packet(ack),
            &mut self.commits.cur,
            &mut self.stats,
        );
        if want_retained.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut found = Vec::new();
        for (filter, granted, identifier) in want_retained {
            self.retained.for_each_match(&filter, |_, r| {
                if r.expires_at.is_some_and(|t| t <= now) {
                    return;
                }
                let mut p = r.publish.clone();
                p.qos = p.qos.min(granted);
                p.retain = true;
                p.properties.subscription_identifiers = identifier.into_iter().collect();
                found.push(Message {
                    publish: p,
                    expires_at: r.expires_at,
                    charge: None,
                });
            });
        }
        for msg in found {
            self.deliver(sid, msg);
        }
    }

    pub(super) fn on_unsubscribe(&mut self, conn: ConnId, unsub: Unsubscribe) {
        let Some(sid) = self.by_conn.get(&conn, &self.sessions) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut codes = Vec::with_capacity(unsub.filters.len());
        for full in &unsub.filters {
            let (inner, group) = match topic::parse_shared(full) {
                Ok(Some((g, inner))) => (inner, Some(g)),
                Ok(None) => (full.as_str(), None),
                Err(_) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if !valid_filter(inner, &self.cfg) {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if s.subscriptions.remove(full).is_some() {
                self.tree.unsubscribe(inner, group, sid);
                if s.durable {
                    self.commits.ops.push(Op::Unsubscribe {
                        sid,
                        filter: full.clone(),
                    });
                }
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        let token = event_token(
            self.commits.ops.len(),
            self.commits.event_ops_start,
            self.commits.next_token,
        );
        let ack = Packet::UnsubAck(UnsubAck {
            packet_id: unsub.packet_id,
            properties: AckProperties::default(),
            reason_codes: codes,
        });
        hold(
            s,
            token,
            Held::packet(ack),
            &mut self.commits.cur,
            &mut self.stats,
        );
    }
}
