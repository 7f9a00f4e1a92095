//! The registry in PostgreSQL, shared by every instance on the database.

use std::collections::BTreeMap;

use async_trait::async_trait;
use fleet_core::admission::Roster;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{PgStore, signed};
use crate::model::{
    AuditEntry, CertificateRecord, CertificateStatus, GroupQuery, PendingCertificate, Scope, Spent,
    StoredTemplate, StoredToken, Thing, TokenRecord,
};
use crate::store::{RegistryStore, StoreError, backend, corrupt};

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A statement's failure: a duplicate key is `AlreadyExists(what)`, a
/// missing referenced row `NotFound(what)`.
fn refused(e: tokio_postgres::Error, what: &str) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::AlreadyExists(what.into()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound(what.into()),
        _ => backend(e),
    }
}

fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn thing(r: &tokio_postgres::Row) -> Result<Thing, StoreError> {
    Ok(Thing {
        name: r.get(0),
        attributes: serde_json::from_str(r.get(1)).map_err(corrupt)?,
        enabled: r.get(2),
    })
}

fn certificate(r: &tokio_postgres::Row) -> CertificateRecord {
    CertificateRecord {
        id: r.get(0),
        thing: r.get(1),
        status: CertificateStatus::parse(r.get(2)),
        pem: r.get(3),
    }
}

fn token(r: &tokio_postgres::Row) -> Result<StoredToken, StoreError> {
    let id: String = r.get(0);
    let scope: String = r.get(2);
    Ok(StoredToken {
        record: TokenRecord {
            scope: Scope::parse(&scope)
                .ok_or_else(|| StoreError::Corrupt(format!("token {id}: scope {scope:?}")))?,
            id,
            name: r.get(1),
            created_at: unsigned(r.get(4)),
        },
        secret_sha256: r.get(3),
    })
}

impl PgStore {
    /// The rows of a registry query.
    async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(backend)?;
        client.query(&stmt, params).await.map_err(backend)
    }

    /// Rows changed by a registry statement (a violated constraint names
    /// `what`).
    async fn execute(&self, sql: &str, params: Params<'_>, what: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(backend)?;
        client
            .execute(&stmt, params)
            .await
            .map_err(|e| refused(e, what))
    }

    /// The first column of `sql`'s rows.
    async fn names(&self, sql: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query(sql, &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

#[async_trait]
impl RegistryStore for PgStore {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        let request = entry.request.as_ref().map(ToString::to_string);
        let before = entry.before.as_ref().map(ToString::to_string);
        let rows = self
            .query(
                "INSERT INTO audit_log (at_ms, token_id, token_name, method, path, status, request, before) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[
                    &signed(entry.at_ms),
                    &entry.token_id,
                    &entry.token_name,
                    &entry.method,
                    &entry.path,
                    &i32::from(entry.status),
                    &request,
                    &before,
                ],
            )
            .await?;
        let id: i64 = rows
            .first()
            .ok_or_else(|| StoreError::backend("INSERT ... RETURNING gave no row"))?
            .get(0);
        Ok(unsigned(id))
    }

    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT id, at_ms, token_id, token_name, method, path, status, request, before \
                 FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2",
                &[&signed(after), &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let json = |s: Option<String>| {
                    s.map(|s| serde_json::from_str(&s).map_err(corrupt))
                        .transpose()
                };
                Ok(AuditEntry {
                    id: unsigned(r.get(0)),
                    at_ms: unsigned(r.get(1)),
                    token_id: r.get(2),
                    token_name: r.get(3),
                    method: r.get(4),
                    path: r.get(5),
                    status: u16::try_from(r.get::<_, i32>(6)).unwrap_or(0),
                    request: json(r.get(7))?,
                    before: json(r.get(8))?,
                })
            })
            .collect()
    }

    async fn put_template(&self, t: &StoredTemplate) -> Result<(), StoreError> {
        let spec = serde_json::to_string(t).map_err(backend)?;
        self.execute(
            "INSERT INTO provisioning_templates (name, spec) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            &[&t.name, &spec],
            &t.name,
        )
        .await
        .map(drop)
    }

    async fn template(&self, name: &str) -> Result<Option<StoredTemplate>, StoreError> {
        self.query(
            "SELECT spec FROM provisioning_templates WHERE name = $1",
            &[&name],
        )
        .await?
        .first()
        .map(|r| serde_json::from_str(&r.get::<_, String>(0)).map_err(corrupt))
        .transpose()
    }

    async fn templates(&self) -> Result<Vec<StoredTemplate>, StoreError> {
        self.query("SELECT spec FROM provisioning_templates ORDER BY name", &[])
            .await?
            .iter()
            .map(|r| serde_json::from_str(&r.get::<_, String>(0)).map_err(corrupt))
            .collect()
    }

    async fn delete_template(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "DELETE FROM provisioning_templates WHERE name = $1",
                &[&name],
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn insert_token(&self, t: &StoredToken) -> Result<(), StoreError> {
        let r = &t.record;
        self.execute(
            "INSERT INTO api_tokens (id, name, scope, secret_sha256, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&r.id, &r.name, &r.scope.as_str(), &t.secret_sha256, &signed(r.created_at)],
            &r.id,
        )
        .await
        .map(drop)
    }

    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        self.query(
            "SELECT id, name, scope, secret_sha256, created_at FROM api_tokens WHERE id = $1",
            &[&id],
        )
        .await?
        .first()
        .map(token)
        .transpose()
    }

    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.query(
            "SELECT id, name, scope, secret_sha256, created_at FROM api_tokens ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(token)
        .collect()
    }

    async fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .execute("DELETE FROM api_tokens WHERE id = $1", &[&id], id)
            .await?;
        Ok(n > 0)
    }

    async fn insert_thing(&self, t: &Thing) -> Result<(), StoreError> {
        let attributes = serde_json::to_string(&t.attributes).map_err(backend)?;
        self.execute(
            "INSERT INTO things (name, attributes, enabled) VALUES ($1, $2, $3)",
            &[&t.name, &attributes, &t.enabled],
            &t.name,
        )
        .await
        .map(drop)
    }

    async fn thing(&self, name: &str) -> Result<Option<Thing>, StoreError> {
        self.query(
            "SELECT name, attributes, enabled FROM things WHERE name = $1",
            &[&name],
        )
        .await?
        .first()
        .map(thing)
        .transpose()
    }

    async fn things(&self, after: &str, limit: usize) -> Result<Vec<Thing>, StoreError> {
        let limit = signed(limit as u64);
        self.query(
            "SELECT name, attributes, enabled FROM things WHERE name > $1 ORDER BY name LIMIT $2",
            &[&after, &limit],
        )
        .await?
        .iter()
        .map(thing)
        .collect()
    }

    async fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<bool, StoreError> {
        let attributes = serde_json::to_string(attributes).map_err(backend)?;
        let n = self
            .execute(
                "UPDATE things SET attributes = $2 WHERE name = $1",
                &[&name, &attributes],
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "UPDATE things SET enabled = $2 WHERE name = $1",
                &[&name, &enabled],
                name,
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete_thing(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .execute("DELETE FROM things WHERE name = $1", &[&name], name)
            .await?;
        Ok(n > 0)
    }

    async fn insert_group(&self, name: &str, query: Option<&GroupQuery>) -> Result<(), StoreError> {
        let query = query
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        self.execute(
            "INSERT INTO thing_groups (name, query) VALUES ($1, $2)",
            &[&name, &query],
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
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT name, query FROM thing_groups WHERE name > $1 ORDER BY name LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let q = r
                    .get::<_, Option<String>>(1)
                    .map(|q| serde_json::from_str(&q).map_err(corrupt))
                    .transpose()?;
                Ok((r.get(0), q))
            })
            .collect()
    }

    async fn group(&self, name: &str) -> Result<Option<Option<GroupQuery>>, StoreError> {
        let rows = self
            .query("SELECT query FROM thing_groups WHERE name = $1", &[&name])
            .await?;
        rows.first()
            .map(|r| {
                r.get::<_, Option<String>>(0)
                    .map(|q| serde_json::from_str(&q).map_err(corrupt))
                    .transpose()
            })
            .transpose()
    }

    async fn add_member(&self, group: &str, thing: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO group_members (group_name, thing) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&group, &thing],
            thing,
        )
        .await
        .map(drop)
    }

    async fn members(&self, group: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query(
                "SELECT thing FROM group_members WHERE group_name = $1 ORDER BY thing",
                &[&group],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn insert_certificate(&self, c: &CertificateRecord) -> Result<(), StoreError> {
        match self
            .execute(
                "INSERT INTO certificates (id, thing, status, pem) VALUES ($1, $2, $3, $4)",
                &[&c.id, &c.thing, &c.status.as_str(), &c.pem],
                &c.id,
            )
            .await
        {
            // The reference that failed is the thing's.
            Err(StoreError::NotFound(_)) => Err(StoreError::NotFound(c.thing.clone())),
            r => r.map(drop),
        }
    }

    async fn revoke_certificate(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "UPDATE certificates SET status = 'REVOKED' WHERE id = $1",
                &[&id],
                id,
            )
            .await?;
        Ok(n > 0)
    }

    async fn certificate(&self, id: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(self
            .query(
                "SELECT id, thing, status, pem FROM certificates WHERE id = $1",
                &[&id],
            )
            .await?
            .first()
            .map(certificate))
    }

    async fn certificates_of(&self, thing: &str) -> Result<Vec<CertificateRecord>, StoreError> {
        Ok(self
            .query(
                "SELECT id, thing, status, pem FROM certificates WHERE thing = $1 ORDER BY id",
                &[&thing],
            )
            .await?
            .iter()
            .map(certificate)
            .collect())
    }

    async fn revoked_certificates(&self) -> Result<Vec<String>, StoreError> {
        self.names(crate::store::sql::REVOKED_CERTIFICATES).await
    }

    async fn denied_identities(&self) -> Result<Vec<String>, StoreError> {
        self.names(crate::store::sql::DENIED_IDENTITIES).await
    }

    async fn roster(&self) -> Result<Roster, StoreError> {
        let mut roster = Roster::default();
        for r in self
            .query("SELECT name, enabled FROM things ORDER BY name", &[])
            .await?
        {
            roster.add_thing(r.get(0), r.get(1));
        }
        for r in self
            .query(
                "SELECT id, thing, status FROM certificates ORDER BY id",
                &[],
            )
            .await?
        {
            let active = CertificateStatus::parse(r.get(2)) == CertificateStatus::Active;
            roster.add_certificate(r.get(0), r.get(1), active);
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
        self.execute(
            "DELETE FROM pending_certificates WHERE used OR expires_at <= $1",
            &[&signed(now)],
            token,
        )
        .await?;
        let n = self
            .execute(
                "INSERT INTO pending_certificates (token, certificate_id, certificate_pem, common_name, named_by_certificate, expires_at, used)
                 SELECT $1, $2, $3, $4, $5, $6, FALSE
                 WHERE (SELECT COUNT(*) FROM pending_certificates) < $7",
                &[
                    &token,
                    &p.certificate_id,
                    &p.certificate_pem,
                    &p.common_name,
                    &p.named_by_certificate,
                    &signed(p.expires_at),
                    &signed(max as u64),
                ],
                token,
            )
            .await?;
        Ok(n == 1)
    }

    async fn pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Option<PendingCertificate>, StoreError> {
        Ok(self
            .query(
                "SELECT certificate_id, certificate_pem, common_name, named_by_certificate, expires_at
                 FROM pending_certificates WHERE token = $1 AND NOT used AND expires_at > $2",
                &[&token, &signed(now)],
            )
            .await?
            .first()
            .map(|r| PendingCertificate {
                certificate_id: r.get(0),
                certificate_pem: r.get(1),
                common_name: r.get(2),
                named_by_certificate: r.get(3),
                expires_at: unsigned(r.get(4)),
            }))
    }

    async fn spend_pending(&self, token: &str, now: u64) -> Result<Spent, StoreError> {
        let n = self
            .execute(
                "UPDATE pending_certificates SET used = TRUE
                 WHERE token = $1 AND NOT used AND expires_at > $2",
                &[&token, &signed(now)],
                token,
            )
            .await?;
        if n == 1 {
            return Ok(Spent::Now);
        }
        let used = !self
            .query(
                "SELECT 1 FROM pending_certificates WHERE token = $1 AND used",
                &[&token],
            )
            .await?
            .is_empty();
        Ok(if used { Spent::Before } else { Spent::Unknown })
    }
}
