//! `ShadowSync`: the device side of shadows, sans-I/O.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use serde_json::{Map, Value};

use super::ShadowError;
use super::document::UpdateRequest;
use super::json::{self, Object};
use crate::identity::{ShadowName, ThingName};
use crate::time::Instant;
use crate::topic::{Role, ShadowOp, ShadowTopic, ShadowTopicKind, Topic, TopicError, TopicPrefix};
use crate::transmit::{QoS, Transmit};

/// Settings of a [`ShadowSync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Topic prefix (`$aws` by default).
    pub prefix: String,
    /// How long to wait for a reply before sending a request again.
    pub request_timeout: Duration,
    /// How many times an update is sent before it is given up
    /// ([`ShadowEvent::Failed`]). Gets are retried for as long as the
    /// connection is up.
    pub max_attempts: u32,
    /// Send each update with the version it was based on, so that it is
    /// refused (409) if the shadow changed in between; the engine then reads
    /// the shadow again and resends. Off, updates merge unconditionally, as
    /// AWS's device SDKs do.
    pub versioned_updates: bool,
    /// Read the whole shadow again after this long without a change, to
    /// repair anything a lost message left behind. `None`: only on connect.
    pub resync_interval: Option<Duration>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            prefix: String::from("$aws"),
            request_timeout: Duration::from_secs(10),
            max_attempts: 5,
            versioned_updates: true,
            resync_interval: Some(Duration::from_secs(300)),
        }
    }
}

/// Names one [`ShadowSync::update`] call; its outcome is reported with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

/// What the engine tells the application, from [`ShadowSync::poll_event`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ShadowEvent {
    /// The engine read the whole shadow (after connecting, or to repair a
    /// gap). `exists` is false if there is no shadow yet.
    Synced {
        /// Which shadow (`None`: classic).
        shadow: Option<ShadowName<'static>>,
        /// Its version.
        version: u64,
        /// Whether it exists.
        exists: bool,
    },
    /// Desired differs from reported: `delta` holds every differing key.
    /// Sent when the difference changes, and again after every sync.
    Delta {
        /// Which shadow.
        shadow: Option<ShadowName<'static>>,
        /// The version the delta belongs to.
        version: u64,
        /// The differing part of desired.
        delta: Object,
    },
    /// An update was accepted by the service.
    Accepted {
        /// The request (several, when queued updates were sent as one).
        id: RequestId,
        /// Which shadow.
        shadow: Option<ShadowName<'static>>,
        /// The shadow's version after it.
        version: u64,
    },
    /// An update was rejected, or given up after `max_attempts`.
    Failed {
        /// The request.
        id: RequestId,
        /// Which shadow.
        shadow: Option<ShadowName<'static>>,
        /// Why: the service's error, or `None` for a timeout.
        error: Option<ShadowError>,
    },
    /// The shadow was deleted (by anyone).
    Deleted {
        /// Which shadow.
        shadow: Option<ShadowName<'static>>,
    },
}

/// Input that the engine refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncError {
    /// The topic is not a shadow topic of this thing.
    UnknownTopic(TopicError),
    /// The topic is a shadow topic of another thing, or a shadow this engine
    /// does not track.
    NotOurs,
    /// The payload is not the JSON object this topic carries.
    InvalidPayload,
    /// An update's section is neither an object nor `null`.
    InvalidPatch,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownTopic(e) => write!(f, "not a shadow topic: {e}"),
            Self::NotOurs => f.write_str("a shadow topic of another thing or an untracked shadow"),
            Self::InvalidPayload => {
                f.write_str("payload is not the JSON object this topic carries")
            }
            Self::InvalidPatch => f.write_str("desired and reported must be objects or null"),
        }
    }
}

impl core::error::Error for SyncError {}

/// An update not yet accepted: the sections to write, and who asked.
#[derive(Debug, Clone)]
struct Pending {
    ids: Vec<RequestId>,
    desired: Option<Value>,
    reported: Option<Value>,
}

impl Pending {
    /// Folds `next` into `self` if one request can say both; sections that
    /// are objects merge (later fields win, nulls kept), a `null` section
    /// replaces. An object after a `null` cannot be folded (it would lose the
    /// removal).
    fn absorb(&mut self, next: &Pending) -> bool {
        let foldable = |a: &Option<Value>, b: &Option<Value>| {
            !(matches!(a, Some(Value::Null)) && matches!(b, Some(Value::Object(_))))
        };
        if !foldable(&self.desired, &next.desired) || !foldable(&self.reported, &next.reported) {
            return false;
        }
        fold(&mut self.desired, &next.desired);
        fold(&mut self.reported, &next.reported);
        self.ids.extend_from_slice(&next.ids);
        true
    }
}

fn fold(into: &mut Option<Value>, next: &Option<Value>) {
    match (into.as_mut(), next) {
        (_, None) => {}
        (Some(Value::Object(a)), Some(Value::Object(b))) => fold_object(a, b),
        (_, Some(b)) => *into = Some(b.clone()),
    }
}

fn fold_object(a: &mut Object, b: &Object) {
    for (k, v) in b {
        match (a.get_mut(k), v) {
            (Some(Value::Object(ao)), Value::Object(bo)) => fold_object(ao, bo),
            _ => {
                a.insert(k.clone(), v.clone());
            }
        }
    }
}

#[derive(Debug)]
struct InFlight {
    pending: Pending,
    token: String,
    payload: Vec<u8>,
    deadline: Instant,
    attempts: u32,
    /// The connection dropped while it was out: sent again, the same
    /// bytes, once the shadow has been read on the new connection.
    resend: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Not connected, or subscriptions not yet acknowledged.
    Offline,
    /// A GET is out; deltas are not trusted until its reply.
    Reading { token: String, deadline: Instant },
    /// The replica is exact for `version`.
    Synced,
}

/// The engine's copy of one shadow.
#[derive(Debug)]
struct Slot {
    name: Option<ShadowName<'static>>,
    /// `{prefix}/things/{thing}/shadow[/name/{name}]`
    base: String,
    phase: Phase,
    /// `None` when the shadow does not exist.
    desired: Option<Object>,
    reported: Object,
    /// The version the replica is exact for, when known.
    version: Option<u64>,
    last_delta: Option<Object>,
    in_flight: Option<InFlight>,
    queue: VecDeque<Pending>,
    next_resync: Option<Instant>,
    /// The highest version an accepted update, delta or deletion told of
    /// while a read was out: the read's answer may predate it.
    seen_while_reading: Option<u64>,
}

impl Slot {
    fn exists(&self) -> bool {
        self.desired.is_some()
    }
}

/// The device side of shadows: keeps a replica of each shadow the device
/// tracks, turns the application's updates into requests, and tells the
/// application what desired wants.
///
/// On every (re)connection it subscribes, then reads each whole shadow with
/// a GET before it trusts anything else. It then keeps its replica exact by
/// applying every `/update/accepted` in version order; a stale message
/// (version already seen) is dropped, and a gap (a version skipped, or a
/// delta for a version it has not seen) makes it read the shadow again.
/// Deltas for the application come from the replica, so they always carry
/// every differing key.
///
/// Updates go out one at a time per shadow, each with a client token, and
/// are retried on timeout; updates queued meanwhile are folded into one
/// request. With [`SyncConfig::versioned_updates`], a `409` makes the engine
/// read the shadow and send the update again: the application's intent is
/// kept until it is accepted or fails for good.
///
/// Methods fall in three families: inputs (`handle_connection`,
/// `handle_subscribed`, `handle_message`, `handle_timeout`), commands
/// (`update`, `report`), and outputs (`poll_transmit`, `poll_event`,
/// `poll_timeout`), which the caller drains after every input or command.
///
/// ```
/// use fleet_core::shadow::{ShadowEvent, ShadowSync, SyncConfig};
/// use fleet_core::time::Instant;
/// use fleet_core::transmit::Transmit;
/// use fleet_core::ThingName;
///
/// let thing = ThingName::new("pump-7")?.into_owned();
/// let mut sync = ShadowSync::new(thing, &[None], SyncConfig::default(), 42);
/// let now = Instant::ZERO;
/// sync.handle_connection(now, true);
/// assert!(matches!(sync.poll_transmit(), Some(Transmit::Subscribe { .. })));
/// sync.handle_subscribed(now);
/// let Some(Transmit::Publish { topic, payload, .. }) = sync.poll_transmit() else { panic!() };
/// assert_eq!(topic, "$aws/things/pump-7/shadow/get");
///
/// // The service answers; the engine is in sync and reports the delta.
/// let token: serde_json::Value = serde_json::from_slice(&payload)?;
/// let reply = format!(
///     r#"{{"state":{{"desired":{{"on":true}}}},"version":3,"timestamp":1,"clientToken":{}}}"#,
///     token["clientToken"]
/// );
/// sync.handle_message(now, "$aws/things/pump-7/shadow/get/accepted", reply.as_bytes())?;
/// assert!(matches!(sync.poll_event(), Some(ShadowEvent::Synced { version: 3, .. })));
/// assert!(matches!(sync.poll_event(), Some(ShadowEvent::Delta { version: 3, .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ShadowSync {
    thing: ThingName<'static>,
    config: SyncConfig,
    slots: Vec<Slot>,
    connected: bool,
    session: u64,
    next_token: u64,
    next_request: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<ShadowEvent>,
}

impl ShadowSync {
    /// An engine for `thing` tracking `shadows` (`None` is the classic
    /// shadow). `session` makes client tokens unique across restarts: pass
    /// something that differs each time the process starts (a boot counter,
    /// random bits).
    pub fn new(
        thing: ThingName<'static>,
        shadows: &[Option<ShadowName<'static>>],
        config: SyncConfig,
        session: u64,
    ) -> Self {
        let mut slots: Vec<Slot> = Vec::new();
        for name in shadows {
            if slots.iter().any(|s| &s.name == name) {
                continue;
            }
            let base = match name {
                None => format!("{}/things/{}/shadow", config.prefix, thing),
                Some(n) => format!("{}/things/{}/shadow/name/{}", config.prefix, thing, n),
            };
            slots.push(Slot {
                name: name.clone(),
                base,
                phase: Phase::Offline,
                desired: None,
                reported: Map::new(),
                version: None,
                last_delta: None,
                in_flight: None,
                queue: VecDeque::new(),
                next_resync: None,
                seen_while_reading: None,
            });
        }
        Self {
            thing,
            config,
            slots,
            connected: false,
            session,
            next_token: 0,
            next_request: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The topic filters the engine needs; it asks for them with
    /// [`Transmit::Subscribe`] on every connection.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut filters = Vec::with_capacity(self.slots.len() * 6);
        for slot in &self.slots {
            for suffix in [
                "get/accepted",
                "get/rejected",
                "update/accepted",
                "update/rejected",
                "update/delta",
                "delete/accepted",
            ] {
                filters.push(format!("{}/{suffix}", slot.base));
            }
        }
        filters
    }

    /// The link went up or down.
    pub fn handle_connection(&mut self, now: Instant, up: bool) {
        let _ = now;
        self.connected = up;
        for slot in &mut self.slots {
            slot.phase = Phase::Offline;
            slot.next_resync = None;
            // What was in flight may or may not have been applied: it goes
            // out again after the next read, the same request (its client
            // token and bytes), so that a service that applied it answers
            // it again rather than applying it twice.
            if let Some(f) = slot.in_flight.as_mut() {
                f.resend = true;
            }
        }
        if up {
            self.transmits.push_back(Transmit::Subscribe {
                filters: self.subscriptions(),
            });
        }
    }

    /// The broker acknowledged the subscriptions: read every shadow.
    pub fn handle_subscribed(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        for i in 0..self.slots.len() {
            self.start_read(i, now);
        }
    }

    /// A message arrived on `topic`. Input the engine cannot use is refused
    /// with an error and changes nothing.
    pub fn handle_message(
        &mut self,
        now: Instant,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), SyncError> {
        let prefix = TopicPrefix::new(&self.config.prefix).map_err(SyncError::UnknownTopic)?;
        let parsed = Topic::parse(&prefix, topic).map_err(SyncError::UnknownTopic)?;
        let Topic::Shadow(ShadowTopic {
            thing,
            shadow,
            kind,
        }) = parsed
        else {
            return Err(SyncError::NotOurs);
        };
        if thing != self.thing {
            return Err(SyncError::NotOurs);
        }
        let i = self
            .slots
            .iter()
            .position(|s| {
                s.name.as_ref().map(|n| n.as_str()) == shadow.as_ref().map(|n| n.as_str())
            })
            .ok_or(SyncError::NotOurs)?;
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(payload) else {
            return Err(SyncError::InvalidPayload);
        };
        let token = body.get("clientToken").and_then(Value::as_str);
        let version = body.get("version").and_then(Value::as_u64);

        match kind {
            ShadowTopicKind::Op(ShadowOp::Get, Role::Accepted) => {
                let slot = &self.slots[i];
                let Phase::Reading { token: want, .. } = &slot.phase else {
                    return Ok(()); // not ours, or already answered
                };
                if token != Some(want.as_str()) {
                    return Ok(());
                }
                let version = version.ok_or(SyncError::InvalidPayload)?;
                let state = body.get("state").and_then(Value::as_object);
                let section = |name| match state.and_then(|s| s.get(name)) {
                    None | Some(Value::Null) => Ok(Map::new()),
                    Some(Value::Object(o)) => Ok(o.clone()),
                    Some(_) => Err(SyncError::InvalidPayload),
                };
                let (desired, reported) = (section("desired")?, section("reported")?);
                if self.slots[i]
                    .seen_while_reading
                    .is_some_and(|seen| seen > version)
                {
                    // A change overtook this answer: it is already stale.
                    self.start_read(i, now);
                    return Ok(());
                }
                let slot = &mut self.slots[i];
                slot.desired = Some(desired);
                slot.reported = reported;
                slot.version = Some(version);
                self.synced(i, now);
            }
            ShadowTopicKind::Op(ShadowOp::Get, Role::Rejected) => {
                let slot = &mut self.slots[i];
                let Phase::Reading { token: want, .. } = &slot.phase else {
                    return Ok(());
                };
                if token != Some(want.as_str()) {
                    return Ok(());
                }
                let code = body.get("code").and_then(Value::as_u64);
                if code == Some(404) && slot.seen_while_reading.is_some() {
                    // Created while the read was out: read again.
                    self.start_read(i, now);
                } else if code == Some(404) {
                    slot.desired = None;
                    slot.reported = Map::new();
                    // The version of a deleted shadow is not told; updates
                    // go out unversioned until it is known again.
                    slot.version = None;
                    self.synced(i, now);
                } else {
                    // Try again when the timer fires.
                    slot.phase = Phase::Reading {
                        token: String::new(),
                        deadline: now + self.config.request_timeout,
                    };
                }
            }
            ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted) => {
                let version = version.ok_or(SyncError::InvalidPayload)?;
                let state = match body.get("state") {
                    Some(Value::Object(s)) => Some(s),
                    Some(Value::Null) => None,
                    _ => return Err(SyncError::InvalidPayload),
                };
                self.apply_accepted(i, now, state, version);
                let slot = &mut self.slots[i];
                if let Some(f) = &slot.in_flight
                    && token == Some(f.token.as_str())
                {
                    let done = slot
                        .in_flight
                        .take()
                        .map(|f| f.pending.ids)
                        .unwrap_or_default();
                    let name = slot.name.clone();
                    for id in done {
                        self.events.push_back(ShadowEvent::Accepted {
                            id,
                            shadow: name.clone(),
                            version,
                        });
                    }
                    self.send_next(i, now);
                }
            }
            ShadowTopicKind::Op(ShadowOp::Update, Role::Rejected) => {
                let slot = &mut self.slots[i];
                let Some(f) = &slot.in_flight else {
                    return Ok(());
                };
                if token != Some(f.token.as_str()) {
                    return Ok(());
                }
                let code = body
                    .get("code")
                    .and_then(Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok())
                    .ok_or(SyncError::InvalidPayload)?;
                let error = ShadowError::from_code(code);
                if error == ShadowError::VersionConflict {
                    // Read the shadow, then send the same intent again.
                    if let Some(f) = slot.in_flight.take() {
                        slot.queue.push_front(f.pending);
                    }
                    self.start_read(i, now);
                } else if error.is_retryable() {
                    if let Some(f) = slot.in_flight.as_mut() {
                        f.deadline = now + self.config.request_timeout;
                    }
                } else if let Some(f) = slot.in_flight.take() {
                    let name = slot.name.clone();
                    for id in f.pending.ids {
                        self.events.push_back(ShadowEvent::Failed {
                            id,
                            shadow: name.clone(),
                            error: Some(error),
                        });
                    }
                    self.send_next(i, now);
                }
            }
            ShadowTopicKind::Delta => {
                let version = version.ok_or(SyncError::InvalidPayload)?;
                self.note_while_reading(i, version);
                let slot = &self.slots[i];
                // The replica follows `/update/accepted`; a delta for a
                // version it has not reached means an accepted was lost (or
                // is late): read the shadow.
                if slot.phase == Phase::Synced && slot.version.is_none_or(|v| version > v) {
                    self.start_read(i, now);
                }
            }
            ShadowTopicKind::Op(ShadowOp::Delete, Role::Accepted) => {
                let version = version.ok_or(SyncError::InvalidPayload)?;
                self.note_while_reading(i, version);
                let slot = &mut self.slots[i];
                if slot.phase == Phase::Synced && slot.version.is_none_or(|v| version >= v) {
                    slot.desired = None;
                    slot.reported = Map::new();
                    slot.version = Some(version);
                    slot.last_delta = None;
                    self.events.push_back(ShadowEvent::Deleted {
                        shadow: slot.name.clone(),
                    });
                }
            }
            // Subscribed to by no one here; harmless.
            _ => {}
        }
        Ok(())
    }

    /// Call when the time from [`poll_timeout`](Self::poll_timeout) has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Phase::Reading { deadline, .. } = slot.phase
                && deadline <= now
            {
                self.start_read(i, now);
                continue;
            }
            let slot = &mut self.slots[i];
            if let Some(f) = slot.in_flight.as_mut()
                && !f.resend
                && f.deadline <= now
            {
                if f.attempts >= self.config.max_attempts {
                    let name = slot.name.clone();
                    if let Some(f) = slot.in_flight.take() {
                        for id in f.pending.ids {
                            self.events.push_back(ShadowEvent::Failed {
                                id,
                                shadow: name.clone(),
                                error: None,
                            });
                        }
                    }
                    self.send_next(i, now);
                } else {
                    f.attempts += 1;
                    f.deadline = now + self.config.request_timeout;
                    let (topic, payload) = (format!("{}/update", slot.base), f.payload.clone());
                    self.publish(topic, payload);
                }
                continue;
            }
            let slot = &mut self.slots[i];
            if slot.next_resync.is_some_and(|t| t <= now) {
                if slot.phase == Phase::Synced && slot.in_flight.is_none() {
                    self.start_read(i, now);
                } else {
                    // Busy: look again once the current exchange is over.
                    slot.next_resync = Some(now + self.config.request_timeout);
                }
            }
        }
    }

    /// Asks for an update of `shadow`: `desired` and `reported` are each an
    /// object to merge, `null` to remove the section, or `None` to leave it.
    /// The outcome comes as [`ShadowEvent::Accepted`] or
    /// [`ShadowEvent::Failed`] with the returned id.
    pub fn update(
        &mut self,
        now: Instant,
        shadow: Option<&ShadowName<'_>>,
        desired: Option<Value>,
        reported: Option<Value>,
    ) -> Result<RequestId, SyncError> {
        let valid = |v: &Option<Value>| matches!(v, None | Some(Value::Null | Value::Object(_)));
        if !valid(&desired) || !valid(&reported) || (desired.is_none() && reported.is_none()) {
            return Err(SyncError::InvalidPatch);
        }
        let i = self.slot_index(shadow).ok_or(SyncError::NotOurs)?;
        self.next_request += 1;
        let id = RequestId(self.next_request);
        let pending = Pending {
            ids: alloc::vec![id],
            desired,
            reported,
        };
        let slot = &mut self.slots[i];
        let folded = slot
            .queue
            .back_mut()
            .is_some_and(|last| last.absorb(&pending));
        if !folded {
            slot.queue.push_back(pending);
        }
        self.send_next(i, now);
        Ok(id)
    }

    /// Reports state: [`update`](Self::update) of `reported` only.
    pub fn report(
        &mut self,
        now: Instant,
        shadow: Option<&ShadowName<'_>>,
        reported: Object,
    ) -> Result<RequestId, SyncError> {
        self.update(now, shadow, None, Some(Value::Object(reported)))
    }

    /// The replica of `shadow`: `(desired, reported, version)`, once read
    /// and while the shadow exists.
    pub fn document(&self, shadow: Option<&ShadowName<'_>>) -> Option<(&Object, &Object, u64)> {
        let slot = &self.slots[self.slot_index(shadow)?];
        match (&slot.desired, slot.version) {
            (Some(d), Some(v)) if slot.phase == Phase::Synced => Some((d, &slot.reported, v)),
            _ => None,
        }
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ShadowEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        self.slots
            .iter()
            .flat_map(|s| {
                let read = match s.phase {
                    Phase::Reading { deadline, .. } => Some(deadline),
                    _ => None,
                };
                [
                    read,
                    s.in_flight
                        .as_ref()
                        .filter(|f| !f.resend)
                        .map(|f| f.deadline),
                    s.next_resync,
                ]
            })
            .flatten()
            .min()
    }

    fn slot_index(&self, shadow: Option<&ShadowName<'_>>) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.name.as_ref().map(|n| n.as_str()) == shadow.map(|n| n.as_str()))
    }

    fn new_token(&mut self) -> String {
        self.next_token += 1;
        format!("fleet-{:x}-{}", self.session, self.next_token)
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.transmits.push_back(Transmit::Publish {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
        });
    }

    /// Remembers a version told of while a read is out.
    fn note_while_reading(&mut self, i: usize, version: u64) {
        let slot = &mut self.slots[i];
        if matches!(slot.phase, Phase::Reading { .. }) {
            slot.seen_while_reading = slot.seen_while_reading.max(Some(version));
        }
    }

    fn start_read(&mut self, i: usize, now: Instant) {
        if !self.connected {
            return;
        }
        let token = self.new_token();
        let payload = format!(r#"{{"clientToken":"{token}"}}"#).into_bytes();
        let slot = &mut self.slots[i];
        let topic = format!("{}/get", slot.base);
        slot.seen_while_reading = None;
        slot.phase = Phase::Reading {
            token,
            deadline: now + self.config.request_timeout,
        };
        self.publish(topic, payload);
    }

    fn synced(&mut self, i: usize, now: Instant) {
        let resync = self.config.resync_interval.map(|d| now + d);
        let slot = &mut self.slots[i];
        slot.phase = Phase::Synced;
        slot.next_resync = resync;
        slot.last_delta = None;
        self.events.push_back(ShadowEvent::Synced {
            shadow: slot.name.clone(),
            version: slot.version.unwrap_or(0),
            exists: slot.exists(),
        });
        self.emit_delta(i);
        self.resend(i, now);
        self.send_next(i, now);
    }

    /// Sends again, unchanged, the request that was out when the
    /// connection dropped.
    fn resend(&mut self, i: usize, now: Instant) {
        let timeout = self.config.request_timeout;
        let slot = &mut self.slots[i];
        let Some(f) = slot.in_flight.as_mut().filter(|f| f.resend) else {
            return;
        };
        f.resend = false;
        f.deadline = now + timeout;
        let (topic, payload) = (format!("{}/update", slot.base), f.payload.clone());
        self.publish(topic, payload);
    }

    /// Applies an `/update/accepted` (anyone's) to the replica, in order.
    fn apply_accepted(&mut self, i: usize, now: Instant, state: Option<&Object>, version: u64) {
        let slot = &mut self.slots[i];
        if slot.phase != Phase::Synced {
            // The read in progress covers it, unless its answer is older.
            slot.seen_while_reading = slot.seen_while_reading.max(Some(version));
            return;
        }
        match slot.version {
            Some(v) if version <= v => return, // stale or duplicate
            Some(v) if version == v + 1 => {}
            // A skipped version, or the first update of a shadow whose
            // version we were not told (`version == 1` creates it afresh).
            None if version == 1 && !slot.exists() => {}
            _ => {
                self.start_read(i, now);
                return;
            }
        }
        let mut scratch = Map::new();
        let desired = slot.desired.get_or_insert_with(Map::new);
        match state {
            None => {
                desired.clear();
                slot.reported.clear();
            }
            Some(state) => {
                for (name, target) in [("desired", &mut *desired), ("reported", &mut slot.reported)]
                {
                    match state.get(name) {
                        Some(Value::Object(patch)) => json::merge(target, &mut scratch, patch, 0),
                        Some(Value::Null) => target.clear(),
                        _ => {}
                    }
                }
            }
        }
        slot.version = Some(version);
        slot.next_resync = self.config.resync_interval.map(|d| now + d);
        self.emit_delta(i);
    }

    fn emit_delta(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(desired) = &slot.desired else {
            return;
        };
        let (delta, _) = json::delta(desired, &Map::new(), &slot.reported);
        if slot.last_delta.as_ref() == Some(&delta) {
            return;
        }
        if !delta.is_empty() {
            self.events.push_back(ShadowEvent::Delta {
                shadow: slot.name.clone(),
                version: slot.version.unwrap_or(0),
                delta: delta.clone(),
            });
        }
        slot.last_delta = Some(delta);
    }

    fn send_next(&mut self, i: usize, now: Instant) {
        if !self.connected {
            return;
        }
        let slot = &self.slots[i];
        if slot.in_flight.is_some() || slot.phase != Phase::Synced || slot.queue.is_empty() {
            return;
        }
        let token = self.new_token();
        let versioned = self.config.versioned_updates;
        let slot = &mut self.slots[i];
        let Some(pending) = slot.queue.pop_front() else {
            return;
        };
        let mut state = Map::new();
        if let Some(d) = &pending.desired {
            state.insert(String::from("desired"), d.clone());
        }
        if let Some(r) = &pending.reported {
            state.insert(String::from("reported"), r.clone());
        }
        let request = UpdateRequest {
            state: Some(state),
            client_token: Some(token.clone()),
            version: if versioned { slot.version } else { None },
        };
        let payload = request.to_payload();
        let topic = format!("{}/update", slot.base);
        slot.in_flight = Some(InFlight {
            pending,
            token,
            payload: payload.clone(),
            deadline: now + self.config.request_timeout,
            attempts: 1,
            resend: false,
        });
        self.publish(topic, payload);
    }
}
