//! Retained messages kept in a [`RetainedStore`], so that they survive a
//! restart: loaded when the broker starts, and written, one at a time in
//! the order the broker applied them, by a writer task. A device's QoS 1
//! retained publish is acknowledged only once its write is durable (its
//! [`Delivery`] is acknowledged by the writer; a failed write closes the
//! device's connection without a PUBACK, so the device sends it again).

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::codec::Message;
use super::receipt::Delivery;
use crate::store::{RetainedMessage, RetainedStore};

/// One change to write: the topic and what it now holds (`None`: nothing).
pub(super) struct Write {
    pub(super) topic: String,
    pub(super) message: Option<RetainedMessage>,
    /// Acknowledged once the write is durable (dropped if it failed).
    pub(super) delivery: Option<Delivery>,
}

/// The MQTT 5 properties a retained message keeps (a topic alias and
/// subscription identifiers belong to one connection, not to the message).
#[derive(Serialize, Deserialize, Default)]
struct Kept {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_format: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
}

/// The stored form of `m` (published by `owner`).
pub(super) fn to_record(m: &Message, owner: &str) -> RetainedMessage {
    let properties = m
        .properties
        .as_ref()
        .map(|p| {
            serde_json::to_vec(&Kept {
                payload_format: p.payload_format_indicator,
                expiry: p.message_expiry_interval,
                response_topic: p.response_topic.clone(),
                correlation: p.correlation_data.as_ref().map(|b| b.to_vec()),
                user: p.user_properties.clone(),
                content_type: p.content_type.clone(),
            })
            .unwrap_or_default()
        })
        .unwrap_or_default();
    RetainedMessage {
        topic: m.topic.clone(),
        payload: m.payload.to_vec(),
        qos: m.qos.min(1),
        properties,
        owner: owner.to_owned(),
    }
}

/// The message a stored record stands for, or `None` if its properties
/// cannot be read (a corrupt row is skipped, not fatal).
pub(super) fn from_record(r: RetainedMessage) -> Option<(Message, String)> {
    let properties = if r.properties.is_empty() {
        None
    } else {
        let k: Kept = serde_json::from_slice(&r.properties).ok()?;
        Some(PublishProperties {
            payload_format_indicator: k.payload_format,
            message_expiry_interval: k.expiry,
            topic_alias: None,
            response_topic: k.response_topic,
            correlation_data: k.correlation.map(Bytes::from),
            user_properties: k.user,
            subscription_identifiers: Vec::new(),
            content_type: k.content_type,
        })
    };
    Some((
        Message {
            topic: r.topic,
            payload: Bytes::from(r.payload),
            qos: r.qos.min(1),
            retain: true,
            properties,
            receipt: None,
        },
        r.owner,
    ))
}

/// Writes the changes in the order they come; ends when the broker drops
/// its sender.
pub(super) async fn writer(store: Arc<dyn RetainedStore>, mut rx: mpsc::UnboundedReceiver<Write>) {
    while let Some(w) = rx.recv().await {
        let result = match &w.message {
            Some(m) => store.put_retained(m).await,
            None => store.delete_retained(&w.topic).await,
        };
        match result {
            Ok(()) => {
                if let Some(d) = w.delivery {
                    d.acknowledge();
                }
            }
            Err(e) => {
                // The delivery is dropped unacknowledged: the publisher is
                // not acknowledged and sends the message again.
                tracing::warn!(topic = w.topic, "retained message not stored: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_its_properties() {
        let m = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: true,
            properties: Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                topic_alias: Some(3),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
                subscription_identifiers: vec![7],
                content_type: Some("application/json".into()),
            }),
            receipt: None,
        };
        let (back, owner) = from_record(to_record(&m, "dev-1")).unwrap();
        assert_eq!(owner, "dev-1");
        assert_eq!(
            (back.topic.as_str(), &back.payload[..], back.qos),
            ("a/b", &b"x"[..], 1)
        );
        let p = back.properties.unwrap();
        assert_eq!(p.topic_alias, None, "an alias belongs to a connection");
        assert!(p.subscription_identifiers.is_empty());
        assert_eq!(p.response_topic.as_deref(), Some("r/t"));
        assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert!(
            from_record(RetainedMessage {
                properties: b"{".to_vec(),
                ..to_record(&m, "o")
            })
            .is_none()
        );
    }
}

/// One change to a kept session: its record, or `None` when it ended.
pub(super) struct SessionWrite {
    pub(super) client_id: String,
    pub(super) record: Option<Vec<u8>>,
    /// Acknowledged once the write is durable (dropped if it failed).
    pub(super) delivery: Option<Delivery>,
}

/// A session as stored: who holds it, how long it outlives a connection,
/// when it ends (`None` while its client is connected), its subscriptions
/// and the messages waiting for it.
#[derive(Serialize, Deserialize)]
pub(super) struct SessionRecord {
    pub(super) identity: String,
    pub(super) role: String,
    pub(super) expiry_secs: u64,
    #[serde(default)]
    pub(super) expires_at: Option<u64>,
    pub(super) filters: Vec<(Option<String>, String, u8)>,
    #[serde(default)]
    pub(super) queue: Vec<QueuedRecord>,
}

/// A message waiting in a kept session.
#[derive(Serialize, Deserialize)]
pub(super) struct QueuedRecord {
    topic: String,
    /// Base64.
    payload: String,
    /// Base64 of the properties' encoding (empty: none).
    #[serde(default)]
    properties: String,
}

impl QueuedRecord {
    pub(super) fn of(m: &Message) -> Self {
        use base64::Engine as _;
        let r = to_record(m, "");
        let b64 = base64::engine::general_purpose::STANDARD;
        Self {
            topic: r.topic,
            payload: b64.encode(&r.payload),
            properties: b64.encode(&r.properties),
        }
    }

    pub(super) fn message(&self) -> Option<Message> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (mut m, _) = from_record(RetainedMessage {
            topic: self.topic.clone(),
            payload: b64.decode(&self.payload).ok()?,
            qos: 1,
            properties: b64.decode(&self.properties).ok()?,
            owner: String::new(),
        })?;
        m.retain = false;
        Some(m)
    }
}

/// Seconds since the epoch.
pub(super) fn epoch_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes session changes in the order they come.
pub(super) async fn session_writer(
    store: Arc<dyn crate::store::SessionStore>,
    mut rx: mpsc::UnboundedReceiver<SessionWrite>,
) {
    while let Some(w) = rx.recv().await {
        let result = match &w.record {
            Some(r) => store.put_session(&w.client_id, r).await,
            None => store.delete_session(&w.client_id).await,
        };
        match result {
            Ok(()) => {
                if let Some(d) = w.delivery {
                    d.acknowledge();
                }
            }
            Err(e) => tracing::warn!(client = w.client_id, "session not stored: {e}"),
        }
    }
}
