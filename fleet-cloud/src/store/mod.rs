//! The storage layer: what the services keep, behind one set of traits,
//! each implemented in memory, in SQLite and in PostgreSQL.
//!
//! | trait | keeps |
//! |---|---|
//! | [`ShadowStore`] | device shadows (classic and named) |
//! | [`JobStore`] | jobs and each thing's executions |
//! | [`StreamStore`] | file streams (OTA release images) |
//! | [`RegistryStore`] | things, groups, certificates, API tokens, ownership tokens |
//! | [`RetainedStore`] | the embedded broker's retained messages |
//! | [`SessionStore`] | the embedded broker's persistent sessions |
//! | [`IndexStore`] | the fleet index: each thing's searchable fields, its connectivity |
//! | [`Leadership`] | which instance drives rollouts and sweeps timeouts |
//!
//! The backends are one module each: [`MemoryStore`] (tests, simulations,
//! `--store memory`), [`SqliteStore`] (one file, the embedded default) and
//! [`PgStore`] (several `fleet serve` instances on one database). Each
//! migrates its own schema through one mechanism (versioned migrations,
//! `PRAGMA user_version` for SQLite, a `fleet_schema` table for
//! PostgreSQL); every SQLite database is opened by one function with the
//! same pragmas. [`Stores`] opens all of them from a [`StoreLocation`], and
//! the services hold them as `Arc<dyn ...>`, so no service is generic over
//! its store. One conformance suite (`tests/stores.rs`) runs every scenario
//! on all three.
//!
//! Every write is a compare-and-set on a store revision that grows with each
//! write of a record, so several service instances sharing a store need no
//! other coordination: a write based on a stale read fails with
//! [`StoreError::Conflict`] and the service reads again. The revision is the
//! store's, not the shadow's version: a delete keeps a shadow's version but
//! still moves the revision, so it cannot be overwritten by an update that
//! was computed before it.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use fleet_cloud::store::{ShadowKey, Stores};
//! let stores = Stores::memory();
//! let key = ShadowKey { thing: "pump-7".into(), shadow: None };
//! let read = stores.shadows.load(&key).await?;
//! assert_eq!(read.revision, 0);
//! let doc = read.value.update(br#"{"state":{"reported":{"on":true}}}"#, 1, &Default::default())
//!     .expect("a valid update").shadow;
//! assert_eq!(stores.shadows.save(&key, 0, &doc).await?, 1);
//! assert!(stores.shadows.save(&key, 0, &doc).await.is_err(), "a stale write loses");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use fleet_core::jobs::ThingJobs;
use fleet_core::shadow::Shadow;

use crate::model::{
    AuditEntry, CertificateRecord, GroupQuery, JobRecord, PendingCertificate, Spent,
    StoredTemplate, StoredToken, Thing,
};
use fleet_core::admission::Roster;

pub mod index;
mod location;
mod memory;
mod postgres;
mod sql;
mod sqlite;

pub use index::{IndexConfig, IndexStore, NumericStats};
pub use location::{StoreLocation, StoreLocationError};
pub use memory::MemoryStore;
pub use postgres::{PgLease, PgStore};
pub use sqlite::{SqliteRegistry, SqliteStore};

/// Which shadow: a thing and a shadow name (`None`: the classic shadow).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShadowKey {
    /// The thing.
    pub thing: String,
    /// The named shadow, or `None` for the classic one.
    pub shadow: Option<String>,
}

impl ShadowKey {
    fn name_column(&self) -> &str {
        // Shadow names are never empty, so "" can stand for the classic one.
        self.shadow.as_deref().unwrap_or("")
    }
}

/// A value and the store revision it was read at (0: never written).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// The revision, for the next [`ShadowStore::save`].
    pub revision: u64,
}

/// A store operation failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// The record changed since it was read; read again and retry.
    Conflict,
    /// The record in the store cannot be decoded.
    Corrupt(String),
    /// A record with that key exists (a thing, group, certificate or
    /// token); names it.
    AlreadyExists(String),
    /// A record the write refers to does not exist; names it.
    NotFound(String),
    /// The store itself failed (I/O, SQLite, PostgreSQL); the cause is
    /// the [`source`](std::error::Error::source). Shared, because one
    /// failed group commit fails every write in it.
    Backend(Arc<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// A store failure caused by `cause` (an error, or a message).
    pub fn backend(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(Arc::from(cause.into()))
    }
}

/// What was being done when a cause failed: "PostgreSQL URL" and the
/// parser's error, kept as the source.
#[derive(Debug)]
pub(crate) struct Context {
    what: String,
    cause: Box<dyn std::error::Error + Send + Sync>,
}

impl Context {
    /// A store failure: `cause`, while doing `what`.
    pub(crate) fn store(
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Backend(Arc::new(Self {
            what: what.into(),
            cause: cause.into(),
        }))
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.cause)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conflict => f.write_str("the record changed since it was read"),
            Self::Corrupt(e) => write!(f, "stored record cannot be decoded: {e}"),
            Self::AlreadyExists(what) => write!(f, "{what} already exists"),
            Self::NotFound(what) => write!(f, "{what} not found"),
            Self::Backend(e) => write!(f, "store failure: {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Where shadows are kept. Implementations must make [`save`](Self::save)
/// atomic and durable once it returns `Ok`.
#[async_trait]
pub trait ShadowStore: Send + Sync + fmt::Debug + 'static {
    /// The shadow (a never-written one is `Shadow::new()` at revision 0).
    async fn load(&self, key: &ShadowKey) -> Result<Versioned<Shadow>, StoreError>;

    /// Writes `shadow` if the record is still at `expected_revision`;
    /// returns the new revision.
    async fn save(
        &self,
        key: &ShadowKey,
        expected_revision: u64,
        shadow: &Shadow,
    ) -> Result<u64, StoreError>;
}

/// Where jobs and executions are kept. Writes are compare-and-set on a
/// revision, atomic and durable once they return `Ok`.
#[async_trait]
pub trait JobStore: Send + Sync + fmt::Debug + 'static {
    /// A job and its revision (`None`: no such job).
    async fn load_job(&self, job_id: &str) -> Result<Option<Versioned<JobRecord>>, StoreError>;
    /// Writes a job if it is still at `expected` (0: new).
    async fn save_job(&self, record: &JobRecord, expected: u64) -> Result<u64, StoreError>;
    /// Every job id, sorted.
    async fn job_ids(&self) -> Result<Vec<String>, StoreError>;
    /// Removes a job if it is still at `expected`.
    async fn delete_job(&self, job_id: &str, expected: u64) -> Result<(), StoreError>;
    /// A thing's executions (a thing without any: empty, revision 0).
    async fn load_thing(&self, thing: &str) -> Result<Versioned<ThingJobs>, StoreError>;
    /// Writes a thing's executions if still at `expected`.
    async fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> Result<u64, StoreError>;
    /// Things with a timer due at or before `now`, sorted.
    async fn due_things(&self, now: u64) -> Result<Vec<String>, StoreError>;
}

/// A stream as a list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: u32,
    /// What the stream is.
    pub description: String,
    /// Bytes of file 0 (a release's image).
    pub size: u64,
}

/// A file stream as stored: its version, description and files in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStream {
    /// Raised by each replacement (1 for a new stream).
    pub version: u32,
    /// What the stream is.
    pub description: String,
    /// The files, file id = index.
    pub files: Vec<Vec<u8>>,
}

/// Where file streams (OTA release images) are kept.
#[async_trait]
pub trait StreamStore: Send + Sync + fmt::Debug + 'static {
    /// Every stream, or only the one named, sorted by id.
    async fn load_streams(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, StoredStream)>, StoreError>;
    /// Streams by id after `after` (`""`: from the start), `limit` at
    /// most, without their files: id, version, description and the size of
    /// file 0 (a release's image).
    async fn list_streams(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, StoreError>;
    /// The stored version of stream `id` (`None`: no such stream).
    async fn stream_version(&self, id: &str) -> Result<Option<u32>, StoreError>;
    /// Replaces stream `id` atomically (one writer at a time per stream);
    /// returns its new version, one more than the last.
    async fn save_stream(
        &self,
        id: &str,
        description: &str,
        files: &[Vec<u8>],
    ) -> Result<u32, StoreError>;
    /// Forgets stream `id` (nothing happens for an unknown one).
    async fn delete_stream(&self, id: &str) -> Result<(), StoreError>;
    /// Whether other instances write to this store too (then a service
    /// checks the stored version before serving its copy).
    fn is_shared(&self) -> bool {
        false
    }
}

/// Where the registry is kept: things, groups, certificates, API tokens
/// and provisioning's ownership tokens. The registry service
/// ([`Registry`](crate::Registry)) validates; a store keeps, and reports
/// what its keys and references forbid ([`StoreError::AlreadyExists`],
/// [`StoreError::NotFound`]). Lists are sorted by their key.
#[async_trait]
pub trait RegistryStore: Send + Sync + fmt::Debug + 'static {
    /// Adds a token (`AlreadyExists` for a taken id).
    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError>;
    /// The token with this id.
    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError>;
    /// Every token.
    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError>;
    /// Forgets a token; whether there was one.
    async fn delete_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Adds a thing (`AlreadyExists` for a taken name).
    async fn insert_thing(&self, thing: &Thing) -> Result<(), StoreError>;
    /// The thing with this name.
    async fn thing(&self, name: &str) -> Result<Option<Thing>, StoreError>;
    /// Up to `limit` things named after `after`, in name order.
    async fn things(&self, after: &str, limit: usize) -> Result<Vec<Thing>, StoreError>;
    /// Replaces a thing's attributes; whether there was such a thing.
    async fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<bool, StoreError>;
    /// Enables or disables a thing; whether there was such a thing.
    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError>;
    /// Forgets a thing with its group memberships and certificates;
    /// whether there was one.
    async fn delete_thing(&self, name: &str) -> Result<bool, StoreError>;

    /// Adds a group, static (`None`) or dynamic (`AlreadyExists` for a
    /// taken name).
    async fn insert_group(&self, name: &str, query: Option<&GroupQuery>) -> Result<(), StoreError>;
    /// A group's query: `None` for no such group, `Some(None)` for a
    /// static one.
    async fn group(&self, name: &str) -> Result<Option<Option<GroupQuery>>, StoreError>;
    /// Adds a thing to a static group (again: nothing happens);
    /// `NotFound` for an unknown thing or group.
    async fn add_member(&self, group: &str, thing: &str) -> Result<(), StoreError>;
    /// A static group's members.
    async fn members(&self, group: &str) -> Result<Vec<String>, StoreError>;

    /// Binds a certificate to its thing (`AlreadyExists` for a taken id,
    /// `NotFound` for an unknown thing).
    async fn insert_certificate(&self, certificate: &CertificateRecord) -> Result<(), StoreError>;
    /// Marks a certificate revoked; whether there was one.
    async fn revoke_certificate(&self, id: &str) -> Result<bool, StoreError>;
    /// The certificate with this id.
    async fn certificate(&self, id: &str) -> Result<Option<CertificateRecord>, StoreError>;
    /// A thing's certificates.
    async fn certificates_of(&self, thing: &str) -> Result<Vec<CertificateRecord>, StoreError>;
    /// The ids of every revoked certificate.
    async fn revoked_certificates(&self) -> Result<Vec<String>, StoreError>;
    /// Things that are disabled, or have certificates and none active.
    async fn denied_identities(&self) -> Result<Vec<String>, StoreError>;
    /// Every thing and certificate with its standing (a broker's copy of
    /// the registry).
    async fn roster(&self) -> Result<Roster, StoreError>;

    /// Keeps `pending` under ownership token `token`, unless `max` tokens
    /// already wait (then `false`); used and expired (at `now`) ones are
    /// forgotten first. `AlreadyExists` for a taken token.
    async fn add_pending(
        &self,
        token: &str,
        pending: &PendingCertificate,
        now: u64,
        max: usize,
    ) -> Result<bool, StoreError>;
    /// The certificate waiting under an unused, unexpired `token`.
    async fn pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Option<PendingCertificate>, StoreError>;
    /// Spends `token` at `now`, atomically: two instances racing on one
    /// token cannot both spend it.
    async fn spend_pending(&self, token: &str, now: u64) -> Result<Spent, StoreError>;

    /// Groups by name after `after` (`""` from the start), `limit` at most:
    /// each with its query (`None`: a static group).
    async fn groups(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Option<GroupQuery>)>, StoreError>;

    /// Appends `entry` to the audit log (its `id` is ignored); returns the
    /// id it was given, greater than every earlier one.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError>;

    /// The audit log's entries with an id greater than `after`, oldest
    /// first, `limit` at most.
    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Creates or replaces the provisioning template `template.name`.
    async fn put_template(&self, template: &StoredTemplate) -> Result<(), StoreError>;
    /// The provisioning template with this name.
    async fn template(&self, name: &str) -> Result<Option<StoredTemplate>, StoreError>;
    /// Every stored provisioning template, by name.
    async fn templates(&self) -> Result<Vec<StoredTemplate>, StoreError>;
    /// Forgets a provisioning template; whether there was one.
    async fn delete_template(&self, name: &str) -> Result<bool, StoreError>;
}

/// A retained message as the embedded broker keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    /// Its topic (one retained message per topic).
    pub topic: String,
    /// Its payload (never empty: an empty payload deletes).
    pub payload: Vec<u8>,
    /// The QoS it was published with (0 or 1).
    pub qos: u8,
    /// Its MQTT 5 properties, in the broker's own encoding (empty: none).
    pub properties: Vec<u8>,
    /// The identity that published it (its retained quota).
    pub owner: String,
}

/// Where the embedded broker keeps retained messages, so that they survive
/// a restart. A write is durable once it returns `Ok`; the broker sends
/// them one at a time, in the order it applied them.
#[async_trait]
pub trait RetainedStore: Send + Sync + fmt::Debug + 'static {
    /// Every retained message, sorted by topic.
    async fn load_retained(&self) -> Result<Vec<RetainedMessage>, StoreError>;
    /// Keeps `message` on its topic, replacing what was there.
    async fn put_retained(&self, message: &RetainedMessage) -> Result<(), StoreError>;
    /// Forgets the retained message on `topic` (none there: nothing).
    async fn delete_retained(&self, topic: &str) -> Result<(), StoreError>;
}

/// Where the embedded broker keeps persistent sessions (a client's
/// subscriptions, and the QoS 1 messages waiting for it while it is away),
/// so that they survive a restart. Each session is one record, in the
/// broker's own encoding, rewritten whole on each change (a session holds
/// a bounded few messages); the broker sends the changes one at a time, in
/// the order it made them.
#[async_trait]
pub trait SessionStore: Send + Sync + fmt::Debug + 'static {
    /// Every session: client id and record, sorted by client id.
    async fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Keeps `record` as `client_id`'s session, replacing what was there.
    async fn put_session(&self, client_id: &str, record: &[u8]) -> Result<(), StoreError>;
    /// Forgets `client_id`'s session (none: nothing).
    async fn delete_session(&self, client_id: &str) -> Result<(), StoreError>;
}

/// Decides which of several instances sharing a store may do what only one
/// should do at a time (drive rollouts, sweep timeouts).
pub trait Leadership: Send + Sync + fmt::Debug + 'static {
    /// Whether this instance may act now; `false` on any doubt (the store
    /// unreachable, say).
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>;

    /// Gives leadership up at once (a clean shutdown), so that another
    /// instance need not wait for it to lapse; nothing by default.
    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
}

/// The leadership of a store only one instance uses (memory, a SQLite
/// file): always the leader.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoleInstance;

impl Leadership for SoleInstance {
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(std::future::ready(true))
    }
}

/// Every store the services keep, opened from one location: what a
/// composition root hands to the services.
#[derive(Debug, Clone)]
pub struct Stores {
    /// Device shadows.
    pub shadows: Arc<dyn ShadowStore>,
    /// Jobs and executions.
    pub jobs: Arc<dyn JobStore>,
    /// File streams.
    pub streams: Arc<dyn StreamStore>,
    /// The registry's records.
    pub registry: Arc<dyn RegistryStore>,
    /// The embedded broker's retained messages.
    pub retained: Arc<dyn RetainedStore>,
    /// The embedded broker's persistent sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// The fleet index (in the database of the shadows and jobs).
    pub index: Arc<dyn IndexStore>,
    /// The PostgreSQL store, when that is where they are (for its lease).
    postgres: Option<PgStore>,
}

impl Stores {
    /// Everything in memory: nothing survives the process.
    pub fn memory() -> Self {
        let m = MemoryStore::new();
        Self {
            shadows: Arc::new(m.clone()),
            jobs: Arc::new(m.clone()),
            streams: Arc::new(m.clone()),
            retained: Arc::new(m.clone()),
            sessions: Arc::new(m.clone()),
            index: Arc::new(m.clone()),
            registry: Arc::new(m),
            postgres: None,
        }
    }

    /// Shadows, jobs and streams in the SQLite file `path`, the registry in
    /// `registry.db` in the same directory (each created as needed, its
    /// schema migrated).
    pub fn sqlite(path: &std::path::Path) -> Result<Self, StoreError> {
        Self::sqlite_with_registry(path, &path.with_file_name("registry.db"))
    }

    /// Shadows, jobs and streams in the SQLite file `path`, the registry in
    /// the SQLite file `registry`.
    pub fn sqlite_with_registry(
        path: &std::path::Path,
        registry: &std::path::Path,
    ) -> Result<Self, StoreError> {
        let store = SqliteStore::open(path)?;
        let registry = SqliteRegistry::open(registry)?;
        Ok(Self {
            shadows: Arc::new(store.clone()),
            jobs: Arc::new(store.clone()),
            streams: Arc::new(store.clone()),
            retained: Arc::new(store.clone()),
            index: Arc::new(store.clone()),
            sessions: Arc::new(store),
            registry: Arc::new(registry),
            postgres: None,
        })
    }

    /// Everything in one PostgreSQL database, shared by every instance on
    /// it (see [`PgStore::connect`] for `url` and TLS).
    pub async fn postgres(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        Ok(Self::on_postgres(
            PgStore::connect(url, max_connections).await?,
        ))
    }

    /// Every store on an open PostgreSQL pool.
    pub fn on_postgres(pg: PgStore) -> Self {
        Self {
            shadows: Arc::new(pg.clone()),
            jobs: Arc::new(pg.clone()),
            streams: Arc::new(pg.clone()),
            retained: Arc::new(pg.clone()),
            sessions: Arc::new(pg.clone()),
            index: Arc::new(pg.clone()),
            registry: Arc::new(pg.clone()),
            postgres: Some(pg),
        }
    }

    /// The stores at `location` (a SQLite location is the file for shadows,
    /// jobs and streams).
    pub async fn open(
        location: &StoreLocation,
        max_connections: usize,
    ) -> Result<Self, StoreError> {
        match location {
            StoreLocation::Memory => Ok(Self::memory()),
            StoreLocation::Sqlite(path) => Self::sqlite(path),
            StoreLocation::Postgres(url) => Self::postgres(url, max_connections).await,
        }
    }

    /// [`open`](Self::open), with the registry in the SQLite file
    /// `registry` when the store is not PostgreSQL (`None`: where `open`
    /// puts it). With PostgreSQL the registry is in the database, shared
    /// by every instance.
    pub async fn open_with_registry(
        location: &StoreLocation,
        max_connections: usize,
        registry: Option<&std::path::Path>,
    ) -> Result<Self, StoreError> {
        match (location, registry) {
            (StoreLocation::Sqlite(path), Some(r)) => Self::sqlite_with_registry(path, r),
            (StoreLocation::Memory, Some(r)) => Ok(Self {
                registry: Arc::new(SqliteRegistry::open(r)?),
                ..Self::memory()
            }),
            _ => Self::open(location, max_connections).await,
        }
    }

    /// The PostgreSQL store, if that is where everything is.
    pub fn pg(&self) -> Option<&PgStore> {
        self.postgres.as_ref()
    }

    /// Who among the instances on these stores may act alone (lease
    /// `name`, asked for by `holder`, lasting `ttl`): a lease in
    /// PostgreSQL, [`SoleInstance`] otherwise.
    pub fn leadership(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Arc<dyn Leadership> {
        match &self.postgres {
            Some(pg) => Arc::new(PgLease::new(pg, name, holder, ttl)),
            None => Arc::new(SoleInstance),
        }
    }
}

/// Waits before compare-and-set attempt `attempt + 1` after a conflict:
/// exponential from 1 ms, capped at 50 ms, with jitter, so that instances
/// writing the same record do not collide again in step.
pub(crate) async fn after_conflict(attempt: usize) {
    let ceiling_us = (1u64 << attempt.min(6)).min(50) * 1000;
    let mut r = [0u8; 4];
    let jitter = match getrandom::fill(&mut r) {
        Ok(()) => u64::from(u32::from_le_bytes(r)) % ceiling_us,
        Err(_) => ceiling_us / 2,
    };
    tokio::time::sleep(std::time::Duration::from_micros(
        ceiling_us / 2 + jitter / 2,
    ))
    .await;
}

pub(crate) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

pub(crate) fn corrupt(e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}
