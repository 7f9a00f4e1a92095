//! The agent: a thin pump between MQTT (rumqttc over rustls) and the
//! fleet-core engines.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::jobs::{
    CommandInbox, CommandStatus, Delivery as CommandDelivery, JobEvent, JobRunner, JobStatus,
    RunnerConfig, UpdateId,
};
use fleet_core::ota::{BlockDownload, DownloadConfig, DownloadEvent};
use fleet_core::shadow::{RequestId, ShadowEvent, ShadowSync, SyncConfig};
use fleet_core::time::Instant as CoreInstant;
use fleet_core::topic::{
    CommandTopic, CommandTopicKind, Format, JobsTopic, JobsTopicKind, Role, Service, Topic,
    TopicPrefix,
};
use fleet_core::transmit::Transmit;
use fleet_core::{JobId, ShadowName, StreamId, ThingName};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::key::DeviceKey;
use crate::mqtt::{self, Client, Ev, Protocol};
use crate::ota::OtaSettings;
use crate::outbox::{MessageKind, Outbox, OutboxError, Overflow};

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
    /// The outbox is full (and its policy keeps what it holds), or its
    /// storage failed; nothing was queued.
    Outbox(OutboxError),
    /// Not connected, and a QoS 0 message is not kept for later.
    NotConnected,
    /// The outbox's overflow policy dropped this telemetry message to make
    /// room for newer ones.
    Dropped,
    /// The MQTT client's queue is full; try again.
    ClientBusy,
    /// The broker refused the message (MQTT 5 reason: not authorized, say).
    Refused(String),
    /// The state directory cannot be used.
    StateDir(String),
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
            Self::Outbox(e) => write!(f, "outbox: {e}"),
            Self::NotConnected => f.write_str("not connected; QoS 0 is not stored"),
            Self::Dropped => f.write_str("dropped by the outbox's overflow policy"),
            Self::ClientBusy => f.write_str("the MQTT client's queue is full"),
            Self::Refused(e) => write!(f, "the broker refused the message: {e}"),
            Self::StateDir(e) => write!(f, "state directory: {e}"),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Outbox(e) => Some(e),
            _ => None,
        }
    }
}

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
    /// Another connection keeps taking this client id (two devices with the
    /// same identity, or a stale process): the broker drops one of them each
    /// time. Reported after three take-overs in a row, each within a minute
    /// of connecting; the agent goes on reconnecting with backoff. Needs MQTT
    /// 5 (a 3.1.1 broker just closes the connection, without a reason).
    ClientIdConflict {
        /// Take-overs in a row so far.
        times: u32,
    },
    /// An update is downloading (with [`AgentBuilder::ota`]).
    OtaProgress {
        /// The job.
        job_id: String,
        /// Bytes written to the new slot.
        received: u64,
        /// Image size.
        total: u64,
    },
    /// The new image is staged and the trial boot set: restart the device
    /// (a process using [`FileSlots`](crate::FileSlots): restart it).
    RebootRequired {
        /// The job.
        job_id: String,
    },
    /// An update ended; the job is reported with a signed install receipt.
    OtaFinished {
        /// The job.
        job_id: String,
        /// The new image runs and is confirmed (`false`: the previous image
        /// runs again, or the download never verified).
        committed: bool,
    },
    /// An update job was refused before anything was written (a manifest
    /// not signed by the trust root, for another device, older than what
    /// runs...). The job is reported failed with the reason.
    OtaRejected {
        /// The job.
        job_id: String,
        /// Why.
        reason: String,
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

/// Quality of service of a telemetry message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Qos {
    /// Sent once, not stored: lost if the connection is down.
    AtMostOnce,
    /// Stored in the outbox until the broker acknowledged it; sent again
    /// after a reconnection or a restart (so it may arrive twice).
    AtLeastOnce,
}

/// The agent's copy of a shadow, as last read from the service.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSnapshot {
    /// Desired state.
    pub desired: Map<String, Value>,
    /// Reported state.
    pub reported: Map<String, Value>,
    /// The shadow's version.
    pub version: u64,
}

/// A queued message: resolves when the broker acknowledged it.
#[derive(Debug)]
pub struct Delivery {
    seq: u64,
    rx: oneshot::Receiver<Result<(), AgentError>>,
}

impl Delivery {
    /// The message's sequence number in the outbox (0 for QoS 0).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The outcome if it is known already, without waiting: `None` while the
    /// message is still on its way.
    pub fn try_result(&mut self) -> Option<Result<(), AgentError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(AgentError::Stopped)),
        }
    }

    /// Waits until the broker acknowledged the message (QoS 1), or it was
    /// handed to the network (QoS 0). If the agent stops first, the message
    /// stays in the outbox and goes out after the next start:
    /// [`AgentError::Stopped`] says only that this process will not see it.
    pub async fn acknowledged(self) -> Result<(), AgentError> {
        self.rx.await.map_err(|_| AgentError::Stopped)?
    }
}

#[derive(Clone)]
pub(crate) enum KeySource {
    Pem(String),
    Custom(Arc<dyn DeviceKey>),
}

/// Builds an [`Agent`].
#[derive(Clone)]
pub struct AgentBuilder {
    host: String,
    port: u16,
    thing: String,
    client_id: Option<String>,
    cert_pem: String,
    key: KeySource,
    ca_pem: String,
    shadows: Vec<Option<String>>,
    backoff: Backoff,
    sync: SyncConfig,
    jobs: RunnerConfig,
    protocol: Protocol,
    state_dir: Option<PathBuf>,
    outbox_bytes: usize,
    overflow: Overflow,
    telemetry_prefix: String,
    keep_alive: Duration,
    ota: Option<OtaSettings>,
}

impl fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("thing", &self.thing)
            .field("protocol", &self.protocol)
            .field("state_dir", &self.state_dir)
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
            client_id: None,
            cert_pem: cert_pem.into(),
            key: KeySource::Pem(key_pem.into()),
            ca_pem: ca_pem.into(),
            shadows: vec![None],
            backoff: Backoff::default(),
            sync: SyncConfig::default(),
            jobs: RunnerConfig::default(),
            protocol: Protocol::V5,
            state_dir: None,
            outbox_bytes: 16 * 1024 * 1024,
            overflow: Overflow::DropOldestTelemetry,
            telemetry_prefix: "dt".into(),
            keep_alive: Duration::from_secs(30),
            ota: None,
        }
    }

    /// As [`new`](Self::new), reading the certificate, key and trust
    /// anchors from PEM files.
    pub fn from_files(
        host: &str,
        port: u16,
        thing: &str,
        cert: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
        ca: impl AsRef<std::path::Path>,
    ) -> Result<Self, AgentError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| AgentError::Tls(format!("{}: {e}", p.display())))
        };
        Ok(Self::new(
            host,
            port,
            thing,
            &read(cert.as_ref())?,
            &read(key.as_ref())?,
            &read(ca.as_ref())?,
        ))
    }

    /// Signs with `key` instead of the PEM key: a key in a secure element,
    /// TPM or HSM. The certificate must be for that key.
    pub fn device_key(mut self, key: Arc<dyn DeviceKey>) -> Self {
        self.key = KeySource::Custom(key);
        self
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

    /// MQTT 5 (default) or 3.1.1.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The MQTT client id; default: the thing name (what AWS IoT policies
    /// expect).
    pub fn client_id(mut self, client_id: &str) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// Where the agent keeps what must survive a restart (the outbox).
    /// Without one, the outbox lives in memory only.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The outbox's size bound (bytes of topics and payloads; default
    /// 16 MiB) and what happens when it is full (default: drop the oldest
    /// telemetry; job updates and receipts are never dropped).
    pub fn outbox(mut self, max_bytes: usize, overflow: Overflow) -> Self {
        self.outbox_bytes = max_bytes;
        self.overflow = overflow;
        self
    }

    /// Telemetry goes to `{prefix}/{thing}/{channel}`; default `dt`.
    pub fn telemetry_prefix(mut self, prefix: &str) -> Self {
        self.telemetry_prefix = prefix.into();
        self
    }

    /// Installs signed releases: jobs whose document is a `fleet.ota`
    /// operation are run by the agent (manifest checked against the trust
    /// root, image fetched over the MQTT file stream into the slot that is
    /// not running, trial boot, self-test, confirm or roll back, signed
    /// receipt) instead of being handed to the application. Needs a
    /// [`state_dir`](Self::state_dir).
    pub fn ota(mut self, settings: OtaSettings) -> Self {
        self.ota = Some(settings);
        self
    }

    /// MQTT keep-alive (default 30 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    fn tls(&self) -> Result<rustls::ClientConfig, AgentError> {
        crate::tls::tls_config(&self.ca_pem, &self.cert_pem, &self.key)
    }

    /// Starts the agent: it connects, and reconnects, by itself. Messages
    /// left in the outbox by an earlier run are sent again.
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
        let outbox = match &self.state_dir {
            Some(dir) => Outbox::open(&dir.join("outbox"), self.outbox_bytes, self.overflow)
                .map_err(|e| AgentError::StateDir(e.to_string()))?,
            None => Outbox::in_memory(self.outbox_bytes, self.overflow),
        };
        let (client, eventloop) = mqtt::connect(
            self.protocol,
            mqtt::Options {
                client_id: self.client_id.clone().unwrap_or_else(|| self.thing.clone()),
                host: self.host.clone(),
                port: self.port,
                tls,
                keep_alive: self.keep_alive,
                // The broker limits messages to 128 KiB; accept all it sends.
                max_packet: 256 * 1024,
                capacity: 1024,
            },
        );
        let session = random_u64();
        let jobs = JobRunner::new(thing.clone(), self.jobs.clone(), session);
        let thing_name = thing.clone();
        let mut sync = ShadowSync::new(thing, &names, self.sync.clone(), session);
        let (commands, commands_rx) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(256);
        let epoch = Instant::now();
        // Shadow reports accepted before a restart and never confirmed are
        // reported again (a fresh request, same content).
        let mut report_seqs = HashMap::new();
        let mut engine_owned = HashSet::new();
        for e in outbox.pending() {
            if e.kind == MessageKind::ShadowReport
                && let Ok(Value::Object(reported)) = serde_json::from_slice(&e.payload)
            {
                let name = (!e.topic.is_empty())
                    .then(|| ShadowName::try_from(e.topic.clone()).ok())
                    .flatten();
                if let Ok(id) = sync.report(CoreInstant::from_millis(0), name.as_ref(), reported) {
                    report_seqs.insert(id, e.seq);
                    engine_owned.insert(e.seq);
                }
            }
        }
        let ota = match (&self.ota, &self.state_dir) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(AgentError::StateDir(
                    "over-the-air updates need a state directory".into(),
                ));
            }
            (Some(settings), Some(dir)) => {
                fleet_core::ota::TrustRoot::parse(&settings.trust_root)
                    .map_err(|e| AgentError::Tls(format!("trust root: {e}")))?;
                Some(OtaState {
                    settings: settings.clone(),
                    state_dir: dir.clone(),
                    run: None,
                })
            }
        };
        let pump = Pump {
            ota,
            thing: thing_name,
            client,
            sync,
            jobs,
            inbox: CommandInbox::new(256),
            telemetry_base: format!("{}/{}", self.telemetry_prefix, self.thing),
            job_waiters: HashMap::new(),
            pending_subacks: 0,
            commands: commands_rx,
            events: events_tx,
            waiters: HashMap::new(),
            epoch,
            backoff: self.backoff,
            rng: session | 1,
            outbox,
            handles: HashMap::new(),
            report_seqs,
            job_seqs: HashMap::new(),
            engine_owned,
            sent: VecDeque::new(),
            awaiting: HashMap::new(),
            cursor: 0,
            inflight: 0,
            connected: false,
            taken_over: 0,
            stopping: false,
        };
        let mut pump = pump;
        pump.ota_resume();
        let task = tokio::spawn(pump.run(eventloop));
        Ok(Agent {
            commands,
            events: tokio::sync::Mutex::new(events),
            task: std::sync::Mutex::new(Some(task)),
        })
    }
}

enum Command {
    PublishBatch {
        channel: String,
        payloads: Vec<Vec<u8>>,
        done: oneshot::Sender<Result<Vec<Delivery>, AgentError>>,
    },
    GetShadow {
        shadow: Option<String>,
        done: oneshot::Sender<Result<Option<ShadowSnapshot>, AgentError>>,
    },
    Publish {
        channel: String,
        payload: Vec<u8>,
        qos: Qos,
        done: oneshot::Sender<Result<Delivery, AgentError>>,
    },
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
///
/// Every method takes `&self`: share the agent (in an `Arc`) between a task
/// that reads its events and the tasks that publish, report and answer.
#[derive(Debug)]
pub struct Agent {
    commands: mpsc::Sender<Command>,
    events: tokio::sync::Mutex<mpsc::Receiver<AgentEvent>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Agent {
    /// Publishes telemetry to `channel` (topic
    /// `{telemetry_prefix}/{thing}/{channel}`). With [`Qos::AtLeastOnce`]
    /// the message is first written to the outbox (on disk with a state
    /// directory), so it survives an outage or a restart; the returned
    /// [`Delivery`] resolves when the broker acknowledged it. Fails at once
    /// with [`AgentError::Outbox`] when the outbox is full and its policy
    /// keeps what it holds.
    pub async fn publish(
        &self,
        channel: &str,
        payload: impl Into<Vec<u8>>,
        qos: Qos,
    ) -> Result<Delivery, AgentError> {
        if channel.is_empty() || channel.contains(['+', '#', '\0']) {
            return Err(AgentError::InvalidName(format!(
                "telemetry channel {channel:?}"
            )));
        }
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish {
                channel: channel.into(),
                payload: payload.into(),
                qos,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Publishes several telemetry messages to `channel` at QoS 1 with one
    /// write to the outbox (one flush to disk instead of one per message):
    /// all are queued, or none (the outbox is full). Each message is its
    /// own MQTT publish with its own [`Delivery`].
    pub async fn publish_batch(
        &self,
        channel: &str,
        payloads: Vec<Vec<u8>>,
    ) -> Result<Vec<Delivery>, AgentError> {
        if channel.is_empty() || channel.contains(['+', '#', '\0']) {
            return Err(AgentError::InvalidName(format!(
                "telemetry channel {channel:?}"
            )));
        }
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::PublishBatch {
                channel: channel.into(),
                payloads,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// The agent's copy of a shadow (`None`: classic): what it last read
    /// from the service, kept current by deltas and accepted updates.
    /// `None` until it was read (after connecting), or if it does not exist.
    pub async fn shadow(&self, shadow: Option<&str>) -> Result<Option<ShadowSnapshot>, AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::GetShadow {
                shadow: shadow.map(String::from),
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

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

    /// The next event; `None` once the agent has stopped. Events go to one
    /// reader: two tasks calling this at once get alternate events.
    pub async fn next_event(&self) -> Option<AgentEvent> {
        self.events.lock().await.recv().await
    }

    /// Stops the agent: sends what it can (for up to 5 s), disconnects.
    /// Every later call fails with [`AgentError::Stopped`].
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Stop).await;
        let task = self.task.lock().map(|mut t| t.take()).unwrap_or_default();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
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

/// Outbox messages handed to the MQTT client and not yet acknowledged, at
/// most.
const WINDOW: usize = 64;

/// Take-overs in a row before the agent reports a client-id conflict.
const CONFLICT_AFTER: u32 = 3;

/// A connection taken over sooner than this after it was made counts
/// toward a conflict.
const CONFLICT_WINDOW: Duration = Duration::from_secs(60);

/// An update in progress, and what the agent must remember of its job.
struct OtaRun {
    job_id: String,
    nonce: Vec<u8>,
    sequence: u64,
    update: fleet_core::ota::OtaUpdate,
    /// The image's blocks, from its MQTT stream.
    download: BlockDownload,
    /// The last block received, for the update's `Write`.
    last_block: Vec<u8>,
    /// Waiting for the reboot it asked for.
    paused: bool,
    /// The job's final report, sent once the jobs engine holds the job.
    report: Option<(JobStatus, BTreeMap<String, String>)>,
    /// The job's in-progress report is still to be sent.
    started: bool,
}

struct OtaState {
    settings: OtaSettings,
    state_dir: PathBuf,
    run: Option<OtaRun>,
}

struct Pump {
    ota: Option<OtaState>,
    /// The thing this agent is (topics are under `$aws`).
    thing: ThingName<'static>,
    client: Client,
    sync: ShadowSync,
    jobs: JobRunner,
    inbox: CommandInbox,
    /// `{telemetry_prefix}/{thing}`
    telemetry_base: String,
    job_waiters: HashMap<UpdateId, oneshot::Sender<Result<(), AgentError>>>,
    /// SUBACKs still expected for this connection's subscriptions.
    pending_subacks: usize,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<AgentEvent>,
    waiters: HashMap<RequestId, oneshot::Sender<Result<u64, AgentError>>>,
    epoch: Instant,
    backoff: Backoff,
    rng: u64,
    outbox: Outbox,
    /// Outbox sequence -> the application's handle.
    handles: HashMap<u64, oneshot::Sender<Result<(), AgentError>>>,
    /// Shadow reports and job updates of this run: the engines deliver them
    /// (with their own retries); the outbox keeps them for a restart.
    report_seqs: HashMap<RequestId, u64>,
    job_seqs: HashMap<UpdateId, u64>,
    engine_owned: HashSet<u64>,
    /// One tag per publish handed to the client, in order: the outbox
    /// sequence, or `None` for the engines' own messages. rumqttc reports
    /// each publish as it writes it, in the same order, with its packet id.
    sent: VecDeque<Option<u64>>,
    /// Packet id -> outbox sequence, awaiting PUBACK.
    awaiting: HashMap<u16, u64>,
    /// Outbox sequences below this were handed out on this connection.
    cursor: u64,
    inflight: usize,
    connected: bool,
    taken_over: u32,
    /// Stopping: events are no longer waited on.
    stopping: bool,
}

impl Pump {
    /// `$aws/commands/things/{thing}/executions/{id}/response/json`.
    fn command_response_topic(&self, execution: &str) -> Option<String> {
        let execution = JobId::new(execution).ok()?;
        Some(
            Topic::Command(CommandTopic {
                thing: self.thing.borrow(),
                execution,
                kind: CommandTopicKind::Response(Role::Request),
                format: Format::Json,
            })
            .to_string_under(&TopicPrefix::AWS),
        )
    }

    /// `$aws/things/{thing}/jobs/{job}/update`.
    fn job_update_topic(&self, job: &str) -> Option<String> {
        let job = JobId::new(job).ok()?;
        Some(
            Topic::Jobs(JobsTopic {
                thing: self.thing.borrow(),
                kind: JobsTopicKind::Update(job, Role::Request),
            })
            .to_string_under(&TopicPrefix::AWS),
        )
    }

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
        if self.stopping {
            // The application waits for the stop, not for events.
            let _ = self.events.try_send(event);
            return;
        }
        // A slow application back-pressures the pump, it is never dropped.
        let _ = self.events.send(event).await;
    }

    /// Hands an engine's message to the client (never waits).
    fn send_raw(&mut self, topic: &str, qos: u8, payload: Vec<u8>) -> Result<(), String> {
        self.client.try_publish(topic, qos, payload)?;
        self.sent.push_back(None);
        Ok(())
    }

    /// Hands outbox messages to the client, oldest first, up to the window.
    fn pump_outbox(&mut self) {
        if !self.connected {
            return;
        }
        let room = WINDOW.saturating_sub(self.inflight);
        let batch: Vec<(u64, String, Vec<u8>)> = self
            .outbox
            .pending()
            .filter(|e| e.seq >= self.cursor)
            .filter(|e| e.kind != MessageKind::ShadowReport && !self.engine_owned.contains(&e.seq))
            .take(room)
            .map(|e| (e.seq, e.topic.clone(), e.payload.clone()))
            .collect();
        for (seq, topic, payload) in batch {
            if self.client.try_publish(&topic, 1, payload).is_err() {
                return;
            }
            self.sent.push_back(Some(seq));
            self.inflight += 1;
            self.cursor = seq + 1;
        }
    }

    /// The message `seq` is done with: forget it, tell whoever waits.
    fn settle(&mut self, seq: u64, result: Result<(), AgentError>) {
        if let Err(e) = self.outbox.ack(seq) {
            tracing::warn!("outbox: {e}");
        }
        self.engine_owned.remove(&seq);
        if let Some(h) = self.handles.remove(&seq) {
            let _ = h.send(result);
        }
    }

    fn connection_lost(&mut self) {
        if self.connected {
            self.connected = false;
            let now = self.now();
            self.sync.handle_connection(now, false);
            self.jobs.handle_connection(now, false);
            self.ota_connection(now, false);
        }
        // rumqttc starts each connection clean: whatever was not
        // acknowledged goes again from the outbox.
        self.sent.clear();
        self.awaiting.clear();
        self.inflight = 0;
        self.cursor = 0;
    }

    async fn run(mut self, mut eventloop: mqtt::EventLoop) {
        let mut failures = 0u32;
        let mut connected_at = Instant::now();
        loop {
            let wake = [
                self.sync.poll_timeout(),
                self.jobs.poll_timeout(),
                self.ota_timeout(),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|t| self.epoch + Duration::from_millis(t.as_millis()));
            tokio::select! {
                polled = eventloop.poll() => match polled {
                    Ev::ConnAck => {
                        failures = 0;
                        self.connected = true;
                        connected_at = Instant::now();
                        let now = self.now();
                        self.pending_subacks = 0;
                        self.sync.handle_connection(now, true);
                        self.jobs.handle_connection(now, true);
                        let mut filters = Service::Commands.device_filters(&TopicPrefix::AWS, self.thing.as_str());
                        if self.ota.is_some() {
                            filters.extend(BlockDownload::subscriptions(&TopicPrefix::AWS, &self.thing, Format::Json));
                        }
                        match self.client.try_subscribe_many(filters) {
                            Ok(()) => self.pending_subacks += 1,
                            Err(e) => tracing::warn!("cannot subscribe to commands: {e}"),
                        }
                        self.pump_outbox();
                        self.emit(AgentEvent::Connected).await;
                    }
                    Ev::SubAck { ok } => {
                        if ok {
                            self.pending_subacks = self.pending_subacks.saturating_sub(1);
                            if self.pending_subacks == 0 {
                                let now = self.now();
                                self.sync.handle_subscribed(now);
                                self.jobs.handle_subscribed(now);
                                // A block asked for before the connection
                                // dropped is asked again, now that its
                                // answer can arrive.
                                self.ota_connection(now, true);
                            }
                        } else {
                            self.emit(AgentEvent::InvalidInput {
                                topic: String::new(),
                                reason: "the broker refused a subscription (check the ACL)".into(),
                            })
                            .await;
                        }
                    }
                    Ev::Publish { topic, payload } => {
                        let now = self.now();
                        let result = match Topic::parse(&TopicPrefix::AWS, &topic) {
                            Ok(Topic::Command(c)) => {
                                let execution = c.execution.into_owned();
                                self.handle_command(&topic, execution, &payload).await;
                                Ok(())
                            }
                            Ok(Topic::Stream(_)) => self.ota_handle_stream(now, &topic, &payload),
                            Ok(Topic::Jobs(_)) => self.jobs.handle_message(now, &topic, &payload).map_err(|e| e.to_string()),
                            Ok(Topic::Shadow(_)) => self.sync.handle_message(now, &topic, &payload).map_err(|e| e.to_string()),
                            Ok(_) => Err("not a topic this agent subscribes to".into()),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Err(reason) = result {
                            self.emit(AgentEvent::InvalidInput { topic, reason }).await;
                        }
                    }
                    Ev::OutgoingPublish(pkid) => {
                        if let Some(Some(seq)) = self.sent.pop_front() {
                            self.awaiting.insert(pkid, seq);
                        }
                    }
                    Ev::PubAck { pkid, refused } => {
                        if let Some(seq) = self.awaiting.remove(&pkid) {
                            self.inflight = self.inflight.saturating_sub(1);
                            // A refusal is final: sending it again would be
                            // refused again.
                            self.settle(seq, refused.map_or(Ok(()), |r| Err(AgentError::Refused(r))));
                            self.pump_outbox();
                        }
                    }
                    Ev::Other => {}
                    Ev::Error { reason, taken_over } => {
                        let was_connected = self.connected;
                        self.connection_lost();
                        if taken_over {
                            // A connection that lasted was taken over once,
                            // not in a fight over the client id.
                            if was_connected && connected_at.elapsed() > CONFLICT_WINDOW {
                                self.taken_over = 0;
                            }
                            self.taken_over += 1;
                            if self.taken_over >= CONFLICT_AFTER {
                                self.emit(AgentEvent::ClientIdConflict { times: self.taken_over }).await;
                            }
                        }
                        let r = self.random();
                        let delay = self.backoff.delay(failures, r);
                        failures = failures.saturating_add(1);
                        self.emit(AgentEvent::Disconnected { reason, retry_in: delay }).await;
                        tokio::time::sleep(delay).await;
                    }
                },
                command = self.commands.recv() => match command {
                    Some(Command::PublishBatch { channel, payloads, done }) => {
                        let topic = format!("{}/{channel}", self.telemetry_base);
                        let messages: Vec<(&str, &[u8])> = payloads.iter().map(|p| (topic.as_str(), p.as_slice())).collect();
                        let result = match self.outbox.push_many(MessageKind::Telemetry, &messages) {
                            Ok(seqs) => Ok(seqs
                                .into_iter()
                                .map(|seq| {
                                    let (tx, rx) = oneshot::channel();
                                    self.handles.insert(seq, tx);
                                    Delivery { seq, rx }
                                })
                                .collect()),
                            Err(e) => Err(AgentError::Outbox(e)),
                        };
                        self.pump_outbox();
                        let _ = done.send(result);
                    }
                    Some(Command::GetShadow { shadow, done }) => {
                        let result = match shadow.map(ShadowName::try_from).transpose() {
                            Ok(name) => Ok(self.sync.document(name.as_ref()).map(|(d, r, v)| ShadowSnapshot {
                                desired: d.clone(),
                                reported: r.clone(),
                                version: v,
                            })),
                            Err(e) => Err(AgentError::InvalidName(e.to_string())),
                        };
                        let _ = done.send(result);
                    }
                    Some(Command::Publish { channel, payload, qos, done }) => {
                        let topic = format!("{}/{channel}", self.telemetry_base);
                        let result = match qos {
                            Qos::AtMostOnce => {
                                let (tx, rx) = oneshot::channel();
                                let sent = if self.connected {
                                    self.send_raw(&topic, 0, payload).map_err(|_| AgentError::ClientBusy)
                                } else {
                                    Err(AgentError::NotConnected)
                                };
                                let _ = tx.send(sent);
                                Ok(Delivery { seq: 0, rx })
                            }
                            Qos::AtLeastOnce => match self.outbox.push(MessageKind::Telemetry, &topic, &payload) {
                                Ok(seq) => {
                                    let (tx, rx) = oneshot::channel();
                                    self.handles.insert(seq, tx);
                                    self.pump_outbox();
                                    Ok(Delivery { seq, rx })
                                }
                                Err(e) => Err(AgentError::Outbox(e)),
                            },
                        };
                        // Telemetry dropped by the overflow policy never
                        // arrives: tell its waiters.
                        let live: HashSet<u64> = self.outbox.pending().map(|e| e.seq).collect();
                        let dropped: Vec<u64> = self.handles.keys().copied().filter(|s| !live.contains(s)).collect();
                        for seq in dropped {
                            if let Some(h) = self.handles.remove(&seq) {
                                let _ = h.send(Err(AgentError::Dropped));
                            }
                        }
                        let _ = done.send(result);
                    }
                    Some(Command::Respond { execution_id, status, payload, done }) => {
                        let result = match self.inbox.respond(epoch_seconds(), &execution_id, status, payload) {
                            Ok(answer) => match self.command_response_topic(&execution_id) {
                                Some(topic) => self.send_raw(&topic, 1, answer).map_err(AgentError::Command),
                                None => Err(AgentError::Command(format!("invalid execution id {execution_id:?}"))),
                            },
                            Err(e) => Err(AgentError::Command(e.to_string())),
                        };
                        let _ = done.send(result);
                    }
                    Some(Command::UpdateJob { status, details, done }) => {
                        let now = self.now();
                        let job = self.jobs.current_job().map(String::from);
                        match self.jobs.update(now, status, details.clone()) {
                            Ok(id) => {
                                // Kept for a restart: sent then as a plain update.
                                if let Some(topic) = job.as_deref().and_then(|j| self.job_update_topic(j)) {
                                    let body = serde_json::json!({"status": status, "statusDetails": details.unwrap_or_default()});
                                    match self.outbox.push(MessageKind::JobUpdate, &topic, body.to_string().as_bytes()) {
                                        Ok(seq) => {
                                            self.engine_owned.insert(seq);
                                            self.job_seqs.insert(id, seq);
                                        }
                                        Err(e) => tracing::warn!("outbox: {e}"),
                                    }
                                }
                                self.job_waiters.insert(id, done);
                            }
                            Err(_) => {
                                let _ = done.send(Err(AgentError::NoCurrentJob));
                            }
                        }
                    }
                    Some(Command::Report { shadow, reported, done }) => {
                        let now = self.now();
                        let name = match shadow.clone().map(ShadowName::try_from).transpose() {
                            Ok(n) => n,
                            Err(e) => {
                                let _ = done.send(Err(AgentError::InvalidName(e.to_string())));
                                continue;
                            }
                        };
                        let intent = Value::Object(reported.clone()).to_string();
                        match self.sync.report(now, name.as_ref(), reported) {
                            Ok(id) => {
                                match self.outbox.push(MessageKind::ShadowReport, shadow.as_deref().unwrap_or(""), intent.as_bytes()) {
                                    Ok(seq) => {
                                        self.engine_owned.insert(seq);
                                        self.report_seqs.insert(id, seq);
                                    }
                                    Err(e) => tracing::warn!("outbox: {e}"),
                                }
                                self.waiters.insert(id, done);
                            }
                            Err(_) => {
                                let _ = done.send(Err(AgentError::UnknownShadow));
                            }
                        }
                    }
                    Some(Command::Stop) | None => {
                        self.flush(&mut eventloop).await;
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
                    self.ota_handle_timeout(now);
                }
            }
            self.drain().await;
            for event in self.ota_drive() {
                self.emit(event).await;
            }
        }
    }

    /// A clean stop: waits (a little) for what is in flight to be
    /// acknowledged, then disconnects. What is not acknowledged stays in
    /// the outbox for the next start.
    async fn flush(&mut self, eventloop: &mut mqtt::EventLoop) {
        self.stopping = true;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        // Outbox messages in flight, and job updates and shadow reports
        // waiting for the service's answer (each answer retires its copy in
        // the outbox; unanswered ones are sent again by the next start).
        while self.connected
            && (self.inflight > 0
                || !self.job_seqs.is_empty()
                || !self.report_seqs.is_empty()
                || self.ota_report_pending())
        {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ev::Publish { topic, payload }) => {
                    let now = self.now();
                    match Topic::parse(&TopicPrefix::AWS, &topic) {
                        Ok(Topic::Jobs(_)) => {
                            let _ = self.jobs.handle_message(now, &topic, &payload);
                        }
                        Ok(Topic::Shadow(_)) => {
                            let _ = self.sync.handle_message(now, &topic, &payload);
                        }
                        _ => {}
                    }
                    self.drain().await;
                    // An update's final report goes once the job is current.
                    let _ = self.ota_drive();
                    self.drain().await;
                }
                Ok(Ev::OutgoingPublish(pkid)) => {
                    if let Some(Some(seq)) = self.sent.pop_front() {
                        self.awaiting.insert(pkid, seq);
                    }
                }
                Ok(Ev::PubAck { pkid, refused }) => {
                    if let Some(seq) = self.awaiting.remove(&pkid) {
                        self.inflight = self.inflight.saturating_sub(1);
                        self.settle(seq, refused.map_or(Ok(()), |r| Err(AgentError::Refused(r))));
                    }
                }
                Ok(Ev::Error { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.client.try_disconnect();
        // Let the DISCONNECT go out.
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }

    async fn handle_command(&mut self, topic: &str, execution: JobId<'static>, payload: &[u8]) {
        match self.inbox.handle_request(epoch_seconds(), payload) {
            Ok(CommandDelivery::Run(r)) => {
                self.emit(AgentEvent::Command {
                    execution_id: r.execution_id,
                    command: r.command,
                    payload: r.payload,
                    deadline: r.deadline,
                })
                .await;
            }
            Ok(CommandDelivery::Duplicate {
                resend: Some(answer),
            }) => {
                if let Some(response) = self.command_response_topic(execution.as_str()) {
                    let _ = self.send_raw(&response, 1, answer);
                }
            }
            Ok(CommandDelivery::Duplicate { resend: None } | CommandDelivery::Expired) => {}
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
                    self.client.try_subscribe_many(filters)
                }
                Transmit::Publish { topic, payload, .. } => self.send_raw(&topic, 1, payload),
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
                    if self.ota.is_some()
                        && document.get("operation").and_then(Value::as_str)
                            == Some(fleet_core::jobs::OTA_OPERATION)
                    {
                        if let Some(e) = self.ota_job(&job_id, &document) {
                            self.emit(e).await;
                        }
                        continue;
                    }
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
                    if let Some(seq) = self.job_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
                    if let Some(w) = self.job_waiters.remove(&id) {
                        let _ = w.send(Ok(()));
                    }
                }
                JobEvent::UpdateFailed { id, code, .. } => {
                    if let Some(seq) = self.job_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
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
                    if let Some(seq) = self.report_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
                    if let Some(w) = self.waiters.remove(&id) {
                        let _ = w.send(Ok(version));
                    }
                }
                ShadowEvent::Failed { id, error, .. } => {
                    if let Some(seq) = self.report_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
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

/// The job an update belongs to, kept beside the slots' progress record so
/// that an update resumed after a restart still knows it.
const OTA_JOB_FILE: &str = "ota-job.json";

fn ota_config(settings: &OtaSettings) -> fleet_core::ota::OtaConfig {
    fleet_core::ota::OtaConfig {
        block_size: settings.block_size,
        ..fleet_core::ota::OtaConfig::default()
    }
}

/// The download of an update's image from its stream.
fn download(
    thing: &ThingName<'static>,
    stream: StreamId<'static>,
    job_id: &str,
    settings: &OtaSettings,
) -> BlockDownload {
    BlockDownload::new(
        &TopicPrefix::AWS,
        thing.clone(),
        stream,
        job_id,
        DownloadConfig {
            block_size: settings.block_size,
            ..DownloadConfig::default()
        },
    )
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Pump {
    /// After a start: an update the slots' record says is under way goes on.
    fn ota_resume(&mut self) {
        use base64::Engine as _;
        let Some(o) = self.ota.as_mut() else { return };
        let (record, booted) = {
            let slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
            (slots.load_record(), slots.booted())
        };
        let record = match record {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("cannot read the OTA record: {e}");
                return;
            }
        };
        let job: Option<Value> = std::fs::read(o.state_dir.join(OTA_JOB_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let fields = job.as_ref().and_then(|j| {
            Some((
                j["jobId"].as_str()?.to_string(),
                j["stream"].as_str()?.to_string(),
                b64().decode(j["nonce"].as_str()?).ok()?,
                j["sequence"].as_u64()?,
            ))
        });
        // An update that ended before the restart, its report not yet
        // handed to the jobs engine: send it now.
        let stored_report: Option<(JobStatus, BTreeMap<String, String>)> = job
            .as_ref()
            .and_then(|j| serde_json::from_value(j.get("report")?.clone()).ok());
        let resumed = fleet_core::ota::OtaUpdate::resume(
            &record,
            booted,
            CoreInstant::from_millis(0),
            ota_config(&o.settings),
        );
        let stream = fields
            .as_ref()
            .and_then(|f| StreamId::try_from(f.1.clone()).ok());
        match (fields, stream, resumed) {
            (Some((job_id, _, nonce, sequence)), Some(stream), Ok(update)) => {
                let download = download(&self.thing, stream, &job_id, &o.settings);
                o.run = Some(OtaRun {
                    job_id,
                    nonce,
                    sequence,
                    update,
                    download,
                    last_block: Vec::new(),
                    paused: false,
                    report: stored_report,
                    started: false,
                });
            }
            (_, _, result) => {
                // A record without its job (or a corrupt one): the running
                // image is what it is; forget the update.
                tracing::warn!(
                    "dropping an OTA record that cannot be resumed: {:?}",
                    result.err()
                );
                let mut slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
                let _ = slots.clear_record();
            }
        }
    }

    /// An update ended and its report has not been handed to the jobs
    /// engine yet.
    fn ota_report_pending(&self) -> bool {
        self.ota
            .as_ref()
            .and_then(|o| o.run.as_ref())
            .is_some_and(|r| r.report.is_some())
    }

    fn ota_timeout(&self) -> Option<CoreInstant> {
        let run = self.ota.as_ref()?.run.as_ref()?;
        [run.download.poll_timeout(), run.update.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    fn ota_handle_timeout(&mut self, now: CoreInstant) {
        let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) else {
            return;
        };
        if run.update.poll_timeout().is_some_and(|t| t <= now) {
            run.update.handle_timeout(now);
        }
        if run.download.poll_timeout().is_some_and(|t| t <= now) {
            run.download.handle_timeout(now);
        }
        self.ota_download_output(now);
    }

    /// The connection came up (subscribed) or went down.
    fn ota_connection(&mut self, now: CoreInstant, up: bool) {
        if let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) {
            run.download.handle_connection(now, up);
        }
        self.ota_download_output(now);
    }

    /// Sends what the download asks and takes what it hands back: a block
    /// goes to the update; a refusal or giving up ends the job FAILED.
    fn ota_download_output(&mut self, now: CoreInstant) {
        let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = run.download.poll_transmit() {
            if let Transmit::Publish { topic, payload, .. } = t {
                sends.push((topic, payload));
            }
        }
        let mut failed = None;
        while let Some(event) = run.download.poll_event() {
            match event {
                DownloadEvent::Block { offset, data } => {
                    match run.update.handle_block(now, offset, &data) {
                        Ok(()) => run.last_block = data,
                        Err(e) => failed = Some(format!("image: {e}")),
                    }
                }
                DownloadEvent::Rejected { code, message } => {
                    failed = Some(format!("stream: {code} {message}"));
                }
                DownloadEvent::GaveUp { offset, attempts } => {
                    failed = Some(format!(
                        "stream: no answer for the block at {offset} after {attempts} tries"
                    ));
                }
            }
        }
        if let Some(reason) = failed {
            run.download.cancel();
            let mut details = BTreeMap::new();
            details.insert("reason".to_string(), reason);
            run.report = Some((JobStatus::Failed, details));
            if let Some(o) = self.ota.as_ref() {
                let _ = o
                    .settings
                    .slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear_record();
            }
        }
        if self.connected {
            for (topic, payload) in sends {
                if let Err(e) = self.send_raw(&topic, 1, payload) {
                    tracing::warn!("cannot ask for a block: {e}");
                }
            }
        }
    }

    fn ota_handle_stream(
        &mut self,
        now: CoreInstant,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) else {
            return Err("no update is running".into());
        };
        let taken = run.download.handle_message(now, topic, payload);
        self.ota_download_output(now);
        match taken {
            Ok(true) => Ok(()),
            Ok(false) => Err("not the stream of the update under way".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A `fleet.ota` job arrived (or arrived again after a restart).
    fn ota_job(&mut self, job_id: &str, document: &Value) -> Option<AgentEvent> {
        use base64::Engine as _;
        use fleet_core::jobs::{ImageSource, JobDocument};
        let o = self.ota.as_mut()?;
        if o.run.as_ref().is_some_and(|r| r.job_id == job_id) {
            // Ours already: go on (the report waits for the job to be current).
            return None;
        }
        let refuse = |this: &mut Self, reason: String| {
            let mut details = BTreeMap::new();
            details.insert("reason".to_string(), reason.clone());
            let now = this.now();
            if let Ok(id) = this.jobs.update(now, JobStatus::Rejected, Some(details)) {
                let _ = id;
            }
            Some(AgentEvent::OtaRejected {
                job_id: job_id.into(),
                reason,
            })
        };
        let job = match JobDocument::parse(document) {
            Ok(JobDocument::Ota(job)) => job,
            Ok(JobDocument::Other(_)) => return None,
            Err(e) => return refuse(self, e.to_string()),
        };
        let ImageSource::Stream(stream) = &job.image else {
            return refuse(self, "only MQTT stream images are supported".into());
        };
        let Ok(stream_id) = StreamId::try_from(stream.clone()) else {
            return refuse(self, format!("invalid stream id {stream:?}"));
        };
        let (Ok(envelope), Ok(nonce)) = (job.manifest_bytes(), job.nonce_bytes()) else {
            return refuse(self, "manifest or nonce is not valid base64".into());
        };
        let o = self.ota.as_mut()?;
        let (booted, installed, capacity) = {
            let slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
            (slots.booted(), slots.installed_sequence(), slots.capacity())
        };
        let Ok(root) = fleet_core::ota::TrustRoot::parse(&o.settings.trust_root) else {
            return refuse(self, "the trust root is unusable".into());
        };
        let profile = fleet_core::ota::DeviceProfile {
            hardware_id: &o.settings.hardware_id,
            installed_sequence: installed,
            max_image_size: capacity,
            now: Some(epoch_seconds()),
        };
        let manifest = match root.verify_manifest(&envelope, &profile) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("manifest refused: {e}");
                return refuse(self, reason);
            }
        };
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&envelope).into()
        };
        let sidecar = serde_json::json!({
            "jobId": job_id,
            "stream": stream,
            "nonce": b64().encode(&nonce),
            "sequence": manifest.sequence,
        });
        if let Err(e) = std::fs::write(o.state_dir.join(OTA_JOB_FILE), sidecar.to_string()) {
            return refuse(self, format!("cannot store the job: {e}"));
        }
        let update = fleet_core::ota::OtaUpdate::start(
            &manifest,
            digest,
            installed,
            booted.other(),
            ota_config(&o.settings),
        );
        let mut download = download(&self.thing, stream_id, job_id, &o.settings);
        if self.connected {
            download.handle_connection(self.now(), true);
        }
        let o = self.ota.as_mut()?;
        o.run = Some(OtaRun {
            job_id: job_id.into(),
            nonce,
            sequence: manifest.sequence,
            update,
            download,
            last_block: Vec::new(),
            paused: false,
            report: None,
            started: true,
        });
        None
    }

    /// Carries out what the update asks, up to the next network round trip,
    /// and reports the job when it is over.
    fn ota_drive(&mut self) -> Vec<AgentEvent> {
        use fleet_core::ota::{
            InstallOutcome, InstallReceipt, MAX_RECEIPT_LEN, OtaAction, OtaEvent,
        };
        let mut events = Vec::new();
        let now = self.now();
        {
            let Some(o) = self.ota.as_mut() else {
                return events;
            };
            let Some(run) = o.run.as_mut() else {
                return events;
            };
            let slots = o.settings.slots.clone();
            while !run.paused && run.download.pending().is_none() && run.report.is_none() {
                let Some(action) = run.update.poll_action() else {
                    break;
                };
                let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                let io = match action {
                    OtaAction::Persist(record) => slots.save_record(&record.encode()),
                    OtaAction::Fetch { offset, len } => {
                        match run.download.fetch(now, offset, len) {
                            Ok(()) => break,
                            Err(e) => Err(std::io::Error::other(e)),
                        }
                    }
                    OtaAction::Write { slot, offset, .. } => {
                        slots.write(slot, offset, &run.last_block)
                    }
                    OtaAction::SetTrialBoot { slot } => slots.set_trial_boot(slot),
                    OtaAction::Reboot => {
                        let _ = slots.reboot();
                        run.paused = true;
                        events.push(AgentEvent::RebootRequired {
                            job_id: run.job_id.clone(),
                        });
                        break;
                    }
                    OtaAction::RunSelfTest => {
                        drop(slots);
                        let passed = (o.settings.self_test)();
                        let _ = run.update.handle_self_test(now, passed);
                        continue;
                    }
                    OtaAction::Confirm { slot } => slots.confirm(slot, run.sequence),
                };
                let result = io
                    .map_err(|e| e.to_string())
                    .and_then(|()| run.update.handle_done(now).map_err(|e| e.to_string()));
                if let Err(e) = result {
                    let mut details = BTreeMap::new();
                    details.insert("reason".to_string(), format!("slots: {e}"));
                    run.report = Some((JobStatus::Failed, details));
                    let _ = slots.clear_record();
                }
            }
            while let Some(event) = run.update.poll_event() {
                match event {
                    OtaEvent::Progress { received, total } => {
                        events.push(AgentEvent::OtaProgress {
                            job_id: run.job_id.clone(),
                            received,
                            total,
                        })
                    }
                    OtaEvent::Finished {
                        outcome,
                        installed_sequence,
                        manifest_digest,
                    } => {
                        let receipt = InstallReceipt {
                            manifest_digest,
                            outcome,
                            installed_sequence,
                            nonce: &run.nonce,
                        };
                        let key = ed25519_dalek::SigningKey::from_bytes(&o.settings.receipt_key);
                        let mut buf = [0u8; MAX_RECEIPT_LEN];
                        let mut details = BTreeMap::new();
                        use base64::Engine as _;
                        match receipt.sign(&key, &mut buf) {
                            Ok(n) => {
                                details.insert("receipt".to_string(), b64().encode(&buf[..n]));
                            }
                            Err(e) => {
                                details.insert("reason".to_string(), e.to_string());
                            }
                        }
                        let committed = outcome == InstallOutcome::Committed;
                        details.insert(
                            "outcome".to_string(),
                            if committed {
                                "committed"
                            } else {
                                "rolled-back"
                            }
                            .to_string(),
                        );
                        details.insert(
                            "installedSequence".to_string(),
                            installed_sequence.to_string(),
                        );
                        let status = if committed {
                            JobStatus::Succeeded
                        } else {
                            JobStatus::Failed
                        };
                        run.report = Some((status, details));
                        events.push(AgentEvent::OtaFinished {
                            job_id: run.job_id.clone(),
                            committed,
                        });
                    }
                    OtaEvent::Failed(e) => {
                        let mut details = BTreeMap::new();
                        details.insert("reason".to_string(), format!("image: {e}"));
                        run.report = Some((JobStatus::Failed, details));
                        events.push(AgentEvent::OtaFinished {
                            job_id: run.job_id.clone(),
                            committed: false,
                        });
                    }
                    OtaEvent::Staged => {}
                }
            }
        }
        self.ota_download_output(now);
        self.ota_persist_report();
        self.ota_report(now);
        events
    }

    /// Writes an ended update's report beside its job, so that a restart
    /// before the report reached the jobs engine still sends it.
    fn ota_persist_report(&mut self) {
        let Some(o) = self.ota.as_ref() else { return };
        let Some(run) = o.run.as_ref() else { return };
        let Some(report) = &run.report else { return };
        let path = o.state_dir.join(OTA_JOB_FILE);
        let Some(mut job) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            return;
        };
        if job.get("report").is_some() {
            return;
        }
        job["report"] = serde_json::json!(report);
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, job.to_string())
            .and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot keep the update's report: {e}");
        }
    }

    /// Sends the job's reports once the jobs engine holds the job.
    fn ota_report(&mut self, now: CoreInstant) {
        let Some(o) = self.ota.as_mut() else { return };
        let Some(run) = o.run.as_mut() else { return };
        if self.jobs.current_job() != Some(run.job_id.as_str()) {
            return;
        }
        let Some(topic) = Topic::Jobs(JobsTopic {
            thing: self.thing.borrow(),
            kind: JobsTopicKind::Update(
                match JobId::new(&run.job_id) {
                    Ok(id) => id,
                    Err(_) => return,
                },
                Role::Request,
            ),
        })
        .to_string_under(&TopicPrefix::AWS)
        .into() else {
            return;
        };
        let mut updates = Vec::new();
        if run.started {
            run.started = false;
            let mut details = BTreeMap::new();
            details.insert("phase".to_string(), "downloading".to_string());
            updates.push((JobStatus::InProgress, details));
        }
        let done = run.report.take();
        if let Some(report) = done.clone() {
            updates.push(report);
        }
        for (status, details) in updates {
            if let Ok(id) = self.jobs.update(now, status, Some(details.clone())) {
                let body = serde_json::json!({"status": status, "statusDetails": details});
                // Kept for a restart: the receipt must reach the service.
                let kind = if done.is_some() {
                    MessageKind::Receipt
                } else {
                    MessageKind::JobUpdate
                };
                if let Ok(seq) = self.outbox.push(kind, &topic, body.to_string().as_bytes()) {
                    self.engine_owned.insert(seq);
                    self.job_seqs.insert(id, seq);
                }
            }
        }
        if done.is_some() {
            let o = self.ota.as_mut();
            if let Some(o) = o {
                let _ = o
                    .settings
                    .slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear_record();
                let _ = std::fs::remove_file(o.state_dir.join(OTA_JOB_FILE));
                o.run = None;
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
