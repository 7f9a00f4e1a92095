//! Running the service against an MQTT broker, as a privileged backend
//! client (MQTT 5, mutual TLS, shared subscriptions).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use fleet_core::topic::{Role, TopicPrefix};

use crate::clock::Clock;
use crate::commands::CommandCenter;
use crate::service::{HandlerError, HandlerId, Request, Services};
use crate::shadows::ShadowService;
use crate::telemetry::{TelemetryRecord, TelemetryRouter};

/// How to reach the broker, with the backend's identity (all PEM).
#[derive(Clone)]
pub struct BrokerConfig {
    /// Host name (checked against the broker's certificate).
    pub host: String,
    /// Port.
    pub port: u16,
    /// MQTT client id; unique per instance.
    pub client_id: String,
    /// The backend's certificate chain, PEM.
    pub cert_pem: String,
    /// The backend's private key, PEM.
    pub key_pem: String,
    /// The CA that signed the broker's certificate, PEM.
    pub ca_pem: String,
    /// Instances in the same group share the load (MQTT 5 shared
    /// subscriptions): each request goes to one of them. `None`: a plain
    /// subscription, for a single instance.
    ///
    /// Mosquitto 2.0 does not deliver topics that start with `$` (such as
    /// `$aws/...`) to shared subscriptions: with Mosquitto, scale out under
    /// a prefix without `$` (`ShadowService::with_prefix("fleet")`), or use
    /// a broker that does (EMQX, HiveMQ, VerneMQ, AWS IoT Core).
    pub share_group: Option<String>,
    /// Requests buffered between the network and the workers; when full,
    /// the service stops reading from the broker (back-pressure), it does
    /// not grow.
    pub queue_capacity: usize,
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("share_group", &self.share_group)
            .finish_non_exhaustive()
    }
}

pub use crate::service::PublishError;

/// The service could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The TLS material is unusable.
    Tls(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls(e) => write!(f, "TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

fn tls(config: &BrokerConfig) -> Result<rustls::ClientConfig, StartError> {
    crate::tls::client_config(&config.ca_pem, Some((&config.cert_pem, &config.key_pem)))
        .map_err(|e| StartError::Tls(e.to_string()))
}

/// What a front-end serves besides its [`Services`] table, and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Telemetry routing; `None`: telemetry is not subscribed to.
    pub telemetry: Option<TelemetryRouter>,
    /// When several instances share a store: the services' periodic work
    /// ([`Handler::tick`](crate::Handler::tick): job timeouts, rollouts) runs only while this
    /// instance holds the lease (`None`: always, one instance).
    pub leadership: Option<Arc<dyn crate::Leadership>>,
    /// The time requests arrive at, and ticks run at.
    pub clock: Clock,
    /// Commands are sent under this prefix (`$aws` by default).
    pub commands_prefix: String,
    /// Connectivity through a broker that reports none of its own
    /// (`None`: the broker reports it, as the embedded one does).
    pub presence: Option<ExternalPresence>,
}

/// What a front-end does for connectivity behind a broker that reports
/// none (Mosquitto): the device agents' presence is handled by
/// [`PresenceService`](crate::PresenceService); the front-end tells
/// [`recorder`](Self::recorder) of every request a thing makes (its
/// `lastSeen`), at most once per [`seen_interval`](Self::seen_interval),
/// and, when the broker no longer holds the service's session (it
/// restarted without its state, or the session expired), records every
/// connection as ended before subscribing again: the retained births of
/// the devices still connected then say so again, and those that died with
/// the broker stay ended.
#[derive(Clone)]
pub struct ExternalPresence {
    /// Where activity is recorded.
    pub recorder: crate::ConnectivityRecorder,
    /// Where connections are ended.
    pub index: Arc<dyn crate::store::IndexStore>,
    /// How often a thing's activity is recorded.
    pub seen_interval: Duration,
}

impl fmt::Debug for ExternalPresence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalPresence")
            .field("seen_interval", &self.seen_interval)
            .finish_non_exhaustive()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            telemetry: None,
            leadership: None,
            clock: Clock::system(),
            commands_prefix: "$aws".into(),
            presence: None,
        }
    }
}

/// Tells a sink that things were heard from, each at most once per
/// interval.
struct Seen {
    sink: crate::ConnectivityRecorder,
    interval: Duration,
    last: std::collections::HashMap<String, std::time::Instant>,
}

impl Seen {
    fn note(&mut self, thing: &str) {
        let now = std::time::Instant::now();
        if self
            .last
            .get(thing)
            .is_some_and(|t| now.duration_since(*t) < self.interval)
        {
            return;
        }
        // Forget the quiet ones now and then (bounded by the things heard
        // from within one interval).
        if self.last.len() >= 100_000 {
            let interval = self.interval;
            self.last.retain(|_, t| now.duration_since(*t) < interval);
        }
        self.last.insert(thing.to_string(), now);
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.sink.record(crate::ConnectivityEvent::Seen {
            thing: thing.to_string(),
            at,
        });
    }
}

/// Publishes through a running service's connection, at QoS 1.
#[derive(Debug, Clone)]
pub struct Publisher(AsyncClient);

impl Publisher {
    /// Publishes `payload` on `topic`.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), PublishError> {
        self.0
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| PublishError::new(e.to_string()))?;
        metrics::counter!("fleet_messages_out_total", "service" => "application", "qos" => "1")
            .increment(1);
        Ok(())
    }
}

/// An error and its causes on one line, `: `-separated (a cause its
/// error's message already quotes is not repeated): what a log line or a
/// command's failure shows, the refused connection or the unknown
/// certificate issuer included, not only the top message.
///
/// ```
/// #[derive(Debug)]
/// struct Unreachable(std::io::Error);
/// impl std::fmt::Display for Unreachable {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str("cannot reach the broker")
///     }
/// }
/// impl std::error::Error for Unreachable {
///     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
///         Some(&self.0)
///     }
/// }
/// let e = Unreachable(std::io::Error::other("connection refused"));
/// assert_eq!(fleet_cloud::error_chain(&e), "cannot reach the broker: connection refused");
/// ```
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

#[async_trait::async_trait]
impl crate::service::Sender for Publisher {
    async fn send(&self, message: crate::Outgoing) -> Result<(), PublishError> {
        self.publish(&message.topic, message.payload).await
    }
}

/// A running service; stops when dropped or on [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct RunningService {
    client: AsyncClient,
    commands: CommandCenter,
    stopping: Arc<AtomicBool>,
    link: LinkState,
    tasks: Vec<JoinHandle<()>>,
}

/// Whether the service's connection to the broker is up (connected and
/// subscribed to its requests): what `/readyz` reports.
#[derive(Debug, Clone, Default)]
pub struct LinkState(Arc<LinkInner>);

#[derive(Debug, Default)]
struct LinkInner {
    up: AtomicBool,
    /// Why the last attempt to connect failed.
    error: std::sync::Mutex<Option<String>>,
}

impl LinkState {
    /// Whether the connection is up now.
    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::SeqCst)
    }

    /// Why the connection is down: the last attempt's error (`None` while
    /// up, or before the first attempt ended).
    pub fn last_error(&self) -> Option<String> {
        if self.is_up() {
            return None;
        }
        self.0
            .error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until the connection is up, `timeout` at most; whether it is.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    fn set(&self, up: bool) {
        self.0.up.store(up, Ordering::SeqCst);
    }

    fn failed(&self, error: String) {
        self.set(false);
        *self
            .0
            .error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }
}

impl RunningService {
    /// The state of the connection to the broker.
    pub fn link(&self) -> LinkState {
        self.link.clone()
    }

    /// Sends commands to things and awaits their answers.
    pub fn commands(&self) -> &CommandCenter {
        &self.commands
    }

    /// Publishes what a service call returned (a desired-state change from
    /// [`ShadowService::update`](crate::ShadowService::update), a job's
    /// notifications, ...) through this service's connection, at QoS 1.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), PublishError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| PublishError::new(e.to_string()))
    }

    /// A handle that publishes through this service's connection (for the
    /// management API, say).
    pub fn publisher(&self) -> Publisher {
        Publisher(self.client.clone())
    }

    /// Disconnects and stops.
    pub async fn shutdown(self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long a broker keeps the service's session (and queues its
/// messages) while it is away.
const SESSION_EXPIRY_SECONDS: u32 = 3600;

/// Bytes (topics and payloads) the backend holds waiting to be published.
const MAX_OUTBOUND_BYTES: usize = 16 * 1024 * 1024;

/// Largest packet the backend accepts.
const MAX_PACKET: u32 = 256 * 1024;

/// Connects to the broker and serves shadow requests until stopped.
pub fn serve_shadows(
    config: BrokerConfig,
    service: ShadowService,
) -> Result<RunningService, StartError> {
    serve(
        config,
        Services::new().with(service),
        ServeOptions::default(),
    )
}

/// What the service sends: a message, or the acknowledgement of one it
/// has handled.
enum Outbound {
    Publish {
        topic: String,
        payload: Vec<u8>,
        properties: Option<PublishProperties>,
    },
    Ack(Ack),
}

/// The acknowledgement of a received message, sent (manual acks) only once
/// the service has handled it: stored the shadow, written the telemetry.
/// A broker that waits for it before acknowledging the device (the
/// embedded one) then means "stored" by its PUBACK; one that keeps the
/// backend's session (Mosquitto) sends what was not acknowledged again.
#[derive(Debug, Clone, Copy)]
struct Ack {
    pkid: u16,
    qos: QoS,
}

impl Ack {
    fn of(p: &rumqttc::v5::mqttbytes::v5::Publish) -> Self {
        Self {
            pkid: p.pkid,
            qos: p.qos,
        }
    }

    fn packet(self) -> rumqttc::v5::mqttbytes::v5::Publish {
        let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", self.qos, Vec::new(), None);
        p.pkid = self.pkid;
        p
    }
}

/// A message for a service as it arrived, with its acknowledgement.
#[derive(Debug)]
struct Queued {
    topic: String,
    payload: Vec<u8>,
    ack: Ack,
    /// Its MQTT 5 response topic and correlation data.
    response: Option<(String, Option<bytes::Bytes>)>,
}

/// Requests are handled by this many workers at once: those of one thing
/// in order, one at a time; different things' at the same time (so a store
/// that commits in groups gets groups).
const WORKERS: usize = 32;

/// Requests waiting, of every thing together; past it, reading from the
/// broker waits (the back-pressure reaches the broker connection).
const MAX_WAITING: usize = 4096;

/// Requests one thing may have waiting; more QoS 0 requests are answered
/// 429 at once (where the service has a way to say so: shadows), so that a
/// device flooding its own topics fills neither the queue nor the others'
/// wait.
const MAX_WAITING_PER_THING: usize = 16;

/// At most this many telemetry messages go to the sinks at once.
const TELEMETRY_BATCH: usize = 512;

/// Whose request this is: the thing of `{prefix}/things/{thing}/...`, or
/// the whole topic for any other.
fn owner_of(topic: &str) -> &str {
    topic
        .split('/')
        .skip_while(|l| *l != "things")
        .nth(1)
        .unwrap_or(topic)
}

/// Which requests wait, by thing, and whose turn is next: things take
/// turns (round robin), each thing's requests in the order they came.
/// Pure, so that its fairness is tested without a broker.
#[derive(Debug, Default)]
struct Turns {
    waiting: HashMap<String, VecDeque<Queued>>,
    /// Things with requests waiting and none being handled, in turn order.
    ready: VecDeque<String>,
    /// Things with a request being handled.
    busy: HashSet<String>,
    total: usize,
}

/// What [`Turns::push`] did with a request.
#[derive(Debug)]
enum Pushed {
    Queued,
    /// The thing has [`MAX_WAITING_PER_THING`] waiting: the request back.
    Full(Queued),
}

impl Turns {
    fn push(&mut self, request: Queued) -> Pushed {
        let full = self
            .waiting
            .get(owner_of(&request.topic))
            .is_some_and(|q| q.len() >= MAX_WAITING_PER_THING);
        if full {
            return Pushed::Full(request);
        }
        self.push_anyway(request);
        Pushed::Queued
    }

    /// Queues `request` whatever its thing holds.
    fn push_anyway(&mut self, request: Queued) {
        let owner = owner_of(&request.topic).to_string();
        let queue = self.waiting.entry(owner.clone()).or_default();
        let first = queue.is_empty();
        queue.push_back(request);
        self.total += 1;
        if first && !self.busy.contains(&owner) {
            self.ready.push_back(owner);
        }
    }

    /// The next request to handle (its thing is then busy until
    /// [`done`](Self::done)).
    fn next(&mut self) -> Option<(String, Queued)> {
        let owner = self.ready.pop_front()?;
        let queue = self.waiting.get_mut(&owner)?;
        let request = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&owner);
        }
        self.total -= 1;
        self.busy.insert(owner.clone());
        Some((owner, request))
    }

    /// `owner`'s request was handled: its next one joins the turns.
    fn done(&mut self, owner: &str) {
        self.busy.remove(owner);
        if self.waiting.contains_key(owner) {
            self.ready.push_back(owner.to_string());
        }
    }
}

/// Handles what arrives on `rx` with `handler`, [`WORKERS`] at a time,
/// things taking turns ([`Turns`]).
/// Each request is acknowledged by `ack` once its handler has handled it
/// (returned `true`); one it failed (a store error) is left
/// unacknowledged, so that the broker delivers it again or the device
/// sends it again. A QoS 0 request over its thing's
/// [`MAX_WAITING_PER_THING`] is answered by `throttled` (a 429 rejection to
/// publish) instead of waiting, where `throttled` has an answer; a QoS 1
/// request always waits its turn (its acknowledgement means it was
/// handled), and a device's QoS 1 requests are bounded by its in-flight
/// window.
fn lanes<F, Fut, A, T>(
    mut rx: mpsc::Receiver<Queued>,
    handler: F,
    ack: A,
    throttled: T,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Queued) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
    A: Fn(Ack) + Clone + Send + 'static,
    T: Fn(&Queued) -> bool + Send + 'static,
{
    tokio::spawn(async move {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
        let mut turns = Turns::default();
        let mut running = 0usize;
        let mut open = true;
        loop {
            while running < WORKERS
                && let Some((owner, queued)) = turns.next()
            {
                running += 1;
                let (handler, ack, done) = (handler.clone(), ack.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let a = queued.ack;
                    if handler(queued).await {
                        ack(a);
                    }
                    let _ = done.send(owner);
                });
            }
            if !open && running == 0 {
                return;
            }
            let can_read = open && turns.total < MAX_WAITING;
            tokio::select! {
                Some(owner) = done_rx.recv(), if running > 0 => {
                    running -= 1;
                    turns.done(&owner);
                }
                r = rx.recv(), if can_read => match r {
                    Some(request) => {
                        if let Pushed::Full(request) = turns.push(request) {
                            if request.ack.qos == QoS::AtMostOnce && throttled(&request) {
                                ack(request.ack);
                            } else {
                                turns.push_anyway(request);
                            }
                        }
                    }
                    None => open = false,
                },
                // Not reached: with nothing running, nothing waits, so
                // reading is allowed while the channel is open.
                else => tokio::task::yield_now().await,
            }
        }
    })
}

/// No Nagle delay: the service answers small requests, and Nagle's
/// algorithm with delayed acknowledgements can hold each answer 40 ms.
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(10);
    n
}

/// Connects to the broker and serves every service of `services`, the
/// answers to this instance's commands and (with a router) telemetry until
/// stopped. Subscriptions are made again after every reconnection.
///
/// This is the MQTT front-end: one subscription set and one queue per
/// handler of the table, things taking turns in each (round robin); a
/// request is parsed into a [`Request`] (its caller the thing its topic
/// names, which the broker's policy lets publish only there), handled
/// through [`Services::handle`], and its answers published before it is
/// acknowledged.
pub fn serve(
    config: BrokerConfig,
    services: Services,
    options: ServeOptions,
) -> Result<RunningService, StartError> {
    let tls = tls(&config)?;
    let mut mqtt = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    mqtt.set_keep_alive(Duration::from_secs(30))
        // Above the broker's limit for devices (128 KiB, as AWS IoT), so a
        // device can never send the backend a packet it refuses (rumqttc's
        // default of 10 KiB would drop the connection).
        .set_max_packet_size(Some(MAX_PACKET))
        // A session the broker keeps while the service is away (Mosquitto
        // queues its QoS 1 messages), and manual acknowledgements: a
        // message is acknowledged only once it is handled, so one the
        // service did not finish is delivered again.
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECONDS))
        .set_manual_acks(true)
        .set_network_options(network_options())
        .set_connection_timeout(10)
        // rumqttc allocates a slot per packet id it may have in flight up
        // front (u16::MAX by default, about 8 MiB).
        .set_outgoing_inflight_upper_limit(1024)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    let (client, mut eventloop) = AsyncClient::new(mqtt, 256);
    let capacity = config.queue_capacity.max(1);

    // The table: the services given, and this instance's command answers.
    let commands = CommandCenter::new(
        Arc::new(Publisher(client.clone())),
        &options.commands_prefix,
        options.clock.clone(),
    );
    let mut services = services;
    services.add(Arc::new(commands.clone()));
    let share = config
        .share_group
        .as_ref()
        .map_or(String::new(), |g| format!("$share/{g}/"));
    let mut filters = Vec::new();
    let mut queues = Vec::new();
    let mut receivers = Vec::new();
    for id in services.ids() {
        let shared = services.get(id).is_some_and(|h| h.shareable());
        for f in services.filters(id) {
            filters.push(if shared { format!("{share}{f}") } else { f });
        }
        let (tx, rx) = mpsc::channel::<Queued>(capacity);
        queues.push(tx);
        receivers.push((id, rx));
    }
    let telemetry_prefix = options.telemetry.as_ref().map(|t| t.prefix.clone());
    if let Some(t) = &telemetry_prefix {
        filters.push(format!("{share}{t}/#"));
    }
    let (telemetry_tx, mut telemetry_rx) = mpsc::channel::<Queued>(capacity);

    // Handlers never wait for the client: the network task may be waiting
    // for them (a full queue), and the client only moves when the network
    // task polls it. What they publish goes through this queue, published
    // in order by its own task. The queue is bounded by bytes: past
    // [`MAX_OUTBOUND_BYTES`] a reply is dropped (and counted), and the
    // device asks again, rather than the process growing without bound.
    let (outbound_tx, mut outbound_rx) = mpsc::unbounded_channel::<Outbound>();
    let ack_tx = outbound_tx.clone();
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pending_out = pending.clone();
    let out_client = client.clone();
    let publisher = tokio::spawn(async move {
        while let Some(o) = outbound_rx.recv().await {
            let r = match o {
                Outbound::Ack(a) => out_client.ack(&a.packet()).await,
                Outbound::Publish {
                    topic,
                    payload,
                    properties,
                } => {
                    let left = pending_out
                        .fetch_sub(topic.len() + payload.len(), Ordering::Relaxed)
                        - (topic.len() + payload.len());
                    metrics::gauge!("fleet_outbound_queued_bytes").set(left as f64);
                    match properties {
                        Some(p) => {
                            out_client
                                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, p)
                                .await
                        }
                        None => {
                            out_client
                                .publish(topic, QoS::AtLeastOnce, false, payload)
                                .await
                        }
                    }
                }
            };
            if let Err(e) = r {
                tracing::warn!("publish: {e}");
            }
        }
    });
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let outbound = move |topic: String, payload: Vec<u8>, properties: Option<PublishProperties>| {
        let size = topic.len() + payload.len();
        if pending.fetch_add(size, Ordering::Relaxed) + size > MAX_OUTBOUND_BYTES {
            pending.fetch_sub(size, Ordering::Relaxed);
            metrics::counter!("fleet_outbound_dropped_total").increment(1);
            let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                topic,
                dropped_total = n,
                "outbound queue full; reply dropped"
            );
            return;
        }
        let _ = outbound_tx.send(Outbound::Publish {
            topic,
            payload,
            properties,
        });
    };
    let acker = {
        let tx = ack_tx;
        move |a: Ack| {
            let _ = tx.send(Outbound::Ack(a));
        }
    };

    let stopping = Arc::new(AtomicBool::new(false));
    let stop_seen = stopping.clone();
    let link = LinkState::default();
    let link_seen = link.clone();
    let sub_client = client.clone();
    let ack_now = acker.clone();
    let table = services.clone();
    let telemetry_in =
        crate::metrics::per_qos("fleet_messages_in_total", &[("service", "telemetry")]);
    let other_in = crate::metrics::per_qos("fleet_messages_in_total", &[("service", "other")]);
    let seen = options.presence.as_ref().map(|p| Seen {
        sink: p.recorder.clone(),
        interval: p.seen_interval,
        last: std::collections::HashMap::new(),
    });
    let ended_on_session_loss = options.presence.as_ref().map(|p| p.index.clone());
    let network = tokio::spawn(async move {
        let mut seen = seen;
        let mut backoff = Duration::from_millis(100);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(100);
                    // The broker lost this service's session: what it
                    // would have queued is gone, so every connection is
                    // ended before the subscriptions bring the retained
                    // births of the devices still there.
                    if let (false, Some(index)) = (ack.session_present, &ended_on_session_loss) {
                        match index.end_connections("SERVER_INITIATED_DISCONNECT").await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                devices = n,
                                "the broker kept no session: connections recorded as ended until their devices say otherwise"
                            ),
                            Err(e) => tracing::warn!("cannot end connections: {e}"),
                        }
                    }
                    let mut subscribed = true;
                    for f in &filters {
                        if let Err(e) = sub_client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!("subscribe {f}: {e}");
                            subscribed = false;
                        }
                    }
                    link_seen.set(subscribed);
                    tracing::info!("connected; serving shadow requests");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let props = p.properties.as_ref();
                    let response = props.and_then(|pr| {
                        Some((pr.response_topic.clone()?, pr.correlation_data.clone()))
                    });
                    let routed = match table.route(&topic) {
                        Some((id, parsed)) => {
                            if let (Some(s), Some(thing)) = (seen.as_mut(), parsed.thing()) {
                                s.note(thing.as_str());
                            }
                            Some(id)
                        }
                        None => None,
                    };
                    let is_telemetry = routed.is_none()
                        && telemetry_prefix.as_ref().is_some_and(|t| {
                            topic
                                .strip_prefix(t.as_str())
                                .is_some_and(|r| r.starts_with('/'))
                        });
                    let qos = match p.qos {
                        QoS::AtMostOnce => 0,
                        QoS::AtLeastOnce => 1,
                        QoS::ExactlyOnce => 2,
                    };
                    let received = match routed.and_then(|id| table.meters(id)) {
                        Some(m) => &m.received,
                        None if is_telemetry => &telemetry_in,
                        None => &other_in,
                    };
                    received[qos].increment(1);
                    let queued = Queued {
                        topic,
                        payload: p.payload.to_vec(),
                        ack: Ack::of(&p),
                        response,
                    };
                    // Awaiting here is the back-pressure: a full queue stops
                    // reads from the broker.
                    let queue = match routed {
                        Some(id) => &queues[id.index()],
                        None if is_telemetry => &telemetry_tx,
                        None => {
                            // Nothing here takes it (a reply of another
                            // instance's): nothing to do.
                            ack_now(queued.ack);
                            continue;
                        }
                    };
                    if queue.send(queued).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) if stop_seen.load(Ordering::SeqCst) => {
                    link_seen.set(false);
                    return;
                }
                Err(e) => {
                    link_seen.failed(error_chain(&e));
                    tracing::warn!("broker connection: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });

    let mut tasks = vec![network, publisher];
    for (id, rx) in receivers {
        let Some(handler) = services.get(id).cloned() else {
            continue;
        };
        let prefix = handler.prefix().to_string();
        let handle = {
            let (services, out, clock) =
                (services.clone(), outbound.clone(), options.clock.clone());
            let prefix = prefix.clone();
            move |queued: Queued| {
                let (services, out, clock) = (services.clone(), out.clone(), clock.clone());
                let prefix = prefix.clone();
                async move { handle_one(&services, id, &prefix, &queued, clock.now(), &out).await }
            }
        };
        let throttled = {
            let (out, clock) = (outbound.clone(), options.clock.clone());
            move |queued: &Queued| {
                let Ok(p) = TopicPrefix::new(&prefix) else {
                    return false;
                };
                let request = Request::from_broker(&p, &queued.topic, &queued.payload, clock.now());
                match request.and_then(|r| handler.throttled(&r)) {
                    Some(o) => {
                        out(o.topic, o.payload, None);
                        true
                    }
                    None => false,
                }
            }
        };
        tasks.push(lanes(rx, handle, acker.clone(), throttled));
    }

    // The services' periodic work, by the instance that leads.
    let ticking = services.clone();
    let leadership = options.leadership.clone();
    let clock = options.clock.clone();
    let out = outbound.clone();
    tasks.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            if let Some(lease) = &leadership
                && !lease.is_leader().await
            {
                continue;
            }
            for (handler, id) in ticking.handlers().iter().zip(ticking.ids()) {
                match handler.tick(clock.now()).await {
                    Ok(messages) => {
                        if let Some(m) = ticking.meters(id) {
                            m.sent.increment(messages.len() as u64);
                        }
                        for m in messages {
                            out(m.topic, m.payload, None);
                        }
                    }
                    Err(e) => {
                        let cause = std::error::Error::source(&e).map(ToString::to_string);
                        tracing::warn!(service = ?handler.service(), cause, "{e}");
                    }
                }
            }
        }
    }));

    if let Some(router) = options.telemetry {
        let ack = acker.clone();
        let clock = options.clock.clone();
        tasks.push(tokio::spawn(async move {
            // What queued up while the last batch was stored goes together.
            while let Some(first) = telemetry_rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < TELEMETRY_BATCH {
                    match telemetry_rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let now = clock.now();
                let acks: Vec<Ack> = batch.iter().map(|q| q.ack).collect();
                let records = batch
                    .into_iter()
                    .map(|q| TelemetryRecord {
                        // `{prefix}/{thing}/...`: the broker policy lets a
                        // device publish only under its own name.
                        thing: q.topic.split('/').nth(1).unwrap_or_default().to_string(),
                        topic: q.topic,
                        received_at: now,
                        payload: q.payload,
                    })
                    .collect();
                // Delivered to the sinks, or kept as dead letters: taken
                // in durable hands either way.
                router.route_batch(records).await;
                for a in acks {
                    ack(a);
                }
            }
        }));
    }
    Ok(RunningService {
        client,
        commands,
        stopping,
        link,
        tasks,
    })
}

/// Handles one message of handler `id`'s queue and publishes its answers:
/// to the request's MQTT 5 response topic where it gave one (in its own
/// namespace only), with its correlation data. Whether to acknowledge it:
/// not when the service failed (its store), so that it comes again.
async fn handle_one(
    services: &Services,
    id: HandlerId,
    prefix: &str,
    queued: &Queued,
    now: u64,
    out: &(impl Fn(String, Vec<u8>, Option<PublishProperties>) + Sync),
) -> bool {
    let Ok(p) = TopicPrefix::new(prefix) else {
        return true;
    };
    let Some(request) = Request::from_broker(&p, &queued.topic, &queued.payload, now) else {
        return true;
    };
    let messages = match services.handle(id, &request).await {
        Ok(messages) => messages,
        Err(HandlerError::Failed(e)) => {
            tracing::warn!(topic = queued.topic, "{e}");
            return false;
        }
        Err(e) => {
            tracing::warn!(topic = queued.topic, "refused: {e}");
            return true;
        }
    };
    if let Some(m) = services.meters(id) {
        m.sent.increment(messages.len() as u64);
    }
    let replies = [Role::Accepted, Role::Rejected].map(|role| {
        request
            .topic
            .reply(role)
            .map(|t| (role, t.to_string_under(&p)))
    });
    for m in messages {
        // Provisioning answers go to the requester's response topic (they
        // carry secrets); other services answer on their own topics.
        let response = queued
            .response
            .as_ref()
            .filter(|_| request.topic.service() == fleet_core::topic::Service::Provisioning);
        let Some((response_topic, correlation)) = response else {
            out(m.topic, m.payload, None);
            continue;
        };
        let role = replies
            .iter()
            .flatten()
            .find(|(_, t)| *t == m.topic)
            .map(|(role, _)| *role);
        let Some(role) = role else {
            out(m.topic, m.payload, None);
            continue;
        };
        // Only a client's own namespace: the service must not be made to
        // publish on someone else's topics.
        if let Some(topic) = fleet_core::topic::response_reply(&p, response_topic, role) {
            let properties = PublishProperties {
                correlation_data: correlation.clone(),
                ..PublishProperties::default()
            };
            out(topic, m.payload, Some(properties));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(thing: &str, n: u16) -> Queued {
        Queued {
            topic: format!("$aws/things/{thing}/shadow/get"),
            payload: Vec::new(),
            ack: Ack {
                pkid: n,
                qos: QoS::AtLeastOnce,
            },
            response: None,
        }
    }

    #[test]
    fn things_take_turns_and_each_keeps_its_order() {
        let mut t = Turns::default();
        for n in 0..MAX_WAITING_PER_THING as u16 {
            assert!(matches!(t.push(request("flood", n)), Pushed::Queued));
        }
        // The flooding thing is full; the next of its requests comes back.
        assert!(matches!(
            t.push(request("flood", 99)),
            Pushed::Full(Queued {
                ack: Ack { pkid: 99, .. },
                ..
            })
        ));
        assert!(matches!(t.push(request("good", 1000)), Pushed::Queued));
        // The flood's first request is handled; the good device's comes
        // next, not after the other fifteen.
        let (owner, Queued { ack: a, .. }) = t.next().unwrap();
        assert_eq!((owner.as_str(), a.pkid), ("flood", 0));
        let (owner, Queued { ack: a, .. }) = t.next().unwrap();
        assert_eq!((owner.as_str(), a.pkid), ("good", 1000));
        // One at a time per thing: nothing else until one is done.
        assert!(t.next().is_none());
        t.done("good");
        assert!(t.next().is_none(), "good has nothing waiting");
        t.done("flood");
        let mut order = Vec::new();
        while let Some((owner, Queued { ack: a, .. })) = t.next() {
            order.push(a.pkid);
            t.done(&owner);
        }
        assert_eq!(order, (1..MAX_WAITING_PER_THING as u16).collect::<Vec<_>>());
        assert_eq!(t.total, 0);
        assert!(t.waiting.is_empty() && t.ready.is_empty() && t.busy.is_empty());
    }

    #[test]
    fn other_topics_are_their_own_owner() {
        assert_eq!(owner_of("$aws/things/pump-1/shadow/update"), "pump-1");
        assert_eq!(owner_of("fleet/things/pump-1/jobs/get"), "pump-1");
        assert_eq!(owner_of("dt/pump-1/x"), "dt/pump-1/x");
    }
}
