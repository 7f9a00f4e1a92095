//! The registry: things with attributes, thing groups (static, and dynamic
//! by attribute query), certificates bound to things with their status,
//! management API tokens, and provisioning's ownership tokens.
//!
//! The service validates and decides; a [`RegistryStore`] keeps (memory,
//! a SQLite file, or PostgreSQL shared by every instance on it).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use fleet_core::ThingName;

use crate::clock::Clock;
use crate::model::{
    AttributeQuery, CertificateRecord, CertificateStatus, GroupQuery, PendingCertificate, Scope,
    Spent, StoredToken, Thing, TokenRecord,
};
use crate::store::{MemoryStore, PgStore, RegistryStore, SqliteRegistry, StoreError};

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
    /// A group's query is not valid, or cannot be served (no fleet index).
    InvalidQuery(String),
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
            Self::InvalidQuery(e) => write!(f, "invalid group query: {e}"),
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

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => Self::AlreadyExists(what),
            StoreError::NotFound(what) => Self::NotFound(what),
            e => Self::Backend(Box::new(e)),
        }
    }
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> RegistryError {
    RegistryError::backend(e)
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
/// Kept by a [`RegistryStore`]: a SQLite file for one instance
/// ([`Registry::open`]), PostgreSQL shared by every `fleet serve` instance
/// on the same database ([`Registry::postgres`]), or memory for tests
/// ([`Registry::in_memory`]).
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<dyn RegistryStore>,
    /// Names no thing may have: the broker's privileged identities.
    reserved: Arc<[String]>,
    /// When tokens are created.
    clock: Clock,
    /// The fleet index, given each thing's registry fields as they change.
    index: Option<Arc<dyn crate::store::IndexStore>>,
}

fn default_reserved() -> Arc<[String]> {
    Arc::from([crate::DEFAULT_BACKEND_IDENTITY.to_owned()])
}

/// A new token's id and its secret, or why not.
fn new_token(name: &str) -> Result<(String, String), RegistryError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(RegistryError::InvalidName(format!("token name {name:?}")));
    }
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).map_err(backend)?;
    getrandom::fill(&mut secret).map_err(backend)?;
    Ok((hex(&id), hex(&secret)))
}

/// `fleet_{id}_{secret}` split, or `None`.
fn split_token(token: &str) -> Option<(&str, &str)> {
    token
        .strip_prefix("fleet_")
        .and_then(|rest| rest.split_once('_'))
}

fn matches_query(query: &AttributeQuery, thing: &Thing) -> bool {
    query
        .iter()
        .all(|(k, v)| thing.attributes.get(k) == Some(v))
}

impl Registry {
    /// The registry kept by `store`.
    pub fn new(store: Arc<dyn RegistryStore>) -> Self {
        Self {
            store,
            reserved: default_reserved(),
            clock: Clock::system(),
            index: None,
        }
    }

    /// The same registry reading the time from `clock` (when tokens are
    /// created).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Opens (or creates) the registry in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        Ok(Self::new(Arc::new(SqliteRegistry::open(path)?)))
    }

    /// A registry in memory, for tests and simulations.
    pub fn in_memory() -> Result<Self, RegistryError> {
        Ok(Self::new(Arc::new(MemoryStore::new())))
    }

    /// The registry in `store`'s PostgreSQL database (its tables are part of
    /// the store's schema): every instance on that database sees the same
    /// things, groups, certificates and tokens.
    pub fn postgres(store: &PgStore) -> Self {
        Self::new(Arc::new(store.clone()))
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
        let (id, secret) = new_token(name)?;
        let created_at = self.clock.now();
        let record = TokenRecord {
            id,
            name: name.into(),
            scope,
            created_at,
        };
        self.store
            .insert_token(&StoredToken {
                record: record.clone(),
                secret_sha256: sha256_hex(&secret),
            })
            .await?;
        let token = format!("fleet_{}_{secret}", record.id);
        Ok((record, token))
    }

    /// The token's record if `token` is a valid, unrevoked token.
    pub async fn verify_token(&self, token: &str) -> Result<Option<TokenRecord>, RegistryError> {
        let Some((id, secret)) = split_token(token) else {
            return Ok(None);
        };
        Ok(self
            .store
            .token(id)
            .await?
            .filter(|t| same(&sha256_hex(secret), &t.secret_sha256))
            .map(|t| t.record))
    }

    /// Every token (without secrets), by id.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        Ok(self
            .store
            .tokens()
            .await?
            .into_iter()
            .map(|t| t.record)
            .collect())
    }

    /// Groups by name after `after` (`None`: from the start), `limit` at
    /// most, each with its query (`None`: a static group).
    pub async fn groups(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Option<GroupQuery>)>, RegistryError> {
        Ok(self.store.groups(after.unwrap_or(""), limit).await?)
    }

    /// Appends `entry` to the audit log; the id it was given.
    pub async fn record_audit(&self, entry: &crate::AuditEntry) -> Result<u64, RegistryError> {
        Ok(self.store.append_audit(entry).await?)
    }

    /// The audit log after entry `after` (0: from the start), oldest
    /// first, `limit` at most.
    pub async fn audit(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::AuditEntry>, RegistryError> {
        Ok(self.store.audit(after, limit).await?)
    }

    /// Creates or replaces a provisioning template kept in the store (the
    /// caller checks it: [`ProvisioningTemplate::from_stored`](crate::ProvisioningTemplate::from_stored)).
    pub async fn put_template(
        &self,
        template: &crate::StoredTemplate,
    ) -> Result<(), RegistryError> {
        Ok(self.store.put_template(template).await?)
    }

    /// The stored provisioning template with this name.
    pub async fn stored_template(
        &self,
        name: &str,
    ) -> Result<Option<crate::StoredTemplate>, RegistryError> {
        Ok(self.store.template(name).await?)
    }

    /// Every stored provisioning template, by name.
    pub async fn stored_templates(&self) -> Result<Vec<crate::StoredTemplate>, RegistryError> {
        Ok(self.store.templates().await?)
    }

    /// Forgets a stored provisioning template (`NotFound` when there is
    /// none): registrations by it are refused from now on.
    pub async fn delete_template(&self, name: &str) -> Result<(), RegistryError> {
        if !self.store.delete_template(name).await? {
            return Err(RegistryError::NotFound(format!("template {name}")));
        }
        Ok(())
    }

    /// Revokes a token: it is refused from now on.
    pub async fn revoke_token(&self, id: &str) -> Result<(), RegistryError> {
        if !self.store.delete_token(id).await? {
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
        let thing = Thing {
            name: name.into(),
            attributes,
            enabled: true,
        };
        self.store.insert_thing(&thing).await?;
        self.reindex(name, Some(Vec::new())).await?;
        Ok(thing)
    }

    /// A thing.
    pub async fn thing(&self, name: &str) -> Result<Thing, RegistryError> {
        self.store
            .thing(name)
            .await?
            .ok_or_else(|| RegistryError::NotFound(name.into()))
    }

    /// Things in name order, `limit` at most, after `after` (for paging).
    pub async fn things(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Thing>, RegistryError> {
        Ok(self.store.things(after.unwrap_or(""), limit).await?)
    }

    /// Replaces a thing's attributes.
    pub async fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), RegistryError> {
        found(self.store.set_attributes(name, attributes).await?, name)?;
        self.reindex(name, None).await
    }

    /// Enables or disables a thing. A disabled thing's identity is denied
    /// by the broker policy (see [`denied_identities`](Self::denied_identities)).
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), RegistryError> {
        found(self.store.set_enabled(name, enabled).await?, name)?;
        self.reindex(name, None).await
    }

    /// Deletes a thing, its group memberships and its certificates.
    pub async fn delete_thing(&self, name: &str) -> Result<(), RegistryError> {
        found(self.store.delete_thing(name).await?, name)?;
        if let Some(index) = &self.index {
            index.index_registry(vec![(name.to_string(), None)]).await?;
        }
        Ok(())
    }

    /// Creates a static group (`query: None`) or a dynamic group: the
    /// things a fleet query finds (it needs the fleet index,
    /// [`with_index`](Self::with_index)), or those whose attributes match.
    pub async fn create_group(
        &self,
        name: &str,
        query: Option<&GroupQuery>,
    ) -> Result<(), RegistryError> {
        ThingName::new(name).map_err(|e| RegistryError::InvalidName(e.to_string()))?;
        if let Some(GroupQuery::Search(text)) = query {
            if self.index.is_none() {
                return Err(RegistryError::InvalidQuery(
                    "a group defined by a search needs the fleet index".into(),
                ));
            }
            crate::query::Query::parse(text)
                .map_err(|e| RegistryError::InvalidQuery(format!("group {name}: {e}")))?;
        }
        Ok(self.store.insert_group(name, query).await?)
    }

    /// A group's query (`None`: a static group).
    async fn group_query(&self, group: &str) -> Result<Option<GroupQuery>, RegistryError> {
        self.store
            .group(group)
            .await?
            .ok_or_else(|| RegistryError::NotFound(group.into()))
    }

    /// Adds a thing to a static group.
    pub async fn add_to_group(&self, group: &str, thing: &str) -> Result<(), RegistryError> {
        if self.group_query(group).await?.is_some() {
            return Err(RegistryError::InvalidName(format!(
                "{group} is a dynamic group"
            )));
        }
        self.store.add_member(group, thing).await?;
        let mut groups = self.indexed_groups(thing).await?;
        if !groups.iter().any(|g| g == group) {
            groups.push(group.to_string());
            groups.sort();
        }
        self.reindex(thing, Some(groups)).await
    }

    /// The fleet index this registry keeps current, if any.
    pub(crate) fn index(&self) -> Option<&Arc<dyn crate::store::IndexStore>> {
        self.index.as_ref()
    }

    /// Uses `index` as the fleet index: every change of a thing's
    /// registry fields is written there after the registry.
    pub fn with_index(mut self, index: Arc<dyn crate::store::IndexStore>) -> Self {
        self.index = Some(index);
        self
    }

    /// A thing's static groups as the fleet index has them.
    async fn indexed_groups(&self, name: &str) -> Result<Vec<String>, RegistryError> {
        let Some(index) = &self.index else {
            return Ok(Vec::new());
        };
        let mut g: Vec<String> = index
            .entries(name)
            .await?
            .into_iter()
            .filter(|e| e.field == "thingGroupNames")
            .map(|e| e.value.text())
            .collect();
        g.sort();
        Ok(g)
    }

    /// Rewrites a thing's registry rows in the fleet index, with its
    /// static groups (`None`: as the index has them).
    async fn reindex(&self, name: &str, groups: Option<Vec<String>>) -> Result<(), RegistryError> {
        let Some(index) = &self.index else {
            return Ok(());
        };
        let Some(thing) = self.store.thing(name).await? else {
            return Ok(());
        };
        let groups = match groups {
            Some(g) => g,
            None => self.indexed_groups(name).await?,
        };
        index
            .index_registry(vec![(
                name.to_string(),
                Some(crate::store::index::registry_entries(&thing, &groups)),
            )])
            .await?;
        Ok(())
    }

    /// Rewrites every thing's registry rows in the fleet index from the
    /// registry (at start: a change the index missed, say because the
    /// process stopped between the two writes, is repaired), and removes
    /// those of things no longer registered. Returns how many things.
    pub async fn sync_index(&self) -> Result<usize, RegistryError> {
        let Some(index) = &self.index else {
            return Ok(0);
        };
        let mut groups_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut after = String::new();
        loop {
            let page = self.store.groups(&after, 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (group, query) in page {
                if query.is_none() {
                    for m in self.store.members(&group).await? {
                        groups_of.entry(m).or_default().push(group.clone());
                    }
                }
            }
        }
        let mut registered = std::collections::BTreeSet::new();
        let mut after = String::new();
        loop {
            let page = self.store.things(&after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.name.clone();
            let batch = page
                .iter()
                .map(|t| {
                    registered.insert(t.name.clone());
                    let groups = groups_of.remove(&t.name).unwrap_or_default();
                    (
                        t.name.clone(),
                        Some(crate::store::index::registry_entries(t, &groups)),
                    )
                })
                .collect();
            index.index_registry(batch).await?;
        }
        let mut gone = Vec::new();
        let mut after = String::new();
        loop {
            let page = index
                .search(&crate::query::Query::All, &after, 10_000)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            gone.extend(
                page.into_iter()
                    .filter(|t| !registered.contains(t))
                    .map(|t| (t, None)),
            );
        }
        if !gone.is_empty() {
            index.index_registry(gone).await?;
        }
        Ok(registered.len())
    }

    /// The members of a group, in name order.
    pub async fn group_members(&self, group: &str) -> Result<Vec<String>, RegistryError> {
        match self.group_query(group).await? {
            None => Ok(self.store.members(group).await?),
            Some(GroupQuery::Search(text)) => {
                let Some(index) = &self.index else {
                    return Err(RegistryError::InvalidQuery(format!(
                        "group {group} is defined by a search, and there is no fleet index"
                    )));
                };
                let query = crate::query::Query::parse(&text)
                    .map_err(|e| RegistryError::InvalidQuery(format!("group {group}: {e}")))?;
                let mut members: Vec<String> = Vec::new();
                loop {
                    let after = members.last().map_or("", String::as_str);
                    let page = index.search(&query, after, 10_000).await?;
                    let done = page.len() < 10_000;
                    members.extend(page);
                    if done {
                        return Ok(members);
                    }
                }
            }
            Some(GroupQuery::Attributes(query)) => {
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
        let record = CertificateRecord {
            id: id.into(),
            thing: thing.into(),
            status: CertificateStatus::Active,
            pem: pem.into(),
        };
        self.store.insert_certificate(&record).await?;
        Ok(record)
    }

    /// Revokes a certificate.
    pub async fn revoke_certificate(&self, id: &str) -> Result<(), RegistryError> {
        found(self.store.revoke_certificate(id).await?, id)
    }

    /// A thing's certificates.
    pub async fn certificates(&self, thing: &str) -> Result<Vec<CertificateRecord>, RegistryError> {
        Ok(self.store.certificates_of(thing).await?)
    }

    /// The certificate with this id (its SHA-256 fingerprint), whichever
    /// thing it is bound to.
    pub async fn certificate(&self, id: &str) -> Result<Option<CertificateRecord>, RegistryError> {
        Ok(self.store.certificate(id).await?)
    }

    /// The ids of every revoked certificate (SHA-256 fingerprints when
    /// issued by provisioning), for
    /// [`EmbeddedBroker::revoke`](crate::EmbeddedBroker::revoke).
    pub async fn revoked_certificates(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.store.revoked_certificates().await?)
    }

    /// Identities the broker must refuse: things that are disabled, or
    /// whose every certificate is revoked. (A broker that knows a device
    /// only by its certificate's common name, as Mosquitto with the
    /// generated ACL, refuses a thing, not one certificate of it; the
    /// embedded broker also refuses single certificates:
    /// [`revoked_certificates`](Self::revoked_certificates).)
    pub async fn denied_identities(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.store.denied_identities().await?)
    }

    /// Every thing and certificate with its standing, for a broker that
    /// cannot ask the registry at each CONNECT (the Mosquitto plugin reads
    /// it from the file `fleet serve --mosquitto-roster` writes).
    /// Certificate ids are their SHA-256 fingerprints; an id that cannot be
    /// one (it holds whitespace) is left out, so it admits nothing.
    pub async fn roster(&self) -> Result<fleet_core::admission::Roster, RegistryError> {
        Ok(self.store.roster().await?)
    }

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
        Ok(self.store.add_pending(token, pending, now, max).await?)
    }

    /// The certificate awaiting registration under `token`, if the token is
    /// unused and unexpired at `now` (the token is not spent).
    pub(crate) async fn pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Option<PendingCertificate>, RegistryError> {
        Ok(self.store.pending(token, now).await?)
    }

    /// Spends ownership token `token` at `now`, once: two instances racing
    /// on one token cannot both register with it.
    pub(crate) async fn spend_pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Spent, RegistryError> {
        Ok(self.store.spend_pending(token, now).await?)
    }
}

/// `NotFound(what)` unless the store found it.
fn found(was: bool, what: &str) -> Result<(), RegistryError> {
    if was {
        Ok(())
    } else {
        Err(RegistryError::NotFound(what.into()))
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
