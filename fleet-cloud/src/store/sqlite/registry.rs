//! The registry in SQLite: its own file (`registry.db`), opened and
//! migrated like every fleet database.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fleet_core::admission::Roster;
use rusqlite::OptionalExtension as _;

use super::{connect, migrate};
use crate::model::{
    AuditEntry, CertificateRecord, CertificateStatus, GroupQuery, PendingCertificate, Scope, Spent,
    StoredTemplate, StoredToken, Thing, TokenRecord,
};
use crate::store::{RegistryStore, StoreError, backend, corrupt};

/// The registry's schema migrations, in order. The first adopts the tables
/// of registries created before the schema was versioned (`IF NOT
/// EXISTS`).
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE IF NOT EXISTS things (
    name TEXT PRIMARY KEY, attributes TEXT NOT NULL, enabled INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS thing_groups (
    name TEXT PRIMARY KEY, query TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS group_members (
    group_name TEXT NOT NULL REFERENCES thing_groups(name) ON DELETE CASCADE,
    thing TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
    PRIMARY KEY (group_name, thing)
) STRICT;
CREATE TABLE IF NOT EXISTS certificates (
    id TEXT PRIMARY KEY,
    thing TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
    status TEXT NOT NULL, pem TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS pending_certificates (
    token TEXT PRIMARY KEY, certificate_id TEXT NOT NULL, certificate_pem TEXT NOT NULL,
    common_name TEXT NOT NULL, named_by_certificate INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, used INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL, created_at INTEGER NOT NULL
) STRICT;
",
    "
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL, token_id TEXT NOT NULL, token_name TEXT NOT NULL,
    method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
    request TEXT, before TEXT
) STRICT;
",
    "
CREATE TABLE IF NOT EXISTS provisioning_templates (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL
) STRICT;
",
];

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        token_id: r.get(2)?,
        token_name: r.get(3)?,
        method: r.get(4)?,
        path: r.get(5)?,
        status: r.get(6)?,
        request: r.get(7)?,
        before: r.get(8)?,
    })
}

/// An audit log row as SQLite gives it.
struct AuditRow {
    id: i64,
    at_ms: i64,
    token_id: String,
    token_name: String,
    method: String,
    path: String,
    status: i64,
    request: Option<String>,
    before: Option<String>,
}

impl AuditRow {
    fn entry(self) -> Result<AuditEntry, StoreError> {
        let json = |s: Option<String>| {
            s.map(|s| serde_json::from_str(&s).map_err(corrupt))
                .transpose()
        };
        Ok(AuditEntry {
            id: unsigned(self.id),
            at_ms: unsigned(self.at_ms),
            token_id: self.token_id,
            token_name: self.token_name,
            method: self.method,
            path: self.path,
            status: u16::try_from(self.status).unwrap_or(0),
            request: json(self.request)?,
            before: json(self.before)?,
        })
    }
}

/// The registry in a SQLite file. Cloning shares its connection; its work
/// runs on blocking threads.
#[derive(Debug, Clone)]
pub struct SqliteRegistry {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A statement's failure: a violated key is `AlreadyExists(what)`, a
/// violated reference `NotFound(what)`.
fn refused(e: rusqlite::Error, what: &str) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY {
                StoreError::NotFound(what.into())
            } else {
                StoreError::AlreadyExists(what.into())
            }
        }
        _ => backend(e),
    }
}

fn thing_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, bool)> {
    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0))
}

fn thing((name, attributes, enabled): (String, String, bool)) -> Result<Thing, StoreError> {
    Ok(Thing {
        attributes: serde_json::from_str(&attributes).map_err(corrupt)?,
        name,
        enabled,
    })
}

fn certificate_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CertificateRecord> {
    Ok(CertificateRecord {
        id: r.get(0)?,
        thing: r.get(1)?,
        status: CertificateStatus::parse(&r.get::<_, String>(2)?),
        pem: r.get(3)?,
    })
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn token(
    (id, name, scope, secret_sha256, created_at): (String, String, String, String, i64),
) -> Result<StoredToken, StoreError> {
    Ok(StoredToken {
        record: TokenRecord {
            scope: Scope::parse(&scope)
                .ok_or_else(|| StoreError::Corrupt(format!("token {id}: scope {scope:?}")))?,
            id,
            name,
            created_at: unsigned(created_at),
        },
        secret_sha256,
    })
}

/// The rows of `sql`, each read by `row`.
fn rows<T, P: rusqlite::Params>(
    c: &rusqlite::Connection,
    sql: &str,
    params: P,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = c.prepare_cached(sql).map_err(backend)?;
    let rows = stmt.query_map(params, row).map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

impl SqliteRegistry {
    /// Opens (or creates) the registry in the SQLite file at `path` and
    /// brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        migrate(&conn, MIGRATIONS)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // The connection holds no invariant a panic could break.
            let mut c = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut c)
        })
        .await
        .map_err(backend)?
    }

    /// Rows changed by `sql` (a violated constraint names `what`).
    async fn execute<P: rusqlite::Params + Send + 'static>(
        &self,
        sql: &'static str,
        params: P,
        what: &str,
    ) -> Result<usize, StoreError> {
        let what = what.to_owned();
        self.with(move |c| {
            c.prepare_cached(sql)
                .and_then(|mut s| s.execute(params))
                .map_err(|e| refused(e, &what))
        })
        .await
    }

    /// The first column of `sql`'s rows.
    async fn names(&self, sql: &'static str) -> Result<Vec<String>, StoreError> {
        self.with(move |c| rows(c, sql, [], |r| r.get(0))).await
    }
}

#[async_trait]
impl RegistryStore for SqliteRegistry {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        let e = entry.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO audit_log (at_ms, token_id, token_name, method, path, status, request, before) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![
                    signed(e.at_ms),
                    e.token_id,
                    e.token_name,
                    e.method,
                    e.path,
                    i64::from(e.status),
                    e.request.as_ref().map(ToString::to_string),
                    e.before.as_ref().map(ToString::to_string),
                ],
            )
            .map_err(backend)?;
            Ok(unsigned(c.last_insert_rowid()))
        })
        .await
    }

    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            rows(
                c,
                "SELECT id, at_ms, token_id, token_name, method, path, status, request, before \
                 FROM audit_log WHERE id > ?1 ORDER BY id LIMIT ?2",
                rusqlite::params![signed(after), limit],
                audit_row,
            )?
            .into_iter()
            .map(AuditRow::entry)
            .collect()
        })
        .await
    }

    async fn put_template(&self, t: &StoredTemplate) -> Result<(), StoreError> {
        let spec = serde_json::to_string(t).map_err(backend)?;
        self.execute(
            "INSERT INTO provisioning_templates (name, spec) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            (t.name.clone(), spec),
            &t.name,
        )
        .await
        .map(drop)
    }

    async fn template(&self, name: &str) -> Result<Option<StoredTemplate>, StoreError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.prepare_cached("SELECT spec FROM provisioning_templates WHERE name = ?1")
                .and_then(|mut s| s.query_row([&name], |r| r.get::<_, String>(0)).optional())
                .map_err(backend)?
                .map(|s| serde_json::from_str(&s).map_err(corrupt))
                .transpose()
        })
        .await
    }

    async fn templates(&self) -> Result<Vec<StoredTemplate>, StoreError> {
        self.with(|c| {
            rows(
                c,
                "SELECT spec FROM provisioning_templates ORDER BY name",
                [],
                |r| r.get::<_, String>(0),
            )?
            .into_iter()
            .map(|s| serde_json::from_str(&s).map_err(corrupt))
            .collect()
        })
        .await
    }

    async fn delete_template(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "DELETE FROM provisioning_templates WHERE name = ?1",
                [name.to_owned()],
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn insert_token(&self, t: &StoredToken) -> Result<(), StoreError> {
        let r = &t.record;
        self.execute(
            "INSERT INTO api_tokens (id, name, scope, secret_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            (
                r.id.clone(),
                r.name.clone(),
                r.scope.as_str(),
                t.secret_sha256.clone(),
                signed(r.created_at),
            ),
            &r.id,
        )
        .await
        .map(drop)
    }

    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.prepare_cached(
                "SELECT id, name, scope, secret_sha256, created_at FROM api_tokens WHERE id = ?1",
            )
            .and_then(|mut s| s.query_row([&id], token_row).optional())
            .map_err(backend)?
            .map(token)
            .transpose()
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.with(|c| {
            rows(
                c,
                "SELECT id, name, scope, secret_sha256, created_at FROM api_tokens ORDER BY id",
                [],
                token_row,
            )?
            .into_iter()
            .map(token)
            .collect()
        })
        .await
    }

    async fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .execute("DELETE FROM api_tokens WHERE id = ?1", [id.to_owned()], id)
            .await?;
        Ok(n > 0)
    }

    async fn insert_thing(&self, t: &Thing) -> Result<(), StoreError> {
        let attributes = serde_json::to_string(&t.attributes).map_err(backend)?;
        self.execute(
            "INSERT INTO things (name, attributes, enabled) VALUES (?1, ?2, ?3)",
            (t.name.clone(), attributes, i64::from(t.enabled)),
            &t.name,
        )
        .await
        .map(drop)
    }

    async fn thing(&self, name: &str) -> Result<Option<Thing>, StoreError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.prepare_cached("SELECT name, attributes, enabled FROM things WHERE name = ?1")
                .and_then(|mut s| s.query_row([&name], thing_row).optional())
                .map_err(backend)?
                .map(thing)
                .transpose()
        })
        .await
    }

    async fn things(&self, after: &str, limit: usize) -> Result<Vec<Thing>, StoreError> {
        let after = after.to_owned();
        let limit = signed(limit as u64);
        self.with(move |c| {
            rows(
                c,
                "SELECT name, attributes, enabled FROM things WHERE name > ?1 ORDER BY name LIMIT ?2",
                (after, limit),
                thing_row,
            )?
            .into_iter()
            .map(thing)
            .collect()
        })
        .await
    }

    async fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<bool, StoreError> {
        let attributes = serde_json::to_string(attributes).map_err(backend)?;
        let n = self
            .execute(
                "UPDATE things SET attributes = ?2 WHERE name = ?1",
                (name.to_owned(), attributes),
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "UPDATE things SET enabled = ?2 WHERE name = ?1",
                (name.to_owned(), i64::from(enabled)),
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_thing(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "DELETE FROM things WHERE name = ?1",
                [name.to_owned()],
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn insert_group(&self, name: &str, query: Option<&GroupQuery>) -> Result<(), StoreError> {
        let query = query
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        self.execute(
            "INSERT INTO thing_groups (name, query) VALUES (?1, ?2)",
            (name.to_owned(), query),
            name,
        )
        .await
        .map(drop)
    }

    async fn groups(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Option<GroupQuery>)>, StoreError> {
        let (after, limit) = (after.to_owned(), i64::try_from(limit).unwrap_or(i64::MAX));
        let rows: Vec<(String, Option<String>)> = self
            .with(move |c| {
                rows(
                    c,
                    "SELECT name, query FROM thing_groups WHERE name > ?1 ORDER BY name LIMIT ?2",
                    rusqlite::params![after, limit],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await?;
        rows.into_iter()
            .map(|(name, q)| {
                let q = q
                    .map(|q| serde_json::from_str(&q).map_err(corrupt))
                    .transpose()?;
                Ok((name, q))
            })
            .collect()
    }

    async fn group(&self, name: &str) -> Result<Option<Option<GroupQuery>>, StoreError> {
        let name = name.to_owned();
        let row: Option<Option<String>> = self
            .with(move |c| {
                c.prepare_cached("SELECT query FROM thing_groups WHERE name = ?1")
                    .and_then(|mut s| s.query_row([&name], |r| r.get(0)).optional())
                    .map_err(backend)
            })
            .await?;
        row.map(|q| {
            q.map(|q| serde_json::from_str(&q).map_err(corrupt))
                .transpose()
        })
        .transpose()
    }

    async fn add_member(&self, group: &str, thing: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT OR IGNORE INTO group_members (group_name, thing) VALUES (?1, ?2)",
            (group.to_owned(), thing.to_owned()),
            thing,
        )
        .await
        .map(drop)
    }

    async fn members(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let group = group.to_owned();
        self.with(move |c| {
            rows(
                c,
                "SELECT thing FROM group_members WHERE group_name = ?1 ORDER BY thing",
                [group],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn insert_certificate(&self, cert: &CertificateRecord) -> Result<(), StoreError> {
        let (id, thing) = (cert.id.clone(), cert.thing.clone());
        let (status, pem) = (cert.status.as_str(), cert.pem.clone());
        self.with(move |c| {
            // A key and a reference can both fail here: say which.
            let known: Option<i64> = c
                .prepare_cached("SELECT 1 FROM things WHERE name = ?1")
                .and_then(|mut s| s.query_row([&thing], |r| r.get(0)).optional())
                .map_err(backend)?;
            if known.is_none() {
                return Err(StoreError::NotFound(thing));
            }
            c.prepare_cached(
                "INSERT INTO certificates (id, thing, status, pem) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute((&id, &thing, status, &pem)))
            .map_err(|e| refused(e, &id))
            .map(drop)
        })
        .await
    }

    async fn revoke_certificate(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "UPDATE certificates SET status = 'REVOKED' WHERE id = ?1",
                [id.to_owned()],
                id,
            )
            .await?;
        Ok(n > 0)
    }

    async fn certificate(&self, id: &str) -> Result<Option<CertificateRecord>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.prepare_cached("SELECT id, thing, status, pem FROM certificates WHERE id = ?1")
                .and_then(|mut s| s.query_row([&id], certificate_row).optional())
                .map_err(backend)
        })
        .await
    }

    async fn certificates_of(&self, thing: &str) -> Result<Vec<CertificateRecord>, StoreError> {
        let thing = thing.to_owned();
        self.with(move |c| {
            rows(
                c,
                "SELECT id, thing, status, pem FROM certificates WHERE thing = ?1 ORDER BY id",
                [thing],
                certificate_row,
            )
        })
        .await
    }

    async fn revoked_certificates(&self) -> Result<Vec<String>, StoreError> {
        self.names(crate::store::sql::REVOKED_CERTIFICATES).await
    }

    async fn denied_identities(&self) -> Result<Vec<String>, StoreError> {
        self.names(crate::store::sql::DENIED_IDENTITIES).await
    }

    async fn roster(&self) -> Result<Roster, StoreError> {
        let (things, certificates) = self
            .with(|c| {
                let things = rows(
                    c,
                    "SELECT name, enabled FROM things ORDER BY name",
                    [],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0)),
                )?;
                let certificates = rows(
                    c,
                    "SELECT id, thing, status FROM certificates ORDER BY id",
                    [],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    },
                )?;
                Ok((things, certificates))
            })
            .await?;
        let mut roster = Roster::default();
        for (name, enabled) in things {
            roster.add_thing(&name, enabled);
        }
        for (id, thing, status) in certificates {
            roster.add_certificate(
                &id,
                &thing,
                CertificateStatus::parse(&status) == CertificateStatus::Active,
            );
        }
        Ok(roster)
    }

    async fn add_pending(
        &self,
        token: &str,
        p: &PendingCertificate,
        now: u64,
        max: usize,
    ) -> Result<bool, StoreError> {
        let (token, p) = (token.to_owned(), p.clone());
        let (now, max) = (signed(now), signed(max as u64));
        self.with(move |c| {
            let tx = c.transaction().map_err(backend)?;
            tx.execute(
                "DELETE FROM pending_certificates WHERE used <> 0 OR expires_at <= ?1",
                [now],
            )
            .map_err(backend)?;
            let n = tx
                .execute(
                    "INSERT INTO pending_certificates (token, certificate_id, certificate_pem, common_name, named_by_certificate, expires_at, used)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, 0
                     WHERE (SELECT COUNT(*) FROM pending_certificates) < ?7",
                    rusqlite::params![
                        token,
                        p.certificate_id,
                        p.certificate_pem,
                        p.common_name,
                        i64::from(p.named_by_certificate),
                        signed(p.expires_at),
                        max
                    ],
                )
                .map_err(|e| refused(e, &token))?;
            tx.commit().map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Option<PendingCertificate>, StoreError> {
        let token = token.to_owned();
        let now = signed(now);
        self.with(move |c| {
            c.prepare_cached(
                "SELECT certificate_id, certificate_pem, common_name, named_by_certificate, expires_at
                 FROM pending_certificates WHERE token = ?1 AND used = 0 AND expires_at > ?2",
            )
            .and_then(|mut s| {
                s.query_row((&token, now), |r| {
                    Ok(PendingCertificate {
                        certificate_id: r.get(0)?,
                        certificate_pem: r.get(1)?,
                        common_name: r.get(2)?,
                        named_by_certificate: r.get::<_, i64>(3)? != 0,
                        expires_at: unsigned(r.get(4)?),
                    })
                })
                .optional()
            })
            .map_err(backend)
        })
        .await
    }

    async fn spend_pending(&self, token: &str, now: u64) -> Result<Spent, StoreError> {
        let token = token.to_owned();
        let now = signed(now);
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE pending_certificates SET used = 1
                     WHERE token = ?1 AND used = 0 AND expires_at > ?2",
                    (&token, now),
                )
                .map_err(backend)?;
            if n == 1 {
                return Ok(Spent::Now);
            }
            let used: Option<i64> = c
                .query_row(
                    "SELECT 1 FROM pending_certificates WHERE token = ?1 AND used <> 0",
                    [&token],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(if used.is_some() {
                Spent::Before
            } else {
                Spent::Unknown
            })
        })
        .await
    }
}
