//! Presence told by the devices themselves: a retained birth message and
//! a last will on [`Topic::Presence`](crate::topic::Topic::Presence)
//! (`{prefix}/things/{thing}/presence`), for brokers that report no
//! lifecycle events (Mosquitto, most MQTT brokers). AWS IoT Core and
//! fleet's embedded broker publish lifecycle events themselves, so a
//! device agent sends these only when told to.
//!
//! The payload is AWS IoT's lifecycle event's JSON (`clientId`,
//! `timestamp`, `eventType`, `sessionIdentifier`, and for a disconnect
//! `clientInitiatedDisconnect` and `disconnectReason`), so one reader
//! handles both:
//!
//! - at each connection, the agent publishes a retained **birth**
//!   (`connected`);
//! - its **last will**, retained too, says `disconnected` with
//!   `CONNECTION_LOST`: the broker publishes it when the connection ends
//!   without a DISCONNECT (a killed process, a lost link, a keep-alive
//!   timeout);
//! - before a clean DISCONNECT (which discards the will) the agent
//!   publishes a retained `disconnected` with
//!   `CLIENT_INITIATED_DISCONNECT`.
//!
//! The retained message is always the last word, so a backend that
//! (re)subscribes learns every device's state at once.
//!
//! ```
//! use fleet_core::presence::{PresenceEvent, PresenceKind};
//! let thing = fleet_core::ThingName::new("pump-1").unwrap();
//! assert_eq!(fleet_core::presence::topic(&thing), "fleet/things/pump-1/presence");
//! let birth = PresenceEvent::birth("pump-1", "5f0c", 1_700_000_000_000);
//! let text = birth.to_json();
//! let read = PresenceEvent::parse(text.as_bytes()).unwrap();
//! assert_eq!(read.event_type, PresenceKind::Connected);
//! assert_eq!(read.session_identifier, "5f0c");
//! let will = PresenceEvent::will("pump-1", "5f0c", 1_700_000_000_000);
//! assert_eq!(will.disconnect_reason.as_deref(), Some("CONNECTION_LOST"));
//! assert!(PresenceEvent::parse(b"{\"eventType\":\"connected\"}").is_err());
//! ```

use alloc::string::{String, ToString};
use core::fmt;

use serde::{Deserialize, Serialize};

/// The topic prefix presence lives under: not `$aws`, since AWS IoT (and
/// fleet's embedded broker, as AWS does) keeps no retained message on a
/// reserved topic.
pub const PREFIX: &str = "fleet";

/// The presence topic of `thing`: `fleet/things/{thing}/presence`.
pub fn topic(thing: &crate::ThingName<'_>) -> String {
    alloc::format!("{PREFIX}/things/{}/presence", thing.as_str())
}

/// The largest presence payload read, in bytes.
pub const MAX_PAYLOAD: usize = 1024;

/// AWS IoT's reason for a disconnect the client asked for.
pub const CLIENT_INITIATED_DISCONNECT: &str = "CLIENT_INITIATED_DISCONNECT";
/// AWS IoT's reason for a connection that ended without a DISCONNECT: what
/// a last will reports (the broker does not say why).
pub const CONNECTION_LOST: &str = "CONNECTION_LOST";

/// AWS IoT's disconnect reasons, the only ones read.
pub const REASONS: [&str; 9] = [
    CLIENT_INITIATED_DISCONNECT,
    "SERVER_INITIATED_DISCONNECT",
    "MQTT_KEEP_ALIVE_TIMEOUT",
    "DUPLICATE_CLIENTID",
    "AUTH_ERROR",
    CONNECTION_LOST,
    "CLIENT_ERROR",
    "THROTTLED",
    "SERVER_ERROR",
];

/// Connected or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    /// A birth: the connection is up.
    Connected,
    /// A goodbye or a last will: the connection ended.
    Disconnected,
}

/// A presence message, in AWS IoT's lifecycle event shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceEvent {
    /// The MQTT client id.
    pub client_id: String,
    /// When, by the device's clock (ms since the Unix epoch): for a will,
    /// when the connection began. A backend records the time it heard it.
    #[serde(default)]
    pub timestamp: u64,
    /// Connected or disconnected.
    pub event_type: PresenceKind,
    /// Identifies the agent's session: a birth and the will or goodbye
    /// that ends it carry the same one, so that a late will of a session
    /// another took over is told apart.
    pub session_identifier: String,
    /// For a disconnect: whether the client asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_initiated_disconnect: Option<bool>,
    /// For a disconnect: why, one of [`REASONS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
}

/// A presence payload that is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceError {
    /// Larger than [`MAX_PAYLOAD`].
    TooLarge(usize),
    /// Not the JSON of a presence event.
    Malformed(String),
    /// A field out of bounds: an empty or long session or client id, a
    /// disconnect without a known reason, a connect with one.
    Invalid(&'static str),
}

impl fmt::Display for PresenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "presence payload of {n} bytes (at most {MAX_PAYLOAD})"),
            Self::Malformed(e) => write!(f, "not a presence event: {e}"),
            Self::Invalid(what) => write!(f, "invalid presence event: {what}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PresenceError {}

impl PresenceEvent {
    /// The birth an agent publishes, retained, once connected.
    pub fn birth(client_id: &str, session: &str, now_ms: u64) -> Self {
        Self {
            client_id: client_id.to_string(),
            timestamp: now_ms,
            event_type: PresenceKind::Connected,
            session_identifier: session.to_string(),
            client_initiated_disconnect: None,
            disconnect_reason: None,
        }
    }

    /// The last will an agent connects with (retained): the connection
    /// was lost.
    pub fn will(client_id: &str, session: &str, connected_ms: u64) -> Self {
        Self::ended(client_id, session, connected_ms, CONNECTION_LOST)
    }

    /// What an agent publishes, retained, before a clean disconnect.
    pub fn goodbye(client_id: &str, session: &str, now_ms: u64) -> Self {
        Self::ended(client_id, session, now_ms, CLIENT_INITIATED_DISCONNECT)
    }

    fn ended(client_id: &str, session: &str, at: u64, reason: &str) -> Self {
        Self {
            client_id: client_id.to_string(),
            timestamp: at,
            event_type: PresenceKind::Disconnected,
            session_identifier: session.to_string(),
            client_initiated_disconnect: Some(reason == CLIENT_INITIATED_DISCONNECT),
            disconnect_reason: Some(reason.to_string()),
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and options always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a presence payload, checked: at most [`MAX_PAYLOAD`] bytes, a
    /// session identifier and client id of 1 to 128 bytes, a disconnect
    /// with one of [`REASONS`], a connect without one.
    pub fn parse(payload: &[u8]) -> Result<Self, PresenceError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(PresenceError::TooLarge(payload.len()));
        }
        let e: Self =
            serde_json::from_slice(payload).map_err(|e| PresenceError::Malformed(e.to_string()))?;
        let bounded = |s: &str| (1..=128).contains(&s.len());
        if !bounded(&e.session_identifier) {
            return Err(PresenceError::Invalid("sessionIdentifier: 1 to 128 bytes"));
        }
        if !bounded(&e.client_id) {
            return Err(PresenceError::Invalid("clientId: 1 to 128 bytes"));
        }
        match (e.event_type, e.disconnect_reason.as_deref()) {
            (PresenceKind::Connected, None) => {}
            (PresenceKind::Connected, Some(_)) => {
                return Err(PresenceError::Invalid("a connect has no disconnectReason"));
            }
            (PresenceKind::Disconnected, Some(r)) if REASONS.contains(&r) => {}
            (PresenceKind::Disconnected, _) => {
                return Err(PresenceError::Invalid(
                    "a disconnect needs one of AWS IoT's disconnectReason values",
                ));
            }
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_agent_sends_reads_back_and_bad_payloads_are_refused() {
        for e in [
            PresenceEvent::birth("c", "s", 1),
            PresenceEvent::will("c", "s", 1),
            PresenceEvent::goodbye("c", "s", 2),
        ] {
            assert_eq!(PresenceEvent::parse(e.to_json().as_bytes()), Ok(e));
        }
        let goodbye = PresenceEvent::goodbye("c", "s", 2);
        assert_eq!(goodbye.client_initiated_disconnect, Some(true));
        // AWS IoT's own lifecycle event reads too.
        let aws = br#"{"clientId":"186b5","timestamp":1573002340451,"eventType":"disconnected","sessionIdentifier":"a4666d2a7d844ae4ac5d7b38c9cb7967","principalIdentifier":"12345678901234567890123456789012","clientInitiatedDisconnect":true,"disconnectReason":"CLIENT_INITIATED_DISCONNECT","versionNumber":0}"#;
        assert_eq!(
            PresenceEvent::parse(aws).map(|e| e.event_type),
            Ok(PresenceKind::Disconnected)
        );
        let refused: [&[u8]; 6] = [
            b"",
            b"[]",
            br#"{"clientId":"c","eventType":"connected","sessionIdentifier":""}"#,
            br#"{"clientId":"c","eventType":"gone","sessionIdentifier":"s"}"#,
            br#"{"clientId":"c","eventType":"disconnected","sessionIdentifier":"s","disconnectReason":"BORED"}"#,
            br#"{"clientId":"c","eventType":"connected","sessionIdentifier":"s","disconnectReason":"CONNECTION_LOST"}"#,
        ];
        for r in refused {
            assert!(
                PresenceEvent::parse(r).is_err(),
                "{}",
                String::from_utf8_lossy(r)
            );
        }
        let long = alloc::vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            PresenceEvent::parse(&long),
            Err(PresenceError::TooLarge(MAX_PAYLOAD + 1))
        );
    }
}
