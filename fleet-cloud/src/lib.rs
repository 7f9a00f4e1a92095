//! The fleet backend.
//!
//! ```
//! use fleet_cloud::{MemoryStore, ShadowService};
//! use fleet_core::shadow::UpdateRequest;
//! use fleet_core::ThingName;
//! use serde_json::json;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // An application backend sets desired state; the service says what to
//! // publish to the device (accepted, delta, documents).
//! let service = ShadowService::new(MemoryStore::new());
//! let thing = ThingName::new("pump-7")?;
//! let out = service.update(&thing, None, &UpdateRequest::desired(json!({"on": true})), 1_700_000_000).await?;
//! assert_eq!(out[1].topic, "$aws/things/pump-7/shadow/update/delta");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # What is here
//! - [`store`]: one storage trait with compare-and-set writes, an in-memory
//!   store for tests, SQLite as the durable embedded default (writes
//!   committed in groups), and [`PgStore`] (PostgreSQL) for several
//!   instances sharing one database, with [`PgLease`] so that one instance
//!   at a time sweeps timeouts and drives rollouts.
//! - [`ShadowService`]: the AWS IoT Device Shadow service over a store, the
//!   rules being fleet-core's, callable from Rust and from the broker.
//! - [`Registry`]: things with attributes, static and dynamic thing groups,
//!   certificates with status, management API tokens; in SQLite, or in
//!   PostgreSQL beside the store ([`Registry::postgres`]).
//! - [`ProvisioningService`]: fleet provisioning by claim (`create-from-csr`
//!   signed by the fleet CA, ownership tokens, templates, a pre-provisioning
//!   hook, `RegisterThing`), with replies only to the requester.
//! - [`BrokerPolicy`]: the broker's access rules for a fleet (devices
//!   confined to their own topics by certificate common name, backend
//!   identities, claim identities), written as a Mosquitto ACL.
//! - [`pki`]: a development CA with server, device, backend and claim
//!   certificates (rcgen).
//! - [`EmbeddedBroker`]: an MQTT 3.1.1 and 5 broker for one machine, mutual
//!   TLS only, enforcing the same [`BrokerPolicy`] in-process, revoking
//!   single certificates; the default of `fleet serve`.
//! - [`service`]: the boundary every transport uses: a typed [`Request`]
//!   (the topic parsed by `fleet_core::topic`, the payload, the [`Caller`]
//!   as the transport authenticated it) handed to a [`Handler`] found in
//!   the [`Services`] table.
//! - [`serve`]: the MQTT front-end: the services as a privileged MQTT 5
//!   backend client with mutual TLS and shared subscriptions, so several
//!   instances split the load.
//! - [`FleetServer`]: the whole backend from one [`FleetConfig`] (stores,
//!   registry, broker, services, leadership, API): what `fleet serve`
//!   runs.
//!
//! - [`JobsService`]: AWS IoT Jobs over MQTT backed by the store (things
//!   and groups, snapshot or continuous, cancel, timeouts swept by the
//!   service, retries), rollouts driven by fleet-core's planner with every
//!   decision persisted, and OTA campaigns ([`CampaignSpec`]) whose install
//!   receipts are verified against each device's registered key
//!   ([`CampaignStatus`], `watch_campaign`, `watch_job`).
//! - [`StreamService`]: MQTT file streams (describe, get blocks; JSON and
//!   CBOR), how OTA images reach devices; kept in SQLite or PostgreSQL.
//! - [`CommandCenter`]: send a command to a thing and await its answer,
//!   with a timeout.
//! - [`telemetry`]: rules route device telemetry to sinks (JSON lines,
//!   SQLite); a failing sink is retried, then dead-lettered.
//! - [`api`]: the management HTTP API (HTTPS, bearer tokens with scopes,
//!   typed errors, paged lists, an OpenAPI document from the same
//!   declarations as the routes).
//! - The `fleet` binary: `fleet serve` (the embedded broker or an external
//!   one, SQLite or PostgreSQL, the management API) and the operator
//!   commands that call the API.
//!
//! # Scale-out
//! Several `fleet serve` instances share one PostgreSQL (shadows, jobs,
//! rollouts, the registry, API tokens, release images) and the devices'
//! requests (MQTT 5 shared subscriptions): every change is a
//! compare-and-set, and one instance at a time ([`PgLease`]) sweeps
//! timeouts and drives rollouts, another taking over when it dies. A
//! shadow or job update retried with the same client token (its answer lost
//! with the instance that applied it) is answered again by any instance,
//! not applied twice. Connections to PostgreSQL may use TLS
//! ([`PgStore::connect`]).
//!
//! Provisioning by claim keeps its ownership tokens in the registry, so a
//! device's registration may reach another instance than its certificate
//! request. A command's waiter lives in the instance that sent it (its
//! answer comes back there, on that instance's own topic).

#![forbid(unsafe_code)]

pub mod api;
mod broker;
mod campaigns;
mod clock;
mod commands;
mod embedded;
pub mod health;
mod inventory;
mod jobs;
pub mod metrics;
mod model;
mod outgoing;
pub mod pki;
mod policy;
mod provisioning;
pub mod query;
mod registry;
mod server;
pub mod service;
mod shadows;
pub mod store;
mod streams;
pub mod telemetry;
pub mod template;
#[doc(hidden)]
pub mod tls;

pub use broker::{
    BrokerConfig, ExternalPresence, LinkState, PublishError, Publisher, RunningService,
    ServeOptions, StartError, error_chain, serve, serve_shadows,
};
pub use campaigns::{CampaignSpec, CampaignStatus, RECEIPT_KEY_ATTRIBUTE};
pub use clock::Clock;
pub use commands::{CommandCenter, CommandFailure};
/// The embedded broker's session logic without sockets, for the fuzz
/// target (feature `fuzzing`; not a stable API).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use embedded::fuzzing;
pub use embedded::{
    ClientLimits, Directory, DirectoryError, EmbeddedBroker, EmbeddedConfig, EmbeddedError,
    PROVISIONED_UNIT, PresenceSink, Revoker, Standing, StandingFuture, certificate_fingerprint,
    is_provisioned,
};
pub use health::{Readiness, Report};
pub use inventory::{ConnectivityRecorder, Inventory, InventoryError, PresenceService};
pub use jobs::{ExecutionSummary, JobSnapshot, JobsError, JobsService, RolloutAction};
pub use model::{
    AttributeQuery, AuditEntry, CertificateRecord, CertificateStatus, Connectivity,
    ConnectivityEvent, GroupQuery, JobRecord, JobSpec, JobState, PendingCertificate, RolloutState,
    Scope, Spent, StoredHook, StoredTemplate, StoredToken, TargetSelection, Thing, TokenRecord,
};
pub use outgoing::Outgoing;
pub use policy::{
    Access, BrokerPolicy, CompiledPolicy, DEFAULT_BACKEND_IDENTITY, MosquittoListener,
    MosquittoPlugin, PolicyError,
};
pub use provisioning::{
    MAX_HOOK_TIMEOUT_MS, PreProvisioningHook, ProvisioningError, ProvisioningService,
    ProvisioningTemplate, Webhook,
};
pub use registry::{Registry, RegistryError};
pub use server::{
    BackendIdentity, BrokerSetup, FleetConfig, FleetServer, ProvisioningSetup, RegistryHook,
    ServerError,
};
pub use service::{Caller, Handler, Request, Services};
pub use shadows::{ServiceError, ShadowService};
pub use store::{
    JobStore, Leadership, MemoryStore, PgLease, PgStore, RegistryStore, RetainedMessage,
    RetainedStore, SessionStore, ShadowKey, ShadowStore, SoleInstance, SqliteRegistry, SqliteStore,
    StoreError, Stores, StreamStore, Versioned,
};
pub use streams::{StreamService, StreamStoreError};
