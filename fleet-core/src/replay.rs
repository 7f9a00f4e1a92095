//! Answering a retried request again instead of applying it twice.
//!
//! A device that gets no answer (its request or the answer was lost, or
//! the service instance that took it died) sends the same request again
//! with the same `clientToken`. The service keeps, per shadow and per job
//! execution, the last request it applied with a token: its token, a
//! digest of its bytes and the answer it gave. The same token and bytes
//! again get that answer, and nothing changes.

use alloc::string::String;

use serde::{Deserialize, Serialize};

/// Accepted answers are kept for a retry up to this length (bytes); a
/// longer one is not kept, and its retry is handled as a new request.
pub(crate) const MAX_KEPT_ANSWER: usize = 4096;

/// FNV-1a, 64 bits: tells a retry from another request with the same token.
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The last request applied with a client token, and its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastRequest {
    pub(crate) token: String,
    /// [`digest`] of the request's bytes.
    pub(crate) digest: u64,
    /// The accepted answer's payload (JSON).
    pub(crate) accepted: String,
}

impl LastRequest {
    /// What to keep after applying `request` (with `token`, if it had one)
    /// and answering `accepted`; `None` when there is nothing to keep.
    pub(crate) fn keep(token: Option<&str>, request: &[u8], accepted: &[u8]) -> Option<Self> {
        let token = token?;
        if accepted.len() > MAX_KEPT_ANSWER {
            return None;
        }
        Some(Self {
            token: token.into(),
            digest: digest(request),
            accepted: String::from(core::str::from_utf8(accepted).ok()?),
        })
    }

    /// The kept answer, if `request` (with `token`) is a retry of this one.
    pub(crate) fn answer(&self, token: Option<&str>, request: &[u8]) -> Option<&[u8]> {
        (token == Some(self.token.as_str()) && digest(request) == self.digest)
            .then_some(self.accepted.as_bytes())
    }
}
