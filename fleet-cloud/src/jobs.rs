//! The jobs service: AWS IoT Jobs over MQTT (`notify`, `notify-next`,
//! `get`, `start-next`, `{jobId}/get`, `{jobId}/update`) backed by the store,
//! with jobs created for things and groups, cancellation, timeouts enforced
//! by the service, and retries.
//!
//! Each thing's executions are one document in the store, changed only by a
//! compare-and-set on its revision, so several instances (and the timeout
//! sweeper) never lose or double-apply a change. The rules are fleet-core's
//! [`ThingJobs`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use fleet_core::ThingName;
use fleet_core::jobs::{JobExecution, JobStatus, JobsMessage, ThingJobs, TimeoutConfig};
use fleet_core::topic::{JobsTopic, Topic, TopicPrefix};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::Registry;
use crate::store::{MemoryStore, SqliteStore, StoreError, Versioned, backend};

/// How a job picks its things.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TargetSelection {
    /// The things in the targets when the job is created.
    Snapshot,
    /// Also things that join a target group later.
    Continuous,
}

/// What a job is: its document, whom it is for, and its rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// The job's id (`[a-zA-Z0-9_-]{1,64}`).
    pub job_id: String,
    /// The document devices receive.
    pub document: Value,
    /// Things targeted by name.
    pub things: Vec<String>,
    /// Thing groups targeted (static or dynamic).
    pub groups: Vec<String>,
    /// Snapshot or continuous.
    pub selection: TargetSelection,
    /// The in-progress timeout.
    pub timeouts: TimeoutConfig,
    /// How many times an execution that ends FAILED or TIMED_OUT is
    /// queued again (0: never).
    pub max_retries: u32,
}

/// A job's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Executions are running or may be added.
    InProgress,
    /// Canceled: no new executions; queued ones were canceled.
    Canceled,
    /// Every execution ended (snapshot jobs only).
    Completed,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// What it is.
    pub spec: JobSpec,
    /// Its state.
    pub state: JobState,
    /// The things it was queued for so far.
    pub targets: BTreeSet<String>,
    /// Retries used, per thing.
    pub retries: BTreeMap<String, u32>,
    /// Epoch seconds.
    pub created_at: u64,
}

/// Where jobs and executions are kept. Writes are compare-and-set on a
/// revision, atomic and durable once they return `Ok`.
pub trait JobStore: Send + Sync + 'static {
    /// A job and its revision (`None`: no such job).
    fn load_job(
        &self,
        job_id: &str,
    ) -> impl Future<Output = Result<Option<Versioned<JobRecord>>, StoreError>> + Send;
    /// Writes a job if it is still at `expected` (0: new).
    fn save_job(
        &self,
        record: &JobRecord,
        expected: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Every job id, sorted.
    fn job_ids(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// A thing's executions (a thing without any: empty, revision 0).
    fn load_thing(
        &self,
        thing: &str,
    ) -> impl Future<Output = Result<Versioned<ThingJobs>, StoreError>> + Send;
    /// Writes a thing's executions if still at `expected`.
    fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Things with a timer due at or before `now`.
    fn due_things(&self, now: u64) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// The in-memory side of [`MemoryStore`] for jobs.
#[derive(Debug, Default)]
pub(crate) struct MemoryJobs {
    jobs: HashMap<String, (JobRecord, u64)>,
    things: HashMap<String, (ThingJobs, u64)>,
}

impl MemoryStore {
    fn jobs_lock(&self) -> Result<std::sync::MutexGuard<'_, MemoryJobs>, StoreError> {
        self.jobs
            .lock()
            .map_err(|_| StoreError::Backend("a writer panicked".into()))
    }
}

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

fn corrupt(e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl JobStore for SqliteStore {
    async fn load_job(&self, job_id: &str) -> Result<Option<Versioned<JobRecord>>, StoreError> {
        let job_id = job_id.to_string();
        self.with_conn(move |c| {
            let row: Option<(u64, Vec<u8>)> = c
                .query_row(
                    "SELECT revision, record FROM jobs WHERE job_id = ?1",
                    [&job_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(backend(e)),
                })?;
            row.map(|(revision, bytes)| {
                Ok(Versioned {
                    value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                    revision,
                })
            })
            .transpose()
        })
        .await
    }

    async fn save_job(&self, record: &JobRecord, expected: u64) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(backend)?;
        let id = record.spec.job_id.clone();
        self.with_conn(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let changed = if expected == 0 {
                tx.execute(
                    "INSERT INTO jobs (job_id, revision, record) VALUES (?1, 1, ?2)
                     ON CONFLICT (job_id) DO NOTHING",
                    (&id, &bytes),
                )
            } else {
                tx.execute(
                    "UPDATE jobs SET revision = revision + 1, record = ?2
                     WHERE job_id = ?1 AND revision = ?3",
                    (&id, &bytes, expected),
                )
            }
            .map_err(backend)?;
            if changed == 0 {
                return Err(StoreError::Conflict);
            }
            tx.commit().map_err(backend)?;
            Ok(expected + 1)
        })
        .await
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare("SELECT job_id FROM jobs ORDER BY job_id")
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn load_thing(&self, thing: &str) -> Result<Versioned<ThingJobs>, StoreError> {
        let thing = thing.to_string();
        self.with_conn(move |c| {
            let row: Option<(u64, Vec<u8>)> = c
                .query_row(
                    "SELECT revision, document FROM thing_jobs WHERE thing = ?1",
                    [&thing],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(backend(e)),
                })?;
            Ok(match row {
                None => Versioned {
                    value: ThingJobs::new(&thing),
                    revision: 0,
                },
                Some((revision, bytes)) => Versioned {
                    value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                    revision,
                },
            })
        })
        .await
    }

    async fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(jobs).map_err(backend)?;
        let deadline = jobs
            .next_deadline()
            .map(|d| i64::try_from(d).unwrap_or(i64::MAX));
        let thing = thing.to_string();
        self.with_conn(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let changed = if expected == 0 {
                tx.execute(
                    "INSERT INTO thing_jobs (thing, revision, next_deadline, document) VALUES (?1, 1, ?2, ?3)
                     ON CONFLICT (thing) DO NOTHING",
                    (&thing, deadline, &bytes),
                )
            } else {
                tx.execute(
                    "UPDATE thing_jobs SET revision = revision + 1, next_deadline = ?2, document = ?3
                     WHERE thing = ?1 AND revision = ?4",
                    (&thing, deadline, &bytes, expected),
                )
            }
            .map_err(backend)?;
            if changed == 0 {
                return Err(StoreError::Conflict);
            }
            tx.commit().map_err(backend)?;
            Ok(expected + 1)
        })
        .await
    }

    async fn due_things(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT thing FROM thing_jobs WHERE next_deadline IS NOT NULL AND next_deadline <= ?1 ORDER BY thing",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([now], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }
}

/// A jobs operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum JobsError {
    /// No such job.
    NotFound(String),
    /// A job with this id exists.
    AlreadyExists(String),
    /// The request is invalid (an id, a target).
    Invalid(String),
    /// The store failed, or kept changing under us.
    Store(StoreError),
}

impl fmt::Display for JobsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound(id) => write!(f, "no job {id}"),
            Self::AlreadyExists(id) => write!(f, "job {id} exists"),
            Self::Invalid(e) => write!(f, "invalid: {e}"),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for JobsError {}

impl From<StoreError> for JobsError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// A message for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsOutgoing {
    /// Where.
    pub topic: String,
    /// What.
    pub payload: Vec<u8>,
}

/// How one thing's execution of a job stands.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionSummary {
    /// The thing.
    pub thing: String,
    /// Its latest execution.
    pub execution: JobExecution,
}

const MAX_CAS_ATTEMPTS: usize = 16;

/// The jobs service over a store.
///
/// ```
/// use fleet_cloud::{JobSpec, JobsService, MemoryStore, Registry, TargetSelection};
/// use fleet_core::jobs::TimeoutConfig;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let jobs = JobsService::new(MemoryStore::new());
/// let registry = Registry::in_memory()?;
/// let spec = JobSpec {
///     job_id: "reboot-1".into(), document: serde_json::json!({"op": "reboot"}),
///     things: vec!["pump-7".into()], groups: vec![], selection: TargetSelection::Snapshot,
///     timeouts: TimeoutConfig::default(), max_retries: 0,
/// };
/// let out = jobs.create_job(spec, &registry, 1_700_000_000).await?;
/// assert!(out.iter().any(|m| m.topic == "$aws/things/pump-7/jobs/notify-next"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct JobsService<S> {
    store: Arc<S>,
    prefix: String,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl<S> Clone for JobsService<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.prefix.clone(),
            clock: self.clock.clone(),
        }
    }
}

impl<S> fmt::Debug for JobsService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobsService")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl<S: JobStore> JobsService<S> {
    /// A service under the `$aws` prefix.
    pub fn new(store: S) -> Self {
        Self {
            store: Arc::new(store),
            prefix: "$aws".into(),
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }),
        }
    }

    /// Uses `clock` (epoch seconds) instead of the system clock when
    /// served over the broker: for tests, and for simulations.
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Now, by this service's clock.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The topic filters of device requests.
    pub fn filters(&self) -> [String; 2] {
        [
            format!("{}/things/+/jobs/+", self.prefix),
            format!("{}/things/+/jobs/+/+", self.prefix),
        ]
    }

    fn outgoing(&self, thing: &str, messages: Vec<JobsMessage>) -> Vec<JobsOutgoing> {
        let Ok(prefix) = TopicPrefix::new(&self.prefix) else {
            return Vec::new();
        };
        let Ok(thing) = ThingName::new(thing) else {
            return Vec::new();
        };
        messages
            .into_iter()
            .map(|m| JobsOutgoing {
                topic: Topic::Jobs(JobsTopic {
                    thing: thing.clone(),
                    kind: m.kind,
                })
                .display(&prefix)
                .to_string(),
                payload: m.payload,
            })
            .collect()
    }

    /// Changes one thing's executions with `f` under compare-and-set;
    /// returns what `f` returned, and the messages.
    async fn with_thing<R>(
        &self,
        thing: &str,
        mut f: impl FnMut(&mut ThingJobs) -> R,
    ) -> Result<R, JobsError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.store.load_thing(thing).await?;
            let mut jobs = current.value.clone();
            let r = f(&mut jobs);
            if jobs != current.value {
                match self.store.save_thing(thing, current.revision, &jobs).await {
                    Ok(_) => {}
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(r);
        }
        Err(StoreError::Conflict.into())
    }

    /// Answers a device's request on `topic`; nothing for other topics.
    pub async fn handle(
        &self,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<Vec<JobsOutgoing>, JobsError> {
        let Ok(prefix) = TopicPrefix::new(&self.prefix) else {
            return Ok(Vec::new());
        };
        let Ok(Topic::Jobs(JobsTopic { thing, kind })) = Topic::parse(&prefix, topic) else {
            return Ok(Vec::new());
        };
        let thing = thing.as_str().to_string();
        let messages = self
            .with_thing(&thing, |jobs| jobs.handle_request(&kind, payload, now))
            .await?;
        let mut out = self.outgoing(&thing, messages);
        out.extend(self.retry_ended(&thing, now).await?);
        Ok(out)
    }

    /// Creates a job and queues its executions.
    pub async fn create_job(
        &self,
        spec: JobSpec,
        registry: &Registry,
        now: u64,
    ) -> Result<Vec<JobsOutgoing>, JobsError> {
        fleet_core::JobId::new(&spec.job_id).map_err(|e| JobsError::Invalid(e.to_string()))?;
        let targets = self.resolve(&spec, registry)?;
        let record = JobRecord {
            spec,
            state: JobState::InProgress,
            targets: BTreeSet::new(),
            retries: BTreeMap::new(),
            created_at: now,
        };
        match self.store.save_job(&record, 0).await {
            Ok(_) => {}
            Err(StoreError::Conflict) => return Err(JobsError::AlreadyExists(record.spec.job_id)),
            Err(e) => return Err(e.into()),
        }
        self.queue_for(&record.spec.job_id, targets, now).await
    }

    fn resolve(&self, spec: &JobSpec, registry: &Registry) -> Result<BTreeSet<String>, JobsError> {
        let mut targets = BTreeSet::new();
        for t in &spec.things {
            ThingName::new(t).map_err(|e| JobsError::Invalid(format!("thing {t}: {e}")))?;
            targets.insert(t.clone());
        }
        for g in &spec.groups {
            let members = registry
                .group_members(g)
                .map_err(|e| JobsError::Invalid(format!("group {g}: {e}")))?;
            targets.extend(members);
        }
        Ok(targets)
    }

    /// Queues executions of `job_id` for `things` not targeted yet, and
    /// records them as targets.
    async fn queue_for(
        &self,
        job_id: &str,
        things: BTreeSet<String>,
        now: u64,
    ) -> Result<Vec<JobsOutgoing>, JobsError> {
        let mut out = Vec::new();
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(current) = self.store.load_job(job_id).await? else {
                return Err(JobsError::NotFound(job_id.into()));
            };
            let mut record = current.value;
            if record.state != JobState::InProgress {
                return Ok(out);
            }
            let new: Vec<String> = things.difference(&record.targets).cloned().collect();
            if new.is_empty() {
                return Ok(out);
            }
            // Queue first (idempotent per thing: a pending execution of the
            // job refuses a second), then record the targets.
            for thing in &new {
                let spec = record.spec.clone();
                let messages = self
                    .with_thing(thing, |jobs| {
                        if jobs
                            .execution(&spec.job_id)
                            .is_some_and(|e| !e.status.is_terminal())
                        {
                            return Vec::new();
                        }
                        let number = jobs
                            .execution(&spec.job_id)
                            .map_or(1, |e| e.execution_number + 1);
                        jobs.queue(
                            JobExecution::new(
                                &spec.job_id,
                                thing,
                                spec.document.clone(),
                                number,
                                spec.timeouts,
                                now,
                            ),
                            now,
                        )
                        .unwrap_or_default()
                    })
                    .await?;
                out.extend(self.outgoing(thing, messages));
            }
            record.targets.extend(new);
            match self.store.save_job(&record, current.revision).await {
                Ok(_) => return Ok(out),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict.into())
    }

    /// Continuous jobs: queues executions for things that joined a target
    /// group since. Call it after group changes (the sweeper does, too).
    pub async fn sync_continuous(
        &self,
        registry: &Registry,
        now: u64,
    ) -> Result<Vec<JobsOutgoing>, JobsError> {
        let mut out = Vec::new();
        for id in self.store.job_ids().await? {
            let Some(job) = self.store.load_job(&id).await? else {
                continue;
            };
            if job.value.spec.selection != TargetSelection::Continuous
                || job.value.state != JobState::InProgress
            {
                continue;
            }
            let targets = self.resolve(&job.value.spec, registry)?;
            out.extend(self.queue_for(&id, targets, now).await?);
        }
        Ok(out)
    }

    /// Cancels a job: queued executions are canceled, and in-progress ones
    /// too when `force` (the device can no longer update them).
    pub async fn cancel_job(
        &self,
        job_id: &str,
        force: bool,
        now: u64,
    ) -> Result<Vec<JobsOutgoing>, JobsError> {
        let record = loop {
            let Some(current) = self.store.load_job(job_id).await? else {
                return Err(JobsError::NotFound(job_id.into()));
            };
            let mut record = current.value;
            record.state = JobState::Canceled;
            match self.store.save_job(&record, current.revision).await {
                Ok(_) => break record,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut out = Vec::new();
        for thing in &record.targets {
            let messages = self
                .with_thing(thing, |jobs| match jobs.execution(job_id) {
                    Some(e)
                        if !e.status.is_terminal() && (force || e.status == JobStatus::Queued) =>
                    {
                        jobs.cancel(job_id, force, now).unwrap_or_default()
                    }
                    _ => Vec::new(),
                })
                .await?;
            out.extend(self.outgoing(thing, messages));
        }
        Ok(out)
    }

    /// A job.
    pub async fn job(&self, job_id: &str) -> Result<JobRecord, JobsError> {
        self.store
            .load_job(job_id)
            .await?
            .map(|v| v.value)
            .ok_or_else(|| JobsError::NotFound(job_id.into()))
    }

    /// Every job id.
    pub async fn job_ids(&self) -> Result<Vec<String>, JobsError> {
        Ok(self.store.job_ids().await?)
    }

    /// Each targeted thing's latest execution of a job.
    pub async fn executions(&self, job_id: &str) -> Result<Vec<ExecutionSummary>, JobsError> {
        let record = self.job(job_id).await?;
        let mut out = Vec::new();
        for thing in &record.targets {
            let jobs = self.store.load_thing(thing).await?.value;
            if let Some(e) = jobs.execution(job_id) {
                out.push(ExecutionSummary {
                    thing: thing.clone(),
                    execution: e.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Times out executions whose timers ran out, without any device
    /// message, and queues retries. Run it periodically (the served
    /// service does, every second).
    pub async fn handle_timeouts(&self, now: u64) -> Result<Vec<JobsOutgoing>, JobsError> {
        let mut out = Vec::new();
        for thing in self.store.due_things(now).await? {
            let messages = self
                .with_thing(&thing, |jobs| jobs.handle_timeout(now))
                .await?;
            out.extend(self.outgoing(&thing, messages));
            out.extend(self.retry_ended(&thing, now).await?);
        }
        Ok(out)
    }

    /// Queues a new execution for each of the thing's executions that ended
    /// FAILED or TIMED_OUT and has retries left.
    async fn retry_ended(&self, thing: &str, now: u64) -> Result<Vec<JobsOutgoing>, JobsError> {
        let ended: Vec<(String, u64)> = self
            .store
            .load_thing(thing)
            .await?
            .value
            .executions()
            .iter()
            .filter(|e| matches!(e.status, JobStatus::Failed | JobStatus::TimedOut))
            .map(|e| (e.job_id.clone(), e.execution_number))
            .collect();
        let mut out = Vec::new();
        for (job_id, number) in ended {
            // Only the latest execution of the job counts.
            let latest = self
                .store
                .load_thing(thing)
                .await?
                .value
                .execution(&job_id)
                .map(|e| e.execution_number);
            if latest != Some(number) {
                continue;
            }
            loop {
                let Some(current) = self.store.load_job(&job_id).await? else {
                    break;
                };
                let mut record = current.value;
                let used = record.retries.get(thing).copied().unwrap_or(0);
                if record.state != JobState::InProgress || used >= record.spec.max_retries {
                    break;
                }
                record.retries.insert(thing.into(), used + 1);
                match self.store.save_job(&record, current.revision).await {
                    Ok(_) => {}
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
                let spec = record.spec;
                let messages = self
                    .with_thing(thing, |jobs| {
                        if jobs.execution(&spec.job_id).map(|e| e.execution_number) != Some(number)
                        {
                            return Vec::new();
                        }
                        jobs.queue(
                            JobExecution::new(
                                &spec.job_id,
                                thing,
                                spec.document.clone(),
                                number + 1,
                                spec.timeouts,
                                now,
                            ),
                            now,
                        )
                        .unwrap_or_default()
                    })
                    .await?;
                out.extend(self.outgoing(thing, messages));
                break;
            }
        }
        Ok(out)
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

trait JobsDyn: Send + Sync {
    fn filters(&self) -> [String; 2];
    fn now(&self) -> u64;
    fn handle<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
        now: u64,
    ) -> BoxFuture<'a, Result<Vec<JobsOutgoing>, JobsError>>;
    fn handle_timeouts(&self, now: u64) -> BoxFuture<'_, Result<Vec<JobsOutgoing>, JobsError>>;
}

impl<S: JobStore> JobsDyn for JobsService<S> {
    fn filters(&self) -> [String; 2] {
        JobsService::filters(self)
    }

    fn now(&self) -> u64 {
        JobsService::now(self)
    }

    fn handle<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
        now: u64,
    ) -> BoxFuture<'a, Result<Vec<JobsOutgoing>, JobsError>> {
        Box::pin(JobsService::handle(self, topic, payload, now))
    }

    fn handle_timeouts(&self, now: u64) -> BoxFuture<'_, Result<Vec<JobsOutgoing>, JobsError>> {
        Box::pin(JobsService::handle_timeouts(self, now))
    }
}

/// A [`JobsService`] over any store, for [`Extras::jobs`](crate::Extras::jobs).
#[derive(Clone)]
pub struct JobsEndpoint(Arc<dyn JobsDyn>);

impl fmt::Debug for JobsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobsEndpoint").finish_non_exhaustive()
    }
}

impl<S: JobStore> From<JobsService<S>> for JobsEndpoint {
    fn from(service: JobsService<S>) -> Self {
        Self(Arc::new(service))
    }
}

impl JobsEndpoint {
    pub(crate) fn filters(&self) -> [String; 2] {
        self.0.filters()
    }

    pub(crate) fn now(&self) -> u64 {
        self.0.now()
    }

    pub(crate) async fn handle(
        &self,
        topic: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<Vec<JobsOutgoing>, JobsError> {
        self.0.handle(topic, payload, now).await
    }

    pub(crate) async fn handle_timeouts(&self, now: u64) -> Result<Vec<JobsOutgoing>, JobsError> {
        self.0.handle_timeouts(now).await
    }
}
