//! The stored shadow and the requests a client sends.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ShadowError;
use super::json::{self, Object};
use crate::replay::LastRequest;

/// The state of an existing shadow: `desired` and `reported` with their
/// metadata. An empty section is absent from the document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowState {
    pub(crate) desired: Object,
    pub(crate) reported: Object,
    pub(crate) desired_meta: Object,
    pub(crate) reported_meta: Object,
}

impl ShadowState {
    /// The desired section (empty when absent).
    pub fn desired(&self) -> &Object {
        &self.desired
    }

    /// The reported section (empty when absent).
    pub fn reported(&self) -> &Object {
        &self.reported
    }

    /// Metadata of the desired section: `{"timestamp": t}` per leaf.
    pub fn desired_metadata(&self) -> &Object {
        &self.desired_meta
    }

    /// Metadata of the reported section.
    pub fn reported_metadata(&self) -> &Object {
        &self.reported_meta
    }

    /// The part of desired that reported does not match, and its metadata.
    pub fn delta(&self) -> (Object, Object) {
        json::delta(&self.desired, &self.desired_meta, &self.reported)
    }
}

/// A shadow as the service stores it: its state if it exists, and its
/// version, which survives a delete (a shadow deleted at version 7 and
/// written again continues at 8).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shadow {
    pub(crate) state: Option<ShadowState>,
    pub(crate) version: u64,
    /// The last update applied with a client token: a retry of it (the
    /// same token and request) is answered again, not applied twice.
    pub(crate) last: Option<LastRequest>,
}

impl Shadow {
    /// A shadow that has never existed (version 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the shadow exists (was written and not deleted since).
    pub fn exists(&self) -> bool {
        self.state.is_some()
    }

    /// The current version: 0 before the first update, then one more for
    /// every accepted update. A delete keeps it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The state, if the shadow exists.
    pub fn state(&self) -> Option<&ShadowState> {
        self.state.as_ref()
    }

    /// The stored form, for a database: `{"version": v, "state": {"desired":
    /// .., "reported": ..} | null, "metadata": {"desired": .., "reported": ..}}`.
    pub fn to_stored_json(&self) -> Vec<u8> {
        let (state, metadata) = match &self.state {
            Some(s) => (
                Some(Sections {
                    desired: non_empty(&s.desired),
                    reported: non_empty(&s.reported),
                    delta: None,
                }),
                Some(Sections {
                    desired: non_empty(&s.desired_meta),
                    reported: non_empty(&s.reported_meta),
                    delta: None,
                }),
            ),
            None => (None, None),
        };
        json::to_vec(&Stored {
            version: self.version,
            state,
            metadata,
            last: self.last.as_ref(),
        })
    }

    /// Reads the form written by [`to_stored_json`](Self::to_stored_json).
    pub fn from_stored_json(bytes: &[u8]) -> Result<Self, ShadowError> {
        let stored: StoredOwned =
            serde_json::from_slice(bytes).map_err(|_| ShadowError::InvalidJson)?;
        let state = stored.state.map(|s| {
            let meta = stored.metadata.unwrap_or_default();
            ShadowState {
                desired: s.desired.unwrap_or_default(),
                reported: s.reported.unwrap_or_default(),
                desired_meta: meta.desired.unwrap_or_default(),
                reported_meta: meta.reported.unwrap_or_default(),
            }
        });
        Ok(Self {
            state,
            version: stored.version,
            last: stored.last,
        })
    }
}

pub(crate) fn non_empty(o: &Object) -> Option<&Object> {
    (!o.is_empty()).then_some(o)
}

/// `{"desired": .., "reported": .., "delta": ..}`, each only when present.
#[derive(Serialize)]
pub(crate) struct Sections<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) desired: Option<&'a Object>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reported: Option<&'a Object>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) delta: Option<&'a Object>,
}

#[derive(Serialize)]
struct Stored<'a> {
    version: u64,
    state: Option<Sections<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Sections<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<&'a LastRequest>,
}

#[derive(Deserialize, Default)]
struct SectionsOwned {
    desired: Option<Object>,
    reported: Option<Object>,
}

#[derive(Deserialize)]
struct StoredOwned {
    version: u64,
    state: Option<SectionsOwned>,
    metadata: Option<SectionsOwned>,
    #[serde(default)]
    last: Option<LastRequest>,
}

/// An update request, as a device or an application sends it to
/// `.../shadow/update`. Build one and call [`to_payload`](Self::to_payload).
///
/// ```
/// use fleet_core::shadow::UpdateRequest;
/// use serde_json::json;
///
/// let request = UpdateRequest::reported(json!({"temp": 21}))
///     .client_token("r1")
///     .version(4);
/// assert_eq!(
///     request.to_payload(),
///     br#"{"state":{"reported":{"temp":21}},"clientToken":"r1","version":4}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpdateRequest {
    /// The `state` node: `Some(object)` with `desired` and/or `reported`, or
    /// `None` to send `"state": null` (clear all state).
    pub state: Option<Object>,
    /// Echoed in the reply.
    pub client_token: Option<String>,
    /// Accepted only if it equals the shadow's current version.
    pub version: Option<u64>,
}

impl UpdateRequest {
    /// An update of `state.reported` (`value` should be an object, or
    /// `null` to delete the section).
    pub fn reported(value: Value) -> Self {
        Self::section("reported", value)
    }

    /// An update of `state.desired`.
    pub fn desired(value: Value) -> Self {
        Self::section("desired", value)
    }

    fn section(name: &str, value: Value) -> Self {
        let mut state = Map::new();
        state.insert(String::from(name), value);
        Self {
            state: Some(state),
            ..Self::default()
        }
    }

    /// Sets the client token.
    pub fn client_token(mut self, token: impl Into<String>) -> Self {
        self.client_token = Some(token.into());
        self
    }

    /// Sets the expected version.
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// The JSON payload.
    pub fn to_payload(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Payload<'a> {
            state: Option<&'a Object>,
            #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
            client_token: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            version: Option<u64>,
        }
        json::to_vec(&Payload {
            state: self.state.as_ref(),
            client_token: self.client_token.as_deref(),
            version: self.version,
        })
    }
}
