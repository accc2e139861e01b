//! Messages: incoming PUBLISH and the QoS 1/2 acknowledgement flows in both directions,
//! wills, routing to matching sessions, delivery into windows and queues, and pumping
//! queues (from memory or read back from disk) into the in-flight window.

use super::*;

impl Router {
    pub(super) fn on_publish(&mut self, conn: ConnId, publish: Publish, received: Instant) {
        let Some(sid) = self.by_conn.get(&conn, &self.sessions) else {
            return;
        };
        self.stats.publishes_in += 1;
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        if qos == QoS::ExactlyOnce {
            if let Some(s) = self.sessions.get_mut(&sid) {
                if let Some(&stored_by) = s.incoming_qos2.get(&packet_id) {
                    // A resend of a message we already have: don't route again; acknowledge
                    // once what it was stored with is committed (the first PUBREC may have
                    // died with an earlier connection before that).
                    let token = if stored_by > self.commits.completed {
                        match self.commits.pending.get_mut(&stored_by) {
                            Some(p) => p.sids.push(sid),
                            None => self.commits.cur.sids.push(sid),
                        }
                        stored_by
                    } else {
                        0
                    };
                    let item = Held::PubAck {
                        packet_id,
                        qos2: true,
                        code: reason::SUCCESS,
                    };
                    if token == 0 && s.held.is_empty() {
                        hold(s, 0, item, &mut self.commits.cur, &mut self.stats);
                    } else if s.conn.is_some() {
                        s.held.push_back((token, item));
                    }
                    return;
                }
            }
        }
        let expires_at = publish
            .properties
            .message_expiry_interval
            .map(|secs| received + Duration::from_secs(u64::from(secs)));
        self.route_gated = false;
        let outcome = self.route(Some(sid), publish, expires_at);
        let gated = std::mem::take(&mut self.route_gated);
        let code = match outcome {
            RouteOutcome::Delivered => reason::SUCCESS,
            RouteOutcome::NoSubscribers => reason::NO_MATCHING_SUBSCRIBERS,
            RouteOutcome::QuotaExceeded => reason::QUOTA_EXCEEDED,
        };
        if qos == QoS::AtMostOnce {
            return;
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if code == reason::QUOTA_EXCEEDED && !s.params.protocol.is_v5() {
            // 3.x has no way to say "quota exceeded": leave the message unacknowledged so
            // the client keeps it and retries later (the refusal was logged by the queue).
            return;
        }
        if qos == QoS::ExactlyOnce && code < 0x80 && s.durable {
            self.commits.ops.push(Op::IncomingQos2 {
                sid,
                packet_id,
                present: true,
            });
        }
        let mut token = event_token(
            self.commits.ops.len(),
            self.commits.event_ops_start,
            self.commits.next_token,
        );
        if qos == QoS::ExactlyOnce && code < 0x80 {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.incoming_qos2.insert(packet_id, token);
            }
            if token != 0 {
                self.commits.cur.qos2.push((sid, packet_id));
            }
        }
        if gated {
            token |= GATE_BIT;
        } else if qos == QoS::AtLeastOnce && token != 0 && code == reason::SUCCESS {
            // The only durable op of this publish is one bridge outbox row: its PUBACK may
            // go as soon as the upstream accepts the message, if that comes first.
            if let [Op::Enqueue {
                sid: outbox, seq, ..
            }] = &self.commits.ops[self.commits.event_ops_start..]
            {
                let (outbox, seq) = (*outbox, *seq);
                if self.sessions.get(&outbox).is_some_and(|o| o.internal) {
                    self.commits
                        .early
                        .insert((outbox, seq), (sid, packet_id, token));
                    self.commits.early_order.push_back((token, (outbox, seq)));
                }
            }
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let item = Held::PubAck {
            packet_id,
            qos2: qos == QoS::ExactlyOnce,
            code,
        };
        hold(s, token, item, &mut self.commits.cur, &mut self.stats);
    }

    pub(super) fn on_pubrel(&mut self, conn: ConnId, packet_id: u16) {
        let Some(sid) = self.by_conn.get(&conn, &self.sessions) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let code = if s.incoming_qos2.remove(&packet_id).is_some() {
            if s.durable {
                self.commits.ops.push(Op::IncomingQos2 {
                    sid,
                    packet_id,
                    present: false,
                });
            }
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        let token = event_token(
            self.commits.ops.len(),
            self.commits.event_ops_start,
            self.commits.next_token,
        );
        let comp = Packet::PubComp(PubAckLike::with_reason(packet_id, code));
        hold(
            s,
            token,
            Held::packet(comp),
            &mut self.commits.cur,
            &mut self.stats,
        );
    }

    /// PUBACK (expecting `AwaitingAck`) or PUBCOMP (expecting `AwaitingComp`).
    pub(super) fn on_ack(&mut self, conn: ConnId, packet_id: u16, expect: InflightState) {
        let Some(sid) = self.by_conn.get(&conn, &self.sessions) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if let Some(i) = s.inflight_position(packet_id) {
            if s.inflight[i].state == expect {
                if let Some(m) = s.inflight.remove(i) {
                    if s.durable {
                        self.commits.ops.push(Op::Delete { sid, seq: m.seq });
                    }
                }
                self.pump(sid);
            }
        }
    }

    /// The upstream accepted outbox message `packet_id`: completes it as a PUBACK, and
    /// releases the publisher's PUBACK if it waited only for this message's row.
    pub(super) fn on_upstream_ack(&mut self, conn: ConnId, packet_id: u16) {
        let seq = self
            .by_conn
            .get(&conn, &self.sessions)
            .and_then(|sid| self.sessions.get(&sid).map(|s| (sid, s)))
            .and_then(|(sid, s)| {
                let i = s.inflight_position(packet_id)?;
                (s.inflight[i].state == InflightState::AwaitingAck)
                    .then(|| (sid, s.inflight[i].seq))
            });
        self.on_ack(conn, packet_id, InflightState::AwaitingAck);
        let Some(key) = seq else {
            return;
        };
        let Some((publisher, publisher_id, token)) = self.commits.early.remove(&key) else {
            return;
        };
        if token <= self.commits.completed {
            return; // committed meanwhile: released already
        }
        let Some(s) = self.sessions.get_mut(&publisher) else {
            return;
        };
        let waiting = s.held.iter_mut().find(|(t, item)| {
            *t == token && matches!(item, Held::PubAck { packet_id, qos2: false, .. } if *packet_id == publisher_id)
        });
        if let Some((t, _)) = waiting {
            *t = 0;
            self.stats.acked_by_upstream += 1;
            flush_held(s, self.commits.completed, &mut self.stats);
        }
    }

    pub(super) fn on_pubrec(&mut self, conn: ConnId, packet_id: u16, code: u8) {
        let Some(sid) = self.by_conn.get(&conn, &self.sessions) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        match s.inflight_position(packet_id) {
            Some(i) if code >= 0x80 => {
                // The receiver refused the message: it is done (MQTT-4.3.3).
                if let Some(m) = s.inflight.remove(i) {
                    if s.durable {
                        self.commits.ops.push(Op::Delete { sid, seq: m.seq });
                    }
                }
                self.pump(sid);
            }
            Some(i) => {
                s.inflight[i].state = InflightState::AwaitingComp;
                if s.durable {
                    let seq = s.inflight[i].seq;
                    self.commits.ops.push(Op::MarkReleased { sid, seq });
                }
                let token = event_token(
                    self.commits.ops.len(),
                    self.commits.event_ops_start,
                    self.commits.next_token,
                );
                let rel = Packet::PubRel(PubAckLike::new(packet_id));
                hold(
                    s,
                    token,
                    Held::packet(rel),
                    &mut self.commits.cur,
                    &mut self.stats,
                );
            }
            None => {
                let rel = Packet::PubRel(PubAckLike::with_reason(
                    packet_id,
                    reason::PACKET_IDENTIFIER_NOT_FOUND,
                ));
                hold(
                    s,
                    0,
                    Held::packet(rel),
                    &mut self.commits.cur,
                    &mut self.stats,
                );
            }
        }
    }

    pub(super) fn publish_will(&mut self, w: Will) {
        let expires_at = w
            .properties
            .message_expiry_interval
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
        debug!(topic = %w.topic, "publishing will");
        self.route(None, will_publish(&w), expires_at);
    }

    /// Stores a retained message if asked, then hands a copy to every matching session.
    pub(super) fn route(
        &mut self,
        publisher: Option<SessionId>,
        mut publish: Publish,
        expires_at: Option<Instant>,
    ) -> RouteOutcome {
        publish.dup = false;
        publish.packet_id = 0;
        publish.properties.topic_alias = None;
        publish.properties.subscription_identifiers.clear();
        if publish.retain {
            let value = (!publish.payload.is_empty()).then(|| Retained {
                publish: publish.clone(),
                expires_at,
            });
            self.commits.ops.push(Op::Retain {
                topic: publish.topic.clone(),
                message: value.as_ref().map(|r| {
                    (
                        instant_to_store(&self.clock, r.expires_at),
                        encode_publish(&r.publish),
                    )
                }),
            });
            // Visible at once; the publisher's ack still waits for the commit.
            self.retained.set(&publish.topic, value);
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        {
            let sessions = &self.sessions;
            self.tree.matches(
                &publish.topic,
                publisher,
                |sid| sessions.get(&sid).is_some_and(|s| s.is_online()),
                &mut matches,
            );
        }
        let mut outcome = if matches.is_empty() {
            RouteOutcome::NoSubscribers
        } else {
            RouteOutcome::Delivered
        };
        for m in matches.drain(..) {
            let mut p = publish.clone();
            p.qos = p.qos.min(m.qos);
            p.retain = publish.retain && m.retain_as_published;
            p.properties.subscription_identifiers = m.identifiers;
            let msg = Message {
                publish: p,
                expires_at,
                charge: None,
            };
            let target = m.session;
            if !self.deliver(target, msg) {
                outcome = RouteOutcome::QuotaExceeded;
            }
            // Backpressure: a clean online subscriber falling behind a QoS 1/2 publisher
            // holds the publisher's acknowledgements until it catches up.
            if let (Some(p), true) = (publisher, publish.qos != QoS::AtMostOnce) {
                if let Some(t) = self.sessions.get_mut(&target) {
                    if p != target && !t.durable && t.is_online() && t.queue_len >= GATE_HIGH {
                        if !t.gated.contains(&p) {
                            t.gated.push(p);
                        }
                        self.route_gated = true;
                    }
                }
            }
        }
        self.matches = matches;
        outcome
    }

    /// Hands one message to a session: sent now if the client is online and its window is
    /// open, otherwise queued (in memory, or on disk for durable sessions), subject to the
    /// queue limits. Returns false if the `reject-new` policy refused it.
    pub(super) fn deliver(&mut self, sid: SessionId, msg: Message) -> bool {
        let Router {
            sessions,
            cfg,
            stats,
            commits:
                super::commits::Commits {
                    ops,
                    cur,
                    next_token,
                    ..
                },
            ..
        } = self;
        let Some(s) = sessions.get_mut(&sid) else {
            return true;
        };
        if super::security::filtered_out(s, &msg.publish.topic) {
            return true; // denied to this subscriber by a deny rule its filter overlaps
        }
        let mut msg = msg;
        if msg.publish.qos == QoS::AtMostOnce
            && s.queue_qos0()
                .iter()
                .any(|f| topic::matches(f, &msg.publish.topic))
        {
            msg.publish.qos = QoS::AtLeastOnce;
        }
        if let Some(age) = s.limits().map(|l| l.max_age_secs).filter(|a| *a > 0) {
            let cap = Instant::now() + Duration::from_secs(u64::from(age));
            msg.expires_at = Some(msg.expires_at.map_or(cap, |t| t.min(cap)));
        }
        if !fits(s, &msg.publish) {
            stats.dropped_too_large += 1;
            debug!(client_id = %s.client_id, "message larger than the client's maximum packet size dropped");
            return true;
        }
        if s.durable && s.next_seq > crate::store::MAX_SEQ {
            // 2^40 messages without the queue ever empty at a start-up: refuse, never wrap
            // onto older rows (see `store::Sid`).
            note_drop(s, stats, "sequence numbers exhausted");
            return false;
        }
        let now = Instant::now();
        if msg.publish.qos == QoS::AtMostOnce {
            if let Some(c) = &s.conn {
                let limit = cfg.max_queued_messages.max(1000);
                if c.backlog() >= limit {
                    stats.dropped_qos0_backlog += 1;
                    return true;
                }
                let p = msg.to_send(0, false, now);
                hold(s, 0, Held::packet(Packet::Publish(p)), cur, stats);
                return true;
            }
            if !(cfg.queue_qos0_offline && s.expiry_interval > 0) {
                if s.internal {
                    // A bridge outbox while the upstream is unreachable: not silent.
                    s.dropped += 1;
                    stats.dropped_qos0_bridge_offline += 1;
                    if !s.drop_episode {
                        s.drop_episode = true;
                        warn!(client_id = %s.client_id, "QoS 0 messages for a bridge whose upstream is unreachable are dropped (counted; set queue_qos0 on the rule to keep them; logged once until the outbox drains)");
                    }
                }
                return true;
            }
        } else if s.window_open() && s.queue_empty() && s.mem_fits(&msg, &self.pool) {
            // (No room under the read-back budget: queued on disk, read back in turn.)
            s.charge(&mut msg, &self.pool);
            let packet_id = s.allocate_packet_id();
            let seq = s.take_seq();
            let mut token = 0;
            if s.durable {
                ops.push(Op::Enqueue {
                    sid,
                    seq,
                    packet_id: Some(packet_id),
                    expires_at: instant_to_store(&self.clock, msg.expires_at),
                    size: msg.publish.payload.len() as u32,
                    packet: encode_publish(&msg.publish),
                });
                // An internal session's QoS 1 delivery does not wait for the commit
                // (see `Session::internal`).
                if !(s.internal && msg.publish.qos == QoS::AtLeastOnce) {
                    token = *next_token;
                    // If the commit fails the message was not accepted: it leaves the
                    // window again, even if the connection (and the held send) is gone.
                    cur.enqueued
                        .push((sid, seq, msg.publish.payload.len() as u64));
                }
            }
            s.inflight.push_back(Inflight {
                packet_id,
                seq,
                state: InflightState::AwaitingAck,
                message: Some(Box::new(msg)),
            });
            let item = Held::Deliver {
                packet_id,
                dup: false,
                fresh: token != 0,
            };
            hold(s, token, item, cur, stats);
            return true;
        }
        // Queue it, making room first if the queue is full.
        let len = msg.publish.payload.len() as u64;
        let limits = s.limits().unwrap_or(if s.durable {
            // On disk: bounded by the store's disk budget unless the operator opted in.
            QueueLimits {
                max_messages: cfg.durable_max_queued_messages,
                max_bytes: cfg.durable_max_queued_bytes,
                policy: cfg.queue_policy,
                max_age_secs: 0,
            }
        } else {
            QueueLimits {
                max_messages: cfg.max_queued_messages as u64,
                max_bytes: cfg.max_queued_bytes,
                policy: cfg.queue_policy,
                max_age_secs: 0,
            }
        });
        let full = |s: &Session| {
            (limits.max_messages > 0 && s.queue_len >= limits.max_messages)
                || (limits.max_bytes > 0 && s.queued_bytes + len > limits.max_bytes)
        };
        if full(s) {
            match limits.policy {
                QueuePolicy::RejectNew => {
                    note_drop(s, stats, "reject-new");
                    return false;
                }
                QueuePolicy::DropOldest => {
                    while full(s) && s.queue_len > 0 {
                        if let Some(q) = s.pop_queue() {
                            if s.durable {
                                ops.push(Op::Drop { sid, seq: q.seq });
                                cur.drops.push(DropUndo::Popped(sid, Box::new(q)));
                            }
                        } else {
                            // The oldest is on disk only; its exact size is known to the
                            // store, the router accounts the average queued size.
                            let average = s.queued_bytes / s.queue_len.max(1);
                            s.forget_queued(average);
                            if s.reading {
                                // They are the first rows of the answer on its way (the
                                // store reads before it sees this): deleted when it comes.
                                s.drops_pending += 1;
                                s.drops_pending_bytes += average;
                                cur.drops.push(DropUndo::Pending(sid, average));
                            } else {
                                ops.push(Op::DeleteOldest {
                                    sid,
                                    from_seq: s.spilled_from().unwrap_or(0),
                                    count: 1,
                                    refusable: true,
                                });
                                cur.drops.push(DropUndo::Oldest(sid, average));
                            }
                        }
                        note_drop(s, stats, "drop-oldest");
                    }
                    if full(s) {
                        // A single message larger than the byte budget.
                        note_drop(s, stats, "drop-oldest");
                        return true;
                    }
                }
            }
        }
        let seq = s.take_seq();
        if s.durable {
            ops.push(Op::Enqueue {
                sid,
                seq,
                packet_id: None,
                expires_at: instant_to_store(&self.clock, msg.expires_at),
                size: len as u32,
                packet: encode_publish(&msg.publish),
            });
            cur.enqueued.push((sid, seq, len));
        }
        s.push_queue(Queued { seq, message: msg }, &self.pool);
        true
    }

    /// Moves queued messages into the in-flight window while it has room, reading the
    /// queue back from disk when the in-memory part runs out.
    pub(super) fn pump(&mut self, sid: SessionId) {
        let want_read;
        {
            let Router {
                sessions,
                stats,
                commits:
                    super::commits::Commits {
                        ops,
                        cur,
                        next_token,
                        ..
                    },
                ..
            } = self;
            let Some(s) = sessions.get_mut(&sid) else {
                return;
            };
            let now = Instant::now();
            while s.window_open() {
                let Some(q) = s.pop_queue() else {
                    break;
                };
                let drop_row = q.message.is_expired(now) || !fits(s, &q.message.publish);
                if drop_row || q.message.publish.qos == QoS::AtMostOnce {
                    if s.durable {
                        ops.push(Op::Delete { sid, seq: q.seq });
                    }
                    if drop_row {
                        stats.expired += 1;
                    } else {
                        let p = q.message.to_send(0, false, now);
                        hold(s, 0, Held::packet(Packet::Publish(p)), cur, stats);
                    }
                    continue;
                }
                let packet_id = s.allocate_packet_id();
                let mut token = 0;
                if s.durable {
                    ops.push(Op::MarkSent {
                        sid,
                        seq: q.seq,
                        packet_id,
                    });
                    if !(s.internal && q.message.publish.qos == QoS::AtLeastOnce) {
                        token = *next_token;
                    }
                }
                s.inflight.push_back(Inflight {
                    packet_id,
                    seq: q.seq,
                    state: InflightState::AwaitingAck,
                    message: Some(Box::new(q.message)),
                });
                let item = Held::Deliver {
                    packet_id,
                    dup: false,
                    fresh: false,
                };
                hold(s, token, item, cur, stats);
            }
            // Read the on-disk part back before the in-memory part runs out, so delivery
            // does not stall on the read, in turn with other sessions (`reads`).
            // Whether anything is left there is the answer's to say (an empty, short answer
            // with no new rows since clears `spilled_from`), never the count's.
            want_read = Router::wants_read(s);
            s.shrink_idle();
            s.settle_counts();
            if s.queue_len == 0 && s.drop_episode {
                s.drop_episode = false;
                info!(client_id = %s.client_id, dropped_total = s.dropped, "client queue drained");
            }
        }
        if self
            .sessions
            .get(&sid)
            .is_some_and(|s| !s.gated.is_empty() && s.queue_len <= GATE_LOW)
        {
            self.ungate_waiters(sid);
        }
        if want_read {
            self.want_read(sid);
        }
        self.serve_reads();
    }
}
