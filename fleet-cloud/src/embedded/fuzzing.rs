//! A socket-free harness over the embedded broker's session logic, for the
//! `broker_packets` fuzz target (feature `fuzzing`; not a stable API).
//!
//! It admits connections as the broker does at CONNECT, feeds each one
//! bytes (packets it encodes, or raw bytes) through the same reader and
//! session handler, delivers what is queued for it, and drops it. After
//! every step [`Harness::check`] asserts the router's bookkeeping: the
//! retained quotas add up, the claim connection counts match the
//! connections, and every connection's subscriptions are in the trie.

// Built for its own tests without the feature: nothing outside uses it.
#![cfg_attr(not(feature = "fuzzing"), allow(unreachable_pub, dead_code))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::sync::{mpsc, oneshot};

use super::admission::ClientLimits;
use super::codec::{self, In, Message, ReadError, Version, Writer};
use super::{Kick, Router, Session, Shared};
use crate::BrokerPolicy;
use fleet_core::admission::Role;

/// The identities a harness knows: a backend, a claimant and two devices.
pub const IDENTITIES: [&str; 4] = ["fleet-backend", "claim@f", "dev-a", "dev-b"];

/// A packet for [`Harness::send`] to encode.
#[derive(Debug, Clone)]
pub enum Packet {
    /// SUBSCRIBE to filters with QoS.
    Subscribe(Vec<(String, u8)>),
    /// UNSUBSCRIBE from filters.
    Unsubscribe(Vec<String>),
    /// PUBLISH.
    Publish {
        /// The topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
        /// 0, 1 or 2.
        qos: u8,
        /// The retain flag.
        retain: bool,
        /// MQTT 5: a response topic.
        response_topic: Option<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
}

struct Conn {
    client_id: String,
    identity: String,
    role: Role,
    version: Version,
    conn: u64,
    rx: mpsc::Receiver<Message>,
    _kick: oneshot::Receiver<Kick>,
    queued: super::QueueBytes,
    buf: BytesMut,
    out: Writer,
    next_pkid: u16,
}

/// The broker without sockets.
pub struct Harness {
    shared: Arc<Shared>,
    conns: Vec<Conn>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A broker with the default policy (reply routing on, one claim
    /// identity) and small limits, so that fuzzing reaches them.
    pub fn new() -> Self {
        let policy = BrokerPolicy {
            claim_identities: vec![IDENTITIES[1].into()],
            reply_routing: true,
            ..BrokerPolicy::default()
        };
        let limits = ClientLimits {
            max_subscriptions: 8,
            max_retained_per_identity: 4,
            max_retained_messages: 16,
            max_retained_bytes: 4096,
            max_queued_bytes: 4096,
            max_queued_bytes_total: 8192,
            max_claim_connections: 2,
            ..ClientLimits::default()
        };
        let shared = Arc::new(Shared {
            received: crate::metrics::per_qos("fleet_broker_messages_received_total", &[]),
            sent: crate::metrics::per_qos("fleet_broker_messages_sent_total", &[]),
            policy: RwLock::new(Arc::new(policy.compile())),
            revoked: RwLock::new(Default::default()),
            router: Mutex::new(Router::default()),
            next_conn: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            max_packet: 128 * 1024,
            queue_capacity: 16,
            handshake_timeout: std::time::Duration::from_secs(1),
            limits,
            directory: None,
            queued_total: Arc::new(AtomicUsize::new(0)),
            partial_budget: Arc::new(tokio::sync::Semaphore::new(1024)),
            retained_writes: None,
            session_writes: None,
            presence: None,
            seen_interval_ms: 10_000,
        });
        Self {
            shared,
            conns: Vec::new(),
        }
    }

    /// Connects `IDENTITIES[who % 4]` with `client_id` (empty: assigned);
    /// whether it was admitted.
    pub fn connect(&mut self, who: u8, client_id: &str, v5: bool) -> bool {
        let identity = IDENTITIES[usize::from(who) % IDENTITIES.len()];
        let role = match identity {
            "fleet-backend" => Role::Backend,
            "claim@f" => Role::Claimant,
            _ => Role::Device,
        };
        let client_id = if client_id.is_empty() {
            if role == Role::Device {
                identity.to_owned()
            } else {
                format!("auto-{}", self.conns.len())
            }
        } else {
            client_id.to_owned()
        };
        if client_id.contains(['/', '+', '#']) || (role == Role::Device && client_id != identity) {
            return false;
        }
        let Ok(r) = self.shared.register(
            identity,
            role,
            &client_id,
            String::new(),
            (true, std::time::Duration::ZERO),
        ) else {
            return false;
        };
        let version = if v5 { Version::V5 } else { Version::V4 };
        self.conns.push(Conn {
            client_id,
            identity: identity.to_owned(),
            role,
            version,
            conn: r.conn,
            rx: r.rx,
            _kick: r.kick,
            queued: r.queued,
            buf: BytesMut::new(),
            out: Writer {
                version,
                buf: BytesMut::new(),
                max_packet: 1024,
            },
            next_pkid: 0,
        });
        true
    }

    /// Connections held.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Encodes `packet` in connection `slot`'s protocol and feeds it.
    pub fn send(&mut self, slot: usize, packet: Packet) {
        let Some(c) = self.conns.get(slot) else {
            return;
        };
        let mut bytes = BytesMut::new();
        // A packet the encoder refuses is not sent.
        let encoded = match c.version {
            Version::V4 => encode4(packet, &mut bytes).is_ok(),
            Version::V5 => encode5(packet, &mut bytes).is_ok(),
        };
        if !encoded {
            return;
        }
        self.feed(slot, &bytes);
    }

    /// Feeds raw bytes to connection `slot`; a malformed packet, a
    /// DISCONNECT or a protocol error drops the connection.
    pub fn feed(&mut self, slot: usize, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        c.buf.extend_from_slice(bytes);
        let mut session = Session {
            shared: &self.shared,
            identity: &c.identity,
            role: c.role,
            client_id: &c.client_id,
            conn: c.conn,
            out: std::mem::replace(
                &mut c.out,
                Writer {
                    version: c.version,
                    buf: BytesMut::new(),
                    max_packet: 1024,
                },
            ),
            next_pkid: c.next_pkid,
            blocked: Vec::new(),
            queued: c.queued.clone(),
            owed: std::collections::VecDeque::new(),
            awaiting: std::collections::HashMap::new(),
        };
        let mut keep = true;
        loop {
            match codec::read(c.version, &mut c.buf, self.shared.max_packet) {
                Ok(In::Disconnect) | Err(ReadError::Malformed(_)) => {
                    keep = false;
                    break;
                }
                Ok(p) => {
                    if session.handle(p).is_err() {
                        keep = false;
                        break;
                    }
                }
                Err(ReadError::Incomplete) => break,
            }
        }
        let next_pkid = session.next_pkid;
        let mut out = session.out;
        out.buf.clear();
        c.out = out;
        c.next_pkid = next_pkid;
        if !keep {
            self.drop_connection(slot);
        }
    }

    /// Delivers what is queued for connection `slot`.
    pub fn drain(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot) else {
            return;
        };
        while let Ok(mut m) = c.rx.try_recv() {
            // Nobody acknowledges here: the publisher's receipt fails.
            drop(m.receipt.take());
            if c.role != Role::Backend {
                c.queued.sub(super::router::retained_size(&m));
            }
            let pkid = c.next_pkid;
            c.next_pkid = c.next_pkid.checked_add(1).unwrap_or(1);
            c.out.publish(&m, m.qos, pkid);
            c.out.buf.clear();
        }
    }

    /// Drops connection `slot` (the socket closed).
    pub fn drop_connection(&mut self, slot: usize) {
        if slot < self.conns.len() {
            let c = self.conns.swap_remove(slot);
            self.shared.unregister(&c.client_id, c.conn, true);
        }
    }

    /// Asserts the router's bookkeeping; panics on a violation.
    pub fn check(&self) {
        let router = self.shared.router();
        let retained: usize = router.retained_by.values().sum();
        assert_eq!(retained, router.retained.len(), "retained counts");
        assert!(router.retained.bytes() <= self.shared.limits.max_retained_bytes);
        for (identity, n) in &router.claim_connections {
            let held = router
                .clients
                .values()
                .filter(|c| c.role == Role::Claimant && c.identity == *identity)
                .count();
            assert_eq!(held, *n, "claim connections of {identity}");
        }
        assert!(
            self.shared.queued_total.load(Ordering::Relaxed)
                <= self.shared.limits.max_queued_bytes_total
        );
        for (id, c) in &router.clients {
            if c.role != Role::Backend {
                assert!(c.filters.len() <= self.shared.limits.max_subscriptions);
                assert!(
                    c.queued.own.load(Ordering::Relaxed) <= self.shared.limits.max_queued_bytes
                );
            }
            for (group, filter) in &c.filters {
                if group.is_none() && super::router::valid_topic(filter) {
                    assert!(router.subscriptions.subscribed(id, filter), "{id} {filter}");
                }
            }
        }
    }
}

fn qos4(q: u8) -> rumqttc::mqttbytes::QoS {
    match q % 3 {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q % 3 {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn encode4(packet: Packet, out: &mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error> {
    let p = match packet {
        Packet::Subscribe(filters) => v4::Packet::Subscribe(v4::Subscribe {
            pkid: 1,
            filters: filters
                .into_iter()
                .map(|(path, q)| v4::SubscribeFilter::new(path, qos4(q)))
                .collect(),
        }),
        Packet::Unsubscribe(topics) => v4::Packet::Unsubscribe(v4::Unsubscribe { pkid: 1, topics }),
        Packet::Publish {
            topic,
            payload,
            qos,
            retain,
            ..
        } => {
            let mut p = v4::Publish::new(topic, qos4(qos), payload);
            p.retain = retain;
            p.pkid = u16::from(qos % 3 > 0);
            v4::Packet::Publish(p)
        }
        Packet::PingReq => v4::Packet::PingReq,
        Packet::Disconnect => v4::Packet::Disconnect,
    };
    p.write(out, usize::MAX)
}

fn encode5(packet: Packet, out: &mut BytesMut) -> Result<usize, rumqttc::v5::mqttbytes::Error> {
    let p = match packet {
        Packet::Subscribe(filters) => v5::Packet::Subscribe(v5::Subscribe {
            pkid: 1,
            filters: filters
                .into_iter()
                .map(|(path, q)| v5::Filter::new(path, qos5(q)))
                .collect(),
            properties: None,
        }),
        Packet::Unsubscribe(filters) => v5::Packet::Unsubscribe(v5::Unsubscribe {
            pkid: 1,
            filters,
            properties: None,
        }),
        Packet::Publish {
            topic,
            payload,
            qos,
            retain,
            response_topic,
        } => {
            let properties = response_topic.map(|r| v5::PublishProperties {
                response_topic: Some(r),
                ..Default::default()
            });
            let mut p = v5::Publish::new(topic, qos5(qos), Bytes::from(payload), properties);
            p.retain = retain;
            p.pkid = u16::from(qos % 3 > 0);
            v5::Packet::Publish(p)
        }
        Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
        Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
    };
    p.write(out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_script_keeps_the_books() {
        let mut h = Harness::new();
        assert!(h.connect(0, "svc", true));
        assert!(h.connect(2, "", false));
        assert!(!h.connect(3, "dev-a", true), "another device's id");
        h.send(0, Packet::Subscribe(vec![("dt/#".into(), 1)]));
        for n in 0..10 {
            h.send(
                1,
                Packet::Publish {
                    topic: format!("dt/dev-a/{n}"),
                    payload: vec![1; 300],
                    qos: 1,
                    retain: true,
                    response_topic: None,
                },
            );
            h.check();
        }
        h.drain(0);
        h.send(0, Packet::Unsubscribe(vec!["dt/#".into()]));
        h.send(0, Packet::PingReq);
        h.send(1, Packet::Subscribe(vec![(vec!["a"; 3000].join("/"), 1)]));
        assert_eq!(h.connections(), 2);
        // A malformed SUBSCRIBE (no payload) drops the connection.
        h.feed(1, &[0x82, 0x00]);
        assert_eq!(h.connections(), 1);
        h.check();
        assert!(h.connect(3, "dev-b", true));
        h.send(1, Packet::Disconnect);
        assert_eq!(h.connections(), 1);
        h.check();
    }
}
