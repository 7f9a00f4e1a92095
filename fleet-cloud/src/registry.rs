//! The registry: things with attributes, thing groups (static, and dynamic
//! by attribute query), and certificates bound to things, with status.
//!
//! Kept in SQLite (a file, or in memory for tests), or in PostgreSQL beside
//! the store, shared by every instance on it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fleet_core::ThingName;

/// A registered thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thing {
    /// Its name.
    pub name: String,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Disabled things may not connect (see [`Registry::denied_identities`]).
    pub enabled: bool,
}

/// The status of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    /// It may be used.
    Active,
    /// It may no longer be used.
    Revoked,
}

/// A certificate bound to a thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Its id (the caller's choice: the SHA-256 fingerprint, say).
    pub id: String,
    /// The thing it is bound to.
    pub thing: String,
    /// Its status.
    pub status: CertificateStatus,
    /// The certificate, PEM.
    pub pem: String,
}

/// How a dynamic group chooses its members: every attribute listed must
/// have the value given.
pub type AttributeQuery = BTreeMap<String, String>;

/// A registry operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RegistryError {
    /// A thing, group or certificate of that name exists.
    AlreadyExists(String),
    /// No such thing, group or certificate.
    NotFound(String),
    /// The name is not valid.
    InvalidName(String),
    /// The store failed; the cause is the
    /// [`source`](std::error::Error::source).
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl RegistryError {
    /// A store failure caused by `cause` (an error, or a message).
    pub fn backend(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(cause.into())
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyExists(n) => write!(f, "{n} already exists"),
            Self::NotFound(n) => write!(f, "{n} not found"),
            Self::InvalidName(e) => write!(f, "invalid name: {e}"),
            Self::Backend(e) => write!(f, "registry store failure: {e}"),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> RegistryError {
    RegistryError::backend(e)
}

const SCHEMA: &str = "
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
";

/// What a management API token may do; each scope includes the ones
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read everything.
    Read,
    /// Also change the fleet: things, groups, shadows, jobs, releases,
    /// campaigns, commands.
    Operator,
    /// Also certificates, claim identities and tokens.
    Admin,
}

impl Scope {
    /// Its name: `read`, `operator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// The scope named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Self::Read),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// A management API token, as stored: its secret only as a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Its id (the public part of the token).
    pub id: String,
    /// Who or what holds it, for people.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Epoch seconds.
    pub created_at: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(text.as_bytes()))
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The registry. Cloning shares it.
///
/// Kept in SQLite (a file for one instance, or in memory for tests), or in
/// PostgreSQL, shared by every `fleet serve` instance on the same database
/// ([`Registry::postgres`]). The methods are async: SQLite work runs on
/// blocking threads, PostgreSQL's on the pool's connections.
#[derive(Debug, Clone)]
pub struct Registry {
    backend: Backend,
    /// Names no thing may have: the broker's privileged identities.
    reserved: Arc<[String]>,
}

fn default_reserved() -> Arc<[String]> {
    Arc::from([crate::DEFAULT_BACKEND_IDENTITY.to_owned()])
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteRegistry),
    Postgres(crate::PgStore),
}

/// Runs `f` on the SQLite registry on a blocking thread.
async fn on_sqlite<T: Send + 'static>(
    s: &SqliteRegistry,
    f: impl FnOnce(&SqliteRegistry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(backend)?
}

/// A new token's id, its secret and the time, or why not.
fn new_token(name: &str) -> Result<(String, String, u64), RegistryError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(RegistryError::InvalidName(format!("token name {name:?}")));
    }
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).map_err(backend)?;
    getrandom::fill(&mut secret).map_err(backend)?;
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((hex(&id), hex(&secret), created_at))
}

/// `fleet_{id}_{secret}` split, or `None`.
fn split_token(token: &str) -> Option<(&str, &str)> {
    token
        .strip_prefix("fleet_")
        .and_then(|rest| rest.split_once('_'))
}

/// A stored token row, checked against `secret`.
fn token_record(
    id: &str,
    secret: &str,
    (name, scope, hash, created_at): (String, String, String, i64),
) -> Result<Option<TokenRecord>, RegistryError> {
    if !same(&sha256_hex(secret), &hash) {
        return Ok(None);
    }
    Ok(Some(TokenRecord {
        id: id.into(),
        name,
        scope: parse_scope(id, &scope)?,
        created_at: u64::try_from(created_at).unwrap_or(0),
    }))
}

fn parse_scope(id: &str, scope: &str) -> Result<Scope, RegistryError> {
    Scope::parse(scope)
        .ok_or_else(|| RegistryError::backend(format!("token {id}: scope {scope:?}")))
}

fn matches_query(query: &AttributeQuery, thing: &Thing) -> bool {
    query
        .iter()
        .all(|(k, v)| thing.attributes.get(k) == Some(v))
}

impl Registry {
    /// Opens (or creates) the registry in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        Ok(Self {
            backend: Backend::Sqlite(SqliteRegistry::with(
                rusqlite::Connection::open(path).map_err(backend)?,
            )?),
            reserved: default_reserved(),
        })
    }

    /// A registry in memory (a real SQLite database that lives as long as
    /// the value).
    pub fn in_memory() -> Result<Self, RegistryError> {
        Ok(Self {
            backend: Backend::Sqlite(SqliteRegistry::with(
                rusqlite::Connection::open_in_memory().map_err(backend)?,
            )?),
            reserved: default_reserved(),
        })
    }

    /// The registry in `store`'s PostgreSQL database (its tables are part of
    /// the store's schema): every instance on that database sees the same
    /// things, groups, certificates and tokens.
    pub fn postgres(store: &crate::PgStore) -> Self {
        Self {
            backend: Backend::Postgres(store.clone()),
            reserved: default_reserved(),
        }
    }

    /// Reserves the broker's privileged identities (its backend
    /// identities, [`BrokerPolicy::backend_identities`](crate::BrokerPolicy::backend_identities)):
    /// no thing may be created with one of these names, through the API or
    /// through provisioning. [`DEFAULT_BACKEND_IDENTITY`](crate::DEFAULT_BACKEND_IDENTITY)
    /// is always reserved.
    #[must_use]
    pub fn with_reserved_names<I: IntoIterator<Item = String>>(mut self, names: I) -> Self {
        let mut all: Vec<String> = self.reserved.to_vec();
        for n in names {
            if !all.contains(&n) {
                all.push(n);
            }
        }
        self.reserved = all.into();
        self
    }

    /// Whether `name` is a privileged identity no thing may have.
    pub fn is_reserved(&self, name: &str) -> bool {
        self.reserved.iter().any(|r| r == name)
    }

    /// Creates a management API token; returns its record and the token
    /// itself (`fleet_{id}_{secret}`), which is not stored and cannot be
    /// shown again.
    pub async fn create_token(
        &self,
        name: &str,
        scope: Scope,
    ) -> Result<(TokenRecord, String), RegistryError> {
        let (id, secret, created_at) = new_token(name)?;
        let hash = sha256_hex(&secret);
        match &self.backend {
            Backend::Sqlite(s) => {
                let (id, name, hash) = (id.clone(), name.to_owned(), hash);
                on_sqlite(s, move |s| {
                    s.insert_token(&id, &name, scope, &hash, created_at)
                })
                .await?;
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "INSERT INTO api_tokens (id, name, scope, secret_sha256, created_at) VALUES ($1, $2, $3, $4, $5)",
                    &[&id, &name, &scope.as_str(), &hash, &(created_at as i64)],
                    &id,
                )
                .await?;
            }
        }
        let token = format!("fleet_{id}_{secret}");
        Ok((
            TokenRecord {
                id,
                name: name.into(),
                scope,
                created_at,
            },
            token,
        ))
    }

    /// The token's record if `token` is a valid, unrevoked token.
    pub async fn verify_token(&self, token: &str) -> Result<Option<TokenRecord>, RegistryError> {
        let Some((id, secret)) = split_token(token) else {
            return Ok(None);
        };
        let row = match &self.backend {
            Backend::Sqlite(s) => {
                let id = id.to_owned();
                on_sqlite(s, move |s| s.token_row(&id)).await?
            }
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT name, scope, secret_sha256, created_at FROM api_tokens WHERE id = $1",
                    &[&id],
                )
                .await?
                .first()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))),
        };
        match row {
            Some(row) => token_record(id, secret, row),
            None => Ok(None),
        }
    }

    /// Every token (without secrets), by id.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => on_sqlite(s, SqliteRegistry::tokens).await,
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT id, name, scope, created_at FROM api_tokens ORDER BY id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    let id: String = r.get(0);
                    Ok(TokenRecord {
                        scope: parse_scope(&id, r.get(2))?,
                        name: r.get(1),
                        created_at: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                        id,
                    })
                })
                .collect(),
        }
    }

    /// Revokes a token: it is refused from now on.
    pub async fn revoke_token(&self, id: &str) -> Result<(), RegistryError> {
        let n = match &self.backend {
            Backend::Sqlite(s) => {
                let id = id.to_owned();
                on_sqlite(s, move |s| s.revoke_token(&id)).await?
            }
            Backend::Postgres(pg) => {
                pg.registry_execute("DELETE FROM api_tokens WHERE id = $1", &[&id], id)
                    .await?
            }
        };
        if n == 0 {
            return Err(RegistryError::NotFound(format!("token {id}")));
        }
        Ok(())
    }

    /// Registers a thing.
    pub async fn create_thing(
        &self,
        name: &str,
        attributes: BTreeMap<String, String>,
    ) -> Result<Thing, RegistryError> {
        ThingName::new(name).map_err(|e| RegistryError::InvalidName(e.to_string()))?;
        if self.is_reserved(name) {
            return Err(RegistryError::InvalidName(format!(
                "{name} is a privileged identity of the broker, not a thing name"
            )));
        }
        let json = serde_json::to_string(&attributes).map_err(backend)?;
        match &self.backend {
            Backend::Sqlite(s) => {
                let name = name.to_owned();
                on_sqlite(s, move |s| s.insert_thing(&name, &json)).await?;
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "INSERT INTO things (name, attributes, enabled) VALUES ($1, $2, TRUE)",
                    &[&name, &json],
                    name,
                )
                .await?;
            }
        }
        Ok(Thing {
            name: name.into(),
            attributes,
            enabled: true,
        })
    }

    /// A thing.
    pub async fn thing(&self, name: &str) -> Result<Thing, RegistryError> {
        let row = match &self.backend {
            Backend::Sqlite(s) => {
                let name = name.to_owned();
                on_sqlite(s, move |s| s.thing_row(&name)).await?
            }
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT attributes, enabled FROM things WHERE name = $1",
                    &[&name],
                )
                .await?
                .first()
                .map(|r| (r.get(0), r.get(1))),
        };
        let (attrs, enabled): (String, bool) =
            row.ok_or_else(|| RegistryError::NotFound(name.into()))?;
        Ok(Thing {
            name: name.into(),
            attributes: serde_json::from_str(&attrs).map_err(backend)?,
            enabled,
        })
    }

    /// Things in name order, `limit` at most, after `after` (for paging).
    pub async fn things(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Thing>, RegistryError> {
        let after = after.unwrap_or("").to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(String, String, bool)> = match &self.backend {
            Backend::Sqlite(s) => on_sqlite(s, move |s| s.thing_rows(&after, limit)).await?,
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT name, attributes, enabled FROM things WHERE name > $1 ORDER BY name LIMIT $2",
                    &[&after, &limit],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        };
        rows.into_iter()
            .map(|(name, attrs, enabled)| {
                Ok(Thing {
                    name,
                    attributes: serde_json::from_str(&attrs).map_err(backend)?,
                    enabled,
                })
            })
            .collect()
    }

    /// Replaces a thing's attributes.
    pub async fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_string(attributes).map_err(backend)?;
        let n = match &self.backend {
            Backend::Sqlite(s) => {
                let name = name.to_owned();
                on_sqlite(s, move |s| s.set_attributes(&name, &json)).await?
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "UPDATE things SET attributes = $2 WHERE name = $1",
                    &[&name, &json],
                    name,
                )
                .await?
            }
        };
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Enables or disables a thing. A disabled thing's identity is denied
    /// by the broker policy (see [`denied_identities`](Self::denied_identities)).
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        let n = match &self.backend {
            Backend::Sqlite(s) => {
                let name = name.to_owned();
                on_sqlite(s, move |s| s.set_enabled(&name, enabled)).await?
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "UPDATE things SET enabled = $2 WHERE name = $1",
                    &[&name, &enabled],
                    name,
                )
                .await?
            }
        };
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Deletes a thing, its group memberships and its certificates.
    pub async fn delete_thing(&self, name: &str) -> Result<(), RegistryError> {
        let n = match &self.backend {
            Backend::Sqlite(s) => {
                let name = name.to_owned();
                on_sqlite(s, move |s| s.delete_thing(&name)).await?
            }
            Backend::Postgres(pg) => {
                pg.registry_execute("DELETE FROM things WHERE name = $1", &[&name], name)
                    .await?
            }
        };
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Creates a static group (`query: None`) or a dynamic group whose
    /// members are the things whose attributes match `query`.
    pub async fn create_group(
        &self,
        name: &str,
        query: Option<&AttributeQuery>,
    ) -> Result<(), RegistryError> {
        ThingName::new(name).map_err(|e| RegistryError::InvalidName(e.to_string()))?;
        let query = query
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        match &self.backend {
            Backend::Sqlite(s) => {
                let name = name.to_owned();
                on_sqlite(s, move |s| s.create_group(&name, query.as_deref())).await
            }
            Backend::Postgres(pg) => pg
                .registry_execute(
                    "INSERT INTO thing_groups (name, query) VALUES ($1, $2)",
                    &[&name, &query],
                    name,
                )
                .await
                .map(drop),
        }
    }

    /// A group's attribute query (`None`: a static group).
    async fn group_query(&self, group: &str) -> Result<Option<AttributeQuery>, RegistryError> {
        let row: Option<Option<String>> = match &self.backend {
            Backend::Sqlite(s) => {
                let group = group.to_owned();
                on_sqlite(s, move |s| s.group_query(&group)).await?
            }
            Backend::Postgres(pg) => pg
                .registry_query("SELECT query FROM thing_groups WHERE name = $1", &[&group])
                .await?
                .first()
                .map(|r| r.get(0)),
        };
        row.ok_or_else(|| RegistryError::NotFound(group.into()))?
            .map(|q| serde_json::from_str(&q).map_err(backend))
            .transpose()
    }

    /// Adds a thing to a static group.
    pub async fn add_to_group(&self, group: &str, thing: &str) -> Result<(), RegistryError> {
        if self.group_query(group).await?.is_some() {
            return Err(RegistryError::InvalidName(format!(
                "{group} is a dynamic group"
            )));
        }
        match &self.backend {
            Backend::Sqlite(s) => {
                let (group, thing) = (group.to_owned(), thing.to_owned());
                on_sqlite(s, move |s| s.add_to_group(&group, &thing)).await
            }
            Backend::Postgres(pg) => pg
                .registry_execute(
                    "INSERT INTO group_members (group_name, thing) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&group, &thing],
                    thing,
                )
                .await
                .map(drop),
        }
    }

    /// The members of a group, in name order.
    pub async fn group_members(&self, group: &str) -> Result<Vec<String>, RegistryError> {
        match self.group_query(group).await? {
            None => match &self.backend {
                Backend::Sqlite(s) => {
                    let group = group.to_owned();
                    on_sqlite(s, move |s| s.static_members(&group)).await
                }
                Backend::Postgres(pg) => Ok(pg
                    .registry_query(
                        "SELECT thing FROM group_members WHERE group_name = $1 ORDER BY thing",
                        &[&group],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()),
            },
            Some(query) => {
                let mut members = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let page = self.things(after.as_deref(), 500).await?;
                    let Some(last) = page.last() else { break };
                    after = Some(last.name.clone());
                    members.extend(
                        page.into_iter()
                            .filter(|t| matches_query(&query, t))
                            .map(|t| t.name),
                    );
                }
                Ok(members)
            }
        }
    }

    /// Binds an active certificate to a thing.
    pub async fn add_certificate(
        &self,
        id: &str,
        thing: &str,
        pem: &str,
    ) -> Result<CertificateRecord, RegistryError> {
        self.thing(thing).await?;
        match &self.backend {
            Backend::Sqlite(s) => {
                let (id, thing, pem) = (id.to_owned(), thing.to_owned(), pem.to_owned());
                on_sqlite(s, move |s| s.add_certificate(&id, &thing, &pem)).await?;
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "INSERT INTO certificates (id, thing, status, pem) VALUES ($1, $2, 'ACTIVE', $3)",
                    &[&id, &thing, &pem],
                    id,
                )
                .await?;
            }
        }
        Ok(CertificateRecord {
            id: id.into(),
            thing: thing.into(),
            status: CertificateStatus::Active,
            pem: pem.into(),
        })
    }

    /// Revokes a certificate.
    pub async fn revoke_certificate(&self, id: &str) -> Result<(), RegistryError> {
        let n = match &self.backend {
            Backend::Sqlite(s) => {
                let id = id.to_owned();
                on_sqlite(s, move |s| s.revoke_certificate(&id)).await?
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "UPDATE certificates SET status = 'REVOKED' WHERE id = $1",
                    &[&id],
                    id,
                )
                .await?
            }
        };
        if n == 0 {
            return Err(RegistryError::NotFound(id.into()));
        }
        Ok(())
    }

    /// A thing's certificates.
    pub async fn certificates(&self, thing: &str) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows: Vec<(String, String, String)> = match &self.backend {
            Backend::Sqlite(s) => {
                let thing = thing.to_owned();
                on_sqlite(s, move |s| s.certificate_rows(&thing)).await?
            }
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT id, status, pem FROM certificates WHERE thing = $1 ORDER BY id",
                    &[&thing],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        };
        Ok(rows
            .into_iter()
            .map(|(id, status, pem)| CertificateRecord {
                id,
                thing: thing.into(),
                status: if status == "ACTIVE" {
                    CertificateStatus::Active
                } else {
                    CertificateStatus::Revoked
                },
                pem,
            })
            .collect())
    }

    /// The certificate with this id (its SHA-256 fingerprint), whichever
    /// thing it is bound to.
    pub async fn certificate(&self, id: &str) -> Result<Option<CertificateRecord>, RegistryError> {
        let row: Option<(String, String, String)> = match &self.backend {
            Backend::Sqlite(s) => {
                let id = id.to_owned();
                on_sqlite(s, move |s| {
                    optional(s.conn().query_row(
                        "SELECT thing, status, pem FROM certificates WHERE id = ?1",
                        [&id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    ))
                })
                .await?
            }
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT thing, status, pem FROM certificates WHERE id = $1",
                    &[&id],
                )
                .await?
                .first()
                .map(|r| (r.get(0), r.get(1), r.get(2))),
        };
        Ok(row.map(|(thing, status, pem)| CertificateRecord {
            id: id.into(),
            thing,
            status: if status == "ACTIVE" {
                CertificateStatus::Active
            } else {
                CertificateStatus::Revoked
            },
            pem,
        }))
    }

    /// The ids of every revoked certificate (SHA-256 fingerprints when
    /// issued by provisioning), for
    /// [`EmbeddedBroker::revoke`](crate::EmbeddedBroker::revoke).
    pub async fn revoked_certificates(&self) -> Result<Vec<String>, RegistryError> {
        self.names(REVOKED_CERTIFICATES).await
    }

    /// Identities the broker must refuse: things that are disabled, or
    /// whose every certificate is revoked. (A broker that knows a device
    /// only by its certificate's common name, as Mosquitto with the
    /// generated ACL, refuses a thing, not one certificate of it; the
    /// embedded broker also refuses single certificates:
    /// [`revoked_certificates`](Self::revoked_certificates).)
    pub async fn denied_identities(&self) -> Result<Vec<String>, RegistryError> {
        self.names(DENIED_IDENTITIES).await
    }

    /// Every thing and certificate with its standing, for a broker that
    /// cannot ask the registry at each CONNECT (the Mosquitto plugin reads
    /// it from the file `fleet serve --mosquitto-roster` writes).
    /// Certificate ids are their SHA-256 fingerprints; an id that cannot be
    /// one (it holds whitespace) is left out, so it admits nothing.
    pub async fn roster(&self) -> Result<fleet_core::admission::Roster, RegistryError> {
        let mut roster = fleet_core::admission::Roster::default();
        let clean = |f: &str| !f.is_empty() && !f.contains(char::is_whitespace);
        for row in self.names(ROSTER_THINGS).await? {
            if let Some((name, enabled)) = row.split_once('\t')
                && clean(name)
            {
                roster.add_thing(name, enabled == "1");
            }
        }
        for row in self.names(ROSTER_CERTIFICATES).await? {
            let mut f = row.split('\t');
            if let (Some(id), Some(thing), Some(status)) = (f.next(), f.next(), f.next())
                && clean(id)
                && clean(thing)
            {
                roster.add_certificate(id, thing, status == "ACTIVE");
            }
        }
        Ok(roster)
    }

    /// The first column of `sql` (the same text for both databases).
    async fn names(&self, sql: &'static str) -> Result<Vec<String>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => on_sqlite(s, move |s| s.names(sql)).await,
            Backend::Postgres(pg) => Ok(pg
                .registry_query(sql, &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()),
        }
    }
}

/// A certificate issued by provisioning that awaits its registration, by
/// its ownership token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingCertificate {
    pub(crate) certificate_id: String,
    pub(crate) certificate_pem: String,
    pub(crate) common_name: String,
    /// Issued by `CreateKeysAndCertificate`: the thing is named after the
    /// certificate, whatever the template would name it.
    pub(crate) named_by_certificate: bool,
    /// Epoch seconds.
    pub(crate) expires_at: u64,
}

/// What spending an ownership token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spent {
    /// It was good, and is now used.
    Now,
    /// It was used before.
    Before,
    /// Unknown or expired.
    Unknown,
}

impl Registry {
    /// Records `pending` under ownership token `token`, unless `max`
    /// tokens already await registration (then `false`). Expired and used
    /// tokens are forgotten first. With PostgreSQL every instance sees it,
    /// so a device's `RegisterThing` may reach another instance than its
    /// `create-from-csr` did (the bound is then per check, not exact).
    pub(crate) async fn add_pending(
        &self,
        token: &str,
        pending: &PendingCertificate,
        now: u64,
        max: usize,
    ) -> Result<bool, RegistryError> {
        let now = signed(now);
        let max = signed(max as u64);
        match &self.backend {
            Backend::Sqlite(s) => {
                let (token, p) = (token.to_owned(), pending.clone());
                on_sqlite(s, move |s| s.add_pending(&token, &p, now, max)).await
            }
            Backend::Postgres(pg) => {
                pg.registry_execute(
                    "DELETE FROM pending_certificates WHERE used OR expires_at <= $1",
                    &[&now],
                    token,
                )
                .await?;
                let n = pg
                    .registry_execute(
                        "INSERT INTO pending_certificates (token, certificate_id, certificate_pem, common_name, named_by_certificate, expires_at, used)
                         SELECT $1, $2, $3, $4, $5, $6, FALSE
                         WHERE (SELECT COUNT(*) FROM pending_certificates) < $7",
                        &[
                            &token,
                            &pending.certificate_id,
                            &pending.certificate_pem,
                            &pending.common_name,
                            &pending.named_by_certificate,
                            &signed(pending.expires_at),
                            &max,
                        ],
                        token,
                    )
                    .await?;
                Ok(n == 1)
            }
        }
    }

    /// The certificate awaiting registration under `token`, if the token is
    /// unused and unexpired at `now` (the token is not spent).
    pub(crate) async fn pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Option<PendingCertificate>, RegistryError> {
        let now = signed(now);
        let row: Option<(String, String, String, bool, i64)> = match &self.backend {
            Backend::Sqlite(s) => {
                let token = token.to_owned();
                on_sqlite(s, move |s| s.pending(&token, now)).await?
            }
            Backend::Postgres(pg) => pg
                .registry_query(
                    "SELECT certificate_id, certificate_pem, common_name, named_by_certificate, expires_at
                     FROM pending_certificates WHERE token = $1 AND NOT used AND expires_at > $2",
                    &[&token, &now],
                )
                .await?
                .first()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))),
        };
        Ok(row.map(
            |(certificate_id, certificate_pem, common_name, named_by_certificate, expires_at)| {
                PendingCertificate {
                    certificate_id,
                    certificate_pem,
                    common_name,
                    named_by_certificate,
                    expires_at: u64::try_from(expires_at).unwrap_or(0),
                }
            },
        ))
    }

    /// Spends ownership token `token` at `now`: one statement that marks it
    /// used only if it was not, so two instances racing on one token cannot
    /// both register with it.
    pub(crate) async fn spend_pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Spent, RegistryError> {
        let now = signed(now);
        let (spent, used) = match &self.backend {
            Backend::Sqlite(s) => {
                let token = token.to_owned();
                on_sqlite(s, move |s| s.spend_pending(&token, now)).await?
            }
            Backend::Postgres(pg) => {
                let n = pg
                    .registry_execute(
                        "UPDATE pending_certificates SET used = TRUE
                         WHERE token = $1 AND NOT used AND expires_at > $2",
                        &[&token, &now],
                        token,
                    )
                    .await?;
                let used = n == 0
                    && !pg
                        .registry_query(
                            "SELECT 1 FROM pending_certificates WHERE token = $1 AND used",
                            &[&token],
                        )
                        .await?
                        .is_empty();
                (n == 1, used)
            }
        };
        Ok(match (spent, used) {
            (true, _) => Spent::Now,
            (false, true) => Spent::Before,
            (false, false) => Spent::Unknown,
        })
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

const REVOKED_CERTIFICATES: &str =
    "SELECT id FROM certificates WHERE status = 'REVOKED' ORDER BY id";

const DENIED_IDENTITIES: &str = "SELECT name FROM things t WHERE NOT enabled OR (
    EXISTS (SELECT 1 FROM certificates c WHERE c.thing = t.name)
    AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.thing = t.name AND c.status = 'ACTIVE'))
 ORDER BY name";

// One text column, the same SQL for both databases (SQLite's `enabled` is
// an integer, PostgreSQL's a boolean: CASE reads both).
const ROSTER_THINGS: &str =
    "SELECT name || '\t' || CASE WHEN enabled THEN '1' ELSE '0' END FROM things ORDER BY name";

const ROSTER_CERTIFICATES: &str =
    "SELECT id || '\t' || thing || '\t' || status FROM certificates ORDER BY id";

/// The registry in SQLite (synchronous; [`Registry`] runs it on blocking
/// threads).
#[derive(Debug, Clone)]
struct SqliteRegistry {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

fn constraint(e: rusqlite::Error, what: &str) -> RegistryError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            RegistryError::AlreadyExists(what.into())
        }
        e => backend(e),
    }
}

/// `None` for no row.
fn optional<T>(r: rusqlite::Result<T>) -> Result<Option<T>, RegistryError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

impl SqliteRegistry {
    fn with(conn: rusqlite::Connection) -> Result<Self, RegistryError> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        // The connection holds no invariant a panic could break.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rows changed by `sql`; a constraint violation is `AlreadyExists(what)`.
    fn execute(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        what: &str,
    ) -> Result<usize, RegistryError> {
        self.conn()
            .execute(sql, params)
            .map_err(|e| constraint(e, what))
    }

    fn insert_token(
        &self,
        id: &str,
        name: &str,
        scope: Scope,
        hash: &str,
        created_at: u64,
    ) -> Result<usize, RegistryError> {
        self.execute(
            "INSERT INTO api_tokens (id, name, scope, secret_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            (id, name, scope.as_str(), hash, created_at as i64),
            id,
        )
    }

    fn token_row(&self, id: &str) -> Result<Option<(String, String, String, i64)>, RegistryError> {
        optional(self.conn().query_row(
            "SELECT name, scope, secret_sha256, created_at FROM api_tokens WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        ))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, name, scope, created_at FROM api_tokens ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(backend)?;
        rows.map(|row| {
            let (id, name, scope, created_at) = row.map_err(backend)?;
            Ok(TokenRecord {
                scope: parse_scope(&id, &scope)?,
                id,
                name,
                created_at: u64::try_from(created_at).unwrap_or(0),
            })
        })
        .collect()
    }

    fn revoke_token(&self, id: &str) -> Result<usize, RegistryError> {
        self.execute("DELETE FROM api_tokens WHERE id = ?1", [id], id)
    }

    fn insert_thing(&self, name: &str, attributes: &str) -> Result<usize, RegistryError> {
        self.execute(
            "INSERT INTO things (name, attributes, enabled) VALUES (?1, ?2, 1)",
            (name, attributes),
            name,
        )
    }

    fn thing_row(&self, name: &str) -> Result<Option<(String, bool)>, RegistryError> {
        optional(self.conn().query_row(
            "SELECT attributes, enabled FROM things WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
        ))
    }

    fn thing_rows(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, String, bool)>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, attributes, enabled FROM things WHERE name > ?1 ORDER BY name LIMIT ?2")
            .map_err(backend)?;
        let rows = stmt
            .query_map((after, limit), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0))
            })
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }

    fn set_attributes(&self, name: &str, attributes: &str) -> Result<usize, RegistryError> {
        self.execute(
            "UPDATE things SET attributes = ?2 WHERE name = ?1",
            (name, attributes),
            name,
        )
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<usize, RegistryError> {
        self.execute(
            "UPDATE things SET enabled = ?2 WHERE name = ?1",
            (name, enabled as i64),
            name,
        )
    }

    fn delete_thing(&self, name: &str) -> Result<usize, RegistryError> {
        self.execute("DELETE FROM things WHERE name = ?1", [name], name)
    }

    fn create_group(&self, name: &str, query: Option<&str>) -> Result<(), RegistryError> {
        self.execute(
            "INSERT INTO thing_groups (name, query) VALUES (?1, ?2)",
            (name, query),
            name,
        )
        .map(drop)
    }

    /// `None`: no such group; `Some(None)`: a static one.
    fn group_query(&self, group: &str) -> Result<Option<Option<String>>, RegistryError> {
        optional(self.conn().query_row(
            "SELECT query FROM thing_groups WHERE name = ?1",
            [group],
            |r| r.get(0),
        ))
    }

    fn add_to_group(&self, group: &str, thing: &str) -> Result<(), RegistryError> {
        self.conn()
            .execute(
                "INSERT OR IGNORE INTO group_members (group_name, thing) VALUES (?1, ?2)",
                (group, thing),
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    RegistryError::NotFound(thing.into())
                }
                e => backend(e),
            })
            .map(drop)
    }

    fn static_members(&self, group: &str) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT thing FROM group_members WHERE group_name = ?1 ORDER BY thing")
            .map_err(backend)?;
        let rows = stmt.query_map([group], |r| r.get(0)).map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }

    fn add_certificate(&self, id: &str, thing: &str, pem: &str) -> Result<usize, RegistryError> {
        self.execute(
            "INSERT INTO certificates (id, thing, status, pem) VALUES (?1, ?2, 'ACTIVE', ?3)",
            (id, thing, pem),
            id,
        )
    }

    fn revoke_certificate(&self, id: &str) -> Result<usize, RegistryError> {
        self.execute(
            "UPDATE certificates SET status = 'REVOKED' WHERE id = ?1",
            [id],
            id,
        )
    }

    fn certificate_rows(
        &self,
        thing: &str,
    ) -> Result<Vec<(String, String, String)>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, status, pem FROM certificates WHERE thing = ?1 ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map([thing], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }

    fn add_pending(
        &self,
        token: &str,
        p: &PendingCertificate,
        now: i64,
        max: i64,
    ) -> Result<bool, RegistryError> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM pending_certificates WHERE used <> 0 OR expires_at <= ?1",
            [now],
        )
        .map_err(backend)?;
        let n = conn
            .execute(
                "INSERT INTO pending_certificates (token, certificate_id, certificate_pem, common_name, named_by_certificate, expires_at, used)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, 0
                 WHERE (SELECT COUNT(*) FROM pending_certificates) < ?7",
                rusqlite::params![
                    token,
                    p.certificate_id,
                    p.certificate_pem,
                    p.common_name,
                    p.named_by_certificate as i64,
                    signed(p.expires_at),
                    max
                ],
            )
            .map_err(|e| constraint(e, token))?;
        Ok(n == 1)
    }

    #[allow(clippy::type_complexity)]
    fn pending(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Option<(String, String, String, bool, i64)>, RegistryError> {
        optional(self.conn().query_row(
            "SELECT certificate_id, certificate_pem, common_name, named_by_certificate, expires_at
             FROM pending_certificates WHERE token = ?1 AND used = 0 AND expires_at > ?2",
            (token, now),
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)? != 0,
                    r.get(4)?,
                ))
            },
        ))
    }

    /// (spent now, used before).
    fn spend_pending(&self, token: &str, now: i64) -> Result<(bool, bool), RegistryError> {
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE pending_certificates SET used = 1
                 WHERE token = ?1 AND used = 0 AND expires_at > ?2",
                (token, now),
            )
            .map_err(backend)?;
        let used = n == 0
            && optional(conn.query_row(
                "SELECT 1 FROM pending_certificates WHERE token = ?1 AND used <> 0",
                [token],
                |r| r.get::<_, i64>(0),
            ))?
            .is_some();
        Ok((n == 1, used))
    }

    fn names(&self, sql: &str) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).map_err(backend)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }
}

/// The embedded broker asks the registry whether a device may connect.
impl crate::embedded::Directory for Registry {
    fn standing<'a>(
        &'a self,
        thing: &'a str,
        fingerprint: &'a str,
    ) -> crate::embedded::StandingFuture<'a> {
        Box::pin(async move {
            let wrap = |e: RegistryError| crate::embedded::DirectoryError(Box::new(e));
            let thing = match self.thing(thing).await {
                Ok(t) => Some(t.enabled),
                Err(RegistryError::NotFound(_)) => None,
                Err(e) => return Err(wrap(e)),
            };
            let certificate = self
                .certificate(fingerprint)
                .await
                .map_err(wrap)?
                .map(|c| (c.thing, c.status == CertificateStatus::Active));
            Ok(crate::embedded::Standing { thing, certificate })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The registry's behaviour on SQLite and PostgreSQL is tested in
    // tests/stores.rs (`registry_on_every_store`).

    #[tokio::test]
    async fn a_registry_file_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let attrs = BTreeMap::from([("a".to_string(), "b".to_string())]);
        Registry::open(&path)
            .unwrap()
            .create_thing("pump-1", attrs)
            .await
            .unwrap();
        let thing = Registry::open(&path)
            .unwrap()
            .thing("pump-1")
            .await
            .unwrap();
        assert_eq!(thing.attributes["a"], "b");
    }
}
