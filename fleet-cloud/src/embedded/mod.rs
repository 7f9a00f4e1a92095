//! The embedded MQTT broker: one process runs the whole backend.
//!
//! A small MQTT 3.1.1 and 5 broker for one machine, built for what a fleet
//! needs and nothing else:
//!
//! - mutual TLS only (rustls, `ring`, TLS 1.2 at least), with a handshake
//!   timeout: a client certificate signed by the fleet CA is the identity.
//!   With a [`Directory`] (the registry), a device is the thing its
//!   certificate is bound to, whatever the certificate's subject says, as
//!   with AWS IoT; otherwise, and for backend and claim identities, the
//!   common name is the identity, as with Mosquitto's
//!   `use_identity_as_username`;
//! - the fleet's [`BrokerPolicy`] enforced on every publish and subscribe,
//!   the same rules the generated Mosquitto ACL holds
//!   ([`BrokerPolicy::allows`]); [`set_policy`](EmbeddedBroker::set_policy)
//!   applies a new policy at once, to connected clients too;
//! - per-certificate revocation: [`revoke`](EmbeddedBroker::revoke) refuses
//!   a certificate (by its SHA-256 fingerprint) and drops its connection;
//! - QoS 0 and 1 (QoS 2 publishes are accepted and delivered at QoS 1),
//!   retained messages (kept in a [`RetainedStore`](crate::store::RetainedStore)
//!   when one is configured, so that they survive a restart; `fleet serve`
//!   keeps them in its store), wills, `$share/{group}/` shared subscriptions, MQTT 5
//!   response topic, correlation data and user properties passed through;
//!   a client id taken over drops the older connection.
//!
//! - persistent sessions, as AWS IoT keeps them: MQTT 3.1.1
//!   `cleanSession=false` and MQTT 5 Clean Start=false with a Session Expiry
//!   Interval (capped by [`ClientLimits::max_session_expiry`], an hour by
//!   default): the subscriptions are kept while the client is away, and
//!   the QoS 1 messages they match wait for it (at most
//!   [`ClientLimits::max_session_messages`], the oldest dropped first);
//!   `session present` says so when it comes back. Sessions are kept in a
//!   [`SessionStore`](crate::store::SessionStore) when one is configured
//!   (`fleet serve` keeps them in its store), so they survive a restart;
//!   a client connected when the broker stopped finds its session when it
//!   comes back.
//!
//! What it does not do, and when to use an external broker instead: it is
//! one process. For fleets beyond one machine or for bridging, run
//! Mosquitto (or EMQX, HiveMQ, VerneMQ) with the ACL from
//! [`BrokerPolicy::mosquitto_acl`] and connect the service to it.
//!
//! Why not rumqttd: it refuses every subscription to a topic starting with
//! `$` and does not route such topics, so devices built with AWS's SDKs
//! (`$aws/things/...`) could not use it; and it has no access control.

mod admission;
mod codec;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod persist;
mod receipt;
mod router;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::policy::{Access, BrokerPolicy, CompiledPolicy};
pub use admission::{
    ClientLimits, Directory, DirectoryError, PROVISIONED_UNIT, Standing, StandingFuture,
    is_provisioned,
};
use codec::{ConnAckCode, In, Message, PubAckCode, ReadError, SubRefusal, Version, Writer};
use fleet_core::admission::{Refusal, Role, may_take_over};
use router::{Retained, Subscriptions};

/// How the embedded broker listens and whom it lets in.
#[derive(Clone)]
pub struct EmbeddedConfig {
    /// Address to listen on. Loopback (`127.0.0.1:8883`) unless devices on
    /// other machines must reach it.
    pub bind: SocketAddr,
    /// The broker's certificate chain, PEM.
    pub cert_pem: String,
    /// The broker's private key, PEM.
    pub key_pem: String,
    /// The CA that signs client certificates, PEM.
    pub ca_pem: String,
    /// Who may touch which topics.
    pub policy: BrokerPolicy,
    /// Time a client has to complete the TLS handshake and send CONNECT.
    pub handshake_timeout: Duration,
    /// Largest packet a client may send, in bytes (AWS IoT's 128 KiB).
    pub max_packet_size: usize,
    /// Connections at most; more are closed at once.
    pub max_connections: usize,
    /// Messages queued for one client before further ones are dropped (a
    /// client that does not read cannot hold up the others).
    pub queue_capacity: usize,
    /// What one client may hold and send ([`ClientLimits`]: AWS IoT's
    /// quotas by default).
    pub limits: ClientLimits,
    /// Where devices' standing is looked up at CONNECT (the registry):
    /// with one, a device's thing must exist and be enabled, and a
    /// certificate issued by provisioning must be bound to it. `None`:
    /// devices are known by their certificate's common name alone, and
    /// certificates issued by provisioning are refused (nothing can vouch
    /// for them).
    pub directory: Option<Arc<dyn Directory>>,
    /// Where retained messages are kept, so that they survive a restart
    /// (`None`: in memory only). Loaded at start; a device's QoS 1
    /// retained publish is acknowledged once it is stored there.
    pub retained_store: Option<Arc<dyn crate::store::RetainedStore>>,
    /// Where persistent sessions are kept, so that they survive a restart
    /// (`None`: in memory only). Loaded at start; each change is written
    /// in order, and a device's QoS 1 message kept for a client that is
    /// away is acknowledged once stored.
    pub session_store: Option<Arc<dyn crate::store::SessionStore>>,
    /// Told each device's connects and disconnects, and at most once per
    /// [`seen_interval`](Self::seen_interval) that it sent something (the
    /// fleet index's connectivity).
    pub presence: Option<Arc<dyn PresenceSink>>,
    /// How often a connected device's activity is reported to
    /// [`presence`](Self::presence) (10 s by default).
    pub seen_interval: Duration,
}

/// Where the embedded broker reports devices' connections:
/// [`ConnectivityRecorder`](crate::ConnectivityRecorder) keeps them in the
/// fleet index. Called on the connection's task: it must not block.
pub trait PresenceSink: Send + Sync + 'static {
    /// A device connected, disconnected, or was heard from.
    fn record(&self, event: crate::ConnectivityEvent);
}

impl EmbeddedConfig {
    /// A configuration with the defaults: 10 s handshake timeout, 128 KiB
    /// packets, 100,000 connections, 1,024 queued messages per client.
    pub fn new(bind: SocketAddr, cert_pem: &str, key_pem: &str, ca_pem: &str) -> Self {
        Self {
            bind,
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            ca_pem: ca_pem.into(),
            policy: BrokerPolicy::default(),
            handshake_timeout: Duration::from_secs(10),
            max_packet_size: 128 * 1024,
            max_connections: 100_000,
            queue_capacity: 1024,
            limits: ClientLimits::default(),
            directory: None,
            retained_store: None,
            session_store: None,
            presence: None,
            seen_interval: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for EmbeddedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedConfig")
            .field("bind", &self.bind)
            .field("policy", &self.policy)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("limits", &self.limits)
            .field("directory", &self.directory.is_some())
            .finish_non_exhaustive()
    }
}

/// The embedded broker could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// The certificates or key are unusable.
    Tls(String),
    /// The listening socket could not be opened.
    Bind(std::io::Error),
    /// The policy names an identity unsafely.
    Policy(crate::PolicyError),
    /// The retained messages could not be loaded from their store.
    Retained(crate::StoreError),
    /// The persistent sessions could not be loaded from their store.
    Sessions(crate::StoreError),
}

impl fmt::Display for EmbeddedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls(e) => write!(f, "embedded broker TLS configuration: {e}"),
            Self::Bind(e) => write!(f, "embedded broker cannot listen: {e}"),
            Self::Policy(e) => write!(f, "embedded broker policy: {e}"),
            Self::Retained(e) => write!(f, "embedded broker retained messages: {e}"),
            Self::Sessions(e) => write!(f, "embedded broker sessions: {e}"),
        }
    }
}

impl std::error::Error for EmbeddedError {}

/// The SHA-256 fingerprint of a PEM certificate's DER bytes, lower-case hex:
/// the id under which the registry keeps certificates and the embedded
/// broker revokes them. `None` if the text holds no certificate.
pub fn certificate_fingerprint(cert_pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    Some(fingerprint(&der))
}

/// A connection as AWS IoT's lifecycle events describe it.
struct Presence {
    client_id: String,
    /// A UUID shared by the connection's two events.
    session: String,
    /// The certificate's id (its SHA-256, hex).
    principal: String,
    ip: String,
    /// Increases with every connection.
    version: u64,
    /// Whether it is a device's (its connectivity is recorded).
    device: bool,
    /// When its activity was last reported (ms since the Unix epoch).
    reported: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Presence {
    /// Publishes `{prefix}/events/presence/connected/{client id}`, or with
    /// the disconnect `reason` (the metrics' label, AWS's reason in lower
    /// case) `.../disconnected/{client id}`, in AWS IoT's JSON, to whoever
    /// may read it (a backend; no device's policy lets it subscribe
    /// there). Client ids holding `#` or `+` get none, as with AWS.
    fn publish(&self, shared: &Shared, reason: Option<&str>) {
        if self.client_id.contains(['#', '+']) {
            return;
        }
        let prefix = shared.policy().policy().prefix.clone();
        let timestamp = now_ms();
        if let (true, Some(sink)) = (self.device, &shared.presence) {
            self.reported.store(timestamp, Ordering::Relaxed);
            sink.record(match reason {
                None => crate::ConnectivityEvent::Connected {
                    thing: self.client_id.clone(),
                    at: timestamp,
                    session: self.session.clone(),
                },
                Some(r) => crate::ConnectivityEvent::Disconnected {
                    thing: self.client_id.clone(),
                    at: timestamp,
                    session: self.session.clone(),
                    reason: r.to_ascii_uppercase(),
                },
            });
        }
        let mut body = serde_json::json!({
            "clientId": self.client_id,
            "timestamp": timestamp,
            "eventType": if reason.is_some() { "disconnected" } else { "connected" },
            "sessionIdentifier": self.session,
            "principalIdentifier": self.principal,
            "ipAddress": self.ip,
            "versionNumber": self.version,
        });
        if let Some(reason) = reason {
            body["clientInitiatedDisconnect"] = (reason == "client_initiated_disconnect").into();
            body["disconnectReason"] = reason.to_ascii_uppercase().into();
        }
        let kind = if reason.is_some() {
            "disconnected"
        } else {
            "connected"
        };
        let message = Message {
            topic: format!("{prefix}/events/presence/{kind}/{}", self.client_id),
            payload: bytes::Bytes::from(body.to_string()),
            qos: 1,
            retain: false,
            properties: None,
            receipt: None,
        };
        // Nobody waits on these: a full queue drops one for its client.
        if let Ok(blocked) = shared.route(&message, "", Role::Backend, None) {
            for (_, m) in blocked {
                shared.note_dropped(&m.topic);
            }
        }
    }
}

impl Presence {
    /// The device sent something: reported at most once per interval.
    fn seen(&self, shared: &Shared) {
        if let (true, Some(sink)) = (self.device, &shared.presence) {
            let now = now_ms();
            let last = self.reported.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= shared.seen_interval_ms {
                self.reported.store(now, Ordering::Relaxed);
                sink.record(crate::ConnectivityEvent::Seen {
                    thing: self.client_id.clone(),
                    at: now,
                });
            }
        }
    }
}

/// A random UUID (version 4), as AWS's session identifiers are.
fn session_identifier() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        return String::new();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    use std::fmt::Write as _;
    sha2::Sha256::digest(der)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

enum Kick {
    TakenOver,
    NotAuthorized,
    ShuttingDown,
}

struct Client {
    conn: u64,
    identity: String,
    role: Role,
    fingerprint: String,
    tx: mpsc::Sender<Message>,
    /// Bytes queued in `tx`, and the most it may hold.
    queued: QueueBytes,
    max_queued: usize,
    kick: Option<oneshot::Sender<Kick>>,
    /// (group, filter) of each subscription, to undo them.
    filters: Filters,
    /// How long its session outlives the connection (0: it ends with it).
    session_expiry: Duration,
}

/// A client's subscriptions: (shared-subscription group, filter).
type Filters = Vec<(Option<String>, String)>;

/// The session of a client that is away: its subscriptions stay in the
/// routing table, and the QoS 1 messages they match wait here for it.
struct Parked {
    identity: String,
    role: Role,
    filters: Filters,
    queue: VecDeque<Message>,
    queued_bytes: usize,
    expires: tokio::time::Instant,
    session_expiry: Duration,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Backend => "backend",
        Role::Claimant => "claimant",
        Role::Device => "device",
    }
}

fn role_of(name: &str) -> Option<Role> {
    match name {
        "backend" => Some(Role::Backend),
        "claimant" => Some(Role::Claimant),
        "device" => Some(Role::Device),
        _ => None,
    }
}

/// Keeps a copy of `m` for a client that is away, at QoS 1, within
/// [`ClientLimits::max_session_messages`] and
/// [`ClientLimits::max_queued_bytes`]: the oldest go first. How many were
/// dropped for it.
fn park_message(p: &mut Parked, m: &Message, limits: &ClientLimits) -> usize {
    let mut kept = m.clone();
    // Kept for long: its own bytes, not a slice of a read buffer.
    kept.payload = bytes::Bytes::copy_from_slice(&m.payload);
    kept.qos = 1;
    kept.retain = false;
    kept.receipt = None;
    let size = router::retained_size(&kept);
    p.queue.push_back(kept);
    p.queued_bytes += size;
    let mut dropped = 0;
    while p.queue.len() > limits.max_session_messages.max(1)
        || (p.queued_bytes > limits.max_queued_bytes && p.queue.len() > 1)
    {
        if let Some(old) = p.queue.pop_front() {
            p.queued_bytes -= router::retained_size(&old);
            dropped += 1;
        }
    }
    dropped
}

/// A connection admitted by [`Shared::register`]: its number, its queue,
/// what tells it to go, and the bytes waiting in its queue.
struct Registration {
    conn: u64,
    rx: mpsc::Receiver<Message>,
    kick: oneshot::Receiver<Kick>,
    queued: QueueBytes,
    /// A kept session was resumed (its subscriptions and messages).
    session_present: bool,
}

/// Bytes waiting in one client's queue, counted also in the total of every
/// client that is not a backend.
#[derive(Clone)]
struct QueueBytes {
    own: Arc<AtomicUsize>,
    /// `None` for a backend client (its queue is bounded by its own rules).
    total: Option<Arc<AtomicUsize>>,
}

impl QueueBytes {
    fn add(&self, n: usize) {
        self.own.fetch_add(n, Ordering::Relaxed);
        if let Some(t) = &self.total {
            t.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn sub(&self, n: usize) {
        self.own.fetch_sub(n, Ordering::Relaxed);
        if let Some(t) = &self.total {
            t.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Bytes of a partly received packet a connection may hold without a share
/// of [`ClientLimits::max_partial_packet_bytes`].
const SMALL_PACKET: usize = 16 * 1024;

/// How long a connection waits for a share of the partial-packet budget
/// before it is closed as "server busy".
const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// How long a client has to finish sending a packet larger than
/// [`SMALL_PACKET`] once it has begun.
const PACKET_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes of queued messages written to a client at once: a client that
/// stops reading holds this much of the broker's memory (besides its
/// queue) while the write waits.
const WRITE_CHUNK: usize = 16 * 1024;

/// How long a client may leave the broker's writes unread before it is
/// disconnected (its queue is then freed).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a publisher waits for room in a full subscriber queue before
/// the message is dropped for that subscriber.
const BLOCKED_SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Router {
    clients: HashMap<String, Client>,
    subscriptions: Subscriptions,
    retained: Retained,
    /// Retained messages kept per identity.
    retained_by: HashMap<String, usize>,
    /// Live connections per claim identity.
    claim_connections: HashMap<String, usize>,
    /// Persistent sessions of clients that are away, by client id.
    parked: HashMap<String, Parked>,
}

impl Router {
    /// Sends `m` to a client that is not a backend: a full queue (by
    /// messages or bytes) drops it for that client, so a device that stops
    /// reading never holds up whoever publishes to it. Whether it was
    /// queued.
    fn offer(c: &Client, m: Message, max_total: usize) -> bool {
        let size = router::retained_size(&m);
        if c.queued.own.load(Ordering::Relaxed) + size > c.max_queued {
            return false;
        }
        if let Some(total) = &c.queued.total
            && total.load(Ordering::Relaxed) + size > max_total
        {
            return false;
        }
        let sent = c.tx.try_send(m).is_ok();
        if sent {
            c.queued.add(size);
        }
        sent
    }
}

struct Shared {
    /// PUBLISH packets received and sent, by QoS.
    received: [metrics::Counter; 3],
    sent: [metrics::Counter; 3],
    policy: RwLock<Arc<CompiledPolicy>>,
    revoked: RwLock<HashSet<String>>,
    router: Mutex<Router>,
    next_conn: AtomicU64,
    dropped: AtomicU64,
    max_packet: usize,
    queue_capacity: usize,
    handshake_timeout: Duration,
    limits: ClientLimits,
    directory: Option<Arc<dyn Directory>>,
    /// Bytes queued for every client that is not a backend.
    queued_total: Arc<AtomicUsize>,
    /// Partly received packets larger than [`SMALL_PACKET`], in KiB.
    partial_budget: Arc<Semaphore>,
    /// Changes to the retained messages, to the writer that stores them.
    retained_writes: Option<mpsc::UnboundedSender<persist::Write>>,
    /// Changes to the persistent sessions, to the writer that stores them.
    session_writes: Option<mpsc::UnboundedSender<persist::SessionWrite>>,
    /// Where devices' connections are reported.
    presence: Option<Arc<dyn PresenceSink>>,
    /// How often a device's activity is reported there, in ms.
    seen_interval_ms: u64,
}

impl Shared {
    fn router(&self) -> std::sync::MutexGuard<'_, Router> {
        self.router.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn is_revoked(&self, fingerprint: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(fingerprint)
    }

    /// Delivers a message to every subscriber (publisher's rights already
    /// checked), and keeps it if it is retained, within the retained
    /// quotas (refused whole if they are exceeded: nothing is delivered).
    ///
    /// Returns the QoS 1 deliveries to backend clients whose queue is
    /// full: the publisher's session waits for room (its client is slowed,
    /// as TCP would slow it) before it reads more, and drops them only
    /// after [`BLOCKED_SEND_TIMEOUT`]. Any other full queue drops the
    /// message for that client only.
    ///
    /// With a `receipt`, each QoS 1 delivery to a backend client carries a
    /// token of it, to be acknowledged by that client.
    fn route(
        &self,
        message: &Message,
        owner: &str,
        owner_role: Role,
        receipt: Option<&receipt::Receipt>,
    ) -> Result<Vec<(mpsc::Sender<Message>, Message)>, PubAckCode> {
        let mut blocked = Vec::new();
        let compiled = self.policy();
        let policy = compiled.policy();
        let mut router = self.router();
        let router = &mut *router;
        if message.retain {
            self.retain(router, message, owner, owner_role, receipt)?;
        }
        if policy.reply_routing
            && let Some((client, conn, topic)) = routed_reply(&policy.prefix, &message.topic)
            && let Some(c) = router.clients.get(client)
            && c.conn == conn
            && router.subscriptions.subscribed(client, topic)
        {
            let mut m = message.clone();
            m.topic = topic.to_owned();
            m.qos = m.qos.min(1);
            m.retain = false;
            m.properties = None;
            if !Router::offer(c, m, self.limits.max_queued_bytes_total) {
                self.note_dropped(client);
            }
        }
        let clients = &router.clients;
        let recipients = router
            .subscriptions
            .recipients(&message.topic, |c| clients.contains_key(c));
        for (client, qos) in recipients {
            let Some(c) = router.clients.get(client) else {
                // Away with a persistent session: QoS 1 waits for it.
                if let Some(p) = router.parked.get_mut(client)
                    && message.qos.min(qos) > 0
                {
                    let dropped = park_message(p, message, &self.limits);
                    for _ in 0..dropped {
                        self.note_dropped(client);
                    }
                    self.store_session(router, client, receipt.map(receipt::Receipt::delivery));
                }
                continue;
            };
            let mut m = message.clone();
            m.qos = m.qos.min(qos).min(1);
            m.retain = false;
            if c.role == Role::Backend && m.qos > 0 {
                m.receipt = receipt.map(receipt::Receipt::delivery);
            }
            if c.role != Role::Backend {
                if !Router::offer(c, m, self.limits.max_queued_bytes_total) {
                    self.note_dropped(client);
                }
                continue;
            }
            match c.tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) if m.qos > 0 => {
                    blocked.push((c.tx.clone(), m));
                }
                Err(mpsc::error::TrySendError::Full(_)) => self.note_dropped(client),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        Ok(blocked)
    }

    /// Keeps (or, with an empty payload, drops) a retained message, within
    /// the per-identity and broker-wide quotas, and has the change stored
    /// (in order: this runs under the router's lock), its write one more
    /// delivery of `receipt` to be acknowledged.
    fn retain(
        &self,
        router: &mut Router,
        message: &Message,
        owner: &str,
        owner_role: Role,
        receipt: Option<&receipt::Receipt>,
    ) -> Result<(), PubAckCode> {
        self.keep_retained(router, message, owner, owner_role)?;
        if let Some(writes) = &self.retained_writes {
            let write = persist::Write {
                topic: message.topic.clone(),
                message: (!message.payload.is_empty()).then(|| persist::to_record(message, owner)),
                delivery: receipt.map(receipt::Receipt::delivery),
            };
            if writes.send(write).is_err() {
                tracing::warn!("the retained writer stopped; retained message not stored");
            }
        }
        Ok(())
    }

    fn keep_retained(
        &self,
        router: &mut Router,
        message: &Message,
        owner: &str,
        owner_role: Role,
    ) -> Result<(), PubAckCode> {
        let release = |router: &mut Router, who: &str| {
            if let Some(n) = router.retained_by.get_mut(who) {
                *n -= 1;
                if *n == 0 {
                    router.retained_by.remove(who);
                }
            }
        };
        if message.payload.is_empty() {
            if let Some((_, old_owner)) = router.retained.remove(&message.topic) {
                release(router, &old_owner);
            }
            return Ok(());
        }
        let limits = &self.limits;
        let replaces_own = router.retained.owner(&message.topic) == Some(owner);
        let replaced = router
            .retained
            .owner(&message.topic)
            .map(|_| router.retained.len());
        let kept_by_owner = router.retained_by.get(owner).copied().unwrap_or(0);
        let size = router::retained_size(message);
        let over_identity = owner_role != Role::Backend
            && !replaces_own
            && kept_by_owner >= limits.max_retained_per_identity;
        let over_count =
            replaced.is_none() && router.retained.len() >= limits.max_retained_messages;
        let over_bytes = router.retained.bytes() + size > limits.max_retained_bytes
            || size > limits.max_retained_message_bytes;
        if over_identity || over_count || over_bytes {
            tracing::debug!(owner, topic = message.topic, "retained quota exceeded");
            return Err(PubAckCode::QuotaExceeded);
        }
        // Kept for long: a copy of its own, not a slice that would keep
        // the whole read buffer it came in alive.
        let mut kept = message.clone();
        kept.payload = bytes::Bytes::copy_from_slice(&message.payload);
        kept.receipt = None;
        if let Some((_, old_owner)) = router.retained.insert(kept, owner) {
            release(router, &old_owner);
        }
        *router.retained_by.entry(owner.to_owned()).or_default() += 1;
        Ok(())
    }

    fn revoke<I: IntoIterator<Item = String>>(&self, fingerprints: I) {
        let mut revoked = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        revoked.extend(fingerprints);
        let mut router = self.router();
        for c in router.clients.values_mut() {
            if revoked.contains(&c.fingerprint)
                && let Some(k) = c.kick.take()
            {
                let _ = k.send(Kick::NotAuthorized);
            }
        }
    }

    /// Admits a connection under `client_id`, taking the id over from a
    /// connection that may lose it ([`may_take_over`]), within the claim
    /// connection limit.
    /// Admits connection of `client_id` as `identity` in `role`. `clean`:
    /// begin afresh; otherwise a session kept for the client id (by the
    /// same identity) is resumed: its subscriptions, and the QoS 1
    /// messages kept for it, which go into the new connection's queue.
    /// The session outlives this connection by `session_expiry`.
    fn register(
        &self,
        identity: &str,
        role: Role,
        client_id: &str,
        fingerprint: String,
        (clean, session_expiry): (bool, Duration),
    ) -> Result<Registration, ConnAckCode> {
        let mut router = self.router();
        let router = &mut *router;
        if let Some(held) = router.clients.get(client_id)
            && !may_take_over((held.role, &held.identity), (role, identity))
        {
            return Err(ConnAckCode::NotAuthorized);
        }
        let claimed = router.claim_connections.get(identity).copied().unwrap_or(0);
        if role == Role::Claimant && claimed >= self.limits.max_claim_connections {
            return Err(ConnAckCode::QuotaExceeded);
        }
        // The session this connection continues, if any: the connection
        // it takes over, or one kept for it while it was away.
        let same = |i: &str, r: Role| !clean && i == identity && r == role;
        let mut resumed: Option<(Filters, VecDeque<Message>)> = None;
        let mut had_session = false;
        if let Some(mut old) = router.clients.remove(client_id) {
            had_session = !old.session_expiry.is_zero();
            if same(&old.identity, old.role) {
                resumed = Some((std::mem::take(&mut old.filters), VecDeque::new()));
            }
            for (group, filter) in &old.filters {
                router
                    .subscriptions
                    .remove(client_id, group.as_deref(), filter);
            }
            if let Some(k) = old.kick.take() {
                let _ = k.send(Kick::TakenOver);
            }
            if old.role == Role::Claimant {
                release_claim(router, &old.identity);
            }
        } else if let Some(mut p) = router.parked.remove(client_id) {
            had_session = true;
            if same(&p.identity, p.role) && p.expires > tokio::time::Instant::now() {
                resumed = Some((std::mem::take(&mut p.filters), std::mem::take(&mut p.queue)));
            }
            for (group, filter) in &p.filters {
                router
                    .subscriptions
                    .remove(client_id, group.as_deref(), filter);
            }
            metrics::gauge!("fleet_broker_parked_sessions").set(router.parked.len() as f64);
        }
        let session_present = resumed.is_some();
        let (filters, waiting) = resumed.unwrap_or_default();
        if role == Role::Claimant {
            *router
                .claim_connections
                .entry(identity.to_owned())
                .or_default() += 1;
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Message>(self.queue_capacity);
        let (kick_tx, kick) = oneshot::channel::<Kick>();
        let queued = QueueBytes {
            own: Arc::new(AtomicUsize::new(0)),
            total: (role != Role::Backend).then(|| self.queued_total.clone()),
        };
        router.clients.insert(
            client_id.to_owned(),
            Client {
                conn,
                identity: identity.to_owned(),
                role,
                fingerprint,
                tx,
                queued: queued.clone(),
                max_queued: if role == Role::Backend {
                    usize::MAX
                } else {
                    self.limits.max_queued_bytes
                },
                kick: Some(kick_tx),
                filters,
                session_expiry,
            },
        );
        if had_session || !session_expiry.is_zero() {
            self.store_session(router, client_id, None);
        }
        // What waited for it goes out after the CONNACK, in order.
        if let Some(c) = router.clients.get(client_id) {
            for m in waiting {
                if !Router::offer(c, m, self.limits.max_queued_bytes_total) {
                    self.note_dropped(client_id);
                }
            }
        }
        Ok(Registration {
            conn,
            rx,
            kick,
            queued,
            session_present,
        })
    }

    /// Forgets connection `conn` of `client_id` (nothing if a newer
    /// connection took the id). Its session is kept for its expiry when it
    /// has one and `keep_session` (not when the client was refused):
    /// its subscriptions stay, and QoS 1 messages wait for it. Otherwise
    /// its subscriptions go.
    fn unregister(&self, client_id: &str, conn: u64, keep_session: bool) {
        let mut router = self.router();
        let router = &mut *router;
        if router
            .clients
            .get(client_id)
            .is_some_and(|c| c.conn == conn)
            && let Some(c) = router.clients.remove(client_id)
        {
            if c.role == Role::Claimant {
                release_claim(router, &c.identity);
            }
            if keep_session && !c.session_expiry.is_zero() {
                router.parked.insert(
                    client_id.to_owned(),
                    Parked {
                        identity: c.identity,
                        role: c.role,
                        filters: c.filters,
                        queue: VecDeque::new(),
                        queued_bytes: 0,
                        expires: tokio::time::Instant::now() + c.session_expiry,
                        session_expiry: c.session_expiry,
                    },
                );
                metrics::gauge!("fleet_broker_parked_sessions").set(router.parked.len() as f64);
                self.store_session(router, client_id, None);
                return;
            }
            if !c.session_expiry.is_zero() {
                // Refused while connected: the kept record goes too.
                self.store_session(router, client_id, None);
            }
            for (group, filter) in &c.filters {
                router
                    .subscriptions
                    .remove(client_id, group.as_deref(), filter);
            }
        }
    }

    /// Has `client_id`'s session stored as it is now (a connected client's
    /// subscriptions, or a kept session with its messages), or forgotten
    /// when it has none; `delivery` is acknowledged once that is durable.
    fn store_session(&self, router: &Router, client_id: &str, delivery: Option<receipt::Delivery>) {
        let Some(writes) = &self.session_writes else {
            return;
        };
        let filters = |filters: &Filters| {
            filters
                .iter()
                .filter_map(|(g, f)| {
                    let qos = router.subscriptions.qos_of(client_id, g.as_deref(), f)?;
                    Some((g.clone(), f.clone(), qos))
                })
                .collect()
        };
        let record = if let Some(c) = router.clients.get(client_id) {
            (!c.session_expiry.is_zero()).then(|| persist::SessionRecord {
                identity: c.identity.clone(),
                role: role_name(c.role).into(),
                expiry_secs: c.session_expiry.as_secs(),
                expires_at: None,
                filters: filters(&c.filters),
                queue: Vec::new(),
            })
        } else {
            router.parked.get(client_id).map(|p| {
                let left = p
                    .expires
                    .saturating_duration_since(tokio::time::Instant::now());
                persist::SessionRecord {
                    identity: p.identity.clone(),
                    role: role_name(p.role).into(),
                    expiry_secs: p.session_expiry.as_secs(),
                    expires_at: Some(persist::epoch_now() + left.as_secs()),
                    filters: filters(&p.filters),
                    queue: p.queue.iter().map(persist::QueuedRecord::of).collect(),
                }
            })
        };
        let write = persist::SessionWrite {
            client_id: client_id.to_owned(),
            record: record.and_then(|r| serde_json::to_vec(&r).ok()),
            delivery,
        };
        if writes.send(write).is_err() {
            tracing::warn!("the session writer stopped; session not stored");
        }
    }

    /// Ends the kept sessions that expired (or, with `identity`, every
    /// kept session of it): their subscriptions and messages go.
    fn end_sessions(&self, identity: Option<&str>) -> usize {
        let now = tokio::time::Instant::now();
        let mut router = self.router();
        let router = &mut *router;
        let ended: Vec<String> = router
            .parked
            .iter()
            .filter(|(_, p)| match identity {
                Some(i) => p.identity == i,
                None => p.expires <= now,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ended {
            if let Some(p) = router.parked.remove(id) {
                for (group, filter) in &p.filters {
                    router.subscriptions.remove(id, group.as_deref(), filter);
                }
            }
            self.store_session(router, id, None);
        }
        metrics::gauge!("fleet_broker_parked_sessions").set(router.parked.len() as f64);
        ended.len()
    }

    /// Closes every connection of `identity` (told "not authorized");
    /// how many there were.
    fn disconnect_identity(&self, identity: &str) -> usize {
        // A thing cut off keeps no session either.
        self.end_sessions(Some(identity));
        let mut router = self.router();
        let mut n = 0;
        for c in router.clients.values_mut() {
            if c.identity == identity
                && let Some(k) = c.kick.take()
            {
                let _ = k.send(Kick::NotAuthorized);
                n += 1;
            }
        }
        n
    }

    fn note_dropped(&self, client: &str) {
        metrics::counter!("fleet_broker_messages_dropped_total").increment(1);
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            client,
            dropped_total = n,
            "client queue full; message dropped"
        );
    }
}

/// Revokes certificates at a running [`EmbeddedBroker`].
#[derive(Clone)]
pub struct Revoker(Arc<Shared>);

impl fmt::Debug for Revoker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Revoker")
    }
}

impl Revoker {
    /// [`EmbeddedBroker::revoke`].
    pub fn revoke<I: IntoIterator<Item = String>>(&self, fingerprints: I) {
        self.0.revoke(fingerprints);
    }

    /// [`EmbeddedBroker::disconnect_identity`].
    pub fn disconnect_identity(&self, identity: &str) -> usize {
        self.0.disconnect_identity(identity)
    }
}

/// A running embedded broker.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use fleet_cloud::pki::Pki;
/// use fleet_cloud::{EmbeddedBroker, EmbeddedConfig};
/// let pki = Pki::new("dev CA")?;
/// let server = pki.server_identity()?;
/// let config = EmbeddedConfig::new("127.0.0.1:8883".parse()?, &server.cert_pem, &server.key_pem, &pki.ca_pem());
/// let broker = EmbeddedBroker::start(config).await?;
/// println!("listening on {}", broker.local_addr());
/// broker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct EmbeddedBroker {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Binds and starts accepting connections.
    pub async fn start(config: EmbeddedConfig) -> Result<Self, EmbeddedError> {
        config.policy.validate().map_err(EmbeddedError::Policy)?;
        let tls = server_tls(&config)?;
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(EmbeddedError::Bind)?;
        let local_addr = listener.local_addr().map_err(EmbeddedError::Bind)?;
        let mut router = Router::default();
        let retained_writes = match &config.retained_store {
            Some(store) => {
                let kept = store
                    .load_retained()
                    .await
                    .map_err(EmbeddedError::Retained)?;
                for record in kept {
                    let topic = record.topic.clone();
                    let Some((message, owner)) = persist::from_record(record) else {
                        tracing::warn!(topic, "stored retained message unreadable; skipped");
                        continue;
                    };
                    if let Some((_, old)) = router.retained.insert(message, &owner) {
                        tracing::warn!(topic, owner = &*old, "retained message stored twice");
                    }
                    *router.retained_by.entry(owner).or_default() += 1;
                }
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(persist::writer(store.clone(), rx));
                Some(tx)
            }
            None => None,
        };
        let session_writes = match &config.session_store {
            Some(store) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let kept = store
                    .load_sessions()
                    .await
                    .map_err(EmbeddedError::Sessions)?;
                let now = persist::epoch_now();
                for (client_id, bytes) in kept {
                    let record = serde_json::from_slice::<persist::SessionRecord>(&bytes).ok();
                    let Some((record, role)) =
                        record.and_then(|r| role_of(&r.role).map(|role| (r, role)))
                    else {
                        tracing::warn!(client_id, "stored session unreadable; dropped");
                        let _ = tx.send(persist::SessionWrite {
                            client_id,
                            record: None,
                            delivery: None,
                        });
                        continue;
                    };
                    let session_expiry = Duration::from_secs(record.expiry_secs);
                    // A client connected when the broker stopped is away
                    // from now on.
                    let left = match record.expires_at {
                        Some(at) => Duration::from_secs(at.saturating_sub(now)),
                        None => session_expiry,
                    };
                    if left.is_zero() {
                        let _ = tx.send(persist::SessionWrite {
                            client_id,
                            record: None,
                            delivery: None,
                        });
                        continue;
                    }
                    let mut filters = Vec::with_capacity(record.filters.len());
                    for (group, filter, qos) in record.filters {
                        router.subscriptions.insert(
                            &client_id,
                            group.as_deref(),
                            &filter,
                            qos.min(1),
                        );
                        filters.push((group, filter));
                    }
                    let queue: VecDeque<Message> = record
                        .queue
                        .iter()
                        .filter_map(persist::QueuedRecord::message)
                        .collect();
                    let queued_bytes = queue.iter().map(router::retained_size).sum();
                    router.parked.insert(
                        client_id,
                        Parked {
                            identity: record.identity,
                            role,
                            filters,
                            queue,
                            queued_bytes,
                            expires: tokio::time::Instant::now() + left,
                            session_expiry,
                        },
                    );
                }
                metrics::gauge!("fleet_broker_parked_sessions").set(router.parked.len() as f64);

                tokio::spawn(persist::session_writer(store.clone(), rx));
                Some(tx)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            received: crate::metrics::per_qos("fleet_broker_messages_received_total", &[]),
            sent: crate::metrics::per_qos("fleet_broker_messages_sent_total", &[]),
            policy: RwLock::new(Arc::new(config.policy.compile())),
            revoked: RwLock::new(HashSet::new()),
            router: Mutex::new(router),
            next_conn: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            max_packet: config.max_packet_size,
            queue_capacity: config.queue_capacity.max(1),
            handshake_timeout: config.handshake_timeout,
            limits: config.limits.clone(),
            directory: config.directory.clone(),
            queued_total: Arc::new(AtomicUsize::new(0)),
            partial_budget: Arc::new(Semaphore::new(
                config
                    .limits
                    .max_partial_packet_bytes
                    .div_ceil(1024)
                    .clamp(1, Semaphore::MAX_PERMITS),
            )),
            retained_writes,
            session_writes,
            presence: config.presence.clone(),
            seen_interval_ms: u64::try_from(config.seen_interval.as_millis()).unwrap_or(u64::MAX),
        });
        let (stop, stopped) = watch::channel(false);
        // Kept sessions that expire are ended (their subscriptions and
        // messages freed) within a few seconds.
        {
            let (shared, mut stopped) = (Arc::downgrade(&shared), stopped.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.changed() => return,
                    }
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    shared.end_sessions(None);
                }
            });
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let accept = tokio::spawn(accept_loop(
            listener,
            acceptor,
            shared.clone(),
            limit,
            stopped,
        ));
        tracing::info!(%local_addr, "embedded broker listening (mutual TLS)");
        Ok(Self {
            shared,
            local_addr,
            stop,
            accept,
        })
    }

    /// The address it listens on (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The policy in force.
    pub fn policy(&self) -> BrokerPolicy {
        self.shared.policy().policy().clone()
    }

    /// Applies a new policy: new requests are checked against it at once,
    /// and a connected client that is now denied, or holds a subscription
    /// the policy no longer allows, is disconnected.
    pub fn set_policy(&self, policy: BrokerPolicy) {
        let compiled = Arc::new(policy.compile());
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(PoisonError::into_inner) = compiled.clone();
        let mut router = self.shared.router();
        for (id, c) in router.clients.iter_mut() {
            let denied = policy.denied_identities.contains(&c.identity);
            let lost = c.filters.iter().any(|(group, filter)| {
                !subscription_allowed(&compiled, &c.identity, id, group.as_deref(), filter)
            });
            if (denied || lost)
                && let Some(k) = c.kick.take()
            {
                let _ = k.send(Kick::NotAuthorized);
            }
        }
    }

    /// Revokes certificates by SHA-256 fingerprint
    /// ([`certificate_fingerprint`]): they can no longer connect, and
    /// connections made with them are closed.
    pub fn revoke<I: IntoIterator<Item = String>>(&self, fingerprints: I) {
        self.shared.revoke(fingerprints);
    }

    /// Closes every connection of `identity` at once (a thing disabled or
    /// deleted: with a [`Directory`], its next CONNECT is refused); returns
    /// how many there were.
    pub fn disconnect_identity(&self, identity: &str) -> usize {
        self.shared.disconnect_identity(identity)
    }

    /// A handle that revokes certificates while the broker runs (for the
    /// management API, say).
    pub fn revoker(&self) -> Revoker {
        Revoker(self.shared.clone())
    }

    /// Clients connected now.
    pub fn connected(&self) -> usize {
        self.shared.router().clients.len()
    }

    /// Messages dropped so far because a client's queue was full.
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Stops accepting, disconnects every client (MQTT 5 clients are told
    /// the server is shutting down) and returns when the listener is closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        let mut router = self.shared.router();
        for c in router.clients.values_mut() {
            if let Some(k) = c.kick.take() {
                let _ = k.send(Kick::ShuttingDown);
            }
        }
    }
}

fn server_tls(config: &EmbeddedConfig) -> Result<rustls::ServerConfig, EmbeddedError> {
    crate::tls::server_config(&config.cert_pem, &config.key_pem, Some(&config.ca_pem))
        .map_err(|e| EmbeddedError::Tls(e.to_string()))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stopped.changed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait, do not spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refused");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(tcp, acceptor, shared, stopped).await {
                tracing::debug!(%peer, "connection closed: {e}");
            }
        });
    }
}

/// The marker of a reply the broker routes to one client under AWS's topic.
const ROUTED: &str = "aws-reply";

/// A provisioning request without a response topic (an MQTT 3.1.1 client,
/// as AWS's SDKs) gets one naming its sender's connection, so that the
/// service's reply is delivered to that connection alone, on the topic it
/// expects (a later connection with the same client id does not get it).
fn reply_to_sender(prefix: &str, client_id: &str, conn: u64, message: &mut Message) {
    let Some(rest) = message
        .topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return;
    };
    let is_request = rest.starts_with("certificates/create-from-csr/")
        || rest.starts_with("certificates/create/")
        || (rest.starts_with("provisioning-templates/") && rest.contains("/provision/"));
    if !is_request || rest.matches('/').count() > 3 {
        return;
    }
    let has_response_topic = message
        .properties
        .as_ref()
        .is_some_and(|p| p.response_topic.is_some());
    if has_response_topic {
        return;
    }
    let properties = message.properties.get_or_insert_with(Default::default);
    properties.response_topic = Some(format!(
        "{prefix}/clients/{client_id}/{ROUTED}/{conn}/{}",
        message.topic
    ));
}

/// `{prefix}/clients/{client}/aws-reply/{conn}/{topic}`: the client, its
/// connection and the topic to deliver on.
fn routed_reply<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, u64, &'t str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/clients/")?;
    let (client, rest) = rest.split_once('/')?;
    let (conn, original) = rest
        .strip_prefix(ROUTED)?
        .strip_prefix('/')?
        .split_once('/')?;
    let conn = conn.parse().ok()?;
    original
        .starts_with(prefix)
        .then_some((client, conn, original))
}

/// Why a publish is refused, if it is: the broker policy, the topic
/// limits, the retain flag on a reserved topic, or an MQTT 5 response
/// topic outside the publisher's own `{prefix}/clients/{client id}/`
/// namespace that is not a reply topic of its own thing (the service would
/// otherwise answer onto someone else's topics).
fn publish_refusal(
    shared: &Shared,
    identity: &str,
    role: Role,
    client_id: &str,
    message: &Message,
) -> Option<PubAckCode> {
    let compiled = shared.policy();
    let policy = compiled.policy();
    let topic = &message.topic;
    if !router::valid_topic(topic) {
        return Some(PubAckCode::TopicNameInvalid);
    }
    if role != Role::Backend && !shared.limits.topic_fits(topic) {
        return Some(PubAckCode::TopicNameInvalid);
    }
    if topic.starts_with("$share/") || !compiled.allows(identity, client_id, Access::Write, topic) {
        return Some(PubAckCode::NotAuthorized);
    }
    // AWS IoT keeps no retained message on a reserved topic: a retained
    // request would be replayed to the services at every reconnection.
    if message.retain
        && topic
            .strip_prefix(policy.prefix.as_str())
            .is_some_and(|r| r.starts_with('/'))
    {
        return Some(PubAckCode::NotAuthorized);
    }
    if role != Role::Backend
        && let Some(response) = message
            .properties
            .as_ref()
            .and_then(|p| p.response_topic.as_deref())
    {
        // Its own `clients/{client id}/` namespace, or a reply topic of its
        // own thing (a request/response client such as `mosquitto_rr` names
        // the shadow's `/accepted` topic), which it may read.
        let own = fleet_core::admission::is_own_response_topic(&policy.prefix, client_id, response)
            || (role == Role::Device
                && fleet_core::admission::is_own_reply_topic(&policy.prefix, identity, response)
                && compiled.allows(identity, client_id, Access::Read, response));
        let fits = own
            && !response.split('/').any(|l| l == ROUTED)
            && router::valid_topic(response)
            && shared.limits.topic_fits(response);
        if !fits {
            return Some(PubAckCode::NotAuthorized);
        }
    }
    None
}

fn release_claim(router: &mut Router, identity: &str) {
    if let Some(n) = router.claim_connections.get_mut(identity) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            router.claim_connections.remove(identity);
        }
    }
}

/// A device's identity and the registry's standing of it: the thing its
/// certificate is bound to, or (a certificate the registry does not know)
/// its common name.
async fn device_identity(
    directory: &dyn Directory,
    common_name: Option<String>,
    fingerprint: &str,
) -> (Option<String>, Option<Result<Standing, DirectoryError>>) {
    let first = directory
        .standing(common_name.as_deref().unwrap_or_default(), fingerprint)
        .await;
    let bound = match &first {
        Ok(s) => s.certificate.as_ref().map(|(thing, _)| thing.clone()),
        Err(_) => None,
    };
    match bound {
        Some(thing) if Some(&thing) != common_name.as_ref() => {
            let standing = directory.standing(&thing, fingerprint).await;
            (Some(thing), Some(standing))
        }
        _ => (common_name, Some(first)),
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

fn subscription_allowed(
    policy: &CompiledPolicy,
    identity: &str,
    client_id: &str,
    group: Option<&str>,
    filter: &str,
) -> bool {
    match group {
        None => policy.allows(identity, client_id, Access::Read, filter),
        Some(g) => {
            policy.allows(identity, client_id, Access::Read, filter)
                || policy.allows(
                    identity,
                    client_id,
                    Access::Read,
                    &format!("$share/{g}/{filter}"),
                )
        }
    }
}

async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<In, String> {
    loop {
        match codec::read(version, buf, max) {
            Ok(p) => return Ok(p),
            Err(ReadError::Incomplete) => {}
            Err(ReadError::Malformed(e)) => return Err(e),
        }
        if rd.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
    }
}

async fn connection(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), String> {
    let deadline = shared.handshake_timeout;
    let peer_ip = tcp
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            crate::tls::count_handshake_failure("mqtt", &e);
            return Err(format!("TLS handshake: {e}"));
        }
        Err(_) => {
            metrics::counter!(
                "fleet_tls_handshake_failures_total",
                "listener" => "mqtt",
                "reason" => "timeout"
            )
            .increment(1);
            return Err("TLS handshake timed out".to_string());
        }
    };
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or("no client certificate")?;
    let common_name = common_name(&der);
    let fingerprint = fingerprint(&der);
    let principal = fingerprint.clone();
    let (mut rd, mut wr) = tokio::io::split(tls);

    // CONNECT, within the same deadline.
    let mut buf = BytesMut::with_capacity(4096);
    let (version, connect) = tokio::time::timeout(deadline, async {
        let version = loop {
            match codec::peek_version(&buf) {
                Ok(v) => break v,
                Err(ReadError::Incomplete) => {
                    if rd.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                        return Err("closed before CONNECT".to_string());
                    }
                }
                Err(ReadError::Malformed(e)) => return Err(e),
            }
        };
        let packet = read_packet(&mut rd, &mut buf, version, shared.max_packet).await?;
        Ok((version, packet))
    })
    .await
    .map_err(|_| "no CONNECT in time".to_string())??;
    let In::Connect {
        client_id,
        keep_alive,
        will,
        max_packet: client_max_packet,
        clean,
        session_expiry: asked_expiry,
    } = connect
    else {
        return Err("the first packet is not CONNECT".into());
    };
    let mut out = Writer {
        version,
        buf: BytesMut::with_capacity(4096),
        max_packet: usize::MAX,
    };
    let max_packet = u32::try_from(shared.max_packet).unwrap_or(u32::MAX);
    let provisioned = is_provisioned(&der);
    let role = {
        let compiled = shared.policy();
        let policy = compiled.policy();
        fleet_core::admission::role(
            common_name.as_deref().unwrap_or_default(),
            provisioned,
            &policy.backend_identities,
            &policy.claim_identities,
        )
    };
    // Who a device is: as with AWS IoT, the thing the registry binds its
    // certificate to, whatever the certificate's subject says; the common
    // name only for a certificate the registry does not know.
    let (identity, standing) = match (&shared.directory, role) {
        (Some(directory), Role::Device) => {
            device_identity(directory.as_ref(), common_name, &fingerprint).await
        }
        _ => (common_name, None),
    };
    let identity = identity.ok_or("client certificate has no common name and no thing")?;
    let (client_id, assigned) = if client_id.is_empty() {
        // A device is its thing name; others get a fresh id.
        let id = if role == Role::Device {
            identity.clone()
        } else {
            let mut r = [0u8; 8];
            getrandom::fill(&mut r).map_err(|e| e.to_string())?;
            format!(
                "auto-{}",
                r.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        };
        let assigned = (version == Version::V5).then(|| id.clone());
        (id, assigned)
    } else {
        (client_id, None)
    };
    let mut refuse =
        if let Err(refusal) = fleet_core::admission::check_client_id(role, &identity, &client_id) {
            Some(match refusal {
                Refusal::BadClientId => ConnAckCode::BadClientId,
                Refusal::NotAuthorized | Refusal::QuotaExceeded => ConnAckCode::NotAuthorized,
            })
        } else if shared.is_revoked(&fingerprint)
            || shared
                .policy()
                .policy()
                .denied_identities
                .contains(&identity)
        {
            Some(ConnAckCode::NotAuthorized)
        } else if *stopped.borrow() {
            Some(ConnAckCode::ServerUnavailable)
        } else {
            None
        };
    if refuse.is_none() && role == Role::Device {
        refuse = match standing {
            None if provisioned => Some(ConnAckCode::NotAuthorized),
            None => None,
            Some(Err(e)) => {
                tracing::warn!(%identity, "{e}");
                Some(ConnAckCode::ServerUnavailable)
            }
            Some(Ok(standing)) => {
                (!standing.admits(&identity, provisioned)).then_some(ConnAckCode::NotAuthorized)
            }
        };
    }
    // How long the session outlives the connection: MQTT 3.1.1 without
    // Clean Session keeps it as long as the broker allows; MQTT 5 says
    // (0 when absent), capped by the broker.
    // A claimant keeps none: its client ids are its own choice, and kept
    // sessions would let it pile them up.
    let max_expiry = if role == Role::Claimant {
        0
    } else {
        u32::try_from(shared.limits.max_session_expiry.as_secs()).unwrap_or(u32::MAX)
    };
    let (expiry, granted_expiry) = match (version, asked_expiry) {
        (Version::V4, _) => (if clean { 0 } else { max_expiry }, None),
        (Version::V5, asked) => {
            let asked = asked.unwrap_or(0);
            let granted = asked.min(max_expiry);
            (granted, (granted != asked).then_some(granted))
        }
    };
    let registered = match refuse {
        Some(code) => Err(code),
        None => shared.register(
            &identity,
            role,
            &client_id,
            fingerprint,
            (clean, Duration::from_secs(u64::from(expiry))),
        ),
    };
    // Keep-alive: 0 (never) or more than the limit gets the limit.
    let max_keep_alive = u16::try_from(shared.limits.max_keep_alive.as_secs()).unwrap_or(u16::MAX);
    let granted_keep_alive = if keep_alive == 0 || keep_alive > max_keep_alive {
        max_keep_alive
    } else {
        keep_alive
    };
    let server_keep_alive = (granted_keep_alive != keep_alive).then_some(granted_keep_alive);
    let Registration {
        conn,
        mut rx,
        mut kick,
        queued,
        session_present,
    } = match registered {
        Ok(r) => r,
        Err(code) => {
            metrics::counter!("fleet_broker_connects_total", "outcome" => code.label())
                .increment(1);
            out.connack(code, None, max_packet, None, (false, None));
            let _ = wr.write_all(&out.buf).await;
            let _ = wr.shutdown().await;
            return Err(format!("{identity} ({client_id}) refused: {code:?}"));
        }
    };
    tracing::debug!(%identity, %client_id, ?version, "connected");
    // AWS IoT's lifecycle event, one session identifier for its pair.
    let presence = Presence {
        client_id: client_id.clone(),
        session: session_identifier(),
        principal,
        ip: peer_ip,
        version: conn,
        device: role == Role::Device,
        reported: AtomicU64::new(0),
    };
    presence.publish(&shared, None);
    metrics::counter!("fleet_broker_connects_total", "outcome" => "accepted").increment(1);
    let connected = metrics::gauge!("fleet_broker_connected_clients", "role" => role_name(role));
    connected.increment(1.0);
    // Why the connection ends, for `fleet_broker_disconnects_total`.
    let ended = std::sync::OnceLock::<&'static str>::new();
    out.connack(
        ConnAckCode::Accepted,
        assigned,
        max_packet,
        server_keep_alive,
        (session_present, granted_expiry),
    );
    // What the client accepts: MQTT 5 clients may say; a message larger
    // than that is not sent to it (MQTT 5 3.1.2.11.4).
    out.max_packet = client_max_packet.map_or(usize::MAX, |m| m as usize);

    let mut session = Session {
        shared: &shared,
        identity: &identity,
        role,
        client_id: &client_id,
        conn,
        out,
        next_pkid: 0,
        blocked: Vec::new(),
        queued,
        owed: VecDeque::new(),
        awaiting: HashMap::new(),
    };
    // The client is gone after one and a half keep-alive periods of silence.
    let keep_alive = Duration::from_millis(u64::from(granted_keep_alive) * 1500);
    let mut clean_exit = false;
    // Refused while connected (revoked, disabled): no session is kept.
    let mut keep_session = true;
    // A share of the partial-packet budget while a large packet comes in,
    // and when it must be complete.
    let mut large: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)> = None;
    let result: Result<(), String> = async {
        loop {
            if !session.out.buf.is_empty() {
                write_out(&mut wr, &session.out.buf).await?;
                session.out.buf.clear();
            }
            // Flow control: this client's messages wait for room in a full
            // queue before anything more is read from it. Its own queue is
            // served meanwhile, so two clients waiting on each other do
            // not stall.
            for (tx, m) in std::mem::take(&mut session.blocked) {
                let deadline = tokio::time::Instant::now() + BLOCKED_SEND_TIMEOUT;
                loop {
                    tokio::select! {
                        permit = tx.reserve() => {
                            if let Ok(p) = permit {
                                p.send(m);
                            }
                            break;
                        }
                        own = rx.recv() => {
                            let Some(own) = own else { return Err("queue closed".into()) };
                            session.deliver_queued(own);
                            write_out(&mut wr, &session.out.buf).await?;
                            session.out.buf.clear();
                        }
                        () = tokio::time::sleep_until(deadline) => {
                            shared.note_dropped(&m.topic);
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                k = &mut kick => {
                    let reason = match k {
                        Ok(Kick::TakenOver) => DisconnectReasonCode::SessionTakenOver,
                        Ok(Kick::ShuttingDown) | Err(_) => DisconnectReasonCode::ServerShuttingDown,
                        Ok(Kick::NotAuthorized) => DisconnectReasonCode::NotAuthorized,
                    };
                    session.out.disconnect(reason);
                    let _ = write_out(&mut wr, &session.out.buf).await;
                    // Taken over: the newer connection is the client now, no will.
                    clean_exit = matches!(reason, DisconnectReasonCode::SessionTakenOver);
                    keep_session = !matches!(reason, DisconnectReasonCode::NotAuthorized);
                    let _ = ended.set(match reason {
                        DisconnectReasonCode::SessionTakenOver => "duplicate_clientid",
                        DisconnectReasonCode::NotAuthorized => "auth_error",
                        _ => "server_initiated_disconnect",
                    });
                    return Err(format!("disconnected by the broker: {reason:?}"));
                }
                () = session.next_settled() => {
                    if let Err(e) = session.settle_acks() {
                        // No PUBACK: the device sends it again when it
                        // reconnects.
                        session.out.disconnect(DisconnectReasonCode::UnspecifiedError);
                        let _ = write_out(&mut wr, &session.out.buf).await;
                        let _ = ended.set("server_error");
                        return Err(e);
                    }
                }
                _ = stopped.changed() => {
                    session.out.disconnect(DisconnectReasonCode::ServerShuttingDown);
                    let _ = write_out(&mut wr, &session.out.buf).await;
                    let _ = ended.set("server_initiated_disconnect");
                    return Err("broker shutting down".into());
                }
                m = rx.recv() => {
                    let Some(m) = m else { return Err("queue closed".into()) };
                    session.deliver_queued(m);
                    // Drain what is queued without waiting, one write.
                    while let Ok(m) = rx.try_recv() {
                        session.deliver_queued(m);
                        if session.out.buf.len() > WRITE_CHUNK {
                            break;
                        }
                    }
                }
                r = async {
                    // A large packet begun must be finished in time.
                    let limit = match &large {
                        Some((_, deadline)) => keep_alive
                            .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                        None => keep_alive,
                    };
                    tokio::time::timeout(limit, rd.read_buf(&mut buf)).await
                        .map_err(|_| if large.is_some() {
                            let _ = ended.set("client_error");
                            "a large packet was not finished in time".to_string()
                        } else {
                            let _ = ended.set("mqtt_keep_alive_timeout");
                            "keep-alive timeout".to_string()
                        })
                } => {
                    let n = r?.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection closed without DISCONNECT".into());
                    }
                    presence.seen(&shared);
                    loop {
                        match codec::read(version, &mut buf, shared.max_packet) {
                            Ok(In::Disconnect) => {
                                clean_exit = true;
                                let _ = ended.set("client_initiated_disconnect");
                                return Ok(());
                            }
                            Ok(p) => {
                                // The large packet (if any) is in: its share
                                // goes back.
                                large = None;
                                if let Err(e) = session.handle(p) {
                                    let _ = ended.set("client_error");
                                    return Err(e);
                                }
                            }
                            Err(ReadError::Incomplete) => {
                                if buf.len() >= SMALL_PACKET && large.is_none() {
                                    let need = codec::declared_len(&buf)
                                        .unwrap_or(shared.max_packet)
                                        .min(shared.max_packet);
                                    let kib = u32::try_from(need.div_ceil(1024)).unwrap_or(u32::MAX);
                                    let share = tokio::time::timeout(
                                        BUDGET_WAIT,
                                        shared.partial_budget.clone().acquire_many_owned(kib),
                                    )
                                    .await;
                                    let Ok(Ok(share)) = share else {
                                        session.out.disconnect(DisconnectReasonCode::ServerBusy);
                                        let _ = write_out(&mut wr, &session.out.buf).await;
                                        let _ = ended.set("throttled");
                                        return Err("no room for another large packet".into());
                                    };
                                    large = Some((share, tokio::time::Instant::now() + PACKET_TIMEOUT));
                                }
                                // Nothing left over: a buffer grown for a
                                // large packet is given back.
                                if buf.is_empty() && buf.capacity() > SMALL_PACKET {
                                    buf = BytesMut::new();
                                }
                                break;
                            }
                            Err(ReadError::Malformed(e)) => {
                                session.out.disconnect(DisconnectReasonCode::MalformedPacket);
                                let _ = write_out(&mut wr, &session.out.buf).await;
                                let _ = ended.set("client_error");
                                return Err(format!("malformed packet: {e}"));
                            }
                        }
                    }
                }
            }
        }
    }
    .await;
    drop(large);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
    })
    .await;

    // Unregister (unless a newer connection took the id), then the will.
    shared.unregister(&client_id, conn, keep_session);
    connected.decrement(1.0);
    metrics::counter!("fleet_broker_disconnects_total", "reason" => ended.get().copied().unwrap_or("connection_lost")).increment(1);
    if !clean_exit
        && let Some(will) = will
        && publish_refusal(&shared, &identity, role, &client_id, &will).is_none()
    {
        // Nobody reads this connection any more: a full queue drops it.
        for (_, m) in shared
            .route(&will, &identity, role, None)
            .unwrap_or_default()
        {
            shared.note_dropped(&m.topic);
        }
    }
    tracing::debug!(%identity, %client_id, "disconnected");
    presence.publish(
        &shared,
        Some(ended.get().copied().unwrap_or("connection_lost")),
    );
    result
}

/// One connected client's protocol state.
struct Session<'a> {
    shared: &'a Shared,
    identity: &'a str,
    role: Role,
    client_id: &'a str,
    conn: u64,
    out: Writer,
    next_pkid: u16,
    /// Deliveries waiting for room in a full client queue.
    blocked: Vec<(mpsc::Sender<Message>, Message)>,
    /// Bytes waiting in this client's queue.
    queued: QueueBytes,
    /// PUBACKs owed to this client, in the order its PUBLISHes came: each
    /// waits for its receipt (if any) and goes out once those before it
    /// have.
    owed: VecDeque<OwedAck>,
    /// A backend client's deliveries it has yet to acknowledge, by packet
    /// id.
    awaiting: HashMap<u16, receipt::Delivery>,
}

/// Writes `bytes` to a client, or fails if it leaves them unread for
/// [`WRITE_TIMEOUT`].
async fn write_out<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(bytes)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the client left the broker's writes unread".into()),
    }
}

/// A PUBACK owed to a publisher.
struct OwedAck {
    pkid: u16,
    code: PubAckCode,
    /// Resolves when the services have the message (`false`: they lost it).
    stored: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// The services lost it (seen while waiting).
    lost: bool,
    deadline: tokio::time::Instant,
}

/// How long a publisher's PUBACK may wait for the services before its
/// connection is closed (and the device sends again).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

impl Session<'_> {
    /// Delivers a message taken from this client's queue; a backend
    /// client's QoS 1 delivery is remembered until it acknowledges it.
    fn deliver_queued(&mut self, mut m: Message) {
        if self.role != Role::Backend {
            self.queued.sub(router::retained_size(&m));
        }
        let receipt = m.receipt.take();
        let pkid = self.deliver(&m);
        if let Some(r) = receipt
            && let Some(pkid) = pkid
            && m.qos > 0
        {
            // An id still awaited from 65,535 deliveries ago is given up.
            self.awaiting.insert(pkid, r);
        }
    }

    /// Sends the PUBACKs whose turn has come; an error if the services
    /// lost a message (the connection is then closed without its PUBACK).
    fn settle_acks(&mut self) -> Result<(), String> {
        while let Some(front) = self.owed.front_mut() {
            if front.lost {
                return Err("the services did not take a message; not acknowledged".into());
            }
            if let Some(stored) = &mut front.stored {
                match stored.try_recv() {
                    Ok(true) => {}
                    Ok(false) | Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        return Err("the services did not take a message; not acknowledged".into());
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                        if tokio::time::Instant::now() >= front.deadline {
                            return Err("the services did not acknowledge in time".into());
                        }
                        return Ok(());
                    }
                }
            }
            let (pkid, code) = (front.pkid, front.code);
            self.owed.pop_front();
            self.out.puback(pkid, code);
        }
        Ok(())
    }

    /// Waits until the first owed PUBACK may be settled (its receipt
    /// resolved, or its deadline passed).
    async fn next_settled(&mut self) {
        let Some(front) = self.owed.front_mut() else {
            return std::future::pending().await;
        };
        let Some(stored) = &mut front.stored else {
            return;
        };
        // A resolved receiver yields its value once: keep what it said.
        match tokio::time::timeout_at(front.deadline, stored).await {
            Ok(Ok(true)) => front.stored = None,
            Ok(Ok(false) | Err(_)) => {
                front.stored = None;
                front.lost = true;
            }
            Err(_) => {}
        }
    }

    /// Writes a message to the client; the packet id it was sent with, if
    /// it was sent at QoS 1.
    fn deliver(&mut self, m: &Message) -> Option<u16> {
        let pkid = if m.qos > 0 {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            self.next_pkid
        } else {
            0
        };
        if !self.out.publish(m, m.qos, pkid) {
            tracing::debug!(
                client = self.client_id,
                "message larger than the client accepts; dropped"
            );
            return None;
        }
        self.shared.sent[usize::from(m.qos.min(2))].increment(1);
        (pkid != 0).then_some(pkid)
    }

    fn handle(&mut self, packet: In) -> Result<(), String> {
        let policy = self.shared.policy();
        match packet {
            In::Publish {
                pkid,
                mut message,
                bad_topic,
            } => {
                if bad_topic || !router::valid_topic(&message.topic) {
                    self.out.disconnect(DisconnectReasonCode::TopicNameInvalid);
                    return Err(format!("invalid topic {:?}", message.topic));
                }
                let qos = message.qos;
                self.shared.received[usize::from(qos.min(2))].increment(1);
                let mut stored = None;
                let mut code = publish_refusal(
                    self.shared,
                    self.identity,
                    self.role,
                    self.client_id,
                    &message,
                );
                if code.is_none() {
                    message.qos = message.qos.min(1);
                    if policy.policy().reply_routing {
                        reply_to_sender(
                            &policy.policy().prefix,
                            self.client_id,
                            self.conn,
                            &mut message,
                        );
                    }
                    // A device's QoS 1 message is acknowledged once the
                    // services that receive it have it.
                    let receipt =
                        (qos == 1 && self.role != Role::Backend).then(receipt::Receipt::new);
                    match self
                        .shared
                        .route(&message, self.identity, self.role, receipt.as_ref())
                    {
                        Ok(blocked) => self.blocked.extend(blocked),
                        Err(refused) => code = Some(refused),
                    }
                    stored = receipt.map(receipt::Receipt::seal);
                } else {
                    tracing::debug!(
                        identity = self.identity,
                        topic = message.topic,
                        ?code,
                        "publish refused"
                    );
                }
                match qos {
                    1 => {
                        self.owed.push_back(OwedAck {
                            pkid,
                            code: code.unwrap_or(PubAckCode::Success),
                            stored,
                            lost: false,
                            deadline: tokio::time::Instant::now() + ACK_TIMEOUT,
                        });
                        self.settle_acks()?;
                    }
                    2 => self.out.pubrec(pkid),
                    _ => {}
                }
            }
            In::PubRel(pkid) => self.out.pubcomp(pkid),
            In::PingReq => self.out.pingresp(),
            In::Subscribe { pkid, filters } => {
                let limits = &self.shared.limits;
                let limited = self.role != Role::Backend;
                let mut granted = Vec::with_capacity(filters.len());
                let mut retained = Vec::new();
                {
                    let mut router = self.shared.router();
                    let router = &mut *router;
                    for (filter, qos) in filters {
                        let (group, inner) = match router::split_shared(&filter) {
                            Some((g, f)) => (Some(g.to_owned()), f.to_owned()),
                            None if filter.starts_with("$share/") => {
                                granted.push(Err(SubRefusal::Invalid));
                                continue;
                            }
                            None => (None, filter.clone()),
                        };
                        if !router::valid_filter(&inner) || (limited && !limits.topic_fits(&inner))
                        {
                            granted.push(Err(SubRefusal::Invalid));
                            continue;
                        }
                        if !subscription_allowed(
                            &policy,
                            self.identity,
                            self.client_id,
                            group.as_deref(),
                            &inner,
                        ) {
                            tracing::debug!(
                                identity = self.identity,
                                filter,
                                "subscription denied"
                            );
                            granted.push(Err(SubRefusal::NotAuthorized));
                            continue;
                        }
                        let Some(c) = router
                            .clients
                            .get_mut(self.client_id)
                            .filter(|c| c.conn == self.conn)
                        else {
                            // Taken over meanwhile: this connection ends.
                            granted.push(Err(SubRefusal::NotAuthorized));
                            continue;
                        };
                        let new = !c.filters.iter().any(|(g, f)| *g == group && *f == inner);
                        if new && limited && c.filters.len() >= limits.max_subscriptions {
                            granted.push(Err(SubRefusal::QuotaExceeded));
                            continue;
                        }
                        if new {
                            c.filters.push((group.clone(), inner.clone()));
                        }
                        let qos = qos.min(1);
                        router
                            .subscriptions
                            .insert(self.client_id, group.as_deref(), &inner, qos);
                        if group.is_none() {
                            // At most a queue's worth: what a client can
                            // take at once.
                            for m in router.retained.matching(&inner, self.shared.queue_capacity) {
                                let mut m = m.clone();
                                m.qos = m.qos.min(qos);
                                retained.push(m);
                            }
                        }
                        granted.push(Ok(qos));
                    }
                    if router
                        .clients
                        .get(self.client_id)
                        .is_some_and(|c| c.conn == self.conn && !c.session_expiry.is_zero())
                    {
                        self.shared.store_session(router, self.client_id, None);
                    }
                }
                self.out.suback(pkid, &granted);
                for m in &retained {
                    let _ = self.deliver(m);
                }
            }
            In::Unsubscribe { pkid, filters } => {
                let mut removed = Vec::with_capacity(filters.len());
                let mut guard = self.shared.router();
                let router = &mut *guard;
                for filter in filters {
                    let (group, inner) = match router::split_shared(&filter) {
                        Some((g, f)) => (Some(g.to_owned()), f.to_owned()),
                        None => (None, filter),
                    };
                    removed.push(router.subscriptions.remove(
                        self.client_id,
                        group.as_deref(),
                        &inner,
                    ));
                    if let Some(c) = router.clients.get_mut(self.client_id)
                        && c.conn == self.conn
                    {
                        c.filters.retain(|(g, f)| !(*g == group && *f == inner));
                    }
                }
                if router
                    .clients
                    .get(self.client_id)
                    .is_some_and(|c| c.conn == self.conn && !c.session_expiry.is_zero())
                {
                    self.shared.store_session(router, self.client_id, None);
                }
                drop(guard);
                self.out.unsuback(pkid, &removed);
            }
            In::Connect { .. } => {
                self.out.disconnect(DisconnectReasonCode::ProtocolError);
                return Err("a second CONNECT".into());
            }
            In::Unexpected => {
                self.out.disconnect(DisconnectReasonCode::ProtocolError);
                return Err("a packet only a server sends".into());
            }
            In::PubAck(pkid) => {
                if let Some(d) = self.awaiting.remove(&pkid) {
                    d.acknowledge();
                }
            }
            In::Disconnect => {}
        }
        Ok(())
    }
}
