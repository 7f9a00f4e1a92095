//! The composition root: a whole fleet backend from one [`FleetConfig`].
//!
//! [`FleetServer::start`] opens the stores and the registry, starts the
//! embedded broker (or reaches an external one), puts the services in the
//! MQTT front-end's handler table, takes part in the leadership of the
//! instances sharing the store, and serves the management API. `fleet
//! serve`, the quickstart and `fleet-sim` all start the backend this way,
//! so what they run is what a user's program gets.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use fleet_cloud::pki::Pki;
//! use fleet_cloud::store::StoreLocation;
//! use fleet_cloud::{BackendIdentity, BrokerSetup, EmbeddedConfig, FleetConfig, FleetServer};
//!
//! let pki = Pki::new("example CA")?;
//! let server = pki.server_identity()?;
//! let backend = pki.client_identity(fleet_cloud::DEFAULT_BACKEND_IDENTITY)?;
//! let broker = EmbeddedConfig::new("127.0.0.1:8883".parse()?, &server.cert_pem, &server.key_pem, &pki.ca_pem());
//! let config = FleetConfig::new(
//!     StoreLocation::Sqlite("fleet.db".into()),
//!     BrokerSetup::Embedded(broker),
//!     BackendIdentity { client_id: "fleet-cloud".into(), cert_pem: backend.cert_pem, key_pem: backend.key_pem, ca_pem: pki.ca_pem() },
//! );
//! let fleet = FleetServer::start(config).await?;
//! println!("devices connect to {:?}", fleet.broker_addr());
//! fleet.shutdown().await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ApiConfig, ApiServices, HookFuture, RunningApi, serve_api};
use crate::pki::Pki;
use crate::store::{IndexConfig, StoreError, StoreLocation};
use crate::telemetry::TelemetryRouter;
use crate::{
    BrokerConfig, Clock, CommandCenter, ConnectivityRecorder, EmbeddedBroker, EmbeddedConfig,
    Inventory, JobsService, Leadership, ProvisioningService, ProvisioningTemplate, Publisher,
    Registry, RunningService, ServeOptions, Services, ShadowService, Stores, StreamService,
};

/// Where the backend's MQTT traffic goes.
#[derive(Debug)]
#[non_exhaustive]
// Made once per process and moved into the server: the size is no cost.
#[allow(clippy::large_enum_variant)]
pub enum BrokerSetup {
    /// Start the embedded broker with this configuration; it admits
    /// devices by the registry (its `directory` is set to it) and refuses
    /// the certificates the registry says are revoked.
    Embedded(EmbeddedConfig),
    /// Reach an external broker (Mosquitto with fleet's ACL, EMQX, ...).
    External {
        /// Host name, checked against the broker's certificate.
        host: String,
        /// Port.
        port: u16,
    },
}

/// How the backend authenticates to the broker (all PEM).
#[derive(Clone)]
pub struct BackendIdentity {
    /// Its MQTT client id; unique per instance.
    pub client_id: String,
    /// Its certificate chain.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The CA that signed the broker's certificate.
    pub ca_pem: String,
}

impl fmt::Debug for BackendIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendIdentity")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Provisioning by claim: the CA that signs devices' certificates and the
/// templates devices register with.
pub struct ProvisioningSetup {
    /// Signs the devices' certificates.
    pub ca: Pki,
    /// The templates served.
    pub templates: Vec<ProvisioningTemplate>,
}

impl fmt::Debug for ProvisioningSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningSetup")
            .field("templates", &self.templates)
            .finish_non_exhaustive()
    }
}

/// Called after the registry changed what a broker must know: a
/// certificate revoked, a thing created, enabled, disabled or deleted, a
/// device registered. (An external broker's ACL or roster is rewritten
/// here; the embedded broker is told by the server itself.)
pub type RegistryHook = Arc<dyn Fn() -> HookFuture + Send + Sync>;

/// Everything a fleet backend is made of.
#[non_exhaustive]
pub struct FleetConfig {
    /// Shadows, jobs and release streams (and, with PostgreSQL, the
    /// registry).
    pub store: StoreLocation,
    /// The registry's SQLite file when the store is not PostgreSQL
    /// (`None`: `registry.db` beside a SQLite store, in memory with a
    /// memory store).
    pub registry: Option<PathBuf>,
    /// PostgreSQL connections per instance.
    pub pool_size: usize,
    /// The topic prefix (`$aws`, the default, is what AWS's SDKs speak;
    /// jobs and provisioning are served under it only).
    pub prefix: String,
    /// The broker.
    pub broker: BrokerSetup,
    /// The backend's identity towards the broker.
    pub backend: BackendIdentity,
    /// Instances in the same group share the devices' requests (MQTT 5
    /// shared subscriptions); `None` for one instance.
    pub share_group: Option<String>,
    /// Requests buffered per service between the network and the workers.
    pub queue_capacity: usize,
    /// Provisioning by claim; `None`: not served.
    pub provisioning: Option<ProvisioningSetup>,
    /// Telemetry routing; `None`: telemetry is not subscribed to.
    pub telemetry: Option<TelemetryRouter>,
    /// The management API; `None`: not served.
    pub api: Option<ApiConfig>,
    /// The CA that issues claim identities through the API, and the
    /// identities it may issue.
    pub claim_ca: Option<Arc<Pki>>,
    /// The claim identities the broker admits.
    pub claim_identities: Vec<String>,
    /// See [`RegistryHook`].
    pub on_registry_changed: Option<RegistryHook>,
    /// This instance's name in the leadership of the instances sharing
    /// the store.
    pub instance: String,
    /// The time, for every service.
    pub clock: Clock,
    /// The embedded broker admits a device only if the registry binds its
    /// certificate to an enabled thing (the default); `false`: any
    /// certificate of the CA (a load tool's simulated devices).
    pub admit_by_registry: bool,
    /// Which shadow fields the fleet index keeps (every one by default).
    pub index: IndexConfig,
    /// How often the embedded broker reports a connected device's
    /// activity (`connectivity.lastSeen`); 10 s by default.
    pub seen_interval: Duration,
}

impl FleetConfig {
    /// A backend on `store` through `broker`, as `backend`; nothing else
    /// served (add provisioning, telemetry, the API by setting them).
    pub fn new(store: StoreLocation, broker: BrokerSetup, backend: BackendIdentity) -> Self {
        let instance = backend.client_id.clone();
        Self {
            store,
            registry: None,
            pool_size: 16,
            prefix: "$aws".into(),
            broker,
            backend,
            share_group: None,
            queue_capacity: 1024,
            provisioning: None,
            telemetry: None,
            api: None,
            claim_ca: None,
            claim_identities: Vec::new(),
            on_registry_changed: None,
            instance,
            clock: Clock::system(),
            admit_by_registry: true,
            index: IndexConfig::default(),
            seen_interval: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("store", &self.store)
            .field("prefix", &self.prefix)
            .field("broker", &self.broker)
            .field("backend", &self.backend)
            .field("share_group", &self.share_group)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// The backend could not start; the cause is the
/// [`source`](std::error::Error::source).
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// The store or the registry could not be opened.
    Store(StoreError),
    /// The registry could not be read.
    Registry(crate::RegistryError),
    /// The release streams could not be loaded.
    Streams(crate::StreamStoreError),
    /// The embedded broker did not start.
    Broker(crate::EmbeddedError),
    /// The front-end did not start (its TLS material).
    Frontend(crate::StartError),
    /// The management API did not start.
    Api(crate::api::ApiStartError),
    /// The configuration is inconsistent (a prefix that is not one).
    Config(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(_) => f.write_str("cannot open the store"),
            Self::Registry(_) => f.write_str("cannot read the registry"),
            Self::Streams(_) => f.write_str("cannot load the release streams"),
            Self::Broker(_) => f.write_str("the embedded broker did not start"),
            Self::Frontend(_) => f.write_str("cannot reach the broker"),
            Self::Api(_) => f.write_str("the management API did not start"),
            Self::Config(e) => write!(f, "configuration: {e}"),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            Self::Registry(e) => Some(e),
            Self::Streams(e) => Some(e),
            Self::Broker(e) => Some(e),
            Self::Frontend(e) => Some(e),
            Self::Api(e) => Some(e),
            Self::Config(_) => None,
        }
    }
}

/// A running fleet backend; stop it with [`shutdown`](Self::shutdown).
pub struct FleetServer {
    stores: Stores,
    inventory: Inventory,
    registry: Registry,
    shadows: ShadowService,
    jobs: JobsService,
    streams: StreamService,
    running: RunningService,
    embedded: Option<EmbeddedBroker>,
    api: Option<RunningApi>,
    leadership: Arc<dyn Leadership>,
}

impl fmt::Debug for FleetServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetServer")
            .field("broker", &self.broker_addr())
            .field("api", &self.api_addr())
            .finish_non_exhaustive()
    }
}

impl FleetServer {
    /// Starts everything `config` describes.
    pub async fn start(config: FleetConfig) -> Result<Self, ServerError> {
        fleet_core::TopicPrefix::new(&config.prefix)
            .map_err(|e| ServerError::Config(format!("prefix {:?}: {e}", config.prefix)))?;
        let stores =
            Stores::open_with_registry(&config.store, config.pool_size, config.registry.as_deref())
                .await
                .map_err(ServerError::Store)?;
        // The fleet index: built for what is indexed, its registry rows
        // repaired from the registry.
        let rebuilt = stores
            .index
            .configure(config.index.clone())
            .await
            .map_err(ServerError::Store)?;
        if rebuilt {
            tracing::info!("fleet index rebuilt for the indexed fields configured");
        }
        let registry = Registry::new(stores.registry.clone())
            .with_clock(config.clock.clone())
            .with_index(stores.index.clone());
        let indexed = registry.sync_index().await.map_err(ServerError::Registry)?;
        tracing::debug!(things = indexed, "fleet index holds the registry");
        let inventory = Inventory::new(stores.index.clone(), config.index.clone());

        // The broker: the embedded one asks the registry at each CONNECT.
        let (host, port, embedded) = match config.broker {
            BrokerSetup::Embedded(mut broker) => {
                if config.admit_by_registry {
                    broker.directory = Some(Arc::new(registry.clone()));
                }
                // Retained messages survive a restart, in the same store.
                if broker.retained_store.is_none() {
                    broker.retained_store = Some(stores.retained.clone());
                }
                // And persistent sessions.
                if broker.session_store.is_none() {
                    broker.session_store = Some(stores.sessions.clone());
                }
                // Devices recorded as connected were connected to a broker
                // that is gone; then each connection is recorded.
                let ended = stores
                    .index
                    .end_connections("SERVER_INITIATED_DISCONNECT")
                    .await
                    .map_err(ServerError::Store)?;
                if ended > 0 {
                    tracing::info!(
                        devices = ended,
                        "devices connected to the last broker recorded as disconnected"
                    );
                }
                if broker.presence.is_none() {
                    broker.presence =
                        Some(Arc::new(ConnectivityRecorder::start(stores.index.clone())));
                    broker.seen_interval = config.seen_interval;
                }
                let b = EmbeddedBroker::start(broker)
                    .await
                    .map_err(ServerError::Broker)?;
                b.revoke(
                    registry
                        .revoked_certificates()
                        .await
                        .map_err(ServerError::Registry)?,
                );
                ("localhost".to_string(), b.local_addr().port(), Some(b))
            }
            BrokerSetup::External { host, port } => (host, port, None),
        };
        // Another broker reports nothing: device agents tell their
        // presence (retained births and wills), and every request is
        // activity.
        let external_presence = embedded.is_none().then(|| crate::broker::ExternalPresence {
            recorder: ConnectivityRecorder::start(stores.index.clone()),
            index: stores.index.clone(),
            seen_interval: config.seen_interval,
        });
        let revoker = embedded.as_ref().map(EmbeddedBroker::revoker);
        let changed = config.on_registry_changed.clone();

        // The services, in the front-end's table.
        let prefix = config.prefix.as_str();
        let aws = prefix == "$aws";
        let bad_prefix = |e: &dyn fmt::Display| ServerError::Config(e.to_string());
        let shadows = ShadowService::shared(stores.shadows.clone())
            .with_prefix(prefix)
            .map_err(|e| bad_prefix(&e))?;
        let jobs = JobsService::shared(stores.jobs.clone())
            .with_clock(config.clock.clone())
            .with_registry(registry.clone());
        let streams = StreamService::load(stores.streams.clone())
            .await
            .map_err(ServerError::Streams)?
            .with_prefix(prefix)
            .map_err(|e| bad_prefix(&e))?;
        let mut services = Services::new().with(shadows.clone()).with(streams.clone());
        if external_presence.is_some() {
            services = services.with(crate::PresenceService::new(stores.index.clone()));
        }
        // Jobs (with rollouts and campaigns) and provisioning speak `$aws`.
        if aws {
            services = services.with(jobs.clone());
        }
        let templates = config
            .provisioning
            .as_ref()
            .map(|p| p.templates.clone())
            .unwrap_or_default();
        if let Some(p) = config.provisioning
            && aws
        {
            let mut service = ProvisioningService::new(p.ca, registry.clone(), p.templates);
            // The embedded broker admitting by the registry knows a device by
            // its certificate's binding, so the CSR's subject is free (as
            // with AWS IoT); another broker knows it by common name.
            service.subject_names_thing = !(embedded.is_some() && config.admit_by_registry);
            service.claim_identities = config.claim_identities.clone();
            if let Some(changed) = changed.clone() {
                service =
                    service.with_on_registered(Arc::new(move |_: &str, _: bool| -> HookFuture {
                        changed()
                    }));
            }
            services = services.with(service);
        }
        let leadership =
            stores.leadership("jobs-sweeper", &config.instance, Duration::from_secs(5));
        let running = crate::serve(
            BrokerConfig {
                host,
                port,
                client_id: config.backend.client_id,
                cert_pem: config.backend.cert_pem,
                key_pem: config.backend.key_pem,
                ca_pem: config.backend.ca_pem,
                share_group: config.share_group,
                queue_capacity: config.queue_capacity,
            },
            services,
            ServeOptions {
                telemetry: config.telemetry,
                leadership: Some(leadership.clone()),
                clock: config.clock,
                commands_prefix: prefix.to_string(),
                presence: external_presence,
            },
        )
        .map_err(ServerError::Frontend)?;

        let api = match config.api {
            None => None,
            Some(api) => {
                let on_revoke = (revoker.is_some() || changed.is_some()).then(|| {
                    let (revoker, changed) = (revoker.clone(), changed.clone());
                    Arc::new(move |id: &str| -> HookFuture {
                        if let Some(r) = &revoker {
                            r.revoke([id.to_string()]);
                        }
                        match &changed {
                            Some(c) => c(),
                            None => Box::pin(async {}),
                        }
                    }) as crate::api::RevocationHook
                });
                let on_standing_changed = (revoker.is_some() || changed.is_some()).then(|| {
                    let (revoker, changed) = (revoker.clone(), changed.clone());
                    Arc::new(move |thing: &str, allowed: bool| -> HookFuture {
                        if let Some(r) = &revoker
                            && !allowed
                        {
                            r.disconnect_identity(thing);
                        }
                        match &changed {
                            Some(c) => c(),
                            None => Box::pin(async {}),
                        }
                    }) as crate::api::ThingHook
                });
                let services = ApiServices {
                    registry: registry.clone(),
                    shadows: shadows.clone(),
                    jobs: jobs.clone(),
                    streams: streams.clone(),
                    commands: running.commands().clone(),
                    publisher: running.publisher(),
                    claim_ca: config.claim_ca,
                    claim_identities: config.claim_identities,
                    on_revoke,
                    on_standing_changed,
                    templates,
                    inventory: Some(inventory.clone()),
                    readiness: Some(crate::Readiness::new(
                        stores.clone(),
                        running.link(),
                        stores.pg().map(|_| leadership.clone()),
                    )),
                };
                Some(serve_api(api, services).await.map_err(ServerError::Api)?)
            }
        };
        Ok(Self {
            stores,
            inventory,
            registry,
            shadows,
            jobs,
            streams,
            running,
            embedded,
            api,
            leadership,
        })
    }

    /// The stores.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Search and aggregation over the fleet index; connectivity.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Things, groups, certificates, API tokens.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Shadows.
    pub fn shadows(&self) -> &ShadowService {
        &self.shadows
    }

    /// Jobs, rollouts and campaigns.
    pub fn jobs(&self) -> &JobsService {
        &self.jobs
    }

    /// Release images (MQTT streams).
    pub fn streams(&self) -> &StreamService {
        &self.streams
    }

    /// Commands to things.
    pub fn commands(&self) -> &CommandCenter {
        self.running.commands()
    }

    /// Publishes through the backend's connection (a job's notices, a
    /// shadow change from the application).
    pub fn publisher(&self) -> Publisher {
        self.running.publisher()
    }

    /// The state of the backend's connection to the broker.
    pub fn link(&self) -> crate::LinkState {
        self.running.link()
    }

    /// Where devices connect, with the embedded broker.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.embedded.as_ref().map(EmbeddedBroker::local_addr)
    }

    /// The embedded broker.
    pub fn broker(&self) -> Option<&EmbeddedBroker> {
        self.embedded.as_ref()
    }

    /// Where the management API listens.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(RunningApi::local_addr)
    }

    /// Stops: the API, the front-end, the lease (handed over at once, not
    /// when it runs out), then the embedded broker.
    pub async fn shutdown(self) {
        drop(self.api);
        self.running.shutdown().await;
        self.leadership.release().await;
        if let Some(b) = self.embedded {
            b.shutdown().await;
        }
    }
}
