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
use tokio_postgres::NoTls;

use super::{StoreError, backend};

mod index;
mod jobs;
mod lease;
mod registry;
mod retained;
mod shadows;
mod streams;

pub use lease::PgLease;

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
    // The embedded broker's retained messages.
    "CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BYTEA NOT NULL,
        qos SMALLINT NOT NULL,
        properties BYTEA NOT NULL,
        owner TEXT NOT NULL
    );",
    // The embedded broker's persistent sessions, one record each.
    "CREATE TABLE broker_sessions (
        client_id TEXT PRIMARY KEY,
        record BYTEA NOT NULL
    );",
    // The management API's audit log.
    "CREATE TABLE audit_log (
        id BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        token_id TEXT NOT NULL,
        token_name TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        request TEXT,
        before TEXT
    );",
    // The fleet index (store/index.rs): each thing's searchable fields
    // (text compared byte by byte, as SQLite and the query language do),
    // and its connectivity record.
    "CREATE TABLE fleet_index (
        thing TEXT COLLATE \"C\" NOT NULL,
        source TEXT COLLATE \"C\" NOT NULL,
        field TEXT COLLATE \"C\" NOT NULL,
        txt TEXT COLLATE \"C\" NOT NULL,
        num DOUBLE PRECISION
    );
    CREATE INDEX fleet_index_thing ON fleet_index (thing, field, source);
    CREATE INDEX fleet_index_txt ON fleet_index (field, txt, thing);
    CREATE INDEX fleet_index_num ON fleet_index (field, num, thing);
    CREATE TABLE connectivity (
        thing TEXT PRIMARY KEY,
        record TEXT NOT NULL
    );
    CREATE TABLE fleet_index_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // Provisioning templates created through the API (the document as
    // given, byte for byte).
    "CREATE TABLE provisioning_templates (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL
    );",
    // Things with index rows written while they were not registered
    // (store/index.rs: queries leave them out without a registry lookup
    // per row).
    "CREATE TABLE fleet_index_orphans (
        thing TEXT COLLATE \"C\" PRIMARY KEY
    );
    INSERT INTO fleet_index_orphans (thing)
        SELECT DISTINCT i.thing FROM fleet_index i
        WHERE NOT EXISTS (SELECT 1 FROM fleet_index u WHERE u.thing = i.thing
                          AND u.field = 'thingName' AND u.source = 'registry')
        ON CONFLICT DO NOTHING;",
    // Text is searched without regard to ASCII case, as AWS IoT's fleet
    // indexing searches: each row keeps its text folded (lower() under
    // the \"C\" collation folds ASCII only), indexed instead of the text.
    "ALTER TABLE fleet_index ADD COLUMN fold TEXT COLLATE \"C\" NOT NULL DEFAULT '';
    UPDATE fleet_index SET fold = lower(txt);
    DROP INDEX fleet_index_txt;
    CREATE INDEX fleet_index_fold ON fleet_index (field, fold, thing);",
];

/// The key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x666c_6565_7401;

/// A PostgreSQL store. Cloning shares its pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Which shadow fields the fleet index keeps.
    index: std::sync::Arc<std::sync::RwLock<crate::store::IndexConfig>>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

pub(super) fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

pub(super) fn signed(r: u64) -> i64 {
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
        let store = Self {
            pool,
            index: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
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
    pub(super) async fn row(
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
    pub(super) async fn cas(
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
