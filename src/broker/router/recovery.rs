//! Start-up of the router: the bridges' standing sessions (outboxes) and the sessions,
//! subscriptions, queues and retained messages recovered from the store.

use super::*;

impl Router {
    /// Creates (or updates) a standing durable session, such as a bridge's outbox, with
    /// exactly the given subscriptions and delivery policy. It exists from start-up, so
    /// messages are kept whether or not its owner is attached.
    pub(super) fn ensure_standing(&mut self, standing: StandingSession) {
        let StandingSession {
            client_id,
            filters,
            policy,
        } = standing;
        let params = ClientParams {
            protocol: crate::protocol::ProtocolVersion::V311,
            window: self.cfg.max_inflight,
            max_packet_size: u32::MAX,
            compact_packet_ids: policy.compact_packet_ids,
        };
        let sid = match self.sessions.sid_of(&client_id) {
            Some(sid) => sid,
            None => {
                let Some(sid) = self.ids.allocate() else {
                    error!(client_id = %client_id, "no free session id: internal session not created");
                    return;
                };
                let mut s = Session::new(sid, client_id.clone(), params, true);
                s.expiry_interval = u32::MAX;
                s.offline_since_ms = self.clock.now_ms();
                self.commits.ops.push(Op::UpsertSession {
                    sid,
                    client_id: client_id.clone(),
                    protocol: 4,
                    expiry: u32::MAX,
                    will: None,
                });
                self.commits.ops.push(Op::SessionOffline {
                    sid,
                    at_ms: s.offline_since_ms,
                    expiry: u32::MAX,
                    will: None,
                });
                self.sessions.insert(Box::new(s));
                sid
            }
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.params = params;
        s.set_own_policy(policy.limits, policy.queue_qos0);
        s.internal = policy.relay;
        let wanted: HashMap<String, SubscriptionData> = filters
            .into_iter()
            .map(|f| {
                (
                    f.filter,
                    SubscriptionData {
                        options: f.options,
                        identifier: None,
                    },
                )
            })
            .collect();
        let stale: Vec<String> = s
            .subscriptions
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .map(str::to_owned)
            .collect();
        for full in stale {
            s.subscriptions.remove(&full);
            let (filter, group) = crate::broker::session::split_share(&full);
            self.tree.unsubscribe(&filter, group.as_deref(), sid);
            self.commits.ops.push(Op::Unsubscribe { sid, filter: full });
        }
        for (full, data) in wanted {
            if s.subscriptions.get(&full) == Some(&data) {
                continue;
            }
            let (filter, group) = crate::broker::session::split_share(&full);
            self.tree
                .subscribe(&filter, group.as_deref(), sid, data.clone());
            self.commits.ops.push(Op::Subscribe {
                sid,
                filter: full.clone(),
                options: options_to_byte(&data.options),
                identifier: None,
            });
            s.subscriptions.insert(full, data);
        }
        info!(client_id = %client_id, subscriptions = s.subscriptions.len(), queued = s.queue_len, "internal session ready");
    }

    /// Rebuilds sessions, subscriptions, in-flight state and retained messages from the
    /// store. Queued messages stay on disk; they are read back when their client returns.
    pub(super) fn recover(&mut self, rec: Recovered) {
        let now = Instant::now();
        // On the store's time line, which continued from the last run counting the time
        // while stopped only if the wall clock could measure it (`crate::clock`).
        let now_ms = self.clock.now_ms();
        for (topic, expires, packet) in rec.retained {
            if let Some(p) = decode_publish(&packet) {
                self.retained.set(
                    &topic,
                    Some(Retained {
                        publish: p,
                        expires_at: store_to_instant(&self.clock, expires),
                    }),
                );
            }
        }
        let mut queued_total = 0;
        let count = rec.sessions.len();
        for rs in rec.sessions {
            let sid = rs.sid;
            let params = ClientParams {
                protocol: protocol_from_level(rs.protocol),
                window: self.cfg.max_inflight,
                max_packet_size: u32::MAX,
                compact_packet_ids: false,
            };
            let client_id: Arc<str> = rs.client_id.as_str().into();
            let mut s = Session::new(sid, client_id.clone(), params, true);
            s.charged = true;
            s.expiry_interval = rs.expiry;
            s.offline_since_ms = rs.disconnected_at.unwrap_or(now_ms);
            s.next_seq = rs.next_seq;
            s.dropped = rs.dropped;
            s.owner = crate::auth::SessionOwner::from_stored(rs.owner.as_deref());
            for sub in rs.subscriptions {
                let data = SubscriptionData {
                    options: options_from_byte(sub.options),
                    identifier: sub.identifier,
                };
                let (filter, group) = crate::broker::session::split_share(&sub.filter);
                self.tree
                    .subscribe(&filter, group.as_deref(), sid, data.clone());
                s.subscriptions.insert(sub.filter, data);
            }
            s.incoming_qos2 = rs.incoming_qos2.into_iter().map(|p| (p, 0)).collect();
            let mut last_inflight_seq = None;
            for row in rs.inflight {
                if row_message(&self.clock, &row).is_none() {
                    continue;
                }
                last_inflight_seq = Some(row.seq);
                s.inflight.push_back(Inflight {
                    packet_id: row.packet_id.unwrap_or(0),
                    seq: row.seq,
                    state: if row.state >= 2 {
                        InflightState::AwaitingComp
                    } else {
                        InflightState::AwaitingAck
                    },
                    // Every session is offline now: bodies stay on disk until it is back.
                    message: None,
                });
            }
            s.inflight_on_disk = s
                .inflight
                .iter()
                .any(|m| m.state == InflightState::AwaitingAck);
            let waiting = rs.queued.saturating_sub(s.inflight.len() as u64);
            s.queue_len = waiting;
            s.queued_bytes = rs.queued_bytes;
            queued_total += rs.queued;
            // Rows after the sent ones may wait on disk whatever the stored count says: the
            // first read-back tells (an empty answer clears `spilled_from`).
            let after_sent = last_inflight_seq.map_or(0, |q| q + 1);
            if rs.next_seq > after_sent {
                s.set_spilled_from(Some(after_sent));
            }
            s.will = rs.will.as_ref().and_then(will_from_stored).map(Box::new);
            // Timers: wills of sessions that were connected when the broker stopped are
            // due now (plus their delay); expiry counts from the disconnect.
            let offline_for = Duration::from_millis((now_ms - s.offline_since_ms).max(0) as u64);
            if let Some(w) = &s.will {
                let delay = Duration::from_secs(u64::from(
                    w.properties
                        .will_delay_interval
                        .unwrap_or(0)
                        .min(s.expiry_interval),
                ));
                let at = if rs.disconnected_at.is_some() {
                    (now + delay).checked_sub(offline_for).unwrap_or(now)
                } else {
                    now + delay
                };
                self.push_timer(Timer::new(self.epoch, at, sid, 0, TimerKind::WillDelay));
            }
            if s.expiry_interval != u32::MAX {
                let at = (now + Duration::from_secs(u64::from(s.expiry_interval)))
                    .checked_sub(offline_for)
                    .unwrap_or(now);
                self.push_timer(Timer::new(self.epoch, at, sid, 0, TimerKind::SessionExpiry));
            }
            if rs.disconnected_at.is_none() {
                self.commits.ops.push(Op::SessionOffline {
                    sid,
                    at_ms: now_ms,
                    expiry: s.expiry_interval,
                    will: rs.will.clone(),
                });
            }
            self.sessions.insert(Box::new(s));
        }
        if count > 0 {
            info!(
                sessions = count,
                queued = queued_total,
                retained = self.retained.len(),
                "durable state recovered"
            );
        }
        self.submit();
    }
}
