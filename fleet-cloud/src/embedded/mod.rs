//! The embedded MQTT broker: one process runs the whole backend.
//!
//! A small MQTT 3.1.1 and 5 broker for one machine, built for what a fleet
//! needs and nothing else:
//!
//! - mutual TLS only (rustls, `ring`, TLS 1.2 at least), with a handshake
//!   timeout: a client certificate signed by the fleet CA is the identity,
//!   its common name the user name, as with Mosquitto's
//!   `use_identity_as_username`;
//! - the fleet's [`BrokerPolicy`] enforced on every publish and subscribe,
//!   the same rules the generated Mosquitto ACL holds
//!   ([`BrokerPolicy::allows`]); [`set_policy`](EmbeddedBroker::set_policy)
//!   applies a new policy at once, to connected clients too;
//! - per-certificate revocation: [`revoke`](EmbeddedBroker::revoke) refuses
//!   a certificate (by its SHA-256 fingerprint) and drops its connection;
//! - QoS 0 and 1 (QoS 2 publishes are accepted and delivered at QoS 1),
//!   retained messages, wills, `$share/{group}/` shared subscriptions, MQTT 5
//!   response topic, correlation data and user properties passed through;
//!   a client id taken over drops the older connection.
//!
//! What it does not do, and when to use an external broker instead: it keeps
//! no sessions (every connection starts clean; QoS 1 messages for an offline
//! client are not queued: the fleet protocol recovers by its GET-on-connect
//! and job polling flows), it does not persist retained messages across a
//! restart, and it is one process. For fleets beyond one machine, for
//! bridging, or for persistent sessions, run Mosquitto (or EMQX, HiveMQ,
//! VerneMQ) with the ACL from [`BrokerPolicy::mosquitto_acl`] and connect
//! the service to it.
//!
//! Why not rumqttd: it refuses every subscription to a topic starting with
//! `$` and does not route such topics, so devices built with AWS's SDKs
//! (`$aws/things/...`) could not use it; and it has no access control.

mod codec;
mod router;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::policy::{Access, BrokerPolicy, CompiledPolicy};
use codec::{ConnAckCode, In, Message, ReadError, Version, Writer};
use router::Subscriptions;

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
        }
    }
}

impl fmt::Debug for EmbeddedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedConfig")
            .field("bind", &self.bind)
            .field("policy", &self.policy)
            .field("handshake_timeout", &self.handshake_timeout)
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
}

impl fmt::Display for EmbeddedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls(e) => write!(f, "embedded broker TLS configuration: {e}"),
            Self::Bind(e) => write!(f, "embedded broker cannot listen: {e}"),
            Self::Policy(e) => write!(f, "embedded broker policy: {e}"),
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
    fingerprint: String,
    tx: mpsc::Sender<Message>,
    kick: Option<oneshot::Sender<Kick>>,
    /// (group, filter) of each subscription, to undo them.
    filters: Vec<(Option<String>, String)>,
}

/// How long a publisher waits for room in a full subscriber queue before
/// the message is dropped for that subscriber.
const BLOCKED_SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Router {
    clients: HashMap<String, Client>,
    subscriptions: Subscriptions,
    retained: HashMap<String, Message>,
}

struct Shared {
    policy: RwLock<Arc<CompiledPolicy>>,
    revoked: RwLock<HashSet<String>>,
    router: Mutex<Router>,
    next_conn: AtomicU64,
    dropped: AtomicU64,
    max_packet: usize,
    queue_capacity: usize,
    handshake_timeout: Duration,
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
    /// checked). Returns the QoS 1 deliveries whose client's queue is full:
    /// the publisher's session waits for room (its client is slowed, as
    /// TCP would slow it) before it reads more, and drops them only after
    /// [`BLOCKED_SEND_TIMEOUT`]. A full queue drops a QoS 0 message for that
    /// client only.
    #[must_use]
    fn route(&self, message: &Message) -> Vec<(mpsc::Sender<Message>, Message)> {
        let mut blocked = Vec::new();
        let compiled = self.policy();
        let policy = compiled.policy();
        let mut router = self.router();
        if policy.reply_routing {
            let prefix = &policy.prefix;
            if let Some((client, topic)) = routed_reply(prefix, &message.topic)
                && let Some(c) = router.clients.get(client)
                && router.subscriptions.subscribed(client, topic)
            {
                let mut m = message.clone();
                m.topic = topic.to_owned();
                m.qos = m.qos.min(1);
                m.retain = false;
                m.properties = None;
                match c.tx.try_send(m) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(m)) if m.qos > 0 => {
                        blocked.push((c.tx.clone(), m));
                    }
                    Err(_) => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if message.retain {
            if message.payload.is_empty() {
                router.retained.remove(&message.topic);
            } else {
                router
                    .retained
                    .insert(message.topic.clone(), message.clone());
            }
        }
        let router = &*router;
        for (client, qos) in router.subscriptions.recipients(&message.topic) {
            let Some(c) = router.clients.get(client) else {
                continue;
            };
            let mut m = message.clone();
            m.qos = m.qos.min(qos).min(1);
            m.retain = false;
            match c.tx.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) if m.qos > 0 => {
                    blocked.push((c.tx.clone(), m));
                }
                Err(mpsc::error::TrySendError::Full(_)) => self.note_dropped(client),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        blocked
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

    fn note_dropped(&self, client: &str) {
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
        let shared = Arc::new(Shared {
            policy: RwLock::new(Arc::new(config.policy.compile())),
            revoked: RwLock::new(HashSet::new()),
            router: Mutex::new(Router::default()),
            next_conn: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            max_packet: config.max_packet_size,
            queue_capacity: config.queue_capacity.max(1),
            handshake_timeout: config.handshake_timeout,
        });
        let (stop, stopped) = watch::channel(false);
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
    let bad = |e: &dyn fmt::Display| EmbeddedError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(config.ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(EmbeddedError::Tls(
            "the CA file holds no certificate".into(),
        ));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad(&e))?;
    let chain = CertificateDer::pem_slice_iter(config.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(config.key_pem.as_bytes()).map_err(|e| bad(&e))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(&e))
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
/// as AWS's SDKs) gets one naming its sender, so that the service's reply
/// can be delivered to that client alone, on the topic it expects.
fn reply_to_sender(prefix: &str, client_id: &str, message: &mut Message) {
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
        "{prefix}/clients/{client_id}/{ROUTED}/{}",
        message.topic
    ));
}

/// `{prefix}/clients/{client}/aws-reply/{topic}`: the client and the topic
/// to deliver on.
fn routed_reply<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, &'t str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/clients/")?;
    let (client, rest) = rest.split_once('/')?;
    let original = rest.strip_prefix(ROUTED)?.strip_prefix('/')?;
    original.starts_with(prefix).then_some((client, original))
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
    let tls = tokio::time::timeout(deadline, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or("no client certificate")?;
    let identity = common_name(&der).ok_or("client certificate has no common name")?;
    let fingerprint = fingerprint(&der);
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
    let (client_id, assigned) = if client_id.is_empty() {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| e.to_string())?;
        let id: String = r.iter().map(|b| format!("{b:02x}")).collect();
        (
            format!("auto-{id}"),
            (version == Version::V5).then(|| format!("auto-{id}")),
        )
    } else {
        (client_id, None)
    };
    let refuse = if client_id.contains(['/', '+', '#']) || client_id.len() > 128 {
        Some(ConnAckCode::BadClientId)
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
    if let Some(code) = refuse {
        out.connack(code, None, max_packet);
        let _ = wr.write_all(&out.buf).await;
        let _ = wr.shutdown().await;
        return Err(format!("{identity} ({client_id}) refused: {code:?}"));
    }

    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(shared.queue_capacity);
    let (kick_tx, mut kick) = oneshot::channel::<Kick>();
    {
        let mut router = shared.router();
        let router = &mut *router;
        if let Some(mut old) = router.clients.remove(&client_id) {
            for (group, filter) in &old.filters {
                router
                    .subscriptions
                    .remove(&client_id, group.as_deref(), filter);
            }
            if let Some(k) = old.kick.take() {
                let _ = k.send(Kick::TakenOver);
            }
        }
        router.clients.insert(
            client_id.clone(),
            Client {
                conn,
                identity: identity.clone(),
                fingerprint,
                tx,
                kick: Some(kick_tx),
                filters: Vec::new(),
            },
        );
    }
    tracing::debug!(%identity, %client_id, ?version, "connected");
    out.connack(ConnAckCode::Accepted, assigned, max_packet);
    // What the client accepts: MQTT 5 clients say; rumqttc and others
    // default to large enough.
    out.max_packet = usize::MAX;

    let mut session = Session {
        shared: &shared,
        identity: &identity,
        client_id: &client_id,
        conn,
        out,
        next_pkid: 0,
        blocked: Vec::new(),
    };
    let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let mut clean_exit = false;
    let result: Result<(), String> = async {
        loop {
            if !session.out.buf.is_empty() {
                wr.write_all(&session.out.buf)
                    .await
                    .map_err(|e| e.to_string())?;
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
                            session.deliver(&own);
                            wr.write_all(&session.out.buf)
                                .await
                                .map_err(|e| e.to_string())?;
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
                    let _ = wr.write_all(&session.out.buf).await;
                    // Taken over: the newer connection is the client now, no will.
                    clean_exit = matches!(reason, DisconnectReasonCode::SessionTakenOver);
                    return Err(format!("disconnected by the broker: {reason:?}"));
                }
                _ = stopped.changed() => {
                    session.out.disconnect(DisconnectReasonCode::ServerShuttingDown);
                    let _ = wr.write_all(&session.out.buf).await;
                    return Err("broker shutting down".into());
                }
                m = rx.recv() => {
                    let Some(m) = m else { return Err("queue closed".into()) };
                    session.deliver(&m);
                    // Drain what is queued without waiting, one write.
                    while let Ok(m) = rx.try_recv() {
                        session.deliver(&m);
                        if session.out.buf.len() > 64 * 1024 {
                            break;
                        }
                    }
                }
                r = async {
                    match keep_alive {
                        Some(d) => tokio::time::timeout(d, rd.read_buf(&mut buf)).await
                            .map_err(|_| "keep-alive timeout".to_string()),
                        None => Ok(rd.read_buf(&mut buf).await),
                    }
                } => {
                    let n = r?.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection closed without DISCONNECT".into());
                    }
                    loop {
                        match codec::read(version, &mut buf, shared.max_packet) {
                            Ok(In::Disconnect) => {
                                clean_exit = true;
                                return Ok(());
                            }
                            Ok(p) => session.handle(p)?,
                            Err(ReadError::Incomplete) => break,
                            Err(ReadError::Malformed(e)) => {
                                session.out.disconnect(DisconnectReasonCode::MalformedPacket);
                                let _ = wr.write_all(&session.out.buf).await;
                                return Err(format!("malformed packet: {e}"));
                            }
                        }
                    }
                }
            }
        }
    }
    .await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;

    // Unregister (unless a newer connection took the id), then the will.
    {
        let mut router = shared.router();
        let router = &mut *router;
        if router
            .clients
            .get(&client_id)
            .is_some_and(|c| c.conn == conn)
            && let Some(c) = router.clients.remove(&client_id)
        {
            for (group, filter) in &c.filters {
                router
                    .subscriptions
                    .remove(&client_id, group.as_deref(), filter);
            }
        }
    }
    if !clean_exit
        && let Some(will) = will
        && router::valid_topic(&will.topic)
        && shared
            .policy()
            .allows(&identity, &client_id, Access::Write, &will.topic)
    {
        // Nobody reads this connection any more: a full queue drops it.
        for (_, m) in shared.route(&will) {
            shared.note_dropped(&m.topic);
        }
    }
    tracing::debug!(%identity, %client_id, "disconnected");
    result
}

/// One connected client's protocol state.
struct Session<'a> {
    shared: &'a Shared,
    identity: &'a str,
    client_id: &'a str,
    conn: u64,
    out: Writer,
    next_pkid: u16,
    /// Deliveries waiting for room in a full client queue.
    blocked: Vec<(mpsc::Sender<Message>, Message)>,
}

impl Session<'_> {
    fn deliver(&mut self, m: &Message) {
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
        }
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
                let allowed =
                    policy.allows(self.identity, self.client_id, Access::Write, &message.topic)
                        && !message.topic.starts_with("$share/");
                let qos = message.qos;
                if allowed {
                    message.qos = message.qos.min(1);
                    if policy.policy().reply_routing {
                        reply_to_sender(&policy.policy().prefix, self.client_id, &mut message);
                    }
                    let blocked = self.shared.route(&message);
                    self.blocked.extend(blocked);
                } else {
                    tracing::debug!(
                        identity = self.identity,
                        topic = message.topic,
                        "publish denied"
                    );
                }
                match qos {
                    1 => self.out.puback(pkid, allowed),
                    2 => self.out.pubrec(pkid),
                    _ => {}
                }
            }
            In::PubRel(pkid) => self.out.pubcomp(pkid),
            In::PingReq => self.out.pingresp(),
            In::Subscribe { pkid, filters } => {
                let mut granted = Vec::with_capacity(filters.len());
                let mut retained = Vec::new();
                {
                    let mut router = self.shared.router();
                    let router = &mut *router;
                    for (filter, qos) in filters {
                        let (group, inner) = match router::split_shared(&filter) {
                            Some((g, f)) => (Some(g.to_owned()), f.to_owned()),
                            None if filter.starts_with("$share/") => {
                                granted.push(Err(false));
                                continue;
                            }
                            None => (None, filter.clone()),
                        };
                        if !router::valid_filter(&inner) {
                            granted.push(Err(false));
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
                            granted.push(Err(true));
                            continue;
                        }
                        let qos = qos.min(1);
                        router
                            .subscriptions
                            .insert(self.client_id, group.as_deref(), &inner, qos);
                        if let Some(c) = router.clients.get_mut(self.client_id)
                            && c.conn == self.conn
                            && !c.filters.iter().any(|(g, f)| *g == group && *f == inner)
                        {
                            c.filters.push((group.clone(), inner.clone()));
                        }
                        if group.is_none() {
                            for m in router.retained.values() {
                                if router::matches(&inner, &m.topic) {
                                    let mut m = m.clone();
                                    m.qos = m.qos.min(qos);
                                    retained.push(m);
                                }
                            }
                        }
                        granted.push(Ok(qos));
                    }
                }
                self.out.suback(pkid, &granted);
                for m in &retained {
                    self.deliver(m);
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
            In::PubAck | In::Disconnect => {}
        }
        Ok(())
    }
}
