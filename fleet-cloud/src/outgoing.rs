//! What a service hands back to be sent.

/// A message a service hands back to be sent: where and what. Every
/// service answers with these (shadows, jobs, provisioning, streams); the
/// transport publishes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where: the topic (the request's response topic where it gave one).
    pub topic: String,
    /// What.
    pub payload: Vec<u8>,
}
