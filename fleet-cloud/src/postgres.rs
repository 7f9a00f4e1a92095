//! PostgreSQL: the store for fleets that outgrow one machine, shared by
//! several `fleet serve` instances.
//!
//! Every change is one statement that compares and sets the row's revision
//! (`INSERT ... ON CONFLICT DO NOTHING` for a new record, `UPDATE ... WHERE
//! revision = $n` otherwise), so instances never overwrite each other's
//! writes: the loser gets [`StoreError::Conflict`], reads again and retries.
//! Connections come from a pool (deadpool); the schema is migrated on
//! connect, one instance at a time (an advisory lock), and its version kept
//! in `fleet_schema`.

use std::fmt;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use fleet_core::shadow::Shadow;
use tokio_postgres::NoTls;

use crate::jobs::{JobRecord, JobStore};
use crate::store::{ShadowKey, ShadowStore, StoreError, Versioned};
use fleet_core::jobs::ThingJobs;

/// Schema migrations, in order; `fleet_schema.version` is how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE shadows (
        thing TEXT NOT NULL,
        name TEXT NOT NULL,
        revision BIGINT NOT NULL,
        document BYTEA NOT NULL,
        PRIMARY KEY (thing, name)
    );",
    "CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        revision BIGINT NOT NULL,
        record BYTEA NOT NULL
    );
    CREATE TABLE thing_jobs (
        thing TEXT PRIMARY KEY,
        revision BIGINT NOT NULL,
        next_deadline BIGINT,
        document BYTEA NOT NULL
    );
    CREATE INDEX thing_jobs_deadline ON thing_jobs (next_deadline);",
    // Leases: which instance does what only one may do at a time.
    "CREATE TABLE fleet_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    );",
    // File streams (OTA release images), served by every instance.
    "CREATE TABLE stream_files (
        stream TEXT NOT NULL,
        version INTEGER NOT NULL,
        description TEXT NOT NULL,
        file INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (stream, file)
    );",
    // The registry (crate::Registry::postgres): things, groups,
    // certificates and API tokens, shared by every instance.
    "CREATE TABLE things (
        name TEXT PRIMARY KEY,
        attributes TEXT NOT NULL,
        enabled BOOLEAN NOT NULL
    );
    CREATE TABLE thing_groups (
        name TEXT PRIMARY KEY,
        query TEXT
    );
    CREATE TABLE group_members (
        group_name TEXT NOT NULL REFERENCES thing_groups(name) ON DELETE CASCADE,
        thing TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
        PRIMARY KEY (group_name, thing)
    );
    CREATE TABLE certificates (
        id TEXT PRIMARY KEY,
        thing TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
        status TEXT NOT NULL,
        pem TEXT NOT NULL
    );
    CREATE INDEX certificates_thing ON certificates (thing);
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE pending_certificates (
        token TEXT PRIMARY KEY,
        certificate_id TEXT NOT NULL,
        certificate_pem TEXT NOT NULL,
        common_name TEXT NOT NULL,
        named_by_certificate BOOLEAN NOT NULL,
        expires_at BIGINT NOT NULL,
        used BOOLEAN NOT NULL
    );",
];

/// A stream as stored: version, description, files.
pub(crate) type StoredStream = (u32, String, Vec<Vec<u8>>);

/// The key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x666c_6565_7401;

/// A PostgreSQL store. Cloning shares its pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn signed(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// The TLS settings of a connection string: libpq's `sslrootcert`,
/// `sslcert` and `sslkey` (which tokio-postgres does not read), taken out
/// of it; `verify-ca` and `verify-full` become `require` (fleet always
/// verifies the server's certificate and name).
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    /// `sslmode`, as given.
    mode: Option<String>,
}

impl TlsParams {
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslrootcert" => &mut self.root,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            "sslmode" => {
                self.mode = Some(value.to_string());
                return false; // kept (rewritten below)
            }
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    }
}

/// Splits the TLS parameters out of `url` (URI or `key=value` form);
/// returns what tokio-postgres should parse.
fn split_tls(url: &str) -> (String, TlsParams) {
    let mut tls = TlsParams::default();
    // What tokio-postgres is given of one `key=value` pair.
    let mut keep = |pair: &str| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if tls.take(k, v) {
            None
        } else if k == "sslmode" && matches!(v, "verify-ca" | "verify-full") {
            Some("sslmode=require".to_string())
        } else {
            Some(pair.to_string())
        }
    };
    let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let kept: Vec<String> = query.split('&').filter_map(&mut keep).collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let kept: Vec<String> = url.split_whitespace().filter_map(&mut keep).collect();
        kept.join(" ")
    };
    (url, tls)
}

/// The rustls client configuration for `tls` (`None`: no TLS asked for).
fn tls_config(tls: &TlsParams) -> Result<Option<rustls::ClientConfig>, StoreError> {
    let bad = |what: &str, e: &dyn fmt::Display| {
        StoreError::backend(format!("PostgreSQL TLS: {what}: {e}"))
    };
    let wants = matches!(
        tls.mode.as_deref(),
        Some("require" | "verify-ca" | "verify-full")
    );
    let Some(root) = &tls.root else {
        if wants || tls.cert.is_some() || tls.key.is_some() {
            return Err(StoreError::backend(
                "PostgreSQL TLS: sslrootcert=<CA file> is needed (the server's certificate is always verified)",
            ));
        }
        return Ok(None);
    };
    if tls.mode.as_deref() == Some("disable") {
        return Ok(None);
    }
    let read = |path: &String| std::fs::read_to_string(path).map_err(|e| bad(path, &e));
    let ca = read(root)?;
    let identity = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        (None, None) => None,
        _ => {
            return Err(StoreError::backend(
                "PostgreSQL TLS: sslcert and sslkey go together",
            ));
        }
    };
    let config = crate::tls::client_config(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
    )
    .map_err(|e| bad(root, &e))?;
    Ok(Some(config))
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`, or
    /// the `key=value` form), with a pool of at most `max_connections`, and
    /// brings the schema up to date.
    ///
    /// TLS takes libpq's parameters: `sslrootcert=ca.pem` (the CA of the
    /// server's certificate; with it, TLS is required and the server's
    /// certificate and host name verified), and `sslcert=client.pem` with
    /// `sslkey=client.key` for certificate authentication. `sslmode=require`
    /// without `sslrootcert` is refused: fleet does not connect to a server
    /// it cannot verify.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        let (url, tls) = split_tls(url);
        let tls = tls_config(&tls)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| crate::store::Context::store("PostgreSQL URL", e))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => {
                // A CA given means TLS, not a fallback to plain text.
                if config.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
                    config.ssl_mode(tokio_postgres::config::SslMode::Require);
                }
                Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                )
            }
            None => Manager::from_config(config, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(backend)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(backend)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(backend)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS fleet_schema (version INTEGER NOT NULL)")
            .await
            .map_err(backend)?;
        let row = tx
            .query_opt("SELECT version FROM fleet_schema", &[])
            .await
            .map_err(backend)?;
        let version = match row {
            Some(r) => usize::try_from(r.get::<_, i32>(0)).unwrap_or(0),
            None => {
                tx.execute("INSERT INTO fleet_schema (version) VALUES (0)", &[])
                    .await
                    .map_err(backend)?;
                0
            }
        };
        if version > MIGRATIONS.len() {
            return Err(StoreError::backend(format!(
                "database schema {version} is newer than this fleet-cloud ({})",
                MIGRATIONS.len()
            )));
        }
        for sql in MIGRATIONS.iter().skip(version) {
            tx.batch_execute(sql).await.map_err(backend)?;
        }
        let now = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        tx.execute("UPDATE fleet_schema SET version = $1", &[&now])
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)
    }

    /// The `(revision, bytes)` row a query selects, if any.
    async fn row(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(backend)?;
        let row = client.query_opt(&stmt, params).await.map_err(backend)?;
        Ok(row.map(|r| (revision(r.get(0)), r.get(1))))
    }

    /// A compare-and-set write: `insert` when `expected` is 0 (it must do
    /// nothing on a conflict), `update` otherwise (it must check the
    /// revision). One statement: atomic without a transaction.
    async fn cas(
        &self,
        expected: u64,
        insert: (&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]),
        update: (&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]),
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let (sql, params) = if expected == 0 { insert } else { update };
        let stmt = client.prepare_cached(sql).await.map_err(backend)?;
        let changed = client.execute(&stmt, params).await.map_err(backend)?;
        if changed != 1 {
            return Err(StoreError::Conflict);
        }
        Ok(expected + 1)
    }
}

fn corrupt(e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl ShadowStore for PgStore {
    async fn load(&self, key: &ShadowKey) -> Result<Versioned<Shadow>, StoreError> {
        let name = key.shadow.clone().unwrap_or_default();
        let row = self
            .row(
                "SELECT revision, document FROM shadows WHERE thing = $1 AND name = $2",
                &[&key.thing, &name],
            )
            .await?;
        Ok(match row {
            None => Versioned {
                value: Shadow::new(),
                revision: 0,
            },
            Some((revision, doc)) => Versioned {
                value: Shadow::from_stored_json(&doc).map_err(corrupt)?,
                revision,
            },
        })
    }

    async fn save(
        &self,
        key: &ShadowKey,
        expected: u64,
        shadow: &Shadow,
    ) -> Result<u64, StoreError> {
        let name = key.shadow.clone().unwrap_or_default();
        let doc = shadow.to_stored_json();
        let expected_db = signed(expected);
        self.cas(
            expected,
            (
                "INSERT INTO shadows (thing, name, revision, document) VALUES ($1, $2, 1, $3)
                 ON CONFLICT (thing, name) DO NOTHING",
                &[&key.thing, &name, &doc],
            ),
            (
                "UPDATE shadows SET revision = revision + 1, document = $3
                 WHERE thing = $1 AND name = $2 AND revision = $4",
                &[&key.thing, &name, &doc, &expected_db],
            ),
        )
        .await
    }
}

impl JobStore for PgStore {
    async fn load_job(&self, job_id: &str) -> Result<Option<Versioned<JobRecord>>, StoreError> {
        let row = self
            .row(
                "SELECT revision, record FROM jobs WHERE job_id = $1",
                &[&job_id],
            )
            .await?;
        row.map(|(revision, bytes)| {
            Ok(Versioned {
                value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                revision,
            })
        })
        .transpose()
    }

    async fn save_job(&self, record: &JobRecord, expected: u64) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(backend)?;
        let id = &record.spec.job_id;
        let expected_db = signed(expected);
        self.cas(
            expected,
            (
                "INSERT INTO jobs (job_id, revision, record) VALUES ($1, 1, $2)
                 ON CONFLICT (job_id) DO NOTHING",
                &[id, &bytes],
            ),
            (
                "UPDATE jobs SET revision = revision + 1, record = $2
                 WHERE job_id = $1 AND revision = $3",
                &[id, &bytes, &expected_db],
            ),
        )
        .await
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT job_id FROM jobs ORDER BY job_id", &[])
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn delete_job(&self, job_id: &str, expected: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM jobs WHERE job_id = $1 AND revision = $2",
                &[&job_id, &signed(expected)],
            )
            .await
            .map_err(backend)?;
        if n == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn load_thing(&self, thing: &str) -> Result<Versioned<ThingJobs>, StoreError> {
        let row = self
            .row(
                "SELECT revision, document FROM thing_jobs WHERE thing = $1",
                &[&thing],
            )
            .await?;
        Ok(match row {
            None => Versioned {
                value: ThingJobs::new(thing),
                revision: 0,
            },
            Some((revision, bytes)) => Versioned {
                value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                revision,
            },
        })
    }

    async fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(jobs).map_err(backend)?;
        let deadline = jobs.next_deadline().map(signed);
        let expected_db = signed(expected);
        self.cas(
            expected,
            (
                "INSERT INTO thing_jobs (thing, revision, next_deadline, document) VALUES ($1, 1, $2, $3)
                 ON CONFLICT (thing) DO NOTHING",
                &[&thing, &deadline, &bytes],
            ),
            (
                "UPDATE thing_jobs SET revision = revision + 1, next_deadline = $2, document = $3
                 WHERE thing = $1 AND revision = $4",
                &[&thing, &deadline, &bytes, &expected_db],
            ),
        )
        .await
    }

    async fn due_things(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT thing FROM thing_jobs WHERE next_deadline IS NOT NULL AND next_deadline <= $1 ORDER BY thing",
                &[&signed(now)],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// A registry statement's failure: a duplicate key is
/// `AlreadyExists(what)`, a missing referenced row `NotFound(what)`.
fn registry_error(e: tokio_postgres::Error, what: &str) -> crate::RegistryError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
            crate::RegistryError::AlreadyExists(what.into())
        }
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            crate::RegistryError::NotFound(what.into())
        }
        _ => crate::RegistryError::backend(e),
    }
}

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

impl PgStore {
    /// Runs a registry query.
    pub(crate) async fn registry_query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, crate::RegistryError> {
        let client = self.client().await.map_err(crate::RegistryError::backend)?;
        client
            .query(sql, params)
            .await
            .map_err(|e| registry_error(e, ""))
    }

    /// Runs a registry statement; the rows it changed (errors name `what`).
    pub(crate) async fn registry_execute(
        &self,
        sql: &str,
        params: Params<'_>,
        what: &str,
    ) -> Result<usize, crate::RegistryError> {
        let client = self.client().await.map_err(crate::RegistryError::backend)?;
        client
            .execute(sql, params)
            .await
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .map_err(|e| registry_error(e, what))
    }

    /// The streams (all, or the one named), with their files in order.
    pub(crate) async fn load_streams(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, StoredStream)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT stream, version, description, data FROM stream_files
                 WHERE $1::TEXT IS NULL OR stream = $1 ORDER BY stream, file",
                &[&only],
            )
            .await
            .map_err(backend)?;
        let mut out: Vec<(String, StoredStream)> = Vec::new();
        for r in rows {
            let id: String = r.get(0);
            let version = u32::try_from(r.get::<_, i32>(1)).unwrap_or(0);
            let data: Vec<u8> = r.get(3);
            match out.last_mut() {
                Some((last, (_, _, files))) if *last == id => files.push(data),
                _ => out.push((id, (version, r.get(2), vec![data]))),
            }
        }
        Ok(out)
    }

    /// The stored version of stream `id`.
    pub(crate) async fn stream_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT version FROM stream_files WHERE stream = $1 AND file = 0",
                &[&id],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| u32::try_from(r.get::<_, i32>(0)).unwrap_or(0)))
    }

    /// Replaces stream `id` in one transaction (one writer at a time per
    /// stream); returns its new version.
    pub(crate) async fn save_stream(
        &self,
        id: &str,
        description: &str,
        files: &[Vec<u8>],
    ) -> Result<u32, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&id])
            .await
            .map_err(backend)?;
        let row = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM stream_files WHERE stream = $1",
                &[&id],
            )
            .await
            .map_err(backend)?;
        let version = row.get::<_, i32>(0).saturating_add(1);
        tx.execute("DELETE FROM stream_files WHERE stream = $1", &[&id])
            .await
            .map_err(backend)?;
        for (i, f) in files.iter().enumerate() {
            let file = i32::try_from(i).map_err(backend)?;
            tx.execute(
                "INSERT INTO stream_files (stream, version, description, file, data)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&id, &version, &description, &file, f],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(u32::try_from(version).unwrap_or(0))
    }

    /// Forgets stream `id`.
    pub(crate) async fn delete_stream(&self, id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM stream_files WHERE stream = $1", &[&id])
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Decides which of several instances sharing a store may do what only one
/// should do at a time (drive rollouts, sweep timeouts).
pub trait Leadership: Send + Sync + fmt::Debug + 'static {
    /// Whether this instance may act now; `false` on any doubt (the store
    /// unreachable, say).
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>;
}

/// A lease in PostgreSQL: held by one instance at a time until it expires
/// (by the database's clock, so instances' clocks do not matter); another
/// instance takes it over once it expired (the holder died or lost the
/// database).
///
/// The holder renews it from a task of its own, five times per `ttl`, so
/// that however long the work it guards takes, the lease does not lapse
/// under it. The holder counts its lease as ended a fifth of `ttl` before
/// the database does (measured from when it asked for the renewal), so two
/// instances never both count themselves leaders, even when a renewal is
/// slow or lost.
#[derive(Debug, Clone)]
pub struct PgLease {
    inner: std::sync::Arc<LeaseInner>,
}

#[derive(Debug)]
struct LeaseInner {
    store: PgStore,
    name: String,
    holder: String,
    ttl: std::time::Duration,
    /// Until when this instance may act, by its own monotonic clock.
    valid_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether the renewing task runs.
    keeping: std::sync::atomic::AtomicBool,
    /// Given up ([`PgLease::release`]): not asked for again.
    released: std::sync::atomic::AtomicBool,
    /// Whether the last answer was "held" (to log the changes).
    held: std::sync::atomic::AtomicBool,
}

impl PgLease {
    /// A lease `name` asked for by `holder` (unique per instance), which
    /// lasts `ttl` after each renewal.
    pub fn new(store: &PgStore, name: &str, holder: &str, ttl: std::time::Duration) -> Self {
        Self {
            inner: std::sync::Arc::new(LeaseInner {
                store: store.clone(),
                name: name.into(),
                holder: holder.into(),
                ttl,
                valid_until: std::sync::Mutex::new(None),
                keeping: std::sync::atomic::AtomicBool::new(false),
                released: std::sync::atomic::AtomicBool::new(false),
                held: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Who holds lease `name` now (an unexpired lease), if anyone.
    pub async fn holder(store: &PgStore, name: &str) -> Result<Option<String>, StoreError> {
        let client = store.client().await?;
        let row = client
            .query_opt(
                "SELECT holder FROM fleet_leases WHERE name = $1
                   AND expires_at >= (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[&name],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Takes or renews the lease once; whether this instance holds it now.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        let asked = std::time::Instant::now();
        let result = self.try_acquire().await;
        let held = matches!(result, Ok(true));
        let inner = &self.inner;
        {
            let mut valid = inner
                .valid_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if held {
                *valid = Some(asked + inner.ttl - inner.ttl / 5);
            } else if result.is_ok() {
                *valid = None;
            }
            // On an error, what was held stays valid until it runs out.
        }
        let now = self.holds();
        let before = inner.held.swap(now, std::sync::atomic::Ordering::Relaxed);
        if now != before {
            if now {
                tracing::info!(lease = %inner.name, holder = %inner.holder, "lease taken");
            } else {
                tracing::info!(lease = %inner.name, holder = %inner.holder, "lease lost");
            }
        }
        result
    }

    async fn try_acquire(&self) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let ttl_ms = i64::try_from(inner.ttl.as_millis()).unwrap_or(i64::MAX);
        let client = inner.store.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO fleet_leases (name, holder, expires_at)
                 VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3)
                 ON CONFLICT (name) DO UPDATE
                   SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                   WHERE fleet_leases.holder = EXCLUDED.holder
                      OR fleet_leases.expires_at < (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                 RETURNING holder",
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&stmt, &[&inner.name, &inner.holder, &ttl_ms])
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }

    /// Whether this instance holds the lease now, by its last renewal (no
    /// round trip to the database).
    pub fn holds(&self) -> bool {
        self.inner
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| std::time::Instant::now() < t)
    }

    /// Starts the task that asks for the lease and renews it, five times
    /// per `ttl`, until this lease (every clone) is dropped or released.
    /// Call it within a Tokio runtime; [`Leadership::is_leader`] starts it
    /// on its first call. Calling it again does nothing.
    pub fn keep(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.keeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        let every = (self.inner.ttl / 5).max(std::time::Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.released.load(Ordering::SeqCst) {
                    return;
                }
                let lease = PgLease { inner };
                if let Err(e) = lease.acquire().await {
                    tracing::warn!("lease {}: {e}", lease.inner.name);
                }
            }
        });
    }

    /// Gives the lease up at once (a clean shutdown), if held, and stops
    /// asking for it.
    pub async fn release(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        *inner
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let client = inner.store.client().await?;
        client
            .execute(
                "DELETE FROM fleet_leases WHERE name = $1 AND holder = $2",
                &[&inner.name, &inner.holder],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }
}

impl Leadership for PgLease {
    /// The first call asks for the lease and starts renewing it
    /// ([`PgLease::keep`]); later calls answer from the last renewal.
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            if self
                .inner
                .released
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return false;
            }
            if !self.inner.keeping.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = self.acquire().await {
                    tracing::warn!("lease {}: {e}", self.inner.name);
                }
                self.keep();
            }
            self.holds()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_either_form() {
        let (url, tls) = split_tls(
            "postgres://u@h:5/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x&sslcert=/c.pem&sslkey=/k.pem",
        );
        assert_eq!(
            url,
            "postgres://u@h:5/db?sslmode=require&application_name=x"
        );
        assert_eq!(
            tls,
            TlsParams {
                root: Some("/ca.pem".into()),
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
                mode: Some("verify-full".into()),
            }
        );
        let (url, tls) = split_tls("postgres://u@h/db?sslrootcert=/ca.pem");
        assert_eq!(
            (url.as_str(), tls.root.as_deref()),
            ("postgres://u@h/db", Some("/ca.pem"))
        );
        let (url, tls) = split_tls("host=h user=u sslmode=verify-ca sslrootcert=/ca.pem");
        assert_eq!(url, "host=h user=u sslmode=require");
        assert_eq!(tls.root.as_deref(), Some("/ca.pem"));
        let (url, tls) = split_tls("postgres://u@h/db");
        assert_eq!(
            (url.as_str(), tls),
            ("postgres://u@h/db", TlsParams::default())
        );
    }
}
