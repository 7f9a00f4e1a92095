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
];

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

fn backend(e: impl fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn signed(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`, or
    /// the `key=value` form), with a pool of at most `max_connections`, and
    /// brings the schema up to date.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
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
            return Err(StoreError::Backend(format!(
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

/// Decides which of several instances sharing a store may do what only one
/// should do at a time (drive rollouts, sweep timeouts).
pub trait Leadership: Send + Sync + fmt::Debug + 'static {
    /// Whether this instance may act now. Holding the lease, this renews
    /// it; `false` on any doubt (the store unreachable, say).
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>;
}

/// A lease in PostgreSQL: held by one instance at a time until it expires
/// (by the database's clock, so instances' clocks do not matter); the
/// holder renews it each time it asks, and another instance takes it over
/// once it expired (the holder died or lost the database).
#[derive(Debug, Clone)]
pub struct PgLease {
    store: PgStore,
    name: String,
    holder: String,
    ttl_ms: i64,
    /// Whether the last answer was "held" (to log the changes).
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PgLease {
    /// A lease `name` asked for by `holder` (unique per instance), which
    /// lasts `ttl` after each renewal.
    pub fn new(store: &PgStore, name: &str, holder: &str, ttl: std::time::Duration) -> Self {
        Self {
            store: store.clone(),
            name: name.into(),
            holder: holder.into(),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            held: std::sync::Arc::default(),
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

    /// Takes or renews the lease; whether this instance holds it now.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        let client = self.store.client().await?;
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
            .query_opt(&stmt, &[&self.name, &self.holder, &self.ttl_ms])
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }

    /// Gives the lease up at once (a clean shutdown), if held.
    pub async fn release(&self) -> Result<(), StoreError> {
        let client = self.store.client().await?;
        client
            .execute(
                "DELETE FROM fleet_leases WHERE name = $1 AND holder = $2",
                &[&self.name, &self.holder],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }
}

impl Leadership for PgLease {
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            let held = match self.acquire().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!("lease {}: {e}", self.name);
                    false
                }
            };
            let before = self.held.swap(held, std::sync::atomic::Ordering::Relaxed);
            if held != before {
                if held {
                    tracing::info!(lease = %self.name, holder = %self.holder, "lease taken");
                } else {
                    tracing::info!(lease = %self.name, holder = %self.holder, "lease lost");
                }
            }
            held
        })
    }
}
