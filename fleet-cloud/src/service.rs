//! What every transport hands the services, and how it finds the one a
//! request is for: the boundary between the fleet's logic and the
//! protocols that carry it.
//!
//! A transport (the MQTT front-end in [`broker`](crate::serve), a CoAP
//! one later) turns what arrived into a [`Request`]: the protocol topic it
//! names, parsed by `fleet_core::topic`; the payload; the [`Caller`] as the
//! transport authenticated it; the time it arrived. It looks the request's
//! service up in a [`Services`] table and sends back the [`Outgoing`]
//! messages the service returns. No service knows which transport carried
//! the request.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use fleet_cloud::service::{Caller, Request, Services};
//! use fleet_cloud::{MemoryStore, ShadowService};
//! use fleet_core::{ThingName, TopicPrefix};
//!
//! let services = Services::new().with(ShadowService::new(MemoryStore::new()));
//! let (handler, topic) = services
//!     .route("$aws/things/pump-7/shadow/update")
//!     .expect("a shadow request");
//! let caller = Caller::Thing(ThingName::new("pump-7")?.into_owned());
//! let request = Request::new(topic, br#"{"state":{"reported":{"on":true}}}"#, caller, 1_700_000_000);
//! let out = services.handle(handler, &request).await?;
//! assert_eq!(out[0].topic, "$aws/things/pump-7/shadow/update/accepted");
//!
//! // A device may act only for its own thing.
//! let (handler, topic) = services.route("$aws/things/pump-8/shadow/get").unwrap();
//! let stranger = Request::new(topic, b"", Caller::Thing(ThingName::new("pump-7")?.into_owned()), 0);
//! assert!(services.handle(handler, &stranger).await.is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;

use fleet_core::ThingName;
use fleet_core::topic::{Service, Topic, TopicPrefix};

use crate::Outgoing;

/// Who sent a request, as its transport authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Caller {
    /// A device authenticated as this thing (a certificate bound to it).
    /// It may act for its own thing only.
    Thing(ThingName<'static>),
    /// A device that has no thing yet (a claim certificate): it may ask
    /// for an identity (provisioning), nothing else.
    Claimant,
    /// The backend itself or an operator (the management API): may act
    /// for any thing.
    Operator,
}

impl Caller {
    /// Whether this caller may make `request`: a thing for its own topics,
    /// a claimant and a thing for provisioning, an operator for anything.
    pub fn may(&self, request: &Topic<'_>) -> bool {
        match (self, request.thing()) {
            (Self::Operator, _) => true,
            (Self::Thing(me), Some(thing)) => me == thing,
            (Self::Thing(_) | Self::Claimant, None) => request.service() == Service::Provisioning,
            (Self::Claimant, Some(_)) => false,
        }
    }
}

/// A request to a service, from any transport.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// What is asked: the service, the operation, the thing (and shadow,
    /// job or stream), as `fleet_core::topic` parsed it.
    pub topic: Topic<'a>,
    /// The request's body (JSON or CBOR, as the topic says).
    pub payload: &'a [u8],
    /// Who asks.
    pub caller: Caller,
    /// When it arrived, in seconds since the Unix epoch.
    pub received_at: u64,
}

impl<'a> Request<'a> {
    /// A request for `topic` with `payload` from `caller`, arrived at
    /// `received_at` (epoch seconds).
    pub fn new(topic: Topic<'a>, payload: &'a [u8], caller: Caller, received_at: u64) -> Self {
        Self {
            topic,
            payload,
            caller,
            received_at,
        }
    }

    /// A request as an MQTT broker that confines every device to its own
    /// topics delivers it: the caller is the thing the topic names (a
    /// claimant for provisioning topics). `None` if `topic` is not a
    /// request under `prefix`.
    pub fn from_broker(
        prefix: &TopicPrefix<'_>,
        topic: &'a str,
        payload: &'a [u8],
        received_at: u64,
    ) -> Option<Self> {
        let topic = Topic::parse(prefix, topic).ok()?;
        if !topic.is_from_device() {
            return None;
        }
        let caller = match topic.thing() {
            Some(thing) => Caller::Thing(thing.clone().into_owned()),
            None => Caller::Claimant,
        };
        Some(Self::new(topic, payload, caller, received_at))
    }
}

/// Why a service did not handle a request. A transport answers what it
/// can in its own terms (CoAP: 4.03, 4.04, 5.00); over MQTT the request is
/// left unacknowledged on [`Failed`](Self::Failed), so that it comes again.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// The caller may not make this request ([`Caller::may`]); nothing
    /// changed.
    Forbidden,
    /// The request is not one this service answers (wrong service, or a
    /// reply rather than a request); nothing changed.
    NotARequest,
    /// The service failed (its store); the cause is the
    /// [`source`](std::error::Error::source).
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl HandlerError {
    /// A failure with its cause.
    pub fn failed(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Failed(Box::new(cause))
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forbidden => f.write_str("the caller may not make this request"),
            Self::NotARequest => f.write_str("not a request of this service"),
            Self::Failed(_) => f.write_str("the service failed"),
        }
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Failed(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

/// A service devices send requests to, as a transport sees it.
///
/// Implemented by [`ShadowService`](crate::ShadowService),
/// [`JobsService`](crate::JobsService), [`StreamService`](crate::StreamService),
/// [`ProvisioningService`](crate::ProvisioningService) and
/// [`CommandCenter`](crate::CommandCenter).
#[async_trait::async_trait]
pub trait Handler: Send + Sync + fmt::Debug {
    /// Which service this is.
    fn service(&self) -> Service;

    /// The topic prefix its requests are under (`$aws` by default).
    fn prefix(&self) -> &str;

    /// Answers `request` (of this service, from a caller allowed to make
    /// it: [`Services::handle`] checks both): what to send back.
    async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, HandlerError>;

    /// The answer to a request refused for being one too many from its
    /// thing (a 429), without doing it; `None` if the service has no such
    /// answer and the request should wait its turn instead.
    fn throttled(&self, _request: &Request<'_>) -> Option<Outgoing> {
        None
    }

    /// Whether several instances may share its requests (MQTT 5 shared
    /// subscriptions). A service whose state is in one instance's memory
    /// (commands: the waiter of an answer) is not.
    fn shareable(&self) -> bool {
        true
    }

    /// Work due at `now` besides requests (timeouts, rollouts): what to
    /// send. Called every second by the instance that leads.
    async fn tick(&self, _now: u64) -> Result<Vec<Outgoing>, HandlerError> {
        Ok(Vec::new())
    }
}

/// A message could not be handed to the transport (it is stopping).
#[derive(Debug)]
pub struct PublishError(String);

impl PublishError {
    /// An error saying why.
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot publish: {}", self.0)
    }
}

impl std::error::Error for PublishError {}

/// Sends what a service starts on its own (a command to a thing), through
/// whichever transport serves it. The MQTT front-end's
/// [`Publisher`](crate::Publisher) is one.
#[async_trait::async_trait]
pub trait Sender: Send + Sync + fmt::Debug {
    /// Hands `message` to the transport.
    async fn send(&self, message: Outgoing) -> Result<(), PublishError>;
}

/// Which handler a request goes to: an index into a [`Services`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(usize);

impl HandlerId {
    /// Its position in the table.
    pub fn index(self) -> usize {
        self.0
    }
}

/// The handler table: every service a fleet serves, found by the topic
/// of a request. One per front-end; cloning shares the handlers.
#[derive(Debug, Clone, Default)]
pub struct Services {
    handlers: Vec<Arc<dyn Handler>>,
    /// Each handler's counters, registered when it is added.
    meters: Vec<Arc<Meters>>,
}

/// What is counted of one service's requests, registered once.
#[derive(Debug)]
pub(crate) struct Meters {
    handled: metrics::Counter,
    failed: metrics::Counter,
    forbidden: metrics::Counter,
    not_a_request: metrics::Counter,
    /// Requests in from the transport, by QoS.
    pub(crate) received: [metrics::Counter; 3],
    /// Messages the service sent (QoS 1).
    pub(crate) sent: metrics::Counter,
}

impl Meters {
    fn new(service: Service) -> Self {
        let service = service.as_str();
        let requests = |outcome: &'static str| metrics::counter!("fleet_requests_total", "service" => service, "outcome" => outcome);
        Self {
            handled: requests("handled"),
            failed: requests("failed"),
            forbidden: requests("forbidden"),
            not_a_request: requests("not_a_request"),
            received: crate::metrics::per_qos("fleet_messages_in_total", &[("service", service)]),
            sent: metrics::counter!("fleet_messages_out_total", "service" => service, "qos" => "1"),
        }
    }
}

impl Services {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same table with `handler` added.
    pub fn with(mut self, handler: impl Handler + 'static) -> Self {
        self.add(Arc::new(handler));
        self
    }

    /// Adds a handler shared with others.
    pub fn add(&mut self, handler: Arc<dyn Handler>) {
        self.meters.push(Arc::new(Meters::new(handler.service())));
        self.handlers.push(handler);
    }

    /// A handler's counters.
    pub(crate) fn meters(&self, id: HandlerId) -> Option<&Meters> {
        self.meters.get(id.0).map(Arc::as_ref)
    }

    /// The handlers, in the order added.
    pub fn handlers(&self) -> &[Arc<dyn Handler>] {
        &self.handlers
    }

    /// A handler by id.
    pub fn get(&self, id: HandlerId) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(id.0)
    }

    /// The handler of the request on `topic` and the topic parsed; `None`
    /// if no service here takes it (not a request, or a service not
    /// served).
    pub fn route<'t>(&self, topic: &'t str) -> Option<(HandlerId, Topic<'t>)> {
        self.handlers.iter().enumerate().find_map(|(i, h)| {
            let prefix = TopicPrefix::new(h.prefix()).ok()?;
            let parsed = Topic::parse(&prefix, topic).ok()?;
            (parsed.service() == h.service() && parsed.is_from_device())
                .then_some((HandlerId(i), parsed))
        })
    }

    /// Handles `request` with handler `id`, once the request is checked:
    /// of that handler's service, and from a caller allowed to make it.
    pub async fn handle(
        &self,
        id: HandlerId,
        request: &Request<'_>,
    ) -> Result<Vec<Outgoing>, HandlerError> {
        let (handler, meters) = match (self.get(id), self.meters(id)) {
            (Some(h), Some(m)) => (h, m),
            _ => return Err(HandlerError::NotARequest),
        };
        if request.topic.service() != handler.service() || !request.topic.is_from_device() {
            meters.not_a_request.increment(1);
            return Err(HandlerError::NotARequest);
        }
        if !request.caller.may(&request.topic) {
            meters.forbidden.increment(1);
            return Err(HandlerError::Forbidden);
        }
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "device_request",
            service = handler.service().as_str(),
            topic = ?request.topic
        );
        let r = handler.handle(request).instrument(span).await;
        if r.is_ok() {
            meters.handled.increment(1);
        } else {
            meters.failed.increment(1);
        }
        r
    }

    /// The filters a front-end subscribes with for handler `id`.
    pub fn filters(&self, id: HandlerId) -> Vec<String> {
        let Some(h) = self.get(id) else {
            return Vec::new();
        };
        TopicPrefix::new(h.prefix())
            .map(|p| h.service().filters(&p))
            .unwrap_or_default()
    }

    /// Every handler's id.
    pub fn ids(&self) -> impl Iterator<Item = HandlerId> + use<> {
        (0..self.handlers.len()).map(HandlerId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thing(s: &str) -> Caller {
        Caller::Thing(ThingName::new(s).unwrap().into_owned())
    }

    #[test]
    fn who_may_make_which_request() {
        let p = TopicPrefix::AWS;
        let shadow = Topic::parse(&p, "$aws/things/a/shadow/update").unwrap();
        let provision = Topic::parse(&p, "$aws/certificates/create-from-csr/json").unwrap();
        assert!(thing("a").may(&shadow));
        assert!(!thing("b").may(&shadow));
        assert!(!Caller::Claimant.may(&shadow));
        assert!(Caller::Operator.may(&shadow));
        assert!(Caller::Claimant.may(&provision));
        assert!(thing("a").may(&provision));
    }

    #[test]
    fn requests_from_the_broker_name_their_thing() {
        let p = TopicPrefix::AWS;
        let r = Request::from_broker(&p, "$aws/things/a/jobs/get", b"{}", 5).unwrap();
        assert_eq!(r.caller, thing("a"));
        let r = Request::from_broker(&p, "$aws/certificates/create/json", b"", 5).unwrap();
        assert_eq!(r.caller, Caller::Claimant);
        // Replies and notifications are not requests.
        assert!(Request::from_broker(&p, "$aws/things/a/jobs/notify", b"", 5).is_none());
        assert!(Request::from_broker(&p, "$aws/things/a/shadow/get/accepted", b"", 5).is_none());
        assert!(Request::from_broker(&p, "dt/a/temp", b"", 5).is_none());
    }
}
