//! Who a connection is, what it may call itself, and how much it may hold.
//!
//! The rules of admission (role, client id, standing, take-over) are
//! [`fleet_core::admission`]'s, shared with the Mosquitto plugin; this module
//! adds the certificate parsing, the registry lookup and the per-client
//! limits.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use fleet_core::admission::{PROVISIONED_UNIT, Standing};

/// Whether a certificate (DER) was issued by provisioning by claim.
pub fn is_provisioned(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    cert.subject()
        .iter_organizational_unit()
        .any(|u| u.as_str().is_ok_and(|s| s == PROVISIONED_UNIT))
}

/// A lookup failed; the connection is refused (server unavailable).
#[derive(Debug)]
pub struct DirectoryError(pub Box<dyn std::error::Error + Send + Sync>);

impl fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "directory lookup failed: {}", self.0)
    }
}

impl std::error::Error for DirectoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The future a [`Directory`] answers with.
pub type StandingFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Standing, DirectoryError>> + Send + 'a>>;

/// Where the embedded broker asks whether a device may connect: the
/// registry ([`Registry`](crate::Registry) implements it).
pub trait Directory: Send + Sync + 'static {
    /// The standing of `thing` and of the certificate `fingerprint`.
    fn standing<'a>(&'a self, thing: &'a str, fingerprint: &'a str) -> StandingFuture<'a>;
}

/// Per-client limits. The defaults are AWS IoT Core's published quotas
/// where AWS has one; backend identities are exempt from all but the
/// queue's message count.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientLimits {
    /// Bytes of a topic name or filter (AWS: 256).
    pub max_topic_bytes: usize,
    /// Levels of a topic name or filter (AWS: 7 slashes, so 8 levels).
    pub max_topic_levels: usize,
    /// Subscriptions one connection holds (AWS: 50).
    pub max_subscriptions: usize,
    /// Connections one claim identity holds at once (a device has one: its
    /// client id is its name).
    pub max_claim_connections: usize,
    /// Bytes queued for one client that does not read, before further
    /// messages to it are dropped (for that client only).
    pub max_queued_bytes: usize,
    /// Bytes queued for every client together (backends apart): past it,
    /// messages to a client with anything queued are dropped, so that a
    /// thousand clients that stop reading hold this much at most.
    pub max_queued_bytes_total: usize,
    /// Bytes of packets that are partly received, of every client
    /// together, counting only packets larger than 16 KiB: a client that
    /// begins a large packet waits (up to 10 s) for a share, and must
    /// finish it within 60 s. Without it, a thousand clients that each
    /// send most of a 128 KiB packet and stall would hold 128 MB.
    pub max_partial_packet_bytes: usize,
    /// Retained messages one identity keeps (each device's own topics).
    pub max_retained_per_identity: usize,
    /// Retained messages kept by the whole broker (AWS IoT: a per-account
    /// quota, 500,000 by default).
    pub max_retained_messages: usize,
    /// Bytes (topic and payload) of one retained message.
    pub max_retained_message_bytes: usize,
    /// Bytes (topics and payloads) of every retained message together.
    pub max_retained_bytes: usize,
    /// The longest keep-alive granted; a client asking for 0 (never time
    /// out) or more gets this (AWS: 1,200 s).
    pub max_keep_alive: Duration,
    /// How long a persistent session outlives its connection at most
    /// (MQTT 3.1.1 `cleanSession=false` gets this; an MQTT 5 Session Expiry
    /// Interval is capped by it). AWS IoT: one hour by default. Zero: no
    /// session outlives its connection.
    pub max_session_expiry: Duration,
    /// QoS 1 messages kept for one client while it is away; past it the
    /// oldest is dropped (and counted). Also bounded by
    /// [`max_queued_bytes`](Self::max_queued_bytes).
    pub max_session_messages: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            max_topic_bytes: 256,
            max_topic_levels: 8,
            max_subscriptions: 50,
            max_claim_connections: 100,
            max_queued_bytes: 256 * 1024,
            max_queued_bytes_total: 32 * 1024 * 1024,
            max_partial_packet_bytes: 16 * 1024 * 1024,
            max_retained_per_identity: 50,
            max_retained_messages: 100_000,
            max_retained_message_bytes: 128 * 1024,
            max_retained_bytes: 64 * 1024 * 1024,
            max_keep_alive: Duration::from_secs(1200),
            max_session_expiry: Duration::from_secs(3600),
            max_session_messages: 100,
        }
    }
}

impl ClientLimits {
    /// Whether a topic name or filter is within the size and depth limits.
    pub(super) fn topic_fits(&self, topic: &str) -> bool {
        topic.len() <= self.max_topic_bytes
            && topic.bytes().filter(|b| *b == b'/').count() < self.max_topic_levels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_limits_count_bytes_and_levels() {
        let l = ClientLimits::default();
        assert!(l.topic_fits("$aws/things/t/shadow/name/s/update/accepted"));
        assert!(!l.topic_fits("$aws/things/t/shadow/name/s/update/accepted/x"));
        assert!(!l.topic_fits(&"a".repeat(257)));
        assert!(l.topic_fits(&"a".repeat(256)));
    }
}
