//! Processing shadow requests exactly as the AWS IoT Device Shadow service
//! does: a pure function of (stored shadow, request bytes, now).

use alloc::string::String;
use alloc::vec::Vec;

use serde::Serialize;
use serde_json::{Map, Value};

use super::ShadowError;
use super::document::{Sections, Shadow, ShadowState, non_empty};
use super::json::{self, Object};
use crate::identity::ClientToken;
use crate::replay::LastRequest;
use crate::topic::{Role, ShadowOp, ShadowTopicKind};

/// Limits the service enforces; the defaults are AWS IoT's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowLimits {
    /// Largest `desired` plus `reported` after an update, as compact JSON
    /// (metadata not counted). AWS: 8 KiB.
    pub max_state_bytes: usize,
    /// Deepest nesting of objects and arrays in `desired` or `reported`.
    /// AWS: 6.
    pub max_depth: usize,
    /// Largest request payload read at all; bigger ones are rejected with
    /// 413 before parsing.
    pub max_request_bytes: usize,
}

impl Default for ShadowLimits {
    fn default() -> Self {
        Self {
            max_state_bytes: 8 * 1024,
            max_depth: 6,
            max_request_bytes: 64 * 1024,
        }
    }
}

/// A rejected request: the error and the client token to echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub error: ShadowError,
    /// The request's `clientToken`, when it had a valid one.
    pub client_token: Option<String>,
    /// What the message names, as AWS IoT names it: the invalid node of
    /// [`ShadowError::InvalidNode`], the shadow of
    /// [`ShadowError::NotFound`] (the thing's name for its classic
    /// shadow, the shadow's name for a named one).
    pub subject: Option<String>,
}

impl Rejection {
    /// A rejection of a request that carried no (valid) client token.
    pub fn new(error: ShadowError) -> Self {
        Self {
            error,
            client_token: None,
            subject: None,
        }
    }

    /// The `message` of the `/rejected` reply, as AWS IoT words it:
    /// `State contains an invalid node: 'foo'`, `No shadow exists with name:
    /// 'thing'`, `JSON contains too many levels of nesting; maximum is 6`.
    ///
    /// ```
    /// use fleet_core::shadow::{Shadow, ShadowError, ShadowLimits};
    ///
    /// let r = Shadow::new()
    ///     .update(br#"{"state":{"foo":{"y":1}}}"#, 0, &ShadowLimits::default())
    ///     .unwrap_err();
    /// assert_eq!(r.error, ShadowError::InvalidNode);
    /// assert_eq!(r.message(), "State contains an invalid node: 'foo'");
    /// ```
    pub fn message(&self) -> alloc::borrow::Cow<'static, str> {
        use alloc::borrow::Cow;
        match (self.error, self.subject.as_deref()) {
            (ShadowError::TooDeep { max }, _) => {
                Cow::Owned(alloc::format!("{}; maximum is {max}", self.error.message()))
            }
            (ShadowError::InvalidNode, Some(node)) => {
                Cow::Owned(alloc::format!("{}: '{node}'", self.error.message()))
            }
            (ShadowError::NotFound, Some(name)) => {
                Cow::Owned(alloc::format!("No shadow exists with name: '{name}'"))
            }
            (e, _) => Cow::Borrowed(e.message()),
        }
    }

    /// The `/rejected` payload: `{"code", "message", "timestamp", "clientToken"}`.
    pub fn to_payload(&self, now: u64) -> Vec<u8> {
        #[derive(Serialize)]
        struct Payload<'a> {
            code: u16,
            message: &'a str,
            timestamp: u64,
            #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
            client_token: Option<&'a str>,
        }
        let message = self.message();
        json::to_vec(&Payload {
            code: self.error.code(),
            message: &message,
            timestamp: now,
            client_token: self.client_token.as_deref(),
        })
    }
}

/// An accepted update: the new shadow and the three messages it causes.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    /// The shadow after the update.
    pub shadow: Shadow,
    /// Payload for `/update/accepted`: what was updated, with its metadata.
    pub accepted: Vec<u8>,
    /// Payload for `/update/delta`, if desired and reported now differ: all
    /// differing keys, not only those of this update.
    pub delta: Option<Vec<u8>>,
    /// Payload for `/update/documents`: the previous and current documents.
    pub documents: Vec<u8>,
    /// The request repeats the last one applied (the same client token and
    /// bytes: a retry whose answer was lost): nothing changed, `accepted` is
    /// the answer it got, and nothing else is to be published or stored.
    pub repeated: bool,
}

/// An accepted delete: the tombstone to store and the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Deleted {
    /// The shadow after the delete: absent, with its version kept.
    pub shadow: Shadow,
    /// Payload for `/delete/accepted`.
    pub accepted: Vec<u8>,
}

/// A message the service publishes, on a topic of the shadow it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowMessage {
    /// Which topic of the shadow.
    pub kind: ShadowTopicKind,
    /// The JSON payload.
    pub payload: Vec<u8>,
}

/// Everything one request causes.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// The shadow to store, when the request changed it (an accepted update
    /// or delete); `None` for a get or a rejection.
    pub shadow: Option<Shadow>,
    /// The messages to publish, in order.
    pub messages: Vec<ShadowMessage>,
}

/// Processes one request to `op` on `shadow` at `now` (epoch seconds).
/// `name` is how AWS IoT names the shadow in its messages (`No shadow
/// exists with name: 'name'`): the thing's name for its classic shadow,
/// the shadow's own name for a named shadow.
///
/// ```
/// use fleet_core::shadow::{process, Shadow, ShadowLimits};
/// use fleet_core::topic::{Role, ShadowOp, ShadowTopicKind};
///
/// let shadow = Shadow::new();
/// let out = process(&shadow, "pump-7", ShadowOp::Update, br#"{"state":{"desired":{"on":true}}}"#,
///                   1_700_000_000, &ShadowLimits::default());
/// let kinds: Vec<_> = out.messages.iter().map(|m| m.kind).collect();
/// assert_eq!(kinds, [
///     ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted),
///     ShadowTopicKind::Delta,
///     ShadowTopicKind::Documents,
/// ]);
/// assert_eq!(out.shadow.unwrap().version(), 1);
///
/// let out = process(&Shadow::new(), "pump-7", ShadowOp::Get, b"", 1_700_000_000,
///                   &ShadowLimits::default());
/// let reply: serde_json::Value = serde_json::from_slice(&out.messages[0].payload).unwrap();
/// assert_eq!(reply["code"], 404);
/// assert_eq!(reply["message"], "No shadow exists with name: 'pump-7'");
/// ```
pub fn process(
    shadow: &Shadow,
    name: &str,
    op: ShadowOp,
    request: &[u8],
    now: u64,
    limits: &ShadowLimits,
) -> Processed {
    let rejected = |mut r: Rejection| Processed {
        shadow: None,
        messages: alloc::vec![ShadowMessage {
            kind: ShadowTopicKind::Op(op, Role::Rejected),
            payload: {
                if r.error == ShadowError::NotFound && r.subject.is_none() {
                    r.subject = Some(String::from(name));
                }
                r.to_payload(now)
            },
        }],
    };
    match op {
        ShadowOp::Update => match shadow.update(request, now, limits) {
            Ok(u) if u.repeated => Processed {
                shadow: None,
                messages: alloc::vec![ShadowMessage {
                    kind: ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted),
                    payload: u.accepted,
                }],
            },
            Ok(u) => {
                let mut messages = Vec::with_capacity(3);
                messages.push(ShadowMessage {
                    kind: ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted),
                    payload: u.accepted,
                });
                if let Some(delta) = u.delta {
                    messages.push(ShadowMessage {
                        kind: ShadowTopicKind::Delta,
                        payload: delta,
                    });
                }
                messages.push(ShadowMessage {
                    kind: ShadowTopicKind::Documents,
                    payload: u.documents,
                });
                Processed {
                    shadow: Some(u.shadow),
                    messages,
                }
            }
            Err(r) => rejected(r),
        },
        ShadowOp::Get => match shadow.get(request, now, limits) {
            Ok(payload) => Processed {
                shadow: None,
                messages: alloc::vec![ShadowMessage {
                    kind: ShadowTopicKind::Op(ShadowOp::Get, Role::Accepted),
                    payload,
                }],
            },
            Err(r) => rejected(r),
        },
        ShadowOp::Delete => match shadow.delete(request, now, limits) {
            Ok(d) => Processed {
                shadow: Some(d.shadow),
                messages: alloc::vec![ShadowMessage {
                    kind: ShadowTopicKind::Op(ShadowOp::Delete, Role::Accepted),
                    payload: d.accepted,
                }],
            },
            Err(r) => rejected(r),
        },
    }
}

/// What every request may carry: a client token and a version.
struct Envelope {
    root: Object,
    client_token: Option<String>,
    version: Option<u64>,
}

impl Envelope {
    fn reject(&self, error: ShadowError) -> Rejection {
        Rejection {
            error,
            client_token: self.client_token.clone(),
            subject: None,
        }
    }
}

/// Checks the encoding, size and JSON of a request, and reads its
/// `clientToken` and `version`. An empty payload (allowed for get and
/// delete) reads as `{}`.
fn parse_envelope(
    request: &[u8],
    limits: &ShadowLimits,
    allow_empty: bool,
) -> Result<Envelope, Rejection> {
    let reject = Rejection::new;
    let text =
        core::str::from_utf8(request).map_err(|_| reject(ShadowError::UnsupportedEncoding))?;
    if text.len() > limits.max_request_bytes {
        return Err(reject(ShadowError::PayloadTooLarge));
    }
    let root = if allow_empty && text.trim().is_empty() {
        Map::new()
    } else {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(o)) => o,
            _ => return Err(reject(ShadowError::InvalidJson)),
        }
    };
    let client_token = match root.get("clientToken") {
        None => None,
        Some(Value::String(s)) if ClientToken::new(s).is_ok() => Some(s.clone()),
        Some(_) => return Err(reject(ShadowError::InvalidClientToken)),
    };
    let mut envelope = Envelope {
        root,
        client_token,
        version: None,
    };
    envelope.version = match envelope.root.get("version") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(v) => Some(v),
            None => return Err(envelope.reject(ShadowError::InvalidVersion)),
        },
    };
    Ok(envelope)
}

/// What an update does to one section.
enum SectionUpdate<'a> {
    Untouched,
    Remove,
    Merge(&'a Object),
}

fn section<'a>(
    state: &'a Object,
    name: &str,
    not_object: ShadowError,
    limits: &ShadowLimits,
) -> Result<SectionUpdate<'a>, ShadowError> {
    match state.get(name) {
        None => Ok(SectionUpdate::Untouched),
        Some(Value::Null) => Ok(SectionUpdate::Remove),
        Some(v @ Value::Object(o)) => {
            if json::depth(v, limits.max_depth) > limits.max_depth {
                return Err(ShadowError::TooDeep {
                    max: limits.max_depth,
                });
            }
            if json::has_null_in_array(v) {
                return Err(ShadowError::NullInArray);
            }
            Ok(SectionUpdate::Merge(o))
        }
        Some(_) => Err(not_object),
    }
}

fn apply(target: &mut Object, meta: &mut Object, update: &SectionUpdate<'_>, now: u64) {
    match update {
        SectionUpdate::Untouched => {}
        SectionUpdate::Remove => {
            target.clear();
            meta.clear();
        }
        SectionUpdate::Merge(patch) => json::merge(target, meta, patch, now),
    }
}

#[derive(Serialize)]
struct Document<'a> {
    state: Sections<'a>,
    metadata: Sections<'a>,
    version: u64,
}

impl<'a> Document<'a> {
    fn of(state: &'a ShadowState, version: u64) -> Self {
        Self {
            state: Sections {
                desired: non_empty(&state.desired),
                reported: non_empty(&state.reported),
                delta: None,
            },
            metadata: Sections {
                desired: non_empty(&state.desired_meta),
                reported: non_empty(&state.reported_meta),
                delta: None,
            },
            version,
        }
    }
}

#[derive(Serialize)]
struct Reply<'a, S: Serialize, M: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<S>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<M>,
    version: u64,
    timestamp: u64,
    #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
    client_token: Option<&'a str>,
}

impl Shadow {
    /// Processes an update request. On success the returned shadow has
    /// `version + 1`; on rejection nothing changes (`self` is not touched).
    pub fn update(
        &self,
        request: &[u8],
        now: u64,
        limits: &ShadowLimits,
    ) -> Result<Updated, Rejection> {
        let env = parse_envelope(request, limits, false)?;
        if let Some(answer) = self
            .last
            .as_ref()
            .and_then(|l| l.answer(env.client_token.as_deref(), request))
        {
            return Ok(Updated {
                shadow: self.clone(),
                accepted: answer.to_vec(),
                delta: None,
                documents: Vec::new(),
                repeated: true,
            });
        }
        let state_node = env
            .root
            .get("state")
            .ok_or_else(|| env.reject(ShadowError::MissingState))?;
        let (desired, reported) = match state_node {
            Value::Null => (SectionUpdate::Remove, SectionUpdate::Remove),
            Value::Object(state) => {
                if let Some(node) = state
                    .keys()
                    .find(|k| k.as_str() != "desired" && k.as_str() != "reported")
                {
                    let mut r = env.reject(ShadowError::InvalidNode);
                    r.subject = Some(node.clone());
                    return Err(r);
                }
                (
                    section(state, "desired", ShadowError::DesiredNotObject, limits)
                        .map_err(|e| env.reject(e))?,
                    section(state, "reported", ShadowError::ReportedNotObject, limits)
                        .map_err(|e| env.reject(e))?,
                )
            }
            _ => return Err(env.reject(ShadowError::StateNotObject)),
        };
        if env.version.is_some_and(|v| v != self.version) {
            return Err(env.reject(ShadowError::VersionConflict));
        }
        let version = self
            .version
            .checked_add(1)
            .ok_or_else(|| env.reject(ShadowError::Internal))?;

        let mut next = self.state.clone().unwrap_or_default();
        apply(&mut next.desired, &mut next.desired_meta, &desired, now);
        apply(&mut next.reported, &mut next.reported_meta, &reported, now);
        if json::object_len(&next.desired) + json::object_len(&next.reported)
            > limits.max_state_bytes
        {
            return Err(env.reject(ShadowError::PayloadTooLarge));
        }

        let token = env.client_token.as_deref();
        // `/update/accepted` echoes the request's state, nulls included, with
        // a timestamp for every leaf it wrote or deleted, and for a section
        // it removed (`"desired": null` has `"desired": {"timestamp": t}`).
        let accepted_meta = match state_node {
            Value::Object(state) => {
                let mut meta = Map::new();
                for name in ["desired", "reported"] {
                    match state.get(name) {
                        Some(Value::Object(patch)) => {
                            meta.insert(
                                String::from(name),
                                Value::Object(json::patch_metadata(patch, now)),
                            );
                        }
                        Some(Value::Null) => {
                            meta.insert(String::from(name), json::stamp(now));
                        }
                        _ => {}
                    }
                }
                Some(meta)
            }
            _ => None,
        };
        let accepted = json::to_vec(&Reply {
            state: Some(state_node),
            metadata: accepted_meta.as_ref().filter(|m| !m.is_empty()),
            version,
            timestamp: now,
            client_token: token,
        });
        let (delta_state, delta_meta) = next.delta();
        let delta = (!delta_state.is_empty()).then(|| {
            json::to_vec(&Reply {
                state: Some(&delta_state),
                metadata: Some(&delta_meta),
                version,
                timestamp: now,
                client_token: token,
            })
        });
        #[derive(Serialize)]
        struct Documents<'a> {
            previous: Option<Document<'a>>,
            current: Document<'a>,
            timestamp: u64,
            #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
            client_token: Option<&'a str>,
        }
        let documents = json::to_vec(&Documents {
            previous: self.state.as_ref().map(|s| Document::of(s, self.version)),
            current: Document::of(&next, version),
            timestamp: now,
            client_token: token,
        });
        let last = LastRequest::keep(token, request, &accepted);
        Ok(Updated {
            shadow: Shadow {
                state: Some(next),
                version,
                last,
            },
            accepted,
            delta,
            documents,
            repeated: false,
        })
    }

    /// Processes a get request: the whole document with its current delta,
    /// and the delta's metadata (the timestamps of the desired leaves that
    /// make it up, nested as the delta is) in `metadata.delta`.
    pub fn get(
        &self,
        request: &[u8],
        now: u64,
        limits: &ShadowLimits,
    ) -> Result<Vec<u8>, Rejection> {
        let env = parse_envelope(request, limits, true)?;
        let state = self
            .state
            .as_ref()
            .ok_or_else(|| env.reject(ShadowError::NotFound))?;
        let (delta, delta_meta) = state.delta();
        Ok(json::to_vec(&Reply {
            state: Some(Sections {
                desired: non_empty(&state.desired),
                reported: non_empty(&state.reported),
                delta: non_empty(&delta),
            }),
            metadata: Some(Sections {
                desired: non_empty(&state.desired_meta),
                reported: non_empty(&state.reported_meta),
                delta: non_empty(&delta_meta),
            }),
            version: self.version,
            timestamp: now,
            client_token: env.client_token.as_deref(),
        }))
    }

    /// Processes a delete request. The version is kept, so a later update
    /// continues from it.
    pub fn delete(
        &self,
        request: &[u8],
        now: u64,
        limits: &ShadowLimits,
    ) -> Result<Deleted, Rejection> {
        let env = parse_envelope(request, limits, true)?;
        if self.state.is_none() {
            return Err(env.reject(ShadowError::NotFound));
        }
        if env.version.is_some_and(|v| v != self.version) {
            return Err(env.reject(ShadowError::VersionConflict));
        }
        let accepted = json::to_vec(&Reply::<(), ()> {
            state: None,
            metadata: None,
            version: self.version,
            timestamp: now,
            client_token: env.client_token.as_deref(),
        });
        Ok(Deleted {
            shadow: Shadow {
                state: None,
                version: self.version,
                // A retry of an update from before the delete applies again.
                last: None,
            },
            accepted,
        })
    }
}
