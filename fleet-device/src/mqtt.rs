//! One face for rumqttc's MQTT 5 and MQTT 3.1.1 clients, so the pump is
//! written once. Nothing here is public.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{TlsConfiguration, Transport};

/// Which MQTT the agent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// MQTT 5 (the default): reason codes on acknowledgements, so a refused
    /// publish or a session taken over is reported precisely.
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers without MQTT 5.
    V311,
}

/// What the connection reports, whichever protocol.
#[derive(Debug)]
pub(crate) enum Ev {
    ConnAck,
    SubAck {
        ok: bool,
    },
    Publish {
        topic: String,
        payload: Bytes,
    },
    /// A publish was written to the network with this packet id (0: QoS 0).
    OutgoingPublish(u16),
    /// The broker acknowledged a publish; `refused`: its MQTT 5 reason when
    /// it did not accept it.
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    Other,
    Error {
        reason: String,
        /// The broker said another connection took this client id (MQTT 5).
        taken_over: bool,
    },
}

pub(crate) struct Options {
    pub(crate) client_id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: rustls::ClientConfig,
    pub(crate) keep_alive: Duration,
    pub(crate) max_packet: u32,
    pub(crate) capacity: usize,
    /// A last will, retained at QoS 1: topic and payload.
    pub(crate) will: Option<(String, Vec<u8>)>,
}

#[derive(Clone)]
pub(crate) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

pub(crate) enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

/// Socket options: no Nagle delay (a request and its answer are small
/// packets; with Nagle's algorithm and delayed acknowledgements each
/// exchange can wait 40 ms), and 10 s for TCP and TLS to connect (a
/// handshake on a slow link, or against a broker in a connection storm,
/// takes longer than rumqttc's 5 s default).
/// QoS 1 publishes in flight at once (AWS IoT's limit per connection).
pub(crate) const MAX_INFLIGHT: u16 = 100;

pub(crate) fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(10);
    n
}

pub(crate) fn connect(protocol: Protocol, o: Options) -> (Client, EventLoop) {
    let transport = Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(o.tls)));
    match protocol {
        Protocol::V5 => {
            let mut m = rumqttc::v5::MqttOptions::new(o.client_id, o.host, o.port);
            m.set_keep_alive(o.keep_alive)
                .set_max_packet_size(Some(o.max_packet))
                .set_clean_start(true)
                .set_network_options(network_options())
                .set_connection_timeout(10)
                // rumqttc keeps a slot for every packet id it may have in
                // flight, allocated up front: u16::MAX of them by default,
                // about 8 MiB per connection. AWS IoT allows 100.
                .set_outgoing_inflight_upper_limit(MAX_INFLIGHT)
                .set_transport(transport);
            if let Some((topic, payload)) = o.will {
                m.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    topic,
                    payload,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    None,
                ));
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(m, o.capacity);
            (Client::V5(c), EventLoop::V5(Box::new(e)))
        }
        Protocol::V311 => {
            let mut m = rumqttc::MqttOptions::new(o.client_id, o.host, o.port);
            let max = usize::try_from(o.max_packet).unwrap_or(usize::MAX);
            m.set_keep_alive(o.keep_alive)
                .set_max_packet_size(max, max)
                .set_clean_session(true)
                .set_transport(transport);
            if let Some((topic, payload)) = o.will {
                m.set_last_will(rumqttc::LastWill::new(
                    topic,
                    payload,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            }
            let (c, mut e) = rumqttc::AsyncClient::new(m, o.capacity);
            e.set_network_options(network_options());
            (Client::V4(c), EventLoop::V4(Box::new(e)))
        }
    }
}

impl Client {
    /// Hands a publish to the client without waiting; fails when its queue
    /// is full (the pump must never wait on the loop it drives).
    pub(crate) fn try_publish(&self, topic: &str, qos: u8, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Self::V5(c) => {
                let q = if qos == 0 {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                };
                c.try_publish(topic, q, false, payload)
                    .map_err(|e| e.to_string())
            }
            Self::V4(c) => {
                let q = if qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.try_publish(topic, q, false, payload)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// As [`try_publish`](Self::try_publish), retained, at QoS 1.
    pub(crate) fn try_publish_retained(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Self::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    payload,
                )
                .map_err(|e| e.to_string()),
            Self::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
                .map_err(|e| e.to_string()),
        }
    }

    pub(crate) fn try_subscribe_many(&self, filters: Vec<String>) -> Result<(), String> {
        match self {
            Self::V5(c) => c
                .try_subscribe_many(filters.into_iter().map(|f| {
                    rumqttc::v5::mqttbytes::v5::Filter::new(
                        f,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    )
                }))
                .map_err(|e| e.to_string()),
            Self::V4(c) => c
                .try_subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, rumqttc::QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub(crate) fn try_disconnect(&self) {
        match self {
            Self::V5(c) => {
                let _ = c.try_disconnect();
            }
            Self::V4(c) => {
                let _ = c.try_disconnect();
            }
        }
    }
}

impl EventLoop {
    pub(crate) async fn poll(&mut self) -> Ev {
        match self {
            Self::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
                use rumqttc::v5::{ConnectionError, Event, StateError};
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(a))) => Ev::SubAck {
                        ok: a
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                    },
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ev::PubAck {
                        pkid: a.pkid,
                        refused: match a.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            r => Some(format!("{r:?}")),
                        },
                    },
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        Ev::OutgoingPublish(pkid)
                    }
                    Ok(_) => Ev::Other,
                    Err(err) => Ev::Error {
                        taken_over: matches!(
                            &err,
                            ConnectionError::MqttState(StateError::ServerDisconnect {
                                reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver,
                                ..
                            })
                        ),
                        reason: err.to_string(),
                    },
                }
            }
            Self::V4(e) => {
                use rumqttc::{Event, Packet, SubscribeReasonCode};
                match e.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(a))) => Ev::SubAck {
                        ok: a
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish {
                        topic: p.topic,
                        payload: p.payload,
                    },
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ev::PubAck {
                        pkid: a.pkid,
                        refused: None,
                    },
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        Ev::OutgoingPublish(pkid)
                    }
                    Ok(_) => Ev::Other,
                    Err(err) => Ev::Error {
                        taken_over: false,
                        reason: err.to_string(),
                    },
                }
            }
        }
    }
}
