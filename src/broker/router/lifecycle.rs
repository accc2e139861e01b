//! Sessions coming and going: CONNECT (new, resumed, taken over), disconnects, will delay
//! and session expiry timers, ending sessions, graceful shutdown.

use super::*;
use crate::auth::Identity;

impl Router {
    pub(super) fn on_connect(&mut self, req: ConnectRequest, identity: Option<Identity>) {
        if let Some(id) = &identity {
            if self.refuse_foreign_session(&req, id) {
                return;
            }
        }
        let ConnectRequest {
            link,
            client_id,
            clean_start,
            expiry_interval,
            will,
            params,
            mut connack,
        } = req;
        let mut wills = Vec::new();
        let mut resumed = false;
        if let Some(sid) = self.sessions.sid_of(&client_id) {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.generation = self.ids.generation();
                s.held.clear();
                if let Some(old) = s.conn.take() {
                    // Session takeover (MQTT-3.1.4-3): close the old connection.
                    info!(client_id = %client_id, "session taken over by a new connection");
                    self.by_conn.remove(old.id, sid);
                    old.send(Outgoing::Disconnect(reason::SESSION_TAKEN_OVER));
                    if let Some(w) = s.will.take() {
                        // The old connection did not DISCONNECT normally. Its will is
                        // delayed only if the session continues and a delay was asked for.
                        if clean_start || will_delay(&w) == 0 {
                            wills.extend(security::permitted_will(s, *w));
                        }
                    }
                } else if let Some(w) = s.will.take() {
                    // A delayed will is cancelled by reconnecting, unless the session ends.
                    if clean_start {
                        wills.extend(security::permitted_will(s, *w));
                    }
                }
                resumed = !clean_start;
            }
            if !resumed {
                self.end_session(sid, "clean start");
            }
        }
        for w in wills {
            self.publish_will(w);
        }

        let sid = match self.sessions.sid_of(&client_id) {
            Some(sid) if resumed => sid,
            _ => {
                let Some(sid) = self.ids.allocate() else {
                    // As many sessions as there are ids (8.4 million): refuse, never wrap.
                    error!(client_id = %client_id, "no free session id: connection refused");
                    connack.reason_code = reason::SERVER_UNAVAILABLE;
                    link.send(Outgoing::Packet(Box::new(Packet::ConnAck(connack))));
                    link.send(Outgoing::Disconnect(reason::SERVER_UNAVAILABLE));
                    return;
                };
                let durable = expiry_interval > 0;
                let mut s = Session::new(sid, client_id.clone(), params, durable);
                s.charged = true;
                s.generation = self.ids.generation();
                self.sessions.insert(Box::new(s));
                sid
            }
        };
        if let Some(id) = identity {
            self.adopt_identity(sid, id);
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let conn = link.id;
        s.conn = Some(link);
        self.by_conn.insert(conn, sid, &self.sessions);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        // One copy of the client id per connected session, the connection's: the session's
        // own (from when it was created) is given back. Equal, so the client-id index holds.
        if !Arc::ptr_eq(&s.client_id, &client_id) {
            s.client_id = client_id;
        }
        s.params = params;
        s.expiry_interval = expiry_interval;
        s.will = will.map(Box::new);
        // A session kept in memory only, resumed with a Session Expiry Interval, is durable
        // from now on: write what it holds, or what it acknowledges would die with the process.
        let promote = !s.durable && expiry_interval > 0;
        s.durable |= promote;
        if s.durable && resumed {
            self.commits.ops.push(Op::MarkOnline { sid });
        }
        if s.durable {
            self.commits.ops.push(Op::UpsertSession {
                sid,
                client_id: s.client_id.clone(),
                protocol: params.protocol.level(),
                expiry: expiry_interval,
                will: s.will.as_deref().map(will_to_stored),
            });
            self.commits.ops.extend(Router::owner_op(s));
        }
        if promote {
            session_state_ops(&self.clock, s, &mut self.commits.ops);
        }
        connack.session_present = resumed;
        let token = event_token(
            self.commits.ops.len(),
            self.commits.event_ops_start,
            self.commits.next_token,
        );
        hold(
            s,
            token,
            Held::packet(Packet::ConnAck(connack)),
            &mut self.commits.cur,
            &mut self.stats,
        );
        debug!(client_id = %s.client_id, resumed, durable = s.durable, "session attached");

        if resumed && s.inflight_on_disk {
            // The window's bodies are on disk: it is resent, PUBRELs included and in the
            // original order, once read back (`Router::on_inflight_rows`).
            self.pump(sid);
        } else if resumed {
            // Resend what was in flight, in order, DUP set (MQTT-4.4.0-1).
            let now = Instant::now();
            let mut i = 0;
            while i < s.inflight.len() {
                let m = &s.inflight[i];
                let item = match (m.state, &m.message) {
                    // On disk: read back, then resent (`Router::on_inflight_rows`).
                    (InflightState::AwaitingAck, None) => {
                        i += 1;
                        continue;
                    }
                    (InflightState::AwaitingAck, Some(message)) => {
                        if message.is_expired(now) {
                            self.stats.expired += 1;
                            if s.durable {
                                self.commits.ops.push(Op::Delete { sid, seq: m.seq });
                            }
                            s.inflight.remove(i);
                            continue;
                        }
                        Held::Deliver {
                            packet_id: m.packet_id,
                            dup: true,
                            fresh: false,
                        }
                    }
                    (InflightState::AwaitingComp, _) => {
                        Held::packet(Packet::PubRel(PubAckLike::new(m.packet_id)))
                    }
                };
                hold(s, 0, item, &mut self.commits.cur, &mut self.stats);
                i += 1;
            }
            self.pump(sid);
        }
    }

    pub(super) fn on_disconnected(
        &mut self,
        conn: ConnId,
        will: WillAction,
        session_expiry: Option<u32>,
    ) {
        let Some(sid) = self.by_conn.take(&conn, &self.sessions) else {
            return; // already taken over
        };
        self.ungate_waiters(sid);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.conn = None;
        s.held.clear();
        s.generation = self.ids.generation();
        if let Some(e) = session_expiry {
            s.expiry_interval = e.min(self.cfg.max_session_expiry_secs);
        }
        let will = match will {
            WillAction::Publish => s.will.take().and_then(|w| security::permitted_will(s, *w)),
            WillAction::Discard => {
                s.will = None;
                None
            }
        };
        debug!(client_id = %s.client_id, will = will.is_some(), "client disconnected");
        let now = Instant::now();
        if s.expiry_interval == 0 {
            if let Some(w) = will {
                self.publish_will(w);
            }
            self.end_session(sid, "session expiry interval 0");
            return;
        }
        let generation = s.generation;
        let mut publish_now = None;
        if let Some(w) = will {
            let delay = will_delay(&w).min(s.expiry_interval);
            if delay == 0 {
                publish_now = Some(w);
            } else {
                s.will = Some(Box::new(w));
                self.timers.push(Reverse(Timer::new(
                    self.epoch,
                    now + Duration::from_secs(u64::from(delay)),
                    sid,
                    generation,
                    TimerKind::WillDelay,
                )));
            }
        }
        if s.expiry_interval != u32::MAX {
            self.timers.push(Reverse(Timer::new(
                self.epoch,
                now + Duration::from_secs(u64::from(s.expiry_interval)),
                sid,
                generation,
                TimerKind::SessionExpiry,
            )));
        }
        if s.durable {
            s.spill_all();
            s.inflight_to_disk();
            s.offline_since_ms = self.clock.now_ms();
            self.commits.ops.push(Op::SessionOffline {
                sid,
                at_ms: s.offline_since_ms,
                expiry: s.expiry_interval,
                will: s.will.as_deref().map(will_to_stored),
            });
        }
        if let Some(w) = publish_now {
            self.publish_will(w);
        }
        self.bound_timers();
    }

    /// Arms a will-delay or session-expiry timer. Timers of earlier connections are not
    /// removed when a session comes and goes (they are skipped when they fire), so a
    /// client reconnecting every minute with a day of expiry would leave 1,440 behind a
    /// day: once the heap holds more than twice the sessions (plus `TIMER_SLACK`), the
    /// stale ones are swept out. Amortised O(1) per timer; memory bounded by the sessions.
    pub(super) fn push_timer(&mut self, t: Timer) {
        self.timers.push(Reverse(t));
        self.bound_timers();
    }

    /// Sweeps stale timers out once there are too many (see `push_timer`).
    pub(super) fn bound_timers(&mut self) {
        if self.timers.len() > 2 * self.sessions.len() + TIMER_SLACK {
            let sessions = &self.sessions;
            self.timers.retain(|Reverse(t)| {
                sessions
                    .get(&t.session())
                    .is_some_and(|s| s.generation == t.generation && !s.is_online())
            });
        }
    }

    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(t)) = self.timers.peek().copied() {
            if t.at(self.epoch) > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&t.session()) else {
                continue;
            };
            if s.generation != t.generation || s.is_online() {
                continue;
            }
            match t.kind {
                TimerKind::WillDelay => {
                    if let Some(w) = s.will.take() {
                        let w = security::permitted_will(s, *w);
                        if s.durable {
                            self.commits.ops.push(Op::SessionOffline {
                                sid: t.session(),
                                at_ms: s.offline_since_ms,
                                expiry: s.expiry_interval,
                                will: None,
                            });
                        }
                        if let Some(w) = w {
                            self.publish_will(w);
                        }
                    }
                }
                TimerKind::SessionExpiry => {
                    if let Some(w) = s.will.take().and_then(|w| security::permitted_will(s, *w)) {
                        self.publish_will(w);
                    }
                    self.stats.sessions_expired += 1;
                    self.commits.ops.push(Op::Count {
                        name: "sessions_expired",
                        add: 1,
                    });
                    self.end_session(t.session(), "session expired");
                }
            }
        }
    }

    /// Removes a session and everything it holds. Queued messages go with it (counted).
    pub(super) fn end_session(&mut self, sid: SessionId, why: &str) {
        self.ungate_waiters(sid);
        let Some(s) = self.sessions.remove(&sid) else {
            return;
        };
        let keys = s.tree_keys();
        self.tree
            .unsubscribe_all(sid, keys.iter().map(|(f, g)| (f.as_str(), g.as_deref())));
        if s.durable {
            self.commits.ops.push(Op::DeleteSession { sid });
            // Free once that commit is reported (see `ids`).
            self.ids
                .release(sid, self.commits.next_token, self.commits.completed);
        } else {
            self.ids.release(sid, 0, self.commits.completed);
        }
        let lost = s.queue_len + s.inflight.len() as u64;
        if lost > 0 {
            info!(client_id = %s.client_id, messages = lost, why, "session ended with undelivered messages");
        } else {
            debug!(client_id = %s.client_id, why, "session ended");
        }
    }

    pub(super) async fn shutdown(&mut self) {
        // Connections are closed by the server, so their wills are due (MQTT-3.1.2-8),
        // unless a Will Delay outlasts this restart (durable sessions keep it on disk).
        // Sessions that are not durable end now, and so do their delayed wills.
        let mut wills = Vec::new();
        let now_ms = self.clock.now_ms();
        for s in self.sessions.values_mut() {
            let online = s.conn.is_some();
            if s.durable {
                if online {
                    let keep = s.will.as_ref().is_some_and(|w| will_delay(w) > 0);
                    if !keep {
                        let w = s.will.take();
                        wills.extend(w.and_then(|w| security::permitted_will(s, *w)));
                    }
                    self.commits.ops.push(Op::SessionOffline {
                        sid: s.id,
                        at_ms: now_ms,
                        expiry: s.expiry_interval,
                        will: s.will.as_deref().map(will_to_stored),
                    });
                }
            } else {
                let w = s.will.take();
                wills.extend(w.and_then(|w| security::permitted_will(s, *w)));
            }
        }
        for w in wills {
            self.publish_will(w);
        }
        for s in self.sessions.values_mut() {
            s.held.clear();
            if let Some(c) = s.conn.take() {
                c.send(Outgoing::Disconnect(reason::SERVER_SHUTTING_DOWN));
            }
        }
        self.close_store().await;
        info!(stats = ?self.stats, "router stopped");
    }
}
