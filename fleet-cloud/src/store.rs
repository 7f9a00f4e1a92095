//! Storage: one trait, an in-memory store and SQLite.
//!
//! Every write is a compare-and-set on a store revision that grows with each
//! write of a record, so several service instances sharing a store need no
//! other coordination: a write based on a stale read fails with
//! [`StoreError::Conflict`] and the service reads again. The revision is the
//! store's, not the shadow's version: a delete keeps a shadow's version but
//! still moves the revision, so it cannot be overwritten by an update that
//! was computed before it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fleet_core::shadow::Shadow;

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
pub trait ShadowStore: Send + Sync + 'static {
    /// The shadow (a never-written one is `Shadow::new()` at revision 0).
    fn load(
        &self,
        key: &ShadowKey,
    ) -> impl Future<Output = Result<Versioned<Shadow>, StoreError>> + Send;

    /// Writes `shadow` if the record is still at `expected_revision`;
    /// returns the new revision.
    fn save(
        &self,
        key: &ShadowKey,
        expected_revision: u64,
        shadow: &Shadow,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

type ShadowMap = HashMap<ShadowKey, (Shadow, u64)>;

/// An in-memory store, for tests and simulations.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    shadows: Arc<Mutex<ShadowMap>>,
    pub(crate) jobs: Arc<Mutex<crate::jobs::MemoryJobs>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ShadowMap>, StoreError> {
        self.shadows
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))
    }
}

impl ShadowStore for MemoryStore {
    async fn load(&self, key: &ShadowKey) -> Result<Versioned<Shadow>, StoreError> {
        Ok(match self.lock()?.get(key) {
            Some((s, r)) => Versioned {
                value: s.clone(),
                revision: *r,
            },
            None => Versioned {
                value: Shadow::new(),
                revision: 0,
            },
        })
    }

    async fn save(
        &self,
        key: &ShadowKey,
        expected: u64,
        shadow: &Shadow,
    ) -> Result<u64, StoreError> {
        let mut map = self.lock()?;
        let current = map.get(key).map_or(0, |(_, r)| *r);
        if current != expected {
            return Err(StoreError::Conflict);
        }
        map.insert(key.clone(), (shadow.clone(), current + 1));
        Ok(current + 1)
    }
}

/// SQLite: the durable embedded default. WAL journal, `synchronous=FULL`
/// (an acknowledged write survives a crash of the process or the machine),
/// schema versions in `PRAGMA user_version`.
///
/// Writes go to one writer thread that commits them in groups: the writes
/// queued while one commit is on disk go out together in the next, each in
/// its own savepoint (a failed compare-and-set changes nothing and does not
/// affect the others), with one `fsync` for the group. A write is answered
/// only after its group is durable. Reads use their own connection and see
/// every answered write.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    readers: Arc<Readers>,
    writer: std::sync::mpsc::Sender<Write>,
}

/// Read connections, used in turn (WAL lets them read while the writer
/// writes).
#[derive(Debug)]
struct Readers {
    conns: Vec<Mutex<rusqlite::Connection>>,
    next: std::sync::atomic::AtomicUsize,
}

/// How many read connections a store opens.
const READERS: usize = 4;

/// One write for the writer thread: statements run inside a savepoint.
type WriteFn = Box<dyn FnOnce(&rusqlite::Connection) -> Result<u64, StoreError> + Send>;

struct Write {
    f: WriteFn,
    done: tokio::sync::oneshot::Sender<Result<u64, StoreError>>,
}

impl fmt::Debug for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Write")
    }
}

/// At most this many writes share one commit.
const MAX_GROUP: usize = 512;

/// Schema migrations, in order; `user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE shadows (
        thing TEXT NOT NULL,
        name TEXT NOT NULL,
        revision INTEGER NOT NULL,
        document BLOB NOT NULL,
        PRIMARY KEY (thing, name)
    ) STRICT;",
    // Jobs: one record per job, one document of executions per thing.
    "CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        record BLOB NOT NULL
    ) STRICT;
    CREATE TABLE thing_jobs (
        thing TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        next_deadline INTEGER,
        document BLOB NOT NULL
    ) STRICT;
    CREATE INDEX thing_jobs_deadline ON thing_jobs (next_deadline);",
];

/// The `(revision, bytes)` row one query selects, if there is one.
pub(crate) fn versioned_row<P: rusqlite::Params>(
    c: &rusqlite::Connection,
    sql: &str,
    params: P,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    c.prepare_cached(sql)
        .map_err(backend)?
        .query_row(params, |r| Ok((r.get(0)?, r.get(1)?)))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(backend(e)),
        })
}

/// A compare-and-set write (run it with [`SqliteStore::write`]): `insert`
/// when the record is new (`expected` is 0, the statement must do nothing
/// on a conflict), `update` otherwise (it must check the revision);
/// `Conflict` unless one row changed. Returns the new revision.
pub(crate) fn cas_write<I: rusqlite::Params, U: rusqlite::Params>(
    c: &rusqlite::Connection,
    expected: u64,
    insert: (&str, I),
    update: (&str, U),
) -> Result<u64, StoreError> {
    let changed = if expected == 0 {
        c.prepare_cached(insert.0)
            .and_then(|mut s| s.execute(insert.1))
    } else {
        c.prepare_cached(update.0)
            .and_then(|mut s| s.execute(update.1))
    }
    .map_err(backend)?;
    if changed != 1 {
        return Err(StoreError::Conflict);
    }
    Ok(expected + 1)
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

fn connect(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    Ok(conn)
}

/// The writer thread: takes what is queued, commits it as one group.
fn write_groups(mut conn: rusqlite::Connection, rx: std::sync::mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let e = StoreError::backend(e);
                for w in group {
                    let _ = w.done.send(Err(e.clone()));
                }
                continue;
            }
        };
        let mut results = Vec::with_capacity(group.len());
        for w in group {
            let result = match tx.savepoint() {
                Ok(mut sp) => {
                    // Dropped without commit, a savepoint rolls back.
                    sp.set_drop_behavior(rusqlite::DropBehavior::Rollback);
                    let r = (w.f)(&sp);
                    match r {
                        Ok(v) => sp.commit().map(|()| v).map_err(backend),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(backend(e)),
            };
            results.push((w.done, result));
        }
        match tx.commit() {
            Ok(()) => {
                for (done, r) in results {
                    let _ = done.send(r);
                }
            }
            Err(e) => {
                let e = StoreError::backend(e);
                for (done, _) in results {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` and brings its schema up
    /// to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(backend)?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::backend(format!(
                "database schema {version} is newer than this fleet-cloud ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.unchecked_transaction().map_err(backend)?;
            tx.execute_batch(sql).map_err(backend)?;
            tx.pragma_update(None, "user_version", i + 1)
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
        }
        let conns = (0..READERS)
            .map(|_| connect(path).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("fleet-sqlite-writer".into())
            .spawn(move || write_groups(conn, rx))
            .map_err(backend)?;
        Ok(Self {
            readers: Arc::new(Readers {
                conns,
                next: std::sync::atomic::AtomicUsize::new(0),
            }),
            writer: tx,
        })
    }

    /// Runs `f` on a read connection (on a blocking thread): the first
    /// free one from the next in turn, or that one when all are busy.
    pub(crate) async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let n = readers.conns.len();
            let start = readers
                .next
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let free = (0..n).find_map(|i| readers.conns[(start + i) % n].try_lock().ok());
            let mut guard = match free {
                Some(g) => g,
                None => readers.conns[start % n]
                    .lock()
                    .map_err(|_| StoreError::backend("a reader panicked"))?,
            };
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }

    /// Runs `f` in the next group commit; answers once it is durable.
    pub(crate) async fn write(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<u64, StoreError> + Send + 'static,
    ) -> Result<u64, StoreError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.writer
            .send(Write {
                f: Box::new(f),
                done,
            })
            .map_err(|_| StoreError::backend("the writer thread stopped"))?;
        rx.await
            .map_err(|_| StoreError::backend("the writer thread stopped"))?
    }
}

impl ShadowStore for SqliteStore {
    async fn load(&self, key: &ShadowKey) -> Result<Versioned<Shadow>, StoreError> {
        let (thing, name) = (key.thing.clone(), key.name_column().to_string());
        self.with_conn(move |c| {
            let row = versioned_row(
                c,
                "SELECT revision, document FROM shadows WHERE thing = ?1 AND name = ?2",
                (&thing, &name),
            )?;
            match row {
                None => Ok(Versioned {
                    value: Shadow::new(),
                    revision: 0,
                }),
                Some((revision, doc)) => Ok(Versioned {
                    value: Shadow::from_stored_json(&doc)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    revision,
                }),
            }
        })
        .await
    }

    async fn save(
        &self,
        key: &ShadowKey,
        expected: u64,
        shadow: &Shadow,
    ) -> Result<u64, StoreError> {
        let (thing, name) = (key.thing.clone(), key.name_column().to_string());
        let doc = shadow.to_stored_json();
        self.write(move |c| {
            cas_write(
                c,
                expected,
                (
                    "INSERT INTO shadows (thing, name, revision, document) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (thing, name) DO NOTHING",
                    (&thing, &name, &doc),
                ),
                (
                    "UPDATE shadows SET revision = revision + 1, document = ?3
                     WHERE thing = ?1 AND name = ?2 AND revision = ?4",
                    (&thing, &name, &doc, expected),
                ),
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::shadow::ShadowLimits;

    fn key() -> ShadowKey {
        ShadowKey {
            thing: "dev-1".into(),
            shadow: Some("cfg".into()),
        }
    }

    fn updated(s: &Shadow, body: &str) -> Shadow {
        s.update(body.as_bytes(), 1, &ShadowLimits::default())
            .expect("accepted")
            .shadow
    }

    async fn compare_and_set<S: ShadowStore>(store: S) {
        let first = store.load(&key()).await.unwrap();
        assert_eq!(first.revision, 0);
        let s1 = updated(&first.value, r#"{"state":{"desired":{"a":1}}}"#);
        assert_eq!(store.save(&key(), 0, &s1).await.unwrap(), 1);
        // A second writer that read revision 0 loses.
        assert!(matches!(
            store.save(&key(), 0, &s1).await,
            Err(StoreError::Conflict)
        ));
        let read = store.load(&key()).await.unwrap();
        assert_eq!((read.value.clone(), read.revision), (s1.clone(), 1));
        // A delete keeps the version but moves the revision.
        let deleted = read
            .value
            .delete(b"", 2, &ShadowLimits::default())
            .unwrap()
            .shadow;
        assert_eq!(store.save(&key(), 1, &deleted).await.unwrap(), 2);
        let stale = updated(&s1, r#"{"state":{"desired":{"a":2}}}"#);
        assert!(matches!(
            store.save(&key(), 1, &stale).await,
            Err(StoreError::Conflict)
        ));
        // Other keys are independent.
        let other = ShadowKey {
            thing: "dev-1".into(),
            shadow: None,
        };
        assert_eq!(store.load(&other).await.unwrap().revision, 0);
    }

    #[tokio::test]
    async fn memory_store_compare_and_set() {
        compare_and_set(MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn sqlite_store_compare_and_set_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        compare_and_set(SqliteStore::open(&path).unwrap()).await;
        // Everything acknowledged is there after reopening; the schema is
        // not migrated twice.
        let again = SqliteStore::open(&path).unwrap();
        let read = again.load(&key()).await.unwrap();
        assert_eq!(read.revision, 2);
        assert!(!read.value.exists());
        assert_eq!(read.value.version(), 1);
    }

    #[tokio::test]
    async fn two_connections_to_one_file_never_both_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let a = SqliteStore::open(&path).unwrap();
        let b = SqliteStore::open(&path).unwrap();
        let s1 = updated(&Shadow::new(), r#"{"state":{"reported":{"x":1}}}"#);
        let k = key();
        let (ra, rb) = tokio::join!(a.save(&k, 0, &s1), b.save(&k, 0, &s1));
        assert_eq!(ra.is_ok() as u8 + rb.is_ok() as u8, 1, "{ra:?} {rb:?}");
    }

    #[tokio::test]
    async fn a_corrupt_record_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let store = SqliteStore::open(&path).unwrap();
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute("INSERT INTO shadows VALUES ('dev-1', 'cfg', 1, X'7B')", ())
                .unwrap();
        }
        assert!(matches!(
            store.load(&key()).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_a_conflict_spoils_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let store = SqliteStore::open(&path).unwrap();
        let s1 = updated(&Shadow::new(), r#"{"state":{"reported":{"x":1}}}"#);
        // 200 things written at once; every other one with a stale
        // revision, which must fail alone.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let (store, s1) = (store.clone(), s1.clone());
            tasks.spawn(async move {
                let k = ShadowKey {
                    thing: format!("dev-{i}"),
                    shadow: None,
                };
                let expected = if i % 2 == 0 { 0 } else { 7 };
                (i, store.save(&k, expected, &s1).await)
            });
        }
        let mut won = 0;
        while let Some(r) = tasks.join_next().await {
            let (i, r) = r.unwrap();
            if i % 2 == 0 {
                assert_eq!(r.unwrap(), 1, "dev-{i}");
                won += 1;
            } else {
                assert!(matches!(r, Err(StoreError::Conflict)), "dev-{i}: {r:?}");
            }
        }
        assert_eq!(won, 100);
        // Durable and visible from a fresh connection; the failed ones
        // wrote nothing.
        let c = rusqlite::Connection::open(&path).unwrap();
        let n: u64 = c
            .query_row("SELECT COUNT(*) FROM shadows", (), |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        for i in 0..4u64 {
            let k = ShadowKey {
                thing: format!("dev-{i}"),
                shadow: None,
            };
            assert_eq!(store.load(&k).await.unwrap().revision, 1 - i % 2);
        }
    }
}

/// Where `fleet serve` keeps its state, as `--store` gives it.
///
/// The forms: `memory`; `sqlite:PATH` (or a bare path without `=` or a
/// scheme); `postgres://...` or `postgresql://...`; and libpq's
/// `key=value` form (`host=db port=5432 user=fleet dbname=fleet`). Anything
/// else is refused: a string that looks like neither is a mistake, not a
/// file name.
///
/// ```
/// use fleet_cloud::store::StoreLocation;
/// let pg: StoreLocation = "host=db.example user=fleet dbname=fleet".parse().unwrap();
/// assert!(matches!(pg, StoreLocation::Postgres(_)));
/// let file: StoreLocation = "sqlite:data/fleet.db".parse().unwrap();
/// assert_eq!(file, StoreLocation::Sqlite("data/fleet.db".into()));
/// assert!("mysql://db/fleet".parse::<StoreLocation>().is_err());
/// assert!("host=db nonsense".parse::<StoreLocation>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// In memory: nothing survives the process.
    Memory,
    /// A SQLite database file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string (URI or `key=value`), as given.
    Postgres(String),
}

/// A `--store` value that names no store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocationError {
    /// What was given (with any password masked).
    pub given: String,
    /// Why it was refused.
    pub reason: String,
}

impl fmt::Display for StoreLocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "store {:?}: {} (give memory, sqlite:PATH, postgres://... or host=... dbname=...)",
            self.given, self.reason
        )
    }
}

impl std::error::Error for StoreLocationError {}

/// The keys of libpq's `key=value` connection strings that fleet passes on.
const LIBPQ_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "channel_binding",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
];

impl std::str::FromStr for StoreLocation {
    type Err = StoreLocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refuse = |reason: &str| StoreLocationError {
            given: mask_password(s),
            reason: reason.into(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(refuse("empty"));
        }
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Self::Postgres(s.into()));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(refuse("sqlite: needs a path"));
            }
            return Ok(Self::Sqlite(path.into()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(refuse(&format!("unknown scheme {scheme:?}")));
        }
        if s.contains('=') {
            // libpq's form: every word a known key with a value (values
            // may be quoted; fleet's own keys have no spaces).
            for word in s.split_whitespace() {
                let Some((key, _)) = word.split_once('=') else {
                    return Err(refuse(&format!("{word:?} is not key=value (libpq's form)")));
                };
                if !LIBPQ_KEYS.contains(&key) {
                    return Err(refuse(&format!("unknown connection key {key:?}")));
                }
            }
            return Ok(Self::Postgres(s.into()));
        }
        Ok(Self::Sqlite(s.into()))
    }
}

impl fmt::Display for StoreLocation {
    /// The location with any password masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Self::Postgres(s) => f.write_str(&mask_password(s)),
        }
    }
}

/// `s` with the password of a PostgreSQL URI or `password=` masked.
fn mask_password(s: &str) -> String {
    if let Some((scheme, rest)) = s.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}");
        }
        return s.to_string();
    }
    s.split_whitespace()
        .map(|w| {
            if w.starts_with("password=") {
                "password=***".to_string()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod location_tests {
    use super::*;

    #[test]
    fn store_locations_parse_or_are_refused() {
        let parse = |s: &str| s.parse::<StoreLocation>();
        assert_eq!(parse("memory"), Ok(StoreLocation::Memory));
        assert_eq!(
            parse("fleet-data/fleet.db"),
            Ok(StoreLocation::Sqlite("fleet-data/fleet.db".into()))
        );
        assert_eq!(
            parse("sqlite:///var/lib/fleet.db"),
            Ok(StoreLocation::Sqlite("/var/lib/fleet.db".into()))
        );
        assert!(matches!(
            parse("postgresql://fleet@db/fleet"),
            Ok(StoreLocation::Postgres(_))
        ));
        // The bug: this used to become a SQLite file of that name.
        assert!(matches!(
            parse("host=127.0.0.1 port=5432 user=fleet dbname=postgres"),
            Ok(StoreLocation::Postgres(_))
        ));
        for bad in ["", "sqlite:", "mysql://db/x", "host=db dbname", "hots=db"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        let e = parse("redis://u:secret@db").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let shown = parse("postgres://fleet:secret@db/fleet")
            .unwrap()
            .to_string();
        assert_eq!(shown, "postgres://fleet:***@db/fleet");
        let shown = parse("host=db password=secret dbname=f")
            .unwrap()
            .to_string();
        assert_eq!(shown, "host=db password=*** dbname=f");
    }
}
