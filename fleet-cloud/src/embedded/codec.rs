//! MQTT 3.1.1 and 5 packets, read and written with rumqttc's codecs and
//! turned into one small vocabulary the broker works with.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    V4,
    V5,
}

/// A message travelling through the broker.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) qos: u8,
    pub(super) retain: bool,
    /// MQTT 5 properties (response topic, correlation data, user
    /// properties...), passed on to MQTT 5 subscribers.
    pub(super) properties: Option<v5::PublishProperties>,
    /// A QoS 1 delivery to a backend client that its publisher waits on
    /// ([`super::receipt`]).
    pub(super) receipt: Option<super::receipt::Delivery>,
}

/// What a client sent.
#[derive(Debug)]
pub(super) enum In {
    Connect {
        client_id: String,
        keep_alive: u16,
        will: Option<Message>,
        /// MQTT 5: the largest packet the client accepts.
        max_packet: Option<u32>,
        /// MQTT 3.1.1 Clean Session, MQTT 5 Clean Start: begin afresh,
        /// discarding any session the broker keeps for the client id.
        clean: bool,
        /// MQTT 5 Session Expiry Interval, seconds (absent: 0).
        session_expiry: Option<u32>,
    },
    Publish {
        pkid: u16,
        message: Message,
        /// The topic was not valid UTF-8 or used a topic alias.
        bad_topic: bool,
    },
    PubAck(u16),
    PubRel(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// A packet a client never sends to a server.
    Unexpected,
}

/// Why a read failed.
#[derive(Debug)]
pub(super) enum ReadError {
    /// More bytes are needed.
    Incomplete,
    /// The bytes are not MQTT, or the packet is larger than allowed.
    Malformed(String),
}

/// The protocol level of the CONNECT at the start of `buf`, once enough of
/// it has arrived.
pub(super) fn peek_version(buf: &[u8]) -> Result<Version, ReadError> {
    if buf.is_empty() {
        return Err(ReadError::Incomplete);
    }
    if buf[0] >> 4 != 1 {
        return Err(ReadError::Malformed(
            "the first packet is not CONNECT".into(),
        ));
    }
    // Remaining length: 1 to 4 bytes.
    let mut i = 1;
    loop {
        let Some(b) = buf.get(i) else {
            return Err(ReadError::Incomplete);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(ReadError::Malformed("bad remaining length".into()));
        }
    }
    let (Some(hi), Some(lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Err(ReadError::Incomplete);
    };
    let name_len = usize::from(*hi) << 8 | usize::from(*lo);
    let Some(level) = buf.get(i + 2 + name_len) else {
        return Err(ReadError::Incomplete);
    };
    match level {
        3 | 4 => Ok(Version::V4),
        5 => Ok(Version::V5),
        l => Err(ReadError::Malformed(format!(
            "unsupported protocol level {l}"
        ))),
    }
}

/// A variable byte integer at `buf[i..]`: its value and length.
fn var_int(buf: &[u8], i: usize) -> Result<(usize, usize), ReadError> {
    let mut value = 0usize;
    for n in 0..4 {
        let Some(b) = buf.get(i + n) else {
            return Err(ReadError::Incomplete);
        };
        value |= usize::from(b & 0x7F) << (7 * n);
        if b & 0x80 == 0 {
            return Ok((value, n + 1));
        }
    }
    Err(ReadError::Malformed("bad variable byte integer".into()))
}

/// The checks rumqttc's reader leaves out of a SUBSCRIBE at the front of
/// `buf`: the fixed header's flags must be `0010`, and each filter's
/// option byte must leave its reserved bits clear and name no QoS or
/// retain handling beyond the protocol's (MQTT 3.1.1 3.8.3.1, 5.0 3.8.3.1).
fn check_subscribe(version: Version, buf: &[u8]) -> Result<(), ReadError> {
    let malformed = |what: &str| Err(ReadError::Malformed(format!("SUBSCRIBE: {what}")));
    let Some(first) = buf.first() else {
        return Ok(());
    };
    if first >> 4 != 8 {
        return Ok(());
    }
    if first & 0x0F != 0b0010 {
        return malformed("reserved flags in the fixed header");
    }
    let (len, n) = var_int(buf, 1)?;
    let start = 1 + n;
    let Some(body) = buf.get(start..start + len) else {
        return Err(ReadError::Incomplete);
    };
    // Packet id, then (MQTT 5) the properties.
    let mut i = 2;
    if version == Version::V5 {
        let (props, n) = match var_int(body, i) {
            Ok(v) => v,
            Err(_) => return malformed("properties"),
        };
        i += n + props;
    }
    if i >= body.len() {
        return malformed("no topic filter");
    }
    while i < body.len() {
        let (Some(hi), Some(lo)) = (body.get(i), body.get(i + 1)) else {
            return malformed("truncated filter");
        };
        i += 2 + (usize::from(*hi) << 8 | usize::from(*lo));
        let Some(options) = body.get(i) else {
            return malformed("truncated options");
        };
        let bad = match version {
            Version::V4 => options & 0xFC != 0 || options & 0x03 == 3,
            Version::V5 => options & 0xC0 != 0 || options & 0x03 == 3 || (options >> 4) & 0x03 == 3,
        };
        if bad {
            return malformed("reserved bits in the subscription options");
        }
        i += 1;
    }
    Ok(())
}

fn qos4(q: QoS4) -> u8 {
    q as u8
}

fn qos5(q: QoS5) -> u8 {
    q as u8
}

fn to_qos4(q: u8) -> QoS4 {
    match q {
        0 => QoS4::AtMostOnce,
        _ => QoS4::AtLeastOnce,
    }
}

fn to_qos5(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        _ => QoS5::AtLeastOnce,
    }
}

/// The whole size of the packet that begins `buf` (fixed header included),
/// once its fixed header is in; `None` before, or if the header is
/// malformed (the next [`read`] says so).
pub(super) fn declared_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + (i + 1) + remaining);
        }
    }
    None
}

/// Reads one packet from the front of `buf`.
pub(super) fn read(version: Version, buf: &mut BytesMut, max: usize) -> Result<In, ReadError> {
    check_subscribe(version, buf)?;
    match version {
        Version::V4 => read4(buf, max),
        Version::V5 => read5(buf, max),
    }
}

fn read4(buf: &mut BytesMut, max: usize) -> Result<In, ReadError> {
    use rumqttc::mqttbytes::Error;
    let packet = match v4::Packet::read(buf, max) {
        Ok(p) => p,
        Err(Error::InsufficientBytes(_)) => return Err(ReadError::Incomplete),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    Ok(match packet {
        v4::Packet::Connect(c) => In::Connect {
            clean: c.clean_session,
            session_expiry: None,
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            max_packet: None,
            will: c.last_will.map(|w| Message {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
                properties: None,
                receipt: None,
            }),
        },
        v4::Packet::Publish(p) => In::Publish {
            pkid: p.pkid,
            message: Message {
                topic: p.topic,
                payload: p.payload,
                qos: qos4(p.qos),
                retain: p.retain,
                properties: None,
                receipt: None,
            },
            bad_topic: false,
        },
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRel(r) => In::PubRel(r.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos4(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect,
        _ => In::Unexpected,
    })
}

fn read5(buf: &mut BytesMut, max: usize) -> Result<In, ReadError> {
    use rumqttc::v5::mqttbytes::Error;
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    // A DISCONNECT of Remaining Length 0 is a normal disconnection (MQTT 5
    // 3.14.2.1: the reason code and properties may be left out), the form
    // most clients send; rumqttc's parser refuses it.
    if buf.starts_with(&[0xE0, 0x00]) {
        let _ = buf.split_to(2);
        return Ok(In::Disconnect);
    }
    let packet = match v5::Packet::read(buf, Some(max)) {
        Ok(p) => p,
        Err(Error::InsufficientBytes(_)) => return Err(ReadError::Incomplete),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    Ok(match packet {
        v5::Packet::Connect(c, will, _login) => In::Connect {
            max_packet: c.properties.as_ref().and_then(|p| p.max_packet_size),
            clean: c.clean_start,
            session_expiry: c
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval),
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            will: will.and_then(|w| {
                Some(Message {
                    topic: String::from_utf8(w.topic.to_vec()).ok()?,
                    payload: w.message,
                    qos: qos5(w.qos),
                    retain: w.retain,
                    properties: w.properties.map(|p| v5::PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        message_expiry_interval: p.message_expiry_interval,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        user_properties: p.user_properties,
                        content_type: p.content_type,
                        ..Default::default()
                    }),
                    receipt: None,
                })
            }),
        },
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec());
            let alias = p
                .properties
                .as_ref()
                .is_some_and(|pr| pr.topic_alias.is_some());
            let bad_topic = topic.is_err() || alias;
            let properties = p.properties.map(|mut pr| {
                pr.topic_alias = None;
                pr.subscription_identifiers.clear();
                pr
            });
            In::Publish {
                pkid: p.pkid,
                message: Message {
                    topic: topic.unwrap_or_default(),
                    payload: p.payload,
                    qos: qos5(p.qos),
                    retain: p.retain,
                    properties,
                    receipt: None,
                },
                bad_topic,
            }
        }
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRel(r) => In::PubRel(r.pkid),
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos5(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(_) => In::Disconnect,
        _ => In::Unexpected,
    })
}

/// How a CONNECT is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnAckCode {
    Accepted,
    NotAuthorized,
    BadClientId,
    ServerUnavailable,
    /// A limit on connections (MQTT 3.1.1: server unavailable).
    QuotaExceeded,
}

impl ConnAckCode {
    /// The code as metrics label it.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::NotAuthorized => "not_authorized",
            Self::BadClientId => "bad_client_id",
            Self::ServerUnavailable => "server_unavailable",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// How a QoS 1 PUBLISH is answered (MQTT 3.1.1 has no reason codes: a
/// plain PUBACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PubAckCode {
    Success,
    NotAuthorized,
    TopicNameInvalid,
    QuotaExceeded,
}

/// Why a subscription is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SubRefusal {
    NotAuthorized,
    Invalid,
    QuotaExceeded,
}

/// Writes packets for one connection.
pub(super) struct Writer {
    pub(super) version: Version,
    pub(super) buf: BytesMut,
    pub(super) max_packet: usize,
}

impl Writer {
    fn put4(&mut self, p: v4::Packet) {
        // A packet we build never exceeds the limit we checked it against;
        // an error here drops that one packet.
        let _ = p.write(&mut self.buf, usize::MAX);
    }

    fn put5(&mut self, p: v5::Packet) {
        let _ = p.write(&mut self.buf, None);
    }

    /// The CONNACK: `session_present` when a kept session was resumed;
    /// `session_expiry` (MQTT 5) when the broker grants another expiry
    /// than the client asked for.
    pub(super) fn connack(
        &mut self,
        code: ConnAckCode,
        assigned: Option<String>,
        max_packet: u32,
        server_keep_alive: Option<u16>,
        session: (bool, Option<u32>),
    ) {
        let (session_present, session_expiry) = session;
        match self.version {
            Version::V4 => {
                let code = match code {
                    ConnAckCode::Accepted => v4::ConnectReturnCode::Success,
                    ConnAckCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                    ConnAckCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                    ConnAckCode::ServerUnavailable | ConnAckCode::QuotaExceeded => {
                        v4::ConnectReturnCode::ServiceUnavailable
                    }
                };
                self.put4(v4::Packet::ConnAck(v4::ConnAck::new(code, session_present)));
            }
            Version::V5 => {
                let code = match code {
                    ConnAckCode::Accepted => v5::ConnectReturnCode::Success,
                    ConnAckCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                    ConnAckCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                    ConnAckCode::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
                    ConnAckCode::QuotaExceeded => v5::ConnectReturnCode::QuotaExceeded,
                };
                let properties = v5::ConnAckProperties {
                    session_expiry_interval: session_expiry,
                    receive_max: None,
                    max_qos: Some(1),
                    retain_available: Some(1),
                    max_packet_size: Some(max_packet),
                    assigned_client_identifier: assigned,
                    topic_alias_max: Some(0),
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(1),
                    subscription_identifiers_available: Some(0),
                    shared_subscription_available: Some(1),
                    server_keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                };
                self.put5(v5::Packet::ConnAck(v5::ConnAck {
                    session_present,
                    code,
                    properties: Some(properties),
                }));
            }
        }
    }

    /// Writes a message; false if it is larger than the client accepts.
    pub(super) fn publish(&mut self, m: &Message, qos: u8, pkid: u16) -> bool {
        match self.version {
            Version::V4 => {
                let mut p = v4::Publish::new(m.topic.as_str(), to_qos4(qos), Vec::new());
                p.payload = m.payload.clone();
                p.pkid = pkid;
                p.retain = m.retain;
                if p.size() > self.max_packet {
                    return false;
                }
                self.put4(v4::Packet::Publish(p));
            }
            Version::V5 => {
                let mut p = v5::Publish::new(
                    m.topic.as_str(),
                    to_qos5(qos),
                    m.payload.clone(),
                    m.properties.clone(),
                );
                p.pkid = pkid;
                p.retain = m.retain;
                if p.size() > self.max_packet {
                    return false;
                }
                self.put5(v5::Packet::Publish(p));
            }
        }
        true
    }

    pub(super) fn puback(&mut self, pkid: u16, code: PubAckCode) {
        match self.version {
            Version::V4 => self.put4(v4::Packet::PubAck(v4::PubAck::new(pkid))),
            Version::V5 => {
                let mut ack = v5::PubAck::new(pkid, None);
                ack.reason = match code {
                    PubAckCode::Success => v5::PubAckReason::Success,
                    PubAckCode::NotAuthorized => v5::PubAckReason::NotAuthorized,
                    PubAckCode::TopicNameInvalid => v5::PubAckReason::TopicNameInvalid,
                    PubAckCode::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                };
                self.put5(v5::Packet::PubAck(ack));
            }
        }
    }

    pub(super) fn pubrec(&mut self, pkid: u16) {
        match self.version {
            Version::V4 => self.put4(v4::Packet::PubRec(v4::PubRec::new(pkid))),
            Version::V5 => self.put5(v5::Packet::PubRec(v5::PubRec::new(pkid, None))),
        }
    }

    pub(super) fn pubcomp(&mut self, pkid: u16) {
        match self.version {
            Version::V4 => self.put4(v4::Packet::PubComp(v4::PubComp::new(pkid))),
            Version::V5 => self.put5(v5::Packet::PubComp(v5::PubComp::new(pkid, None))),
        }
    }

    /// `granted`: per filter, the QoS granted or why not.
    pub(super) fn suback(&mut self, pkid: u16, granted: &[Result<u8, SubRefusal>]) {
        match self.version {
            Version::V4 => {
                let codes = granted
                    .iter()
                    .map(|g| match g {
                        Ok(q) => v4::SubscribeReasonCode::Success(to_qos4(*q)),
                        Err(_) => v4::SubscribeReasonCode::Failure,
                    })
                    .collect();
                self.put4(v4::Packet::SubAck(v4::SubAck::new(pkid, codes)));
            }
            Version::V5 => {
                let codes = granted
                    .iter()
                    .map(|g| match g {
                        Ok(q) => v5::SubscribeReasonCode::Success(to_qos5(*q)),
                        Err(SubRefusal::NotAuthorized) => v5::SubscribeReasonCode::NotAuthorized,
                        Err(SubRefusal::Invalid) => v5::SubscribeReasonCode::TopicFilterInvalid,
                        Err(SubRefusal::QuotaExceeded) => v5::SubscribeReasonCode::QuotaExceeded,
                    })
                    .collect();
                self.put5(v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: codes,
                    properties: None,
                }));
            }
        }
    }

    pub(super) fn unsuback(&mut self, pkid: u16, removed: &[bool]) {
        match self.version {
            Version::V4 => self.put4(v4::Packet::UnsubAck(v4::UnsubAck::new(pkid))),
            Version::V5 => {
                let reasons = removed
                    .iter()
                    .map(|r| {
                        if *r {
                            v5::UnsubAckReason::Success
                        } else {
                            v5::UnsubAckReason::NoSubscriptionExisted
                        }
                    })
                    .collect();
                self.put5(v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons,
                    properties: None,
                }));
            }
        }
    }

    pub(super) fn pingresp(&mut self) {
        match self.version {
            Version::V4 => self.put4(v4::Packet::PingResp),
            Version::V5 => self.put5(v5::Packet::PingResp(v5::PingResp)),
        }
    }

    /// MQTT 5 only: 3.1.1 servers just close the connection.
    pub(super) fn disconnect(&mut self, reason: v5::DisconnectReasonCode) {
        if self.version == Version::V5 {
            // Written by hand: rumqttc 0.25 miscounts the length of a
            // DISCONNECT with a reason code. Type, remaining length 2, the
            // reason, an empty property block.
            self.buf
                .extend_from_slice(&[0xE0, 0x02, reason as u8, 0x00]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_len_reads_the_fixed_header() {
        assert_eq!(declared_len(&[0x30]), None);
        assert_eq!(declared_len(&[0x30, 0x05]), Some(7));
        // 120 KiB: three length bytes.
        let n = 120 * 1024;
        let head = [
            0x30,
            (n % 128) as u8 | 0x80,
            (n / 128 % 128) as u8 | 0x80,
            (n / 16384) as u8,
        ];
        assert_eq!(declared_len(&head), Some(1 + 3 + n));
        assert_eq!(declared_len(&[0x30, 0x80, 0x80]), None);
        assert_eq!(declared_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), None);
    }

    /// MQTT 5 3.14.2.1: a DISCONNECT without reason code and properties
    /// (Remaining Length 0) is a normal disconnection, as is one with
    /// reason 0; what follows it in the buffer stays.
    #[test]
    fn a_short_mqtt5_disconnect_is_a_disconnect() {
        let mut b = BytesMut::from(&[0xE0, 0x00, 0xC0, 0x00][..]);
        assert!(matches!(
            read(Version::V5, &mut b, 1024),
            Ok(In::Disconnect)
        ));
        assert_eq!(&b[..], &[0xC0, 0x00]);
        let mut b = BytesMut::from(&[0xE0, 0x02, 0x00, 0x00][..]);
        assert!(matches!(
            read(Version::V5, &mut b, 1024),
            Ok(In::Disconnect)
        ));
        let mut b = BytesMut::from(&[0xE0, 0x00][..]);
        assert!(matches!(
            read(Version::V4, &mut b, 1024),
            Ok(In::Disconnect)
        ));
    }

    /// A SUBSCRIBE with one filter and the given header flags and options.
    fn subscribe(version: Version, flags: u8, options: u8) -> BytesMut {
        let filter = b"a/b";
        let mut body = vec![0, 1];
        if version == Version::V5 {
            body.push(0);
        }
        body.extend_from_slice(&[0, 3]);
        body.extend_from_slice(filter);
        body.push(options);
        let mut b = BytesMut::new();
        b.extend_from_slice(&[0x80 | flags, u8::try_from(body.len()).unwrap()]);
        b.extend_from_slice(&body);
        b
    }

    #[test]
    fn subscribe_reserved_bits_are_malformed() {
        for v in [Version::V4, Version::V5] {
            assert!(matches!(
                read(v, &mut subscribe(v, 2, 1), 1024),
                Ok(In::Subscribe { .. })
            ));
            for (flags, options) in [(0, 1), (3, 1), (2, 0x80), (2, 3)] {
                assert!(
                    matches!(
                        read(v, &mut subscribe(v, flags, options), 1024),
                        Err(ReadError::Malformed(_))
                    ),
                    "{v:?} flags {flags} options {options:#x}"
                );
            }
        }
        // MQTT 3.1.1 reserves bits 2-7; MQTT 5 uses 2-5.
        assert!(matches!(
            read(Version::V4, &mut subscribe(Version::V4, 2, 0x04), 1024),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            read(Version::V5, &mut subscribe(Version::V5, 2, 0x04), 1024),
            Ok(In::Subscribe { .. })
        ));
        assert!(matches!(
            read(Version::V5, &mut subscribe(Version::V5, 2, 0x31), 1024),
            Err(ReadError::Malformed(_))
        ));
        // Incomplete stays incomplete.
        let mut half = subscribe(Version::V4, 2, 1);
        half.truncate(4);
        assert!(matches!(
            read(Version::V4, &mut half, 1024),
            Err(ReadError::Incomplete)
        ));
    }
}
