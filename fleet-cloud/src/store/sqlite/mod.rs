//! SQLite: the durable embedded default, one file.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{StoreError, backend};

mod index;
mod jobs;
mod registry;
mod retained;
mod shadows;
mod streams;

pub use registry::SqliteRegistry;

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
    /// Which shadow fields the fleet index keeps.
    index: Arc<std::sync::RwLock<crate::store::IndexConfig>>,
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
    // File streams (OTA release images). `IF NOT EXISTS`: before it was a
    // migration, the stream service created this table itself.
    "CREATE TABLE IF NOT EXISTS stream_files (
        stream TEXT NOT NULL,
        version INTEGER NOT NULL,
        description TEXT NOT NULL,
        file INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (stream, file)
    ) STRICT;",
    // The embedded broker's retained messages.
    "CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        properties BLOB NOT NULL,
        owner TEXT NOT NULL
    ) STRICT;",
    // The embedded broker's persistent sessions, one record each.
    "CREATE TABLE broker_sessions (
        client_id TEXT PRIMARY KEY,
        record BLOB NOT NULL
    ) STRICT;",
    // The fleet index (store/index.rs): each thing's searchable fields
    // (clustered by thing; the secondary indexes hold the key, so a range
    // of a field gives its things without a lookup), and its connectivity
    // record.
    "CREATE TABLE fleet_index (
        thing TEXT NOT NULL,
        source TEXT NOT NULL,
        field TEXT NOT NULL,
        txt TEXT NOT NULL,
        num REAL,
        PRIMARY KEY (thing, field, source, txt)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX fleet_index_txt ON fleet_index (field, txt);
    CREATE INDEX fleet_index_num ON fleet_index (field, num) WHERE num IS NOT NULL;
    CREATE TABLE connectivity (
        thing TEXT PRIMARY KEY,
        record TEXT NOT NULL
    ) STRICT;
    CREATE TABLE fleet_index_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;",
    // Things with index rows (a shadow, jobs, connectivity) that were not
    // registered when the rows were written: queries leave them out
    // (checked again at query time), so that they need no registry lookup
    // per row.
    "CREATE TABLE fleet_index_orphans (
        thing TEXT PRIMARY KEY
    ) STRICT, WITHOUT ROWID;
    INSERT OR IGNORE INTO fleet_index_orphans (thing)
        SELECT DISTINCT i.thing FROM fleet_index i
        WHERE NOT EXISTS (SELECT 1 FROM fleet_index u WHERE u.thing = i.thing
                          AND u.field = 'thingName' AND u.source = 'registry');",
    // Text is searched without regard to ASCII case, as AWS IoT's fleet
    // indexing searches: each row keeps its text folded (SQLite's lower()
    // folds ASCII only), indexed instead of the text.
    "ALTER TABLE fleet_index ADD COLUMN fold TEXT NOT NULL DEFAULT '';
    UPDATE fleet_index SET fold = lower(txt);
    DROP INDEX fleet_index_txt;
    CREATE INDEX fleet_index_fold ON fleet_index (field, fold);",
];

/// The `(revision, bytes)` row one query selects, if there is one.
pub(super) fn versioned_row<P: rusqlite::Params>(
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
pub(super) fn cas_write<I: rusqlite::Params, U: rusqlite::Params>(
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

/// Opens a connection to the database at `path`, the one way fleet opens
/// SQLite: WAL journal (readers do not wait for the writer),
/// `synchronous=FULL` (a committed write survives a crash of the machine),
/// foreign keys enforced, and a 10 s wait on a locked database.
pub(crate) fn connect(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend)?;
    Ok(conn)
}

/// Brings the schema of `conn` up to date: runs the `migrations` not yet
/// run, each in a transaction with the new `PRAGMA user_version` (how many
/// have run). A database newer than `migrations` is refused.
pub(crate) fn migrate(conn: &rusqlite::Connection, migrations: &[&str]) -> Result<(), StoreError> {
    let version: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(backend)?;
    if version > migrations.len() {
        return Err(StoreError::backend(format!(
            "database schema {version} is newer than this fleet-cloud ({})",
            migrations.len()
        )));
    }
    for (i, sql) in migrations.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction().map_err(backend)?;
        tx.execute_batch(sql).map_err(backend)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
    }
    Ok(())
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
        migrate(&conn, MIGRATIONS)?;
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
            index: Arc::default(),
        })
    }

    /// Runs `f` on a read connection (on a blocking thread): the first
    /// free one from the next in turn, or that one when all are busy.
    pub(super) async fn with_conn<T: Send + 'static>(
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
    pub(super) async fn write(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ShadowKey, ShadowStore};
    use fleet_core::shadow::Shadow;
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
