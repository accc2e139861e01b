//! A router driven without sockets or tasks, for deterministic tests of its bookkeeping
//! against the real store (issue 12; the first part of issue 16's router harness).
//!
//! The harness owns a `Router` with a real `Store` in a temp dir and calls its handlers
//! one event at a time, exactly as `Router::run` would. Store events (commits, queue
//! read-backs, removals) are taken from the writer in order and handed to the router only
//! when the test says so: `settle` delivers them all, `settle_until` stops after the first
//! that matches, and events not delivered yet wait, in order, for the next call. That is
//! how a test makes the store's answer arrive "late" (after the clients did something
//! else), the interleavings behind the races of issue 12. The writer thread itself runs
//! freely; `Store` pings make sure it has handled everything submitted.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::config::MqttConfig;
use crate::protocol::{ConnAckProperties, ProtocolVersion, SubscribeFilter, SubscriptionOptions};
use crate::store::StoreOptions;

pub struct Client {
    pub conn: ConnId,
    pub rx: crate::broker::connection::LinkRx,
    /// The protocol the connection speaks (all v5 for now).
    #[allow(dead_code)]
    pub version: ProtocolVersion,
}

impl Client {
    /// Everything the router sent this connection so far.
    pub fn take(&mut self) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while let Ok(o) = self.rx.try_recv() {
            out.push(o);
        }
        out
    }

    /// The PUBLISH packets sent so far (other output dropped).
    pub fn publishes(&mut self) -> Vec<Publish> {
        self.take()
            .into_iter()
            .filter_map(|o| match o {
                Outgoing::Packet(p) => match *p {
                    Packet::Publish(p) => Some(p),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }
}

pub struct Harness {
    pub r: Router,
    pub dir: tempfile::TempDir,
    pub cfg: MqttConfig,
    pub opts: StoreOptions,
    /// Store events taken from the writer and not yet given to the router, in order.
    pending: VecDeque<StoreEvent>,
    next_conn: ConnId,
    _tx: mpsc::Sender<RouterEvent>,
}

impl Harness {
    pub fn new(tweak: impl FnOnce(&mut MqttConfig, &mut StoreOptions)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = MqttConfig::default();
        let mut opts = StoreOptions::for_test(dir.path());
        tweak(&mut cfg, &mut opts);
        Harness::open(dir, cfg, opts)
    }

    fn open(dir: tempfile::TempDir, cfg: MqttConfig, opts: StoreOptions) -> Harness {
        let (store, recovered, store_rx) = Store::open(&opts).expect("store opens");
        let (tx, rx) = mpsc::channel(16);
        let r = Router::new(
            Arc::new(cfg.clone()),
            rx,
            store,
            store_rx,
            recovered,
            Duration::from_secs(3600),
            Vec::new(),
        );
        let mut h = Harness {
            r,
            dir,
            cfg,
            opts,
            pending: VecDeque::new(),
            next_conn: 1,
            _tx: tx,
        };
        h.settle();
        h
    }

    /// A crash: the router and its memory are gone, the store keeps what it committed (the
    /// writer finishes what it was given, as a killed process's kernel would not; use the
    /// power-cut tests for that). Then a new router on the same files.
    pub fn restart(self) -> Harness {
        let Harness {
            mut r,
            dir,
            cfg,
            opts,
            ..
        } = self;
        let store = r.store.take();
        drop(r);
        if let Some(store) = store {
            let (done, rx) = oneshot::channel();
            let _ = store.send(Command::Shutdown(done));
            let _ = rx.blocking_recv();
            drop(store);
        }
        Harness::open(dir, cfg, opts)
    }

    /// One router event, handled as `Router::run` handles it. The writer handles its
    /// token before the next event (one commit per event, so runs repeat exactly); what it
    /// reports still waits for `settle`.
    pub fn event(&mut self, ev: RouterEvent) {
        self.r.commits.event_ops_start = self.r.commits.ops.len();
        self.r.handle(ev);
        if std::env::var_os("HOLDFAST_HARNESS_GROUPED").is_some() {
            // Let the writer group tokens as timing has it (not repeatable; for searching).
            self.r.submit();
        } else {
            self.collect();
        }
    }

    /// Several router events handled in one batch, as `Router::run` takes them from its
    /// channel: their store ops go to the writer as one token.
    pub fn events(&mut self, evs: Vec<RouterEvent>) {
        for ev in evs {
            self.r.commits.event_ops_start = self.r.commits.ops.len();
            self.r.handle(ev);
        }
        self.collect();
    }

    /// Waits until the writer has handled everything submitted, and takes its events.
    fn collect(&mut self) {
        // As `Router::run` after each batch: budget given back serves who waits.
        self.r.serve_reads();
        self.r.submit();
        if let Some(store) = &self.r.store {
            let (reply, rx) = oneshot::channel();
            if store.send(Command::Ping(reply)).is_ok() {
                let _ = rx.blocking_recv();
            }
        }
        while let Ok(ev) = self.r.store_rx.try_recv() {
            self.pending.push_back(ev);
        }
    }

    fn deliver_one(&mut self) -> Option<bool> {
        let ev = self.pending.pop_front()?;
        let rows = matches!(ev, StoreEvent::QueueRows { .. });
        self.r.commits.event_ops_start = self.r.commits.ops.len();
        self.r.on_store_event(ev);
        self.r.submit();
        Some(rows)
    }

    /// Gives the router every store event, until the store has nothing more to say.
    pub fn settle(&mut self) {
        loop {
            self.collect();
            if self.pending.is_empty() {
                return;
            }
            while self.deliver_one().is_some() {}
        }
    }

    /// Gives the router store events in order up to and including the `n`th queue
    /// read-back answer; the events after it wait. False if there were fewer.
    pub fn settle_until_rows(&mut self, mut n: usize) -> bool {
        loop {
            self.collect();
            if self.pending.is_empty() {
                return false;
            }
            while let Some(rows) = self.deliver_one() {
                if rows {
                    n -= 1;
                    if n == 0 {
                        return true;
                    }
                }
            }
        }
    }

    /// Lets the writer handle what was submitted without telling the router yet.
    pub fn freeze(&mut self) {
        self.collect();
    }

    pub fn connect(&mut self, id: &str, clean: bool, expiry: u32, window: u16) -> Client {
        self.connect_as(id.into(), clean, expiry, window)
    }

    /// [`Harness::connect`] with the client id the connection holds.
    pub fn connect_as(
        &mut self,
        client_id: std::sync::Arc<str>,
        clean: bool,
        expiry: u32,
        window: u16,
    ) -> Client {
        let conn = self.next_conn;
        self.next_conn += 1;
        let (link, rx) = ConnLink::new(conn);
        let version = ProtocolVersion::V5;
        self.event(RouterEvent::Connect(Box::new(ConnectRequest {
            link,
            client_id,
            clean_start: clean,
            expiry_interval: expiry,
            will: None,
            params: ClientParams {
                protocol: version,
                window,
                max_packet_size: u32::MAX,
                compact_packet_ids: false,
            },
            connack: ConnAck {
                session_present: false,
                reason_code: 0,
                properties: ConnAckProperties::default(),
            },
        })));
        Client { conn, rx, version }
    }

    pub fn subscribe(&mut self, c: &Client, filter: &str, qos: QoS) {
        self.event(RouterEvent::Subscribe {
            conn: c.conn,
            subscribe: Subscribe {
                packet_id: 1,
                subscription_identifier: None,
                user_properties: Vec::new(),
                filters: vec![SubscribeFilter {
                    filter: filter.into(),
                    options: SubscriptionOptions {
                        qos,
                        ..Default::default()
                    },
                }],
            },
        });
    }

    /// PUBREC / PUBACK packets sent to `c` so far: (packet id, reason code).
    pub fn acks(c: &mut Client) -> Vec<(u16, u8)> {
        c.take()
            .into_iter()
            .filter_map(|o| match o {
                Outgoing::Packet(p) => match *p {
                    Packet::PubRec(a) | Packet::PubAck(a) => Some((a.packet_id, a.reason_code)),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    pub fn disconnect(&mut self, c: Client) {
        self.event(RouterEvent::Disconnected {
            conn: c.conn,
            will: WillAction::Discard,
            session_expiry: None,
        });
    }

    /// A QoS 1 PUBLISH of `payload` on `topic`, with an optional Message Expiry Interval.
    pub fn publish(
        &mut self,
        c: &Client,
        topic: &str,
        payload: &str,
        pid: u16,
        expiry: Option<u32>,
    ) {
        self.publish_qos(
            c,
            QoS::AtLeastOnce,
            false,
            topic,
            payload.as_bytes(),
            pid,
            expiry,
        );
    }

    /// Any PUBLISH.
    #[allow(clippy::too_many_arguments)]
    pub fn publish_qos(
        &mut self,
        c: &Client,
        qos: QoS,
        dup: bool,
        topic: &str,
        payload: &[u8],
        pid: u16,
        expiry: Option<u32>,
    ) {
        let mut p = Publish {
            dup,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: pid,
            properties: Default::default(),
            payload: bytes::Bytes::copy_from_slice(payload),
        };
        p.properties.message_expiry_interval = expiry;
        self.event(RouterEvent::Publish {
            conn: c.conn,
            publish: p,
            received: Instant::now(),
        });
    }

    pub fn puback(&mut self, c: &Client, packet_id: u16) {
        self.event(RouterEvent::PubAck {
            conn: c.conn,
            packet_id,
        });
    }

    /// Receives what `c` was sent, acknowledging every QoS 1 PUBLISH, until nothing more
    /// comes; the payloads in arrival order.
    pub fn drain(&mut self, c: &mut Client) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            self.settle();
            let ps = c.publishes();
            if ps.is_empty() {
                return got;
            }
            for p in ps {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                if p.qos == QoS::AtLeastOnce {
                    self.puback(c, p.packet_id);
                }
            }
        }
    }

    /// The session's queue as the router counts it and as the disk holds it: (waiting
    /// messages counted by the router, unsent rows on disk).
    pub fn counts(&mut self, client_id: &str) -> (u64, u64) {
        self.settle();
        let sid = self.r.sessions.sid_of(client_id).expect("session");
        let counted = self.r.sessions[&sid].queue_len;
        let db = rusqlite::Connection::open(&self.opts.path).expect("open db");
        let (lo, hi) = crate::store::queue_range(sid);
        let on_disk: i64 = db
            .query_row(
                "SELECT count(*) FROM queue_all WHERE id BETWEEN ?1 AND ?2 AND state = 0",
                [lo, hi],
                |r| r.get(0),
            )
            .expect("count rows");
        (counted, on_disk as u64)
    }
}

/// Payloads "0".."n-1".
pub fn numbers(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

/// First receipts in order (redeliveries of messages seen before removed).
pub fn first_receipts(got: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    got.iter()
        .filter(|g| seen.insert((*g).clone()))
        .cloned()
        .collect()
}
