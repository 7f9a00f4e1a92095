//! Memory: every store in maps behind mutexes, for tests, simulations and
//! `--store memory`. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fleet_core::jobs::ThingJobs;
use fleet_core::shadow::Shadow;

use super::index::{self, IndexConfig, IndexStore, NumericStats};
use super::{
    JobStore, RegistryStore, RetainedMessage, RetainedStore, SessionStore, ShadowKey, ShadowStore,
    StoreError, StoredStream, StreamStore, Versioned,
};
use crate::model::{
    AuditEntry, CertificateRecord, CertificateStatus, Connectivity, ConnectivityEvent, GroupQuery,
    JobRecord, PendingCertificate, Spent, StoredTemplate, StoredToken, Thing,
};
use crate::query::{Entry, Query};
use fleet_core::admission::Roster;

type ShadowMap = HashMap<ShadowKey, (Shadow, u64)>;

/// An in-memory store, for tests and simulations.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    shadows: Arc<Mutex<ShadowMap>>,
    jobs: Arc<Mutex<MemoryJobs>>,
    streams: Arc<Mutex<BTreeMap<String, StoredStream>>>,
    registry: Arc<Mutex<MemoryRegistry>>,
    retained: Arc<Mutex<BTreeMap<String, RetainedMessage>>>,
    sessions: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    index: Arc<Mutex<MemoryIndex>>,
}

/// The fleet index side of [`MemoryStore`]: rows by thing and source.
#[derive(Debug, Default)]
struct MemoryIndex {
    rows: BTreeMap<String, BTreeMap<String, Vec<Entry>>>,
    connectivity: HashMap<String, Connectivity>,
    config: IndexConfig,
}

impl MemoryIndex {
    fn replace(&mut self, thing: &str, source: &str, entries: Vec<Entry>) {
        let sources = self.rows.entry(thing.to_string()).or_default();
        if entries.is_empty() {
            sources.remove(source);
        } else {
            sources.insert(source.to_string(), entries);
        }
    }

    /// The things `query` matches, with every row of each, in name order.
    fn matching<'a>(&'a self, query: &'a Query) -> impl Iterator<Item = (&'a str, Vec<&'a Entry>)> {
        self.rows.iter().filter_map(move |(t, sources)| {
            let rows: Vec<&Entry> = sources.values().flatten().collect();
            query.matches_refs(&rows).then_some((t.as_str(), rows))
        })
    }
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

#[async_trait]
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
        let mut index = self.index_lock()?;
        let entries = index::shadow_entries(key, shadow, &index.config);
        index.replace(&key.thing, &index::shadow_source(key), entries);
        Ok(current + 1)
    }
}

/// The jobs side of [`MemoryStore`].
#[derive(Debug, Default)]
struct MemoryJobs {
    jobs: HashMap<String, (JobRecord, u64)>,
    things: HashMap<String, (ThingJobs, u64)>,
}

impl MemoryStore {
    fn jobs_lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryJobs>, StoreError> {
        self.jobs
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))
    }
}

#[async_trait]
impl JobStore for MemoryStore {
    async fn load_job(&self, job_id: &str) -> Result<Option<Versioned<JobRecord>>, StoreError> {
        Ok(self
            .jobs_lock()?
            .jobs
            .get(job_id)
            .map(|(r, rev)| Versioned {
                value: r.clone(),
                revision: *rev,
            }))
    }

    async fn save_job(&self, record: &JobRecord, expected: u64) -> Result<u64, StoreError> {
        let mut m = self.jobs_lock()?;
        let current = m.jobs.get(&record.spec.job_id).map_or(0, |(_, r)| *r);
        if current != expected {
            return Err(StoreError::Conflict);
        }
        m.jobs
            .insert(record.spec.job_id.clone(), (record.clone(), current + 1));
        Ok(current + 1)
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self.jobs_lock()?.jobs.keys().cloned().collect();
        ids.sort();
        Ok(ids)
    }

    async fn delete_job(&self, job_id: &str, expected: u64) -> Result<(), StoreError> {
        let mut m = self.jobs_lock()?;
        match m.jobs.get(job_id) {
            Some((_, r)) if *r == expected => {
                m.jobs.remove(job_id);
                Ok(())
            }
            _ => Err(StoreError::Conflict),
        }
    }

    async fn load_thing(&self, thing: &str) -> Result<Versioned<ThingJobs>, StoreError> {
        Ok(match self.jobs_lock()?.things.get(thing) {
            Some((j, r)) => Versioned {
                value: j.clone(),
                revision: *r,
            },
            None => Versioned {
                value: ThingJobs::new(thing),
                revision: 0,
            },
        })
    }

    async fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> Result<u64, StoreError> {
        let mut m = self.jobs_lock()?;
        let current = m.things.get(thing).map_or(0, |(_, r)| *r);
        if current != expected {
            return Err(StoreError::Conflict);
        }
        m.things.insert(thing.into(), (jobs.clone(), current + 1));
        self.index_lock()?
            .replace(thing, index::JOBS, index::job_entries(jobs));
        Ok(current + 1)
    }

    async fn due_things(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let mut due: Vec<String> = self
            .jobs_lock()?
            .things
            .iter()
            .filter(|(_, (j, _))| j.next_deadline().is_some_and(|d| d <= now))
            .map(|(t, _)| t.clone())
            .collect();
        due.sort();
        Ok(due)
    }
}

impl MemoryStore {
    fn streams_lock(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, StoredStream>>, StoreError> {
        self.streams
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))
    }
}

#[async_trait]
impl StreamStore for MemoryStore {
    async fn load_streams(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, StoredStream)>, StoreError> {
        Ok(self
            .streams_lock()?
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == id.as_str()))
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect())
    }

    async fn list_streams(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<super::StreamSummary>, StoreError> {
        Ok(self
            .streams_lock()?
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(id, s)| super::StreamSummary {
                id: id.clone(),
                version: s.version,
                description: s.description.clone(),
                size: s.files.first().map_or(0, |f| f.len() as u64),
            })
            .collect())
    }

    async fn stream_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        Ok(self.streams_lock()?.get(id).map(|s| s.version))
    }

    async fn save_stream(
        &self,
        id: &str,
        description: &str,
        files: &[Vec<u8>],
    ) -> Result<u32, StoreError> {
        let mut streams = self.streams_lock()?;
        let version = streams.get(id).map_or(0, |s| s.version).saturating_add(1);
        streams.insert(
            id.into(),
            StoredStream {
                version,
                description: description.into(),
                files: files.to_vec(),
            },
        );
        Ok(version)
    }

    async fn delete_stream(&self, id: &str) -> Result<(), StoreError> {
        self.streams_lock()?.remove(id);
        Ok(())
    }
}

/// The registry side of [`MemoryStore`].
#[derive(Debug, Default)]
struct MemoryRegistry {
    things: BTreeMap<String, Thing>,
    /// Query (`None`: static) and static members.
    groups: BTreeMap<String, (Option<GroupQuery>, BTreeSet<String>)>,
    certificates: BTreeMap<String, CertificateRecord>,
    tokens: BTreeMap<String, StoredToken>,
    /// The certificate and whether the token was used.
    pending: BTreeMap<String, (PendingCertificate, bool)>,
    audit: Vec<AuditEntry>,
    templates: BTreeMap<String, StoredTemplate>,
}

impl MemoryStore {
    fn registry_lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryRegistry>, StoreError> {
        self.registry
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))
    }

    /// Runs `f` on the thing `name`; whether there was one.
    fn change_thing(&self, name: &str, f: impl FnOnce(&mut Thing)) -> Result<bool, StoreError> {
        Ok(self.registry_lock()?.things.get_mut(name).map(f).is_some())
    }
}

#[async_trait]
impl RegistryStore for MemoryStore {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64, StoreError> {
        let mut r = self.registry_lock()?;
        let id = r.audit.last().map_or(1, |e| e.id + 1);
        r.audit.push(AuditEntry {
            id,
            ..entry.clone()
        });
        Ok(id)
    }

    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let r = self.registry_lock()?;
        Ok(r.audit
            .iter()
            .filter(|e| e.id > after)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn put_template(&self, template: &StoredTemplate) -> Result<(), StoreError> {
        self.registry_lock()?
            .templates
            .insert(template.name.clone(), template.clone());
        Ok(())
    }

    async fn template(&self, name: &str) -> Result<Option<StoredTemplate>, StoreError> {
        Ok(self.registry_lock()?.templates.get(name).cloned())
    }

    async fn templates(&self) -> Result<Vec<StoredTemplate>, StoreError> {
        Ok(self.registry_lock()?.templates.values().cloned().collect())
    }

    async fn delete_template(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.registry_lock()?.templates.remove(name).is_some())
    }

    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        let mut r = self.registry_lock()?;
        if r.tokens.contains_key(&token.record.id) {
            return Err(StoreError::AlreadyExists(token.record.id.clone()));
        }
        r.tokens.insert(token.record.id.clone(), token.clone());
        Ok(())
    }

    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        Ok(self.registry_lock()?.tokens.get(id).cloned())
    }

    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        Ok(self.registry_lock()?.tokens.values().cloned().collect())
    }

    async fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.registry_lock()?.tokens.remove(id).is_some())
    }

    async fn insert_thing(&self, thing: &Thing) -> Result<(), StoreError> {
        let mut r = self.registry_lock()?;
        if r.things.contains_key(&thing.name) {
            return Err(StoreError::AlreadyExists(thing.name.clone()));
        }
        r.things.insert(thing.name.clone(), thing.clone());
        Ok(())
    }

    async fn thing(&self, name: &str) -> Result<Option<Thing>, StoreError> {
        Ok(self.registry_lock()?.things.get(name).cloned())
    }

    async fn things(&self, after: &str, limit: usize) -> Result<Vec<Thing>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        Ok(self
            .registry_lock()?
            .things
            .range::<str, _>((Excluded(after), Unbounded))
            .take(limit)
            .map(|(_, t)| t.clone())
            .collect())
    }

    async fn set_attributes(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<bool, StoreError> {
        self.change_thing(name, |t| t.attributes = attributes.clone())
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, StoreError> {
        self.change_thing(name, |t| t.enabled = enabled)
    }

    async fn delete_thing(&self, name: &str) -> Result<bool, StoreError> {
        let mut r = self.registry_lock()?;
        if r.things.remove(name).is_none() {
            return Ok(false);
        }
        for (_, members) in r.groups.values_mut() {
            members.remove(name);
        }
        r.certificates.retain(|_, c| c.thing != name);
        Ok(true)
    }

    async fn insert_group(&self, name: &str, query: Option<&GroupQuery>) -> Result<(), StoreError> {
        let mut r = self.registry_lock()?;
        if r.groups.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.into()));
        }
        r.groups
            .insert(name.into(), (query.cloned(), BTreeSet::new()));
        Ok(())
    }

    async fn groups(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Option<GroupQuery>)>, StoreError> {
        Ok(self
            .registry_lock()?
            .groups
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(name, (q, _))| (name.clone(), q.clone()))
            .collect())
    }

    async fn group(&self, name: &str) -> Result<Option<Option<GroupQuery>>, StoreError> {
        Ok(self
            .registry_lock()?
            .groups
            .get(name)
            .map(|(q, _)| q.clone()))
    }

    async fn add_member(&self, group: &str, thing: &str) -> Result<(), StoreError> {
        let mut r = self.registry_lock()?;
        if !r.things.contains_key(thing) {
            return Err(StoreError::NotFound(thing.into()));
        }
        let Some((_, members)) = r.groups.get_mut(group) else {
            return Err(StoreError::NotFound(group.into()));
        };
        members.insert(thing.into());
        Ok(())
    }

    async fn members(&self, group: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .registry_lock()?
            .groups
            .get(group)
            .map(|(_, m)| m.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn insert_certificate(&self, certificate: &CertificateRecord) -> Result<(), StoreError> {
        let mut r = self.registry_lock()?;
        if !r.things.contains_key(&certificate.thing) {
            return Err(StoreError::NotFound(certificate.thing.clone()));
        }
        if r.certificates.contains_key(&certificate.id) {
            return Err(StoreError::AlreadyExists(certificate.id.clone()));
        }
        r.certificates
            .insert(certificate.id.clone(), certificate.clone());
        Ok(())
    }

    async fn revoke_certificate(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .registry_lock()?
            .certificates
            .get_mut(id)
            .map(|c| c.status = CertificateStatus::Revoked)
            .is_some())
    }

    async fn certificate(&self, id: &str) -> Result<Option<CertificateRecord>, StoreError> {
        Ok(self.registry_lock()?.certificates.get(id).cloned())
    }

    async fn certificates_of(&self, thing: &str) -> Result<Vec<CertificateRecord>, StoreError> {
        Ok(self
            .registry_lock()?
            .certificates
            .values()
            .filter(|c| c.thing == thing)
            .cloned()
            .collect())
    }

    async fn revoked_certificates(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .registry_lock()?
            .certificates
            .values()
            .filter(|c| c.status == CertificateStatus::Revoked)
            .map(|c| c.id.clone())
            .collect())
    }

    async fn denied_identities(&self) -> Result<Vec<String>, StoreError> {
        let r = self.registry_lock()?;
        Ok(r.things
            .values()
            .filter(|t| {
                let mut certificates = r.certificates.values().filter(|c| c.thing == t.name);
                let any = certificates.clone().next().is_some();
                !t.enabled || (any && !certificates.any(|c| c.status == CertificateStatus::Active))
            })
            .map(|t| t.name.clone())
            .collect())
    }

    async fn roster(&self) -> Result<Roster, StoreError> {
        let r = self.registry_lock()?;
        let mut roster = Roster::default();
        for t in r.things.values() {
            roster.add_thing(&t.name, t.enabled);
        }
        for c in r.certificates.values() {
            roster.add_certificate(&c.id, &c.thing, c.status == CertificateStatus::Active);
        }
        Ok(roster)
    }

    async fn add_pending(
        &self,
        token: &str,
        pending: &PendingCertificate,
        now: u64,
        max: usize,
    ) -> Result<bool, StoreError> {
        let mut r = self.registry_lock()?;
        r.pending
            .retain(|_, (p, used)| !*used && p.expires_at > now);
        if r.pending.contains_key(token) {
            return Err(StoreError::AlreadyExists(token.into()));
        }
        if r.pending.len() >= max {
            return Ok(false);
        }
        r.pending.insert(token.into(), (pending.clone(), false));
        Ok(true)
    }

    async fn pending(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Option<PendingCertificate>, StoreError> {
        Ok(self
            .registry_lock()?
            .pending
            .get(token)
            .filter(|(p, used)| !*used && p.expires_at > now)
            .map(|(p, _)| p.clone()))
    }

    async fn spend_pending(&self, token: &str, now: u64) -> Result<Spent, StoreError> {
        let mut r = self.registry_lock()?;
        Ok(match r.pending.get_mut(token) {
            Some((_, used)) if *used => Spent::Before,
            Some((p, used)) if p.expires_at > now => {
                *used = true;
                Spent::Now
            }
            _ => Spent::Unknown,
        })
    }
}

#[async_trait]
impl RetainedStore for MemoryStore {
    async fn load_retained(&self) -> Result<Vec<RetainedMessage>, StoreError> {
        let map = self
            .retained
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))?;
        Ok(map.values().cloned().collect())
    }

    async fn put_retained(&self, message: &RetainedMessage) -> Result<(), StoreError> {
        self.retained
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))?
            .insert(message.topic.clone(), message.clone());
        Ok(())
    }

    async fn delete_retained(&self, topic: &str) -> Result<(), StoreError> {
        self.retained
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))?
            .remove(topic);
        Ok(())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let map = self
            .sessions
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))?;
        Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn put_session(&self, client_id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.sessions
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))?
            .insert(client_id.to_owned(), record.to_vec());
        Ok(())
    }

    async fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        self.sessions
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))?
            .remove(client_id);
        Ok(())
    }
}

impl MemoryStore {
    fn index_lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryIndex>, StoreError> {
        self.index
            .lock()
            .map_err(|_| StoreError::backend("a writer panicked"))
    }

    fn matching(&self, query: &Query) -> Result<Vec<(String, Vec<Entry>)>, StoreError> {
        let index = self.index_lock()?;
        Ok(index
            .matching(query)
            .map(|(t, e)| (t.to_string(), e.into_iter().cloned().collect()))
            .collect())
    }
}

#[async_trait]
impl IndexStore for MemoryStore {
    async fn configure(&self, config: IndexConfig) -> Result<bool, StoreError> {
        let shadows: Vec<(ShadowKey, Shadow)> = self
            .lock()?
            .iter()
            .map(|(k, (s, _))| (k.clone(), s.clone()))
            .collect();
        let mut index = self.index_lock()?;
        if index.config == config {
            return Ok(false);
        }
        for (key, shadow) in shadows {
            let entries = index::shadow_entries(&key, &shadow, &config);
            index.replace(&key.thing, &index::shadow_source(&key), entries);
        }
        index.config = config;
        Ok(true)
    }

    async fn index_registry(
        &self,
        things: Vec<(String, Option<Vec<Entry>>)>,
    ) -> Result<(), StoreError> {
        let mut index = self.index_lock()?;
        for (thing, entries) in things {
            match entries {
                Some(e) => index.replace(&thing, index::REGISTRY, e),
                None => {
                    index.rows.remove(&thing);
                    index.connectivity.remove(&thing);
                }
            }
        }
        Ok(())
    }

    async fn record_connectivity(&self, events: Vec<ConnectivityEvent>) -> Result<(), StoreError> {
        let mut index = self.index_lock()?;
        for e in &events {
            let record = index.connectivity.entry(e.thing().to_string()).or_default();
            record.apply(e);
            let entries = index::connectivity_entries(record);
            index.replace(e.thing(), index::CONNECTIVITY, entries);
        }
        Ok(())
    }

    async fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError> {
        Ok(self.index_lock()?.connectivity.get(thing).cloned())
    }

    async fn index_rows(
        &self,
        thing: &str,
        source: &str,
        entries: Vec<Entry>,
    ) -> Result<(), StoreError> {
        self.index_lock()?.replace(thing, source, entries);
        Ok(())
    }

    async fn end_connections(&self, reason: &str) -> Result<usize, StoreError> {
        let mut index = self.index_lock()?;
        let connected: Vec<String> = index
            .connectivity
            .iter()
            .filter(|(_, c)| c.connected)
            .map(|(t, _)| t.clone())
            .collect();
        for thing in &connected {
            let Some(record) = index.connectivity.get_mut(thing) else {
                continue;
            };
            record.end(reason);
            let entries = index::connectivity_entries(record);
            index.replace(thing, index::CONNECTIVITY, entries);
        }
        Ok(connected.len())
    }

    async fn search(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.scan(query, after, limit).await
    }

    async fn count(&self, query: &Query) -> Result<u64, StoreError> {
        Ok(self.index_lock()?.matching(query).count() as u64)
    }

    async fn count_by(
        &self,
        query: &Query,
        field: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (_, entries) in self.matching(query)? {
            let values: BTreeSet<String> = entries
                .iter()
                .filter(|e| e.field == field)
                .map(|e| e.value.text())
                .collect();
            for v in values {
                *counts.entry(v).or_default() += 1;
            }
        }
        let mut out: Vec<(String, u64)> = counts.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.truncate(limit);
        Ok(out)
    }

    async fn numeric_stats(&self, query: &Query, field: &str) -> Result<NumericStats, StoreError> {
        let values: Vec<f64> = self
            .matching(query)?
            .iter()
            .flat_map(|(_, e)| e.iter())
            .filter(|e| e.field == field)
            .filter_map(|e| e.value.number())
            .collect();
        let count = values.len() as u64;
        Ok(NumericStats {
            count,
            min: values.iter().copied().reduce(f64::min),
            max: values.iter().copied().reduce(f64::max),
            avg: (count > 0).then(|| values.iter().sum::<f64>() / count as f64),
        })
    }

    async fn entries(&self, thing: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .index_lock()?
            .rows
            .get(thing)
            .map(|s| s.values().flatten().cloned().collect())
            .unwrap_or_default())
    }

    async fn scan(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let index = self.index_lock()?;
        Ok(index
            .matching(query)
            .filter(|(t, _)| *t > after)
            .take(limit)
            .map(|(t, _)| t.to_string())
            .collect())
    }
}
