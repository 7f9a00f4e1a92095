//! The registry: things with attributes, thing groups (static, and dynamic
//! by attribute query), and certificates bound to things, with status.
//!
//! Kept in SQLite (a file, or in memory for tests), next to the shadows.

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
    /// The store failed.
    Backend(String),
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

impl std::error::Error for RegistryError {}

fn backend(e: impl fmt::Display) -> RegistryError {
    RegistryError::Backend(e.to_string())
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

/// A group's attribute query (`None`: a static group).
fn group_query(conn: &rusqlite::Connection, group: &str) -> Result<Option<String>, RegistryError> {
    conn.query_row(
        "SELECT query FROM thing_groups WHERE name = ?1",
        [group],
        |r| r.get(0),
    )
    .map_err(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => RegistryError::NotFound(group.into()),
        e => backend(e),
    })
}

/// The registry. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Registry {
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

impl Registry {
    /// Opens (or creates) the registry in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        Self::with(rusqlite::Connection::open(path).map_err(backend)?)
    }

    /// A registry in memory (a real SQLite database that lives as long as
    /// the value).
    pub fn in_memory() -> Result<Self, RegistryError> {
        Self::with(rusqlite::Connection::open_in_memory().map_err(backend)?)
    }

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

    /// Creates a management API token; returns its record and the token
    /// itself (`fleet_{id}_{secret}`), which is not stored and cannot be
    /// shown again.
    pub fn create_token(
        &self,
        name: &str,
        scope: Scope,
    ) -> Result<(TokenRecord, String), RegistryError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(RegistryError::InvalidName(format!("token name {name:?}")));
        }
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        getrandom::fill(&mut id).map_err(backend)?;
        getrandom::fill(&mut secret).map_err(backend)?;
        let (id, secret) = (hex(&id), hex(&secret));
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.conn()
            .execute(
                "INSERT INTO api_tokens (id, name, scope, secret_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                (&id, name, scope.as_str(), sha256_hex(&secret), created_at as i64),
            )
            .map_err(|e| constraint(e, &id))?;
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
    pub fn verify_token(&self, token: &str) -> Result<Option<TokenRecord>, RegistryError> {
        let Some((id, secret)) = token
            .strip_prefix("fleet_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(None);
        };
        let row = self.conn().query_row(
            "SELECT name, scope, secret_sha256, created_at FROM api_tokens WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        );
        let (name, scope, hash, created_at) = match row {
            Ok(r) => r,
            Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        if !same(&sha256_hex(secret), &hash) {
            return Ok(None);
        }
        let scope = Scope::parse(&scope)
            .ok_or_else(|| RegistryError::Backend(format!("token {id}: scope {scope:?}")))?;
        Ok(Some(TokenRecord {
            id: id.into(),
            name,
            scope,
            created_at: u64::try_from(created_at).unwrap_or(0),
        }))
    }

    /// Every token (without secrets), by id.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
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
        let mut out = Vec::new();
        for row in rows {
            let (id, name, scope, created_at) = row.map_err(backend)?;
            out.push(TokenRecord {
                scope: Scope::parse(&scope).ok_or_else(|| {
                    RegistryError::Backend(format!("token {id}: scope {scope:?}"))
                })?,
                id,
                name,
                created_at: u64::try_from(created_at).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Revokes a token: it is refused from now on.
    pub fn revoke_token(&self, id: &str) -> Result<(), RegistryError> {
        let n = self
            .conn()
            .execute("DELETE FROM api_tokens WHERE id = ?1", [id])
            .map_err(backend)?;
        if n == 0 {
            return Err(RegistryError::NotFound(format!("token {id}")));
        }
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        // The connection holds no invariant a panic could break.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a thing.
    pub fn create_thing(
        &self,
        name: &str,
        attributes: BTreeMap<String, String>,
    ) -> Result<Thing, RegistryError> {
        ThingName::new(name).map_err(|e| RegistryError::InvalidName(e.to_string()))?;
        let json = serde_json::to_string(&attributes).map_err(backend)?;
        self.conn()
            .execute(
                "INSERT INTO things (name, attributes, enabled) VALUES (?1, ?2, 1)",
                (name, &json),
            )
            .map_err(|e| constraint(e, name))?;
        Ok(Thing {
            name: name.into(),
            attributes,
            enabled: true,
        })
    }

    /// A thing.
    pub fn thing(&self, name: &str) -> Result<Thing, RegistryError> {
        let row: Result<(String, i64), _> = self.conn().query_row(
            "SELECT attributes, enabled FROM things WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        );
        match row {
            Ok((attrs, enabled)) => Ok(Thing {
                name: name.into(),
                attributes: serde_json::from_str(&attrs).map_err(backend)?,
                enabled: enabled != 0,
            }),
            Err(rusqlite::Error::QueryReturnedNoRows) => Err(RegistryError::NotFound(name.into())),
            Err(e) => Err(backend(e)),
        }
    }

    /// Things in name order, `limit` at most, after `after` (for paging).
    pub fn things(&self, after: Option<&str>, limit: usize) -> Result<Vec<Thing>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, attributes, enabled FROM things WHERE name > ?1 ORDER BY name LIMIT ?2")
            .map_err(backend)?;
        let rows = stmt
            .query_map((after.unwrap_or(""), limit as i64), |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(backend)?;
        rows.map(|r| {
            let (name, attrs, enabled) = r.map_err(backend)?;
            Ok(Thing {
                name,
                attributes: serde_json::from_str(&attrs).map_err(backend)?,
                enabled: enabled != 0,
            })
        })
        .collect()
    }

    /// Replaces a thing's attributes.
    pub fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_string(attributes).map_err(backend)?;
        let n = self
            .conn()
            .execute(
                "UPDATE things SET attributes = ?2 WHERE name = ?1",
                (name, &json),
            )
            .map_err(backend)?;
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Enables or disables a thing. A disabled thing's identity is denied
    /// by the broker policy (see [`denied_identities`](Self::denied_identities)).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        let n = self
            .conn()
            .execute(
                "UPDATE things SET enabled = ?2 WHERE name = ?1",
                (name, enabled as i64),
            )
            .map_err(backend)?;
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Deletes a thing, its group memberships and its certificates.
    pub fn delete_thing(&self, name: &str) -> Result<(), RegistryError> {
        let n = self
            .conn()
            .execute("DELETE FROM things WHERE name = ?1", [name])
            .map_err(backend)?;
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Creates a static group (`query: None`) or a dynamic group whose
    /// members are the things whose attributes match `query`.
    pub fn create_group(
        &self,
        name: &str,
        query: Option<&AttributeQuery>,
    ) -> Result<(), RegistryError> {
        ThingName::new(name).map_err(|e| RegistryError::InvalidName(e.to_string()))?;
        let query = query
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        self.conn()
            .execute(
                "INSERT INTO thing_groups (name, query) VALUES (?1, ?2)",
                (name, &query),
            )
            .map_err(|e| constraint(e, name))?;
        Ok(())
    }

    /// Adds a thing to a static group.
    pub fn add_to_group(&self, group: &str, thing: &str) -> Result<(), RegistryError> {
        let conn = self.conn();
        if group_query(&conn, group)?.is_some() {
            return Err(RegistryError::InvalidName(format!(
                "{group} is a dynamic group"
            )));
        }
        conn.execute(
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
        })?;
        Ok(())
    }

    /// The members of a group, in name order.
    pub fn group_members(&self, group: &str) -> Result<Vec<String>, RegistryError> {
        let query = group_query(&self.conn(), group)?;
        match query {
            None => {
                let conn = self.conn();
                let mut stmt = conn
                    .prepare("SELECT thing FROM group_members WHERE group_name = ?1 ORDER BY thing")
                    .map_err(backend)?;
                let rows = stmt.query_map([group], |r| r.get(0)).map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)
            }
            Some(q) => {
                let query: AttributeQuery = serde_json::from_str(&q).map_err(backend)?;
                let mut members = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let page = self.things(after.as_deref(), 500)?;
                    let Some(last) = page.last() else { break };
                    after = Some(last.name.clone());
                    members.extend(
                        page.into_iter()
                            .filter(|t| query.iter().all(|(k, v)| t.attributes.get(k) == Some(v)))
                            .map(|t| t.name),
                    );
                }
                Ok(members)
            }
        }
    }

    /// Binds an active certificate to a thing.
    pub fn add_certificate(
        &self,
        id: &str,
        thing: &str,
        pem: &str,
    ) -> Result<CertificateRecord, RegistryError> {
        self.thing(thing)?;
        self.conn()
            .execute(
                "INSERT INTO certificates (id, thing, status, pem) VALUES (?1, ?2, 'ACTIVE', ?3)",
                (id, thing, pem),
            )
            .map_err(|e| constraint(e, id))?;
        Ok(CertificateRecord {
            id: id.into(),
            thing: thing.into(),
            status: CertificateStatus::Active,
            pem: pem.into(),
        })
    }

    /// Revokes a certificate.
    pub fn revoke_certificate(&self, id: &str) -> Result<(), RegistryError> {
        let n = self
            .conn()
            .execute(
                "UPDATE certificates SET status = 'REVOKED' WHERE id = ?1",
                [id],
            )
            .map_err(backend)?;
        if n == 0 {
            return Err(RegistryError::NotFound(id.into()));
        }
        Ok(())
    }

    /// A thing's certificates.
    pub fn certificates(&self, thing: &str) -> Result<Vec<CertificateRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, status, pem FROM certificates WHERE thing = ?1 ORDER BY id")
            .map_err(backend)?;
        let rows = stmt
            .query_map([thing], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(backend)?;
        rows.map(|r| {
            let (id, status, pem) = r.map_err(backend)?;
            Ok(CertificateRecord {
                id,
                thing: thing.into(),
                status: if status == "ACTIVE" {
                    CertificateStatus::Active
                } else {
                    CertificateStatus::Revoked
                },
                pem,
            })
        })
        .collect()
    }

    /// The ids of every revoked certificate (SHA-256 fingerprints when
    /// issued by provisioning), for
    /// [`EmbeddedBroker::revoke`](crate::EmbeddedBroker::revoke).
    pub fn revoked_certificates(&self) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id FROM certificates WHERE status = 'REVOKED' ORDER BY id")
            .map_err(backend)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }

    /// Identities the broker must refuse: things that are disabled, or
    /// whose every certificate is revoked. (A broker that knows a device
    /// only by its certificate's common name, as Mosquitto with the
    /// generated ACL, refuses a thing, not one certificate of it; the
    /// embedded broker also refuses single certificates:
    /// [`revoked_certificates`](Self::revoked_certificates).)
    pub fn denied_identities(&self) -> Result<Vec<String>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT name FROM things t WHERE enabled = 0 OR (
                    EXISTS (SELECT 1 FROM certificates c WHERE c.thing = t.name)
                    AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.thing = t.name AND c.status = 'ACTIVE'))
                 ORDER BY name",
            )
            .map_err(backend)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn things_groups_and_certificates() {
        let r = Registry::in_memory().unwrap();
        r.create_thing("pump-1", attrs(&[("site", "gdansk"), ("model", "p7")]))
            .unwrap();
        r.create_thing("pump-2", attrs(&[("site", "gdansk"), ("model", "p8")]))
            .unwrap();
        r.create_thing("pump-3", attrs(&[("site", "oslo"), ("model", "p7")]))
            .unwrap();
        assert!(matches!(
            r.create_thing("pump-1", BTreeMap::new()),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(matches!(
            r.create_thing("bad/name", BTreeMap::new()),
            Err(RegistryError::InvalidName(_))
        ));
        assert_eq!(r.thing("pump-3").unwrap().attributes["site"], "oslo");
        assert!(matches!(r.thing("nope"), Err(RegistryError::NotFound(_))));

        // Paging.
        let first = r.things(None, 2).unwrap();
        assert_eq!(
            first.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["pump-1", "pump-2"]
        );
        let rest = r.things(Some("pump-2"), 2).unwrap();
        assert_eq!(rest.len(), 1);

        // Static and dynamic groups; a dynamic group follows attribute changes.
        r.create_group("canary", None).unwrap();
        r.add_to_group("canary", "pump-3").unwrap();
        assert!(matches!(
            r.add_to_group("canary", "ghost"),
            Err(RegistryError::NotFound(_))
        ));
        r.create_group(
            "gdansk-p7",
            Some(&attrs(&[("site", "gdansk"), ("model", "p7")])),
        )
        .unwrap();
        assert_eq!(r.group_members("canary").unwrap(), ["pump-3"]);
        assert_eq!(r.group_members("gdansk-p7").unwrap(), ["pump-1"]);
        r.set_attributes("pump-2", &attrs(&[("site", "gdansk"), ("model", "p7")]))
            .unwrap();
        assert_eq!(r.group_members("gdansk-p7").unwrap(), ["pump-1", "pump-2"]);
        assert!(
            r.add_to_group("gdansk-p7", "pump-3").is_err(),
            "dynamic groups have no manual members"
        );

        // Certificates: a thing with all certificates revoked is denied.
        r.add_certificate("c1", "pump-1", "PEM1").unwrap();
        r.add_certificate("c2", "pump-1", "PEM2").unwrap();
        assert!(matches!(
            r.add_certificate("c3", "ghost", "x"),
            Err(RegistryError::NotFound(_))
        ));
        r.revoke_certificate("c1").unwrap();
        assert!(
            r.denied_identities().unwrap().is_empty(),
            "pump-1 still has c2"
        );
        assert_eq!(r.revoked_certificates().unwrap(), ["c1"]);
        r.revoke_certificate("c2").unwrap();
        assert_eq!(r.denied_identities().unwrap(), ["pump-1"]);
        assert_eq!(
            r.certificates("pump-1").unwrap()[0].status,
            CertificateStatus::Revoked
        );
        r.set_enabled("pump-3", false).unwrap();
        assert_eq!(r.denied_identities().unwrap(), ["pump-1", "pump-3"]);

        // Deleting a thing removes its memberships and certificates.
        r.delete_thing("pump-3").unwrap();
        assert!(r.group_members("canary").unwrap().is_empty());
        assert!(r.certificates("pump-3").unwrap().is_empty());
    }

    #[test]
    fn a_registry_file_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        Registry::open(&path)
            .unwrap()
            .create_thing("pump-1", attrs(&[("a", "b")]))
            .unwrap();
        assert_eq!(
            Registry::open(&path)
                .unwrap()
                .thing("pump-1")
                .unwrap()
                .attributes["a"],
            "b"
        );
    }
}
