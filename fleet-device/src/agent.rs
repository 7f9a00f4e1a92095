//! The agent: a thin pump between MQTT (rumqttc over rustls) and the
//! fleet-core engines.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use fleet_core::jobs::{
    CommandInbox, CommandStatus, Delivery, JobEvent, JobRunner, JobStatus, RunnerConfig, UpdateId,
};
use fleet_core::shadow::{RequestId, ShadowEvent, ShadowSync, SyncConfig};
use fleet_core::time::Instant as CoreInstant;
use fleet_core::transmit::Transmit;
use fleet_core::{ShadowName, ThingName};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why the agent could not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentError {
    /// The TLS identity or trust anchors are unusable.
    Tls(String),
    /// A name is invalid.
    InvalidName(String),
    /// The shadow is not one the agent tracks.
    UnknownShadow,
    /// No job is running.
    NoCurrentJob,
    /// A command answer was refused (unknown, answered, past its deadline).
    Command(String),
    /// The service refused the update (its code and message).
    Rejected {
        /// HTTP-style code (400, 409, 413, ...).
        code: u16,
        /// AWS's message.
        message: String,
    },
    /// The jobs service refused the update (its error code).
    JobRejected(String),
    /// No answer after every retry.
    TimedOut,
    /// The agent has stopped.
    Stopped,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls(e) => write!(f, "TLS configuration: {e}"),
            Self::InvalidName(e) => write!(f, "invalid name: {e}"),
            Self::UnknownShadow => f.write_str("not a shadow this agent tracks"),
            Self::NoCurrentJob => f.write_str("no job is running"),
            Self::Command(e) => write!(f, "command: {e}"),
            Self::Rejected { code, message } => write!(f, "rejected: {code} {message}"),
            Self::JobRejected(code) => write!(f, "job update rejected: {code}"),
            Self::TimedOut => f.write_str("no answer after every retry"),
            Self::Stopped => f.write_str("the agent has stopped"),
        }
    }
}

impl std::error::Error for AgentError {}

/// What the agent tells the application.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// Connected to the broker (again).
    Connected,
    /// The connection dropped; the agent reconnects by itself.
    Disconnected {
        /// Why.
        reason: String,
        /// How long it waits before the next try (jittered).
        retry_in: Duration,
    },
    /// Desired state differs from reported: apply `delta` and report.
    ShadowDelta {
        /// Which shadow (`None`: classic).
        shadow: Option<String>,
        /// The shadow's version.
        version: u64,
        /// Every differing key of desired.
        delta: Map<String, Value>,
    },
    /// A job to run (or to go on with after a restart: `status_details`
    /// holds what was last reported). Report with [`Agent::update_job`].
    Job {
        /// The job.
        job_id: String,
        /// Which execution.
        execution_number: u64,
        /// The job document.
        document: Value,
        /// Details last reported.
        status_details: BTreeMap<String, String>,
    },
    /// The current job was canceled (or removed, or timed out) by the
    /// service: stop working on it.
    JobCanceled {
        /// The job.
        job_id: String,
    },
    /// A command to run once; answer with [`Agent::respond`] before its
    /// deadline. A redelivered command is not handed out again.
    Command {
        /// Its execution id (for the answer).
        execution_id: String,
        /// Which command.
        command: String,
        /// Its arguments.
        payload: Value,
        /// Epoch seconds after which an answer no longer counts.
        deadline: u64,
    },
    /// The broker or the service sent something the agent cannot use; it
    /// changed nothing.
    InvalidInput {
        /// The topic.
        topic: String,
        /// What was wrong.
        reason: String,
    },
}

/// Reconnection: exponential backoff with full jitter, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay's upper bound.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before try `attempt` (0-based): uniform in
    /// `[0, min(max, initial * 2^attempt)]` ("full jitter"), from `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(if millis == 0 {
            0
        } else {
            random % (millis + 1)
        })
    }
}

/// Builds an [`Agent`].
#[derive(Clone)]
pub struct AgentBuilder {
    host: String,
    port: u16,
    thing: String,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    shadows: Vec<Option<String>>,
    backoff: Backoff,
    sync: SyncConfig,
    jobs: RunnerConfig,
}

impl fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("thing", &self.thing)
            .finish_non_exhaustive()
    }
}

impl AgentBuilder {
    /// An agent for `thing` that connects to `host:port` with mutual TLS.
    /// The identity is a certificate (whose common name is the thing name)
    /// and its private key; `ca_pem` holds the trust anchors. All PEM.
    pub fn new(
        host: &str,
        port: u16,
        thing: &str,
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            thing: thing.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            ca_pem: ca_pem.into(),
            shadows: vec![None],
            backoff: Backoff::default(),
            sync: SyncConfig::default(),
            jobs: RunnerConfig::default(),
        }
    }

    /// Tracks these shadows (`None`: classic). Default: the classic shadow.
    pub fn shadows(mut self, shadows: &[Option<&str>]) -> Self {
        self.shadows = shadows.iter().map(|s| s.map(String::from)).collect();
        self
    }

    /// Reconnection timing.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Request timeouts and retries of shadow requests.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.sync.request_timeout = timeout;
        self.jobs.request_timeout = timeout;
        self
    }

    fn tls(&self) -> Result<rustls::ClientConfig, AgentError> {
        let bad = |e: &dyn fmt::Display| AgentError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| bad(&e))?;
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e))
    }

    /// Starts the agent: it connects, and reconnects, by itself.
    pub fn start(self) -> Result<Agent, AgentError> {
        let thing = ThingName::try_from(self.thing.clone())
            .map_err(|e| AgentError::InvalidName(e.to_string()))?;
        let mut names = Vec::new();
        for s in &self.shadows {
            names.push(
                s.clone()
                    .map(ShadowName::try_from)
                    .transpose()
                    .map_err(|e| AgentError::InvalidName(e.to_string()))?,
            );
        }
        let tls = self.tls()?;
        let mut options = MqttOptions::new(self.thing.clone(), self.host.clone(), self.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            // The broker limits messages to 128 KiB; accept all it sends.
            .set_max_packet_size(Some(256 * 1024))
            .set_clean_start(true)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, eventloop) = AsyncClient::new(options, 64);
        let session = random_u64();
        let jobs = JobRunner::new(thing.clone(), self.jobs.clone(), session);
        let sync = ShadowSync::new(thing, &names, self.sync.clone(), session);
        let (commands, commands_rx) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(256);
        let pump = Pump {
            client,
            sync,
            jobs,
            inbox: CommandInbox::new(256),
            commands_base: format!("$aws/commands/things/{}/executions", self.thing),
            job_waiters: HashMap::new(),
            pending_subacks: 0,
            commands: commands_rx,
            events: events_tx,
            waiters: HashMap::new(),
            epoch: Instant::now(),
            backoff: self.backoff,
            rng: session | 1,
        };
        let task = tokio::spawn(pump.run(eventloop));
        Ok(Agent {
            commands,
            events,
            task,
        })
    }
}

enum Command {
    Respond {
        execution_id: String,
        status: CommandStatus,
        payload: Value,
        done: oneshot::Sender<Result<(), AgentError>>,
    },
    UpdateJob {
        status: JobStatus,
        details: Option<BTreeMap<String, String>>,
        done: oneshot::Sender<Result<(), AgentError>>,
    },
    Report {
        shadow: Option<String>,
        reported: Map<String, Value>,
        done: oneshot::Sender<Result<u64, AgentError>>,
    },
    Stop,
}

/// A running device agent. Dropping it stops it.
#[derive(Debug)]
pub struct Agent {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<AgentEvent>,
    task: JoinHandle<()>,
}

impl Agent {
    /// Reports state to a shadow and waits until the service accepted it;
    /// returns the shadow's new version. While offline, the report waits
    /// and goes out after the next connection.
    pub async fn report(
        &self,
        shadow: Option<&str>,
        reported: Map<String, Value>,
    ) -> Result<u64, AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Report {
                shadow: shadow.map(String::from),
                reported,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Answers a command. Refused after its deadline, or a second time.
    pub async fn respond(
        &self,
        execution_id: &str,
        status: CommandStatus,
        payload: Value,
    ) -> Result<(), AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Respond {
                execution_id: execution_id.into(),
                status,
                payload,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Reports the status of the current job and waits until the service
    /// accepted it (`details` replace the previous ones). A terminal status
    /// ends the job; the agent then asks for the next.
    pub async fn update_job(
        &self,
        status: JobStatus,
        details: Option<BTreeMap<String, String>>,
    ) -> Result<(), AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::UpdateJob {
                status,
                details,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// The next event; `None` once the agent has stopped.
    pub async fn next_event(&mut self) -> Option<AgentEvent> {
        self.events.recv().await
    }

    /// Stops the agent: sends what it can, disconnects.
    pub async fn shutdown(self) {
        let _ = self.commands.send(Command::Stop).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut task = self.task;
            let _ = (&mut task).await;
        })
        .await;
    }
}

fn epoch_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without an OS random source, time is a fallback that still varies
    // between boots; tokens need uniqueness, not secrecy.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t;
    }
    u64::from_le_bytes(b)
}

struct Pump {
    client: AsyncClient,
    sync: ShadowSync,
    jobs: JobRunner,
    inbox: CommandInbox,
    /// `$aws/commands/things/{thing}/executions`
    commands_base: String,
    job_waiters: HashMap<UpdateId, oneshot::Sender<Result<(), AgentError>>>,
    /// SUBACKs still expected for this connection's subscriptions.
    pending_subacks: usize,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<AgentEvent>,
    waiters: HashMap<RequestId, oneshot::Sender<Result<u64, AgentError>>>,
    epoch: Instant,
    backoff: Backoff,
    rng: u64,
}

impl Pump {
    fn now(&self) -> CoreInstant {
        CoreInstant::from_millis(
            u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    async fn emit(&self, event: AgentEvent) {
        // A slow application back-pressures the pump, it is never dropped.
        let _ = self.events.send(event).await;
    }

    async fn run(mut self, mut eventloop: rumqttc::v5::EventLoop) {
        let mut failures = 0u32;
        let mut connected = false;
        loop {
            let wake = self
                .sync
                .poll_timeout()
                .map(|t| self.epoch + Duration::from_millis(t.as_millis()));
            tokio::select! {
                polled = eventloop.poll() => match polled {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failures = 0;
                        connected = true;
                        let now = self.now();
                        self.pending_subacks = 0;
                        self.sync.handle_connection(now, true);
                        self.jobs.handle_connection(now, true);
                        let filter = format!("{}/+/request/json", self.commands_base);
                        match self.client.subscribe(filter, QoS::AtLeastOnce).await {
                            Ok(()) => self.pending_subacks += 1,
                            Err(e) => tracing::warn!("cannot subscribe to commands: {e}"),
                        }
                        self.emit(AgentEvent::Connected).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))) {
                            self.pending_subacks = self.pending_subacks.saturating_sub(1);
                            if self.pending_subacks == 0 {
                                let now = self.now();
                                self.sync.handle_subscribed(now);
                                self.jobs.handle_subscribed(now);
                            }
                        } else {
                            self.emit(AgentEvent::InvalidInput {
                                topic: String::new(),
                                reason: "the broker refused a subscription (check the ACL)".into(),
                            })
                            .await;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let now = self.now();
                        if topic.starts_with(&self.commands_base) {
                            self.handle_command(&topic, &p.payload).await;
                            continue;
                        }
                        let result = if topic.contains("/jobs/") {
                            self.jobs.handle_message(now, &topic, &p.payload).map_err(|e| e.to_string())
                        } else {
                            self.sync.handle_message(now, &topic, &p.payload).map_err(|e| e.to_string())
                        };
                        if let Err(reason) = result {
                            self.emit(AgentEvent::InvalidInput { topic, reason }).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            connected = false;
                            let now = self.now();
                            self.sync.handle_connection(now, false);
                            self.jobs.handle_connection(now, false);
                        }
                        let r = self.random();
                        let delay = self.backoff.delay(failures, r);
                        failures = failures.saturating_add(1);
                        self.emit(AgentEvent::Disconnected { reason: e.to_string(), retry_in: delay }).await;
                        tokio::time::sleep(delay).await;
                    }
                },
                command = self.commands.recv() => match command {
                    Some(Command::Respond { execution_id, status, payload, done }) => {
                        let result = match self.inbox.respond(epoch_seconds(), &execution_id, status, payload) {
                            Ok(answer) => {
                                let topic = format!("{}/{execution_id}/response/json", self.commands_base);
                                self.client
                                    .publish(topic, QoS::AtLeastOnce, false, answer)
                                    .await
                                    .map_err(|e| AgentError::Command(e.to_string()))
                            }
                            Err(e) => Err(AgentError::Command(e.to_string())),
                        };
                        let _ = done.send(result);
                    }
                    Some(Command::UpdateJob { status, details, done }) => {
                        let now = self.now();
                        match self.jobs.update(now, status, details) {
                            Ok(id) => {
                                self.job_waiters.insert(id, done);
                            }
                            Err(_) => {
                                let _ = done.send(Err(AgentError::NoCurrentJob));
                            }
                        }
                    }
                    Some(Command::Report { shadow, reported, done }) => {
                        let now = self.now();
                        let name = match shadow.map(ShadowName::try_from).transpose() {
                            Ok(n) => n,
                            Err(e) => {
                                let _ = done.send(Err(AgentError::InvalidName(e.to_string())));
                                continue;
                            }
                        };
                        match self.sync.report(now, name.as_ref(), reported) {
                            Ok(id) => {
                                self.waiters.insert(id, done);
                            }
                            Err(_) => {
                                let _ = done.send(Err(AgentError::UnknownShadow));
                            }
                        }
                    }
                    Some(Command::Stop) | None => {
                        let _ = self.client.disconnect().await;
                        // Let the DISCONNECT go out.
                        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                        return;
                    }
                },
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = self.now();
                    self.sync.handle_timeout(now);
                    self.jobs.handle_timeout(now);
                }
            }
            self.drain().await;
        }
    }

    async fn handle_command(&mut self, topic: &str, payload: &[u8]) {
        match self.inbox.handle_request(epoch_seconds(), payload) {
            Ok(Delivery::Run(r)) => {
                self.emit(AgentEvent::Command {
                    execution_id: r.execution_id,
                    command: r.command,
                    payload: r.payload,
                    deadline: r.deadline,
                })
                .await;
            }
            Ok(Delivery::Duplicate {
                resend: Some(answer),
            }) => {
                let response = topic.replace("/request/", "/response/");
                let _ = self
                    .client
                    .publish(response, QoS::AtLeastOnce, false, answer)
                    .await;
            }
            Ok(Delivery::Duplicate { resend: None } | Delivery::Expired) => {}
            Err(e) => {
                self.emit(AgentEvent::InvalidInput {
                    topic: topic.into(),
                    reason: e.to_string(),
                })
                .await;
            }
        }
    }

    /// Sends what the engine asks for and forwards its events.
    async fn drain(&mut self) {
        // Both engines subscribe on every connection; they are told once
        // every SUBACK of the connection has come.
        let mut transmits = Vec::new();
        while let Some(t) = self.sync.poll_transmit() {
            transmits.push(t);
        }
        while let Some(t) = self.jobs.poll_transmit() {
            transmits.push(t);
        }
        for t in transmits {
            let result = match t {
                Transmit::Subscribe { filters } => {
                    self.pending_subacks += 1;
                    let subs = filters
                        .into_iter()
                        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f, QoS::AtLeastOnce));
                    self.client.subscribe_many(subs).await
                }
                Transmit::Publish { topic, payload, .. } => {
                    self.client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::warn!("cannot hand a message to the MQTT client: {e}");
            }
        }
        while let Some(event) = self.jobs.poll_event() {
            match event {
                JobEvent::Job {
                    job_id,
                    execution_number,
                    document,
                    status_details,
                } => {
                    self.emit(AgentEvent::Job {
                        job_id,
                        execution_number,
                        document,
                        status_details,
                    })
                    .await;
                }
                JobEvent::Canceled { job_id } => {
                    self.emit(AgentEvent::JobCanceled { job_id }).await;
                }
                JobEvent::Updated { id, .. } => {
                    if let Some(w) = self.job_waiters.remove(&id) {
                        let _ = w.send(Ok(()));
                    }
                }
                JobEvent::UpdateFailed { id, code, .. } => {
                    if let Some(w) = self.job_waiters.remove(&id) {
                        let _ = w.send(Err(match code {
                            Some(c) => AgentError::JobRejected(format!("{c:?}")),
                            None => AgentError::TimedOut,
                        }));
                    }
                }
                _ => {}
            }
        }
        while let Some(event) = self.sync.poll_event() {
            match event {
                ShadowEvent::Delta {
                    shadow,
                    version,
                    delta,
                } => {
                    self.emit(AgentEvent::ShadowDelta {
                        shadow: shadow.map(|s| s.as_str().to_string()),
                        version,
                        delta,
                    })
                    .await;
                }
                ShadowEvent::Accepted { id, version, .. } => {
                    if let Some(w) = self.waiters.remove(&id) {
                        let _ = w.send(Ok(version));
                    }
                }
                ShadowEvent::Failed { id, error, .. } => {
                    if let Some(w) = self.waiters.remove(&id) {
                        let _ = w.send(Err(match error {
                            Some(e) => AgentError::Rejected {
                                code: e.code(),
                                message: e.message().into(),
                            },
                            None => AgentError::TimedOut,
                        }));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut rng = 12345u64;
        for attempt in 0..12 {
            let cap = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
            for _ in 0..50 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let d = b.delay(attempt, rng);
                assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
                seen.insert(d.as_millis());
            }
        }
        assert!(seen.len() > 100, "delays are spread out, not fixed");
        assert!(b.delay(40, u64::MAX) <= Duration::from_secs(2));
    }
}
