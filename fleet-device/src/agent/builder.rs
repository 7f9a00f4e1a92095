//! [`AgentBuilder`]: the configuration, checked, and the pump started.

use super::pump::{OtaState, random_u64};
use super::*;

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
    inventory: Option<super::types::Inventory>,
    presence: bool,
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
            inventory: None,
            presence: false,
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

    /// Reports what the device runs ([`Inventory`](super::types::Inventory):
    /// hardware id, component versions) with the agent's version and
    /// protocol, to the named shadow `fleet-inventory`, at each connection
    /// and after an update is installed; the fleet index keeps it as
    /// `inventory.*`. Off by default.
    pub fn inventory(mut self, inventory: super::types::Inventory) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// Tells the backend who is connected through a broker that reports no
    /// lifecycle events (Mosquitto, most MQTT brokers): a retained birth on
    /// `fleet/things/{thing}/presence` at each connection, a retained last
    /// will there (`CONNECTION_LOST`) that the broker publishes when the
    /// connection ends without a DISCONNECT, and a retained goodbye
    /// (`CLIENT_INITIATED_DISCONNECT`) before a clean stop
    /// ([`fleet_core::presence`]). Off by default: AWS IoT Core and fleet's
    /// embedded broker publish lifecycle events themselves.
    pub fn presence(mut self, on: bool) -> Self {
        self.presence = on;
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
        let session = random_u64();
        let client_id = self.client_id.clone().unwrap_or_else(|| self.thing.clone());
        let presence = self.presence.then(|| super::pump::PresenceState {
            topic: fleet_core::presence::topic(&thing),
            client_id: client_id.clone(),
            session: format!("{session:016x}"),
        });
        let will = presence.as_ref().map(|p| {
            let will = fleet_core::presence::PresenceEvent::will(
                &p.client_id,
                &p.session,
                super::pump::epoch_millis(),
            );
            (p.topic.clone(), will.to_json().into_bytes())
        });
        let (client, eventloop) = mqtt::connect(
            self.protocol,
            mqtt::Options {
                client_id,
                host: self.host.clone(),
                port: self.port,
                tls,
                keep_alive: self.keep_alive,
                // The broker limits messages to 128 KiB; accept all it sends.
                max_packet: 256 * 1024,
                capacity: 1024,
                will,
            },
        );
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
                if let crate::ota::ReceiptKey::Device(key) = &settings.receipt_key
                    && key.algorithm() != crate::KeyAlgorithm::Ed25519
                {
                    return Err(AgentError::Tls(
                        "the receipt key must be an Ed25519 key".into(),
                    ));
                }
                Some(OtaState {
                    settings: settings.clone(),
                    state_dir: dir.clone(),
                    run: None,
                    installed: None,
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
            inventory: self.inventory.map(|i| (i, self.protocol)),
            presence,
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
