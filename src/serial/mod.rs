//! Serial sensor ingest: one task per `[[serial]]` port, reading delimited lines (`raw`,
//! `json`, `csv`, `nmea`) or polling Modbus RTU devices, publishing each reading into the
//! local broker.
//!
//! # Durability
//! Each port is an internal client of the router (client id `$serial/<name>`, clean
//! start, session expiry 0: it only publishes; real clients may not use the prefix). A
//! reading becomes a QoS 1 PUBLISH (MQTT 5 semantics, so refusals carry a reason code)
//! with a packet id from the port's window, exactly as a client's publish, and it counts
//! as delivered only on the router's PUBACK, which the router sends after the message is
//! committed for every durable subscriber (see `broker::router`). A refusal (reason
//! ≥ 0x80, e.g. 0x97 quota exceeded) keeps the reading and offers it again after
//! `retry_delay_ms` (counted as `refused`). While `inflight` readings are unacknowledged
//! the port is not read: the kernel's and the device's buffers (and hardware flow control,
//! if configured) hold back the sender — backpressure, never a drop.
//!
//! Readings still unacknowledged at shutdown are waited for (up to `DRAIN_AT_SHUTDOWN`, within the broker's
//! shutdown timeout); a partial line in the buffer at that moment is not a reading yet.
//!
//! # Robustness
//! - A missing or unplugged port is reopened with exponential backoff; the state is
//!   logged once per change (and once per distinct error), published retained at
//!   `$SYS/holdfast/serial/<name>/state` (`open` / `closed`).
//! - Opening runs on the blocking pool with a time limit, so a misbehaving driver cannot
//!   stall the runtime; every port is its own task.
//! - Over-long frames, invalid UTF-8, malformed JSON/CSV/NMEA and bad NMEA checksums are
//!   counted and dropped, with at most one warning per kind per `WARN_EVERY` naming the
//!   port. Modbus timeouts, exceptions and garbled answers are counted per device.
//! - Counters: retained JSON at `$SYS/holdfast/serial/<name>/stats`, republished at most
//!   once a second when they change.

pub mod config;
pub mod format;
pub mod modbus;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use tracing::{debug, info, warn};

pub use config::{Format, SerialConfig};
use format::{Frame, Framer, LineFormat, Reject, Template};

use crate::broker::client::{BrokerHandle, ClientOptions, ClientRx, ClientTx, Outgoing, Reserved};
use crate::protocol::{
    reason, topic, Packet, ProtocolVersion, Publish, PublishProperties, QoS, UserProperty,
};

/// At most one warning of each kind per port in this time.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Stats are republished (when changed) this often.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Longest time an open(2) of the port may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long unacknowledged readings are waited for at shutdown.
const DRAIN_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// Counters of one Modbus device.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DeviceStats {
    pub polls: u64,
    pub ok: u64,
    pub timeouts: u64,
    pub exceptions: u64,
    /// Garbled or mismatched answers.
    pub errors: u64,
}

/// Counters of one port (`$SYS/holdfast/serial/<name>/stats`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SerialStats {
    /// `open` or `closed`.
    pub state: String,
    pub last_error: Option<String>,
    /// Successful opens (the first one included).
    pub opens: u64,
    pub bytes: u64,
    /// Complete frames read (lines formats).
    pub frames: u64,
    /// Readings handed to the broker (retries not counted again).
    pub published: u64,
    /// Readings acknowledged by the broker (committed).
    pub delivered: u64,
    /// Refusals by the broker (each one retried later).
    pub refused: u64,
    /// Readings handed over and not yet acknowledged (includes those waiting to retry).
    pub inflight: u64,
    pub dropped_too_long: u64,
    pub dropped_utf8: u64,
    pub dropped_malformed: u64,
    pub dropped_checksum: u64,
    pub dropped_topic: u64,
    /// modbus-rtu, by device name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, DeviceStats>,
}

/// Every serial port's latest counters, by port name: written by the port tasks, read by
/// the observers (`/metrics`). One per gateway (`app.rs`).
pub type SerialRegistry = std::sync::Arc<std::sync::Mutex<BTreeMap<String, SerialStats>>>;

/// The port task: runs until the broker shuts down.
pub async fn run(cfg: SerialConfig, broker: BrokerHandle, registry: SerialRegistry) {
    let mut port = Port::new(cfg, broker.clone(), registry);
    let Some(mut link) = PortSession::attach(&broker, &port.cfg).await else {
        return;
    };
    port.run(&mut link).await;
    // Wait (bounded) for the broker to acknowledge what was handed over.
    let deadline = Instant::now() + DRAIN_AT_SHUTDOWN;
    while link.outstanding() > 0 {
        let next = tokio::select! {
            out = link.rx.recv() => out,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        match next {
            Some(out) => {
                if link.on_out(out, &mut port.stats).await.is_err() {
                    break;
                }
            }
            None => break,
        }
    }
    if link.outstanding() > 0 {
        warn!(port = %port.cfg.name, unacknowledged = link.outstanding(), "serial port stopped with readings not acknowledged by the broker");
    }
    port.stats.inflight = link.outstanding() as u64;
    port.publish_stats(true).await;
    link.detach().await;
    debug!(port = %port.cfg.name, "serial port stopped");
}

/// Why reading a port stopped.
enum End {
    Shutdown,
    /// The port failed: reopen it after a backoff.
    Lost(String),
}

/// The port's internal session in the router, with its packet-id window.
struct PortSession {
    tx: ClientTx,
    rx: ClientRx,
    window: usize,
    free: Vec<u16>,
    inflight: HashMap<u16, Publish>,
    /// Refused readings waiting to be offered again (they keep their packet id).
    retry: VecDeque<(Instant, Publish)>,
    retry_delay: Duration,
}

impl PortSession {
    async fn attach(broker: &BrokerHandle, cfg: &SerialConfig) -> Option<PortSession> {
        let connect = ClientOptions {
            client_id: Reserved::Serial.client_id(&cfg.name),
            clean_start: true,
            expiry_interval: 0,
            protocol: ProtocolVersion::V5,
            window: 1,
            compact_packet_ids: true,
        };
        let (tx, rx) = broker.connect(connect).await.ok()?;
        let window = usize::from(cfg.inflight.max(1));
        Some(PortSession {
            tx,
            rx,
            window,
            free: (1..=cfg.inflight.max(1)).rev().collect(),
            inflight: HashMap::new(),
            retry: VecDeque::new(),
            retry_delay: Duration::from_millis(cfg.retry_delay_ms),
        })
    }

    fn outstanding(&self) -> usize {
        self.inflight.len() + self.retry.len()
    }

    fn full(&self) -> bool {
        self.outstanding() >= self.window
    }

    fn retry_at(&self) -> Option<Instant> {
        self.retry.front().map(|(t, _)| *t)
    }

    /// Hands a reading to the router. The caller makes sure the window has room.
    async fn publish(&mut self, mut p: Publish, stats: &mut SerialStats) -> Result<(), End> {
        stats.published += 1;
        if p.qos == QoS::AtMostOnce {
            stats.delivered += 1;
        } else {
            let Some(id) = self.free.pop() else {
                // Not reachable (callers wait for room); never drop.
                return Err(End::Lost("packet id window exhausted".into()));
            };
            p.packet_id = id;
            self.inflight.insert(id, p.clone());
            stats.inflight = self.outstanding() as u64;
        }
        self.send(p).await
    }

    async fn send(&self, publish: Publish) -> Result<(), End> {
        self.tx.publish(publish).await.map_err(|_| End::Shutdown)
    }

    /// One packet from the router.
    async fn on_out(&mut self, out: Outgoing, stats: &mut SerialStats) -> Result<(), End> {
        match out {
            Outgoing::Disconnect(_) => Err(End::Shutdown),
            Outgoing::Packet(p) => {
                if let Packet::PubAck(a) = *p {
                    if let Some(publish) = self.inflight.remove(&a.packet_id) {
                        if is_success(a.reason_code) {
                            stats.delivered += 1;
                            self.free.push(a.packet_id);
                        } else {
                            stats.refused += 1;
                            self.retry
                                .push_back((Instant::now() + self.retry_delay, publish));
                        }
                        stats.inflight = self.outstanding() as u64;
                    }
                }
                Ok(())
            }
        }
    }

    /// Offers again the refused readings whose delay is over.
    async fn fire_retries(&mut self) -> Result<(), End> {
        let now = Instant::now();
        while self.retry.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, p)) = self.retry.pop_front() else {
                break;
            };
            self.inflight.insert(p.packet_id, p.clone());
            self.send(p).await?;
        }
        Ok(())
    }

    async fn detach(self) {
        self.tx.disconnect().await;
    }
}

/// Rate-limited warnings, per kind.
#[derive(Default)]
struct Warner {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl Warner {
    /// Some(suppressed since the last warning) if a warning of this kind may go out now.
    fn allow(&mut self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        match self.last.get_mut(kind) {
            Some((t, n)) if now.duration_since(*t) < WARN_EVERY => {
                *n += 1;
                None
            }
            Some((t, n)) => {
                *t = now;
                Some(std::mem::take(n))
            }
            None => {
                self.last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

struct Port {
    cfg: SerialConfig,
    broker: BrokerHandle,
    registry: SerialRegistry,
    shutdown: CancellationToken,
    stats: SerialStats,
    /// The stats last published, to publish only changes.
    published_stats: Option<SerialStats>,
    last_stats_at: Instant,
    warner: Warner,
    template: Template,
    qos: QoS,
}

impl Port {
    fn new(cfg: SerialConfig, broker: BrokerHandle, registry: SerialRegistry) -> Port {
        // The configuration was validated: the template parses.
        let template = Template::parse(&cfg.topic)
            .unwrap_or_else(|_| Template::parse("serial").expect("literal"));
        let qos = if cfg.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut stats = SerialStats {
            state: "closed".into(),
            ..Default::default()
        };
        for d in &cfg.device {
            stats.devices.insert(d.name.clone(), DeviceStats::default());
        }
        Port {
            registry,
            shutdown: broker.shutdown_token(),
            cfg,
            broker,
            stats,
            published_stats: None,
            last_stats_at: Instant::now(),
            warner: Warner::default(),
            template,
            qos,
        }
    }

    async fn run(&mut self, link: &mut PortSession) {
        self.sys("state", b"closed".to_vec()).await;
        self.publish_stats(true).await;
        let mut backoff = Backoff::new(self.cfg.reopen_min_ms, self.cfg.reopen_max_ms);
        let mut framer = Framer::new(self.cfg.delimiter.as_bytes(), self.cfg.max_frame_bytes);
        let lines = match LineFormat::new(&self.cfg) {
            Ok(l) => l,
            Err(e) => {
                warn!(port = %self.cfg.name, cause = %e, "serial port not started");
                return;
            }
        };
        let mut last_error: Option<String> = None;
        while !self.shutdown.is_cancelled() {
            let error = match self.open().await {
                Ok(stream) => {
                    backoff.reset();
                    self.stats.opens += 1;
                    self.stats.state = "open".into();
                    self.stats.last_error = None;
                    info!(port = %self.cfg.name, path = %self.cfg.path, format = ?self.cfg.format, "serial port open");
                    self.sys("state", b"open".to_vec()).await;
                    self.publish_stats(true).await;
                    let end = if self.cfg.format.is_lines() {
                        framer.reset();
                        self.read_lines(stream, link, &mut framer, &lines).await
                    } else {
                        self.poll_modbus(stream, link).await
                    };
                    self.stats.state = "closed".into();
                    self.sys("state", b"closed".to_vec()).await;
                    match end {
                        End::Shutdown => break,
                        End::Lost(e) => {
                            warn!(port = %self.cfg.name, path = %self.cfg.path, cause = %e, "serial port lost; reopening with backoff");
                            e
                        }
                    }
                }
                Err(e) => {
                    if last_error.as_deref() != Some(e.as_str()) {
                        warn!(port = %self.cfg.name, path = %self.cfg.path, cause = %e, "serial port cannot be opened; retrying with backoff (logged once per distinct error)");
                    }
                    e
                }
            };
            self.stats.last_error = Some(error.clone());
            last_error = Some(error);
            self.publish_stats(true).await;
            if self.idle(link, backoff.next_wait()).await.is_err() {
                break;
            }
        }
    }

    /// Opens the port on the blocking pool, bounded in time.
    async fn open(&self) -> Result<SerialStream, String> {
        use tokio_serial::{DataBits, FlowControl, Parity, StopBits};
        let c = &self.cfg;
        let builder = tokio_serial::new(c.path.clone(), c.baud)
            .data_bits(match c.data_bits {
                5 => DataBits::Five,
                6 => DataBits::Six,
                7 => DataBits::Seven,
                _ => DataBits::Eight,
            })
            .parity(match c.parity {
                config::Parity::None => Parity::None,
                config::Parity::Odd => Parity::Odd,
                config::Parity::Even => Parity::Even,
            })
            .stop_bits(if c.stop_bits == 2 {
                StopBits::Two
            } else {
                StopBits::One
            })
            .flow_control(match c.flow_control {
                config::FlowControl::None => FlowControl::None,
                config::FlowControl::Software => FlowControl::Software,
                config::FlowControl::Hardware => FlowControl::Hardware,
            });
        let open = tokio::task::spawn_blocking(move || builder.open_native_async());
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Err(_) => Err("opening timed out".into()),
            Ok(Err(e)) => Err(format!("open task failed: {e}")),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Ok(Ok(s))) => Ok(s),
        }
    }

    /// Waits `d` while still taking acknowledgements, retries and stats. Err on shutdown.
    async fn idle(&mut self, link: &mut PortSession, d: Duration) -> Result<(), End> {
        let until = Instant::now() + d;
        loop {
            let retry_at = link.retry_at();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(End::Shutdown),
                _ = tokio::time::sleep_until(until) => return Ok(()),
                out = link.rx.recv() => match out {
                    None => return Err(End::Shutdown),
                    Some(out) => link.on_out(out, &mut self.stats).await?,
                },
                _ = sleep_opt(retry_at) => link.fire_retries().await?,
                _ = tokio::time::sleep_until(self.last_stats_at + STATS_EVERY) => self.publish_stats(false).await,
            }
        }
    }

    /// Waits until the window has room (backpressure). Err on shutdown.
    async fn wait_room(&mut self, link: &mut PortSession) -> Result<(), End> {
        while link.full() {
            let retry_at = link.retry_at();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(End::Shutdown),
                out = link.rx.recv() => match out {
                    None => return Err(End::Shutdown),
                    Some(out) => link.on_out(out, &mut self.stats).await?,
                },
                _ = sleep_opt(retry_at) => link.fire_retries().await?,
                _ = tokio::time::sleep_until(self.last_stats_at + STATS_EVERY) => self.publish_stats(false).await,
            }
        }
        Ok(())
    }

    async fn read_lines(
        &mut self,
        mut port: SerialStream,
        link: &mut PortSession,
        framer: &mut Framer,
        lines: &LineFormat,
    ) -> End {
        loop {
            // Complete frames first, as long as the window has room.
            while !link.full() {
                let Some(frame) = framer.next_frame() else {
                    break;
                };
                if let Err(end) = self.frame(frame, link, lines).await {
                    return end;
                }
            }
            let room = !link.full();
            let retry_at = link.retry_at();
            let buf = framer.buffer();
            buf.reserve(4096);
            let step: Result<(), End> = tokio::select! {
                _ = self.shutdown.cancelled() => Err(End::Shutdown),
                out = link.rx.recv() => match out {
                    None => Err(End::Shutdown),
                    Some(out) => link.on_out(out, &mut self.stats).await,
                },
                _ = sleep_opt(retry_at) => link.fire_retries().await,
                _ = tokio::time::sleep_until(self.last_stats_at + STATS_EVERY) => {
                    self.publish_stats(false).await;
                    Ok(())
                }
                r = port.read_buf(buf), if room => match r {
                    Ok(0) => Err(End::Lost("end of file".into())),
                    Ok(n) => {
                        self.stats.bytes += n as u64;
                        Ok(())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
                    Err(e) => Err(End::Lost(e.to_string())),
                },
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// One frame from the framer: a reading to publish or a counted drop.
    async fn frame(
        &mut self,
        frame: Frame,
        link: &mut PortSession,
        lines: &LineFormat,
    ) -> Result<(), End> {
        let line = match frame {
            Frame::TooLong => {
                self.stats.dropped_too_long += 1;
                self.warn_drop(
                    "too-long",
                    &format!(
                        "frame longer than max_frame_bytes ({})",
                        self.cfg.max_frame_bytes
                    ),
                    None,
                );
                return Ok(());
            }
            Frame::Line(l) => l,
        };
        self.stats.frames += 1;
        if line.is_empty() || line.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(()); // blank lines are not readings
        }
        let now = format::Stamp::now();
        let reading = lines.reading(&line, now).and_then(|r| {
            if self.valid_topic(&r.topic) {
                Ok(r)
            } else {
                Err(Reject::Topic)
            }
        });
        match reading {
            Ok(r) => {
                let mut properties = PublishProperties::default();
                if self.cfg.timestamp && self.cfg.format == Format::Raw {
                    let ts: UserProperty = ("ts".into(), now.ms.to_string());
                    let synced: UserProperty = ("ts_synced".into(), now.synced.to_string());
                    properties.user_properties.extend([ts, synced]);
                }
                self.publish(link, r.topic, r.payload, properties).await
            }
            Err(why) => {
                match why {
                    Reject::Utf8 => self.stats.dropped_utf8 += 1,
                    Reject::Json | Reject::Csv | Reject::NmeaSyntax => {
                        self.stats.dropped_malformed += 1
                    }
                    Reject::NmeaChecksum => self.stats.dropped_checksum += 1,
                    Reject::Topic => self.stats.dropped_topic += 1,
                }
                let sample = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
                self.warn_drop(why.label(), why.label(), Some(&sample));
                Ok(())
            }
        }
    }

    fn valid_topic(&self, t: &str) -> bool {
        topic::valid_topic_name(t)
            && !t.starts_with('$')
            && t.len() <= self.broker.mqtt().max_topic_length
            && topic::level_count(t) <= self.broker.mqtt().max_topic_levels
    }

    fn warn_drop(&mut self, kind: &'static str, what: &str, sample: Option<&str>) {
        if let Some(suppressed) = self.warner.allow(kind) {
            warn!(port = %self.cfg.name, path = %self.cfg.path, suppressed, sample = sample.unwrap_or(""), "serial: {what}; dropped (counted; at most one such warning per 10 s)");
        }
    }

    async fn publish(
        &mut self,
        link: &mut PortSession,
        topic: String,
        payload: Bytes,
        properties: PublishProperties,
    ) -> Result<(), End> {
        self.wait_room(link).await?;
        let p = Publish {
            dup: false,
            qos: self.qos,
            retain: self.cfg.retain,
            topic: topic.into(),
            packet_id: 0,
            properties,
            payload,
        };
        link.publish(p, &mut self.stats).await
    }

    async fn poll_modbus(&mut self, port: SerialStream, link: &mut PortSession) -> End {
        let mut ctx = tokio_modbus::client::rtu::attach(port);
        let timeout = Duration::from_millis(self.cfg.response_timeout_ms);
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.poll_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let devices = self.cfg.device.clone();
        let registers = self.cfg.register.clone();
        loop {
            let retry_at = link.retry_at();
            let step: Result<bool, End> = tokio::select! {
                _ = self.shutdown.cancelled() => Err(End::Shutdown),
                out = link.rx.recv() => match out {
                    None => Err(End::Shutdown),
                    Some(out) => link.on_out(out, &mut self.stats).await.map(|_| false),
                },
                _ = sleep_opt(retry_at) => link.fire_retries().await.map(|_| false),
                _ = tokio::time::sleep_until(self.last_stats_at + STATS_EVERY) => {
                    self.publish_stats(false).await;
                    Ok(false)
                }
                _ = tick.tick() => Ok(true),
            };
            match step {
                Err(end) => return end,
                Ok(false) => continue,
                Ok(true) => {}
            }
            for dev in &devices {
                let regs: Vec<&config::Register> = registers
                    .iter()
                    .filter(|r| r.device.as_deref().is_none_or(|d| d == dev.name))
                    .collect();
                if let Err(end) = self.wait_room(link).await {
                    return end;
                }
                let polled = tokio::select! {
                    r = modbus::poll_device(&mut ctx, dev, &regs, timeout) => r,
                    _ = self.shutdown.cancelled() => return End::Shutdown,
                };
                let ds = self.stats.devices.entry(dev.name.clone()).or_default();
                ds.polls += 1;
                let mut m = match polled {
                    Ok(m) => {
                        ds.ok += 1;
                        m
                    }
                    Err(modbus::PollError::Transport(e)) => return End::Lost(e),
                    Err(modbus::PollError::Timeout) => {
                        ds.timeouts += 1;
                        let what = format!(
                            "modbus device {} (unit {}) did not answer within {} ms",
                            dev.name, dev.unit_id, self.cfg.response_timeout_ms
                        );
                        self.warn_drop("modbus-timeout", &what, None);
                        continue;
                    }
                    Err(modbus::PollError::Exception(e)) => {
                        ds.exceptions += 1;
                        let what = format!(
                            "modbus device {} (unit {}) answered with exception {e}",
                            dev.name, dev.unit_id
                        );
                        self.warn_drop("modbus-exception", &what, None);
                        continue;
                    }
                    Err(modbus::PollError::Protocol(e)) => {
                        ds.errors += 1;
                        let what = format!(
                            "modbus device {} (unit {}): bad answer: {e}",
                            dev.name, dev.unit_id
                        );
                        self.warn_drop("modbus-error", &what, None);
                        continue;
                    }
                };
                let Some(topic) = self.template.render(|k| match k {
                    "name" => Some(self.cfg.name.clone()),
                    "device" => Some(dev.name.clone()),
                    "unit" => Some(dev.unit_id.to_string()),
                    _ => None,
                }) else {
                    self.stats.dropped_topic += 1;
                    continue;
                };
                if self.cfg.timestamp {
                    format::Stamp::now().insert(&mut m);
                }
                let payload = Bytes::from(serde_json::Value::Object(m).to_string());
                if let Err(end) = self
                    .publish(link, topic, payload, PublishProperties::default())
                    .await
                {
                    return end;
                }
            }
        }
    }

    /// Publishes a retained `$SYS/holdfast/serial/<name>/<leaf>` message.
    async fn sys(&self, leaf: &str, payload: Vec<u8>) {
        let topic = format!("$SYS/holdfast/serial/{}/{leaf}", self.cfg.name);
        let _ = self.broker.sys(topic, payload).await;
    }

    /// Publishes the stats if they changed (or `force`).
    async fn publish_stats(&mut self, force: bool) {
        self.last_stats_at = Instant::now();
        if !force && self.published_stats.as_ref() == Some(&self.stats) {
            return;
        }
        if let Ok(mut all) = self.registry.lock() {
            all.insert(self.cfg.name.clone(), self.stats.clone());
        }
        if let Ok(json) = serde_json::to_vec(&self.stats) {
            self.sys("stats", json).await;
            self.published_stats = Some(self.stats.clone());
        }
    }
}

/// Sleeps until `at`, or forever if None.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A reason code is a success (the reading is committed).
pub fn is_success(code: u8) -> bool {
    code < reason::UNSPECIFIED_ERROR
}
