//! MQTT 3.1.1 upstream through rumqttc 0.25.1 (pinned).
//!
//! rumqttc is driven through its public `EventLoop` fields (see
//! `../shared/research/crates.md` §2): requests go into `pending` and are written by
//! [`V311::flush`] through rumqttc's own state machine (`state.handle_outgoing_packet`) and
//! framed network, one flush per batch; the request channel is never used. `poll()` only
//! reads (acks, downlink, pings) and is raced with other futures only while `pending` is
//! empty, when it can only be waiting in cancel-safe places. The event loop is thrown away
//! after any error (its own replay would go out without DUP); the router resends instead.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, MqttState, Packet as RPacket, Request,
    SubscribeFilter as RFilter,
};
use tokio::time::Instant;

use super::upstream::{bounded, AckKind, Granted, UpEvent, Upstream};
use super::BridgeConfig;
use crate::protocol::{Packet, Publish, QoS, SubscribeFilter};

pub(super) struct V311 {
    /// Kept alive: rumqttc's `poll` fails once every sender of its channel is gone.
    _client: AsyncClient,
    el: EventLoop,
    write_timeout: Duration,
    keep_alive: Duration,
    /// When the next PINGREQ is due (rumqttc's rule: one every keep-alive, whatever else
    /// is sent; the previous one still unanswered then means the link is half-open).
    next_ping: Instant,
}

/// Connects and waits for a successful CONNACK. `max_id` is the highest packet id the
/// bridge will use (rumqttc only accepts ids up to its in-flight limit).
pub(super) async fn connect(
    cfg: &BridgeConfig,
    tls: Option<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
    max_packet_size: usize,
    max_id: u16,
) -> Result<(V311, Granted), String> {
    let (host, port) = super::host_port(&cfg.address);
    let mut opts = MqttOptions::new(cfg.effective_client_id(), host, port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_inflight(max_id);
    opts.set_keep_alive(Duration::from_secs(u64::from(cfg.keepalive_secs.max(5))));
    opts.set_max_packet_size(max_packet_size, max_packet_size);
    if let Some(u) = &cfg.username {
        opts.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, mut el) = AsyncClient::new(opts, 1);
    el.network_options
        .set_connection_timeout(cfg.connect_timeout_secs.max(1));
    // rumqttc leaves Nagle on: a batch written while earlier bytes wait for their TCP ack
    // would wait for that ack. Every flush here is a whole batch already (as on the MQTT 5
    // link, which sets it too).
    el.network_options.set_tcp_nodelay(true);
    match el.poll().await {
        Ok(Event::Incoming(RPacket::ConnAck(ack)))
            if ack.code == rumqttc::ConnectReturnCode::Success =>
        {
            // Start from a clean rumqttc state: the router resends what is in flight.
            el.pending.clear();
            el.state = MqttState::new(max_id, true);
            let granted = Granted {
                session_present: ack.session_present,
                receive_maximum: u16::MAX,
                maximum_qos: QoS::AtLeastOnce,
                retain_available: true,
            };
            let keep_alive = el.mqtt_options.keep_alive();
            let up = V311 {
                _client: client,
                el,
                write_timeout: Duration::from_secs(cfg.connect_timeout_secs.max(1)),
                keep_alive,
                next_ping: Instant::now() + keep_alive,
            };
            Ok((up, granted))
        }
        Ok(ev) => Err(format!("unexpected first event {ev:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn qos(q: rumqttc::QoS) -> QoS {
    match q {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn rqos(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn downlink(p: rumqttc::Publish) -> Publish {
    Publish {
        dup: p.dup,
        qos: qos(p.qos),
        retain: p.retain,
        topic: p.topic.into(),
        packet_id: p.pkid,
        properties: Default::default(),
        payload: p.payload,
    }
}

fn event(ev: Event) -> UpEvent {
    match ev {
        Event::Incoming(RPacket::PubAck(a)) => UpEvent::Ack {
            kind: AckKind::Ack,
            packet_id: a.pkid,
            reason: 0,
        },
        Event::Incoming(RPacket::Publish(p)) => UpEvent::Publish(downlink(p)),
        Event::Incoming(RPacket::Disconnect) => {
            UpEvent::Disconnect("upstream sent DISCONNECT".into())
        }
        _ => UpEvent::Nothing,
    }
}

impl Upstream for V311 {
    /// rumqttc's `EventLoop::poll` is not used once connected: per call it allocates and
    /// arms a zero timer, polls its (unused) request channel, and returns every written
    /// PUBLISH back as an `Outgoing` event, one more wake-up per message. This reads
    /// through the same `Network::readb` and state machine, and keeps rumqttc's ping rule.
    async fn next(&mut self) -> Result<UpEvent, String> {
        loop {
            if let Some(ev) = self.try_next()? {
                return Ok(ev);
            }
            let Some(net) = self.el.network.as_mut() else {
                return Err("not connected".into());
            };
            let state = &mut self.el.state;
            tokio::select! {
                r = net.readb(state) => {
                    r.map_err(|e| e.to_string())?;
                    // Anything rumqttc answered by itself (it has none to send with manual
                    // acks and QoS 0/1, but keep its contract).
                    match bounded(self.write_timeout, net.flush()).await {
                        Some(r) => r.map_err(|e| e.to_string())?,
                        None => return Err("writing to the upstream timed out".into()),
                    }
                }
                _ = tokio::time::sleep_until(self.next_ping), if !self.keep_alive.is_zero() => {
                    self.next_ping = Instant::now() + self.keep_alive;
                    if self.el.state.await_pingresp {
                        return Err(format!(
                            "no PINGRESP within {} s: the link is half-open",
                            self.keep_alive.as_secs()
                        ));
                    }
                    // Written by the flush that follows `Nothing`, through rumqttc's state
                    // (which then expects the PINGRESP).
                    self.el.pending.push_back(Request::PingReq(rumqttc::PingReq));
                    return Ok(UpEvent::Nothing);
                }
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<UpEvent>, String> {
        while let Some(ev) = self.el.state.events.pop_front() {
            // Our own writes come back as `Outgoing`: nothing for the bridge.
            if let Event::Incoming(_) = ev {
                return Ok(Some(event(ev)));
            }
        }
        Ok(None)
    }

    fn queue(&mut self, packet: Packet) -> Result<(), String> {
        let request = match packet {
            Packet::Publish(p) => Request::Publish(rumqttc::Publish {
                dup: p.dup,
                qos: rqos(p.qos),
                retain: p.retain,
                topic: p.topic.to_string(),
                pkid: p.packet_id,
                payload: p.payload,
            }),
            Packet::PubAck(a) => Request::PubAck(rumqttc::PubAck::new(a.packet_id)),
            other => return Err(format!("{} is not used over MQTT 3.1.1", other.name())),
        };
        self.el.pending.push_back(request);
        Ok(())
    }

    /// rumqttc's own path sleeps `pending_throttle` before each pending request, which
    /// costs a timer tick (~1 ms) even at zero and would cap the backlog drain at about
    /// 1,000 messages per second; this writes them all with one flush. The state
    /// bookkeeping is rumqttc's own (`handle_outgoing_packet`), so its acks, in-flight
    /// count and pings stay consistent.
    async fn flush(&mut self) -> Result<(), String> {
        if self.el.pending.is_empty() {
            return Ok(());
        }
        let requests: Vec<Request> = self.el.pending.drain(..).collect();
        let el = &mut self.el;
        let work = async {
            let Some(net) = el.network.as_mut() else {
                return Err("not connected".to_string());
            };
            for r in requests {
                match el.state.handle_outgoing_packet(r) {
                    Ok(Some(packet)) => net.write(packet).await.map_err(|e| e.to_string())?,
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            net.flush().await.map_err(|e| e.to_string())
        };
        bounded(self.write_timeout, work)
            .await
            .unwrap_or_else(|| Err("writing to the upstream timed out".into()))
    }

    async fn subscribe(
        &mut self,
        filters: Vec<SubscribeFilter>,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<UpEvent>), String> {
        let filters = filters
            .into_iter()
            .map(|f| RFilter::new(f.filter, rqos(f.options.qos)));
        self.el
            .pending
            .push_back(Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
        self.flush().await?;
        let deadline = Instant::now() + timeout;
        let mut early = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.el.poll()).await {
                Err(_) => return Err("no SUBACK from upstream".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(Event::Incoming(RPacket::SubAck(ack)))) => {
                    let codes = ack
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                    return Ok((codes, early));
                }
                Ok(Ok(Event::Incoming(RPacket::Publish(p)))) => {
                    early.push(UpEvent::Publish(downlink(p)))
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn close(&mut self) {
        // 3.1.1 DISCONNECT: the upstream keeps the session (clean session = false) and
        // discards no will (we set none).
        self.el
            .pending
            .push_back(Request::Disconnect(rumqttc::Disconnect));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
    }
}
