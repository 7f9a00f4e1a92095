//! What a state machine asks its transport to send. Needs `alloc`.

use alloc::string::String;
use alloc::vec::Vec;

/// MQTT delivery guarantee of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce,
    /// At least once.
    AtLeastOnce,
}

/// One thing for the transport to do, from `poll_transmit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Subscribe to these topic filters, then tell the state machine with
    /// its `handle_subscribed` once the broker has acknowledged all of them.
    Subscribe {
        /// The topic filters.
        filters: Vec<String>,
    },
    /// Publish a message.
    Publish {
        /// The topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
        /// The delivery guarantee.
        qos: QoS,
    },
}
