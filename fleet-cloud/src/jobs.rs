//! The jobs service: AWS IoT Jobs over MQTT (`notify`, `notify-next`,
//! `get`, `start-next`, `{jobId}/get`, `{jobId}/update`) backed by the store,
//! with jobs created for things and groups, cancellation, timeouts enforced
//! by the service, and retries.
//!
//! Each thing's executions are one document in the store, changed only by a
//! compare-and-set on its revision, so several instances (and the timeout
//! sweeper) never lose or double-apply a change. The rules are fleet-core's
//! [`ThingJobs`].

use crate::Outgoing;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use fleet_core::ThingName;
use fleet_core::jobs::{
    JobExecution, JobStatus, JobsMessage, RolloutControl, RolloutStatus, Target, TargetStatus,
    ThingJobs,
};
use fleet_core::topic::{JobsTopic, JobsTopicKind, Role, Service, Topic, TopicPrefix};

use crate::clock::Clock;
use crate::service::{Handler, HandlerError, Request};

use crate::registry::Registry;
use crate::store::{JobStore, StoreError};

use crate::model::{JobRecord, JobSpec, JobState, RolloutState, TargetSelection};

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

impl std::error::Error for JobsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl Handler for JobsService {
    fn service(&self) -> Service {
        Service::Jobs
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, HandlerError> {
        JobsService::handle(self, request)
            .await
            .map_err(HandlerError::failed)
    }

    async fn tick(&self, now: u64) -> Result<Vec<Outgoing>, HandlerError> {
        JobsService::tick(self, now)
            .await
            .map_err(HandlerError::failed)
    }
}

impl From<StoreError> for JobsError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// A job's progress at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSnapshot {
    /// The job's state.
    pub state: JobState,
    /// Executions per status (latest execution of each target).
    pub executions: BTreeMap<JobStatus, usize>,
    /// Targets a rollout has not released yet.
    pub not_released: usize,
    /// The rollout's status, for a job with a rollout.
    pub rollout: Option<RolloutStatus>,
}

impl JobSnapshot {
    /// Whether nothing more will change.
    pub fn is_final(&self) -> bool {
        let running = self
            .executions
            .iter()
            .any(|(s, n)| !s.is_terminal() && *n > 0);
        !running
            && (self.state != JobState::InProgress
                || matches!(self.rollout, Some(RolloutStatus::Aborted(_))))
    }
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
///     timeouts: TimeoutConfig::default(), max_retries: 0, rollout: None,
/// };
/// let out = jobs.create_job(spec, &registry, 1_700_000_000).await?;
/// assert!(out.iter().any(|m| m.topic == "$aws/things/pump-7/jobs/notify-next"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct JobsService {
    store: Arc<dyn JobStore>,
    prefix: String,
    clock: Clock,
    /// Where continuous jobs' groups are resolved in `tick` (`None`: only
    /// by [`sync_continuous`](JobsService::sync_continuous)), and install
    /// receipts verified for the fleet index.
    pub(crate) registry: Option<Registry>,
    /// When continuous jobs were last synced (seconds).
    synced: Arc<std::sync::atomic::AtomicU64>,
}

/// Seconds between two syncs of continuous jobs in `tick`.
const CONTINUOUS_EVERY: u64 = 5;

impl fmt::Debug for JobsService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobsService")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The executions of `jobs` that ended FAILED or TIMED_OUT and are their
/// job's latest: candidates for a retry.
fn ended_executions(jobs: &ThingJobs) -> Vec<(String, u64)> {
    jobs.executions()
        .iter()
        .filter(|e| matches!(e.status, JobStatus::Failed | JobStatus::TimedOut))
        .filter(|e| {
            jobs.execution(&e.job_id).map(|l| l.execution_number) == Some(e.execution_number)
        })
        .map(|e| (e.job_id.clone(), e.execution_number))
        .collect()
}

/// Counts each execution of `after` whose status is new since `before` in
/// `fleet_job_executions_total`.
fn count_transitions(before: &ThingJobs, after: &ThingJobs) {
    for e in after.executions() {
        let was = before
            .executions()
            .iter()
            .find(|b| b.job_id == e.job_id && b.execution_number == e.execution_number)
            .map(|b| b.status);
        if was != Some(e.status) {
            metrics::counter!("fleet_job_executions_total", "status" => e.status.as_str())
                .increment(1);
        }
    }
}

/// Sets `fleet_rollout_targets{job, status}`: a rollout's things by status.
fn rollout_progress(job_id: &str, targets: &[fleet_core::jobs::Target]) {
    let statuses = [
        (TargetStatus::Pending, "pending"),
        (TargetStatus::Queued, "queued"),
        (TargetStatus::InProgress, "in_progress"),
        (TargetStatus::Succeeded, "succeeded"),
        (TargetStatus::Failed, "failed"),
        (TargetStatus::TimedOut, "timed_out"),
        (TargetStatus::Rejected, "rejected"),
        (TargetStatus::Canceled, "canceled"),
        (TargetStatus::Removed, "removed"),
    ];
    for (status, label) in statuses {
        let n = targets.iter().filter(|t| t.status == status).count();
        metrics::gauge!("fleet_rollout_targets", "job" => job_id.to_string(), "status" => label)
            .set(n as f64);
    }
}

/// Things queued at once when a job is created.
const QUEUE_CONCURRENCY: usize = 256;

impl JobsService {
    /// A service over `store` under the `$aws` prefix.
    pub fn new(store: impl JobStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// A service over a store shared with others.
    pub fn shared(store: Arc<dyn JobStore>) -> Self {
        Self {
            store,
            prefix: "$aws".into(),
            clock: Clock::system(),
            registry: None,
            synced: Arc::default(),
        }
    }

    /// Uses `clock` instead of the system clock for what it does on its
    /// own (timeouts swept by [`tick`](Self::tick) through a front-end,
    /// [`now`](Self::now)): for tests, and for simulations.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Resolves continuous jobs' groups in `registry` from
    /// [`tick`](Self::tick), every few seconds: a thing that joins a
    /// target group (a static one, or one defined by a query it comes to
    /// match) gets the job. With a registry that keeps the fleet index, a
    /// campaign's install receipt that verifies is also written there as
    /// the thing's `inventory.verified.*` fields.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Now, by this service's clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// This service's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn outgoing(&self, thing: &str, messages: Vec<JobsMessage>) -> Vec<Outgoing> {
        let Ok(prefix) = TopicPrefix::new(&self.prefix) else {
            return Vec::new();
        };
        let Ok(thing) = ThingName::new(thing) else {
            return Vec::new();
        };
        messages
            .into_iter()
            .map(|m| Outgoing {
                topic: Topic::Jobs(JobsTopic {
                    thing: thing.clone(),
                    kind: m.kind,
                })
                .to_string_under(&prefix),
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
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let current = crate::metrics::timed("jobs_load", self.store.load_thing(thing)).await?;
            let mut jobs = current.value.clone();
            let r = f(&mut jobs);
            if jobs != current.value {
                let saved = crate::metrics::timed(
                    "jobs_save",
                    self.store.save_thing(thing, current.revision, &jobs),
                )
                .await;
                match saved {
                    Ok(_) => count_transitions(&current.value, &jobs),
                    Err(StoreError::Conflict) => {
                        metrics::counter!("fleet_store_conflicts_total", "kind" => "jobs")
                            .increment(1);
                        crate::store::after_conflict(attempt).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(r);
        }
        Err(StoreError::Conflict.into())
    }

    /// Answers a device's jobs request.
    pub async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, JobsError> {
        let Topic::Jobs(JobsTopic { thing, kind }) = &request.topic else {
            return Err(JobsError::Invalid("not a jobs request".into()));
        };
        let (now, payload) = (request.received_at, request.payload);
        let thing = thing.as_str().to_string();
        let (messages, ended, receipt) = self
            .with_thing(&thing, |jobs| {
                let messages = jobs.handle_request(kind, payload, now);
                // An execution reported done with an install receipt.
                let receipt = match kind {
                    JobsTopicKind::Update(job_id, Role::Request) => jobs
                        .execution(job_id.as_str())
                        .filter(|e| e.status == JobStatus::Succeeded)
                        .and_then(|e| e.status_details.get("receipt").cloned())
                        .map(|r| (job_id.as_str().to_string(), r)),
                    _ => None,
                };
                (messages, ended_executions(jobs), receipt)
            })
            .await?;
        if let Some((job_id, receipt)) = receipt {
            self.note_verified_install(&thing, &job_id, &receipt).await;
        }
        let mut out = self.outgoing(&thing, messages);
        out.extend(self.retry(&thing, ended, now).await?);
        Ok(out)
    }

    /// Creates a job and queues its executions.
    pub async fn create_job(
        &self,
        spec: JobSpec,
        registry: &Registry,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
        fleet_core::JobId::new(&spec.job_id).map_err(|e| JobsError::Invalid(e.to_string()))?;
        let order = self.resolve(&spec, registry).await?;
        let targets: BTreeSet<String> = order.iter().cloned().collect();
        let rollout = spec.rollout.as_ref().map(|_| RolloutState {
            targets: vec![Target::PENDING; order.len()],
            order,
            control: RolloutControl {
                open_groups: 1,
                ..RolloutControl::default()
            },
            recent_releases: Vec::new(),
            status: None,
        });
        let record = JobRecord {
            spec,
            state: JobState::InProgress,
            targets: BTreeSet::new(),
            retries: BTreeMap::new(),
            created_at: now,
            rollout,
        };
        match self.store.save_job(&record, 0).await {
            Ok(_) => {}
            Err(StoreError::Conflict) => return Err(JobsError::AlreadyExists(record.spec.job_id)),
            Err(e) => return Err(e.into()),
        }
        if record.rollout.is_some() {
            return self.drive_rollout(&record.spec.job_id, now).await;
        }
        self.queue_for(&record.spec.job_id, targets, now).await
    }

    /// The job's targets, each once, in order: the things named, then each
    /// group's members (a rollout releases them in this order).
    async fn resolve(&self, spec: &JobSpec, registry: &Registry) -> Result<Vec<String>, JobsError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for t in &spec.things {
            ThingName::new(t).map_err(|e| JobsError::Invalid(format!("thing {t}: {e}")))?;
            if seen.insert(t.clone()) {
                order.push(t.clone());
            }
        }
        for g in &spec.groups {
            let members = registry
                .group_members(g)
                .await
                .map_err(|e| JobsError::Invalid(format!("group {g}: {e}")))?;
            for t in members {
                if seen.insert(t.clone()) {
                    order.push(t);
                }
            }
        }
        Ok(order)
    }

    /// Queues executions of `job_id` for `things` not targeted yet, and
    /// records them as targets.
    async fn queue_for(
        &self,
        job_id: &str,
        things: BTreeSet<String>,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
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
            // job refuses a second), then record the targets. Things are
            // independent records: queue many at once, so a store that
            // commits in groups writes them together.
            // What an execution needs of the spec (not its list of
            // targets: cloning that for every target is quadratic).
            let job = Arc::new((
                record.spec.job_id.clone(),
                record.spec.document.clone(),
                record.spec.timeouts,
            ));
            for chunk in new.chunks(QUEUE_CONCURRENCY) {
                let mut set = tokio::task::JoinSet::new();
                for (i, thing) in chunk.iter().enumerate() {
                    let this = self.clone();
                    let job = job.clone();
                    let thing = thing.clone();
                    set.spawn(async move {
                        let messages = this
                            .with_thing(&thing, |jobs| {
                                let (job_id, document, timeouts) = &*job;
                                if jobs
                                    .execution(job_id)
                                    .is_some_and(|e| !e.status.is_terminal())
                                {
                                    return Vec::new();
                                }
                                let number =
                                    jobs.execution(job_id).map_or(1, |e| e.execution_number + 1);
                                jobs.queue(
                                    JobExecution::new(
                                        job_id,
                                        &thing,
                                        document.clone(),
                                        number,
                                        *timeouts,
                                        now,
                                    ),
                                    now,
                                )
                                .unwrap_or_default()
                            })
                            .await;
                        (i, thing, messages)
                    });
                }
                let mut done = Vec::with_capacity(chunk.len());
                while let Some(joined) = set.join_next().await {
                    let (i, thing, messages) =
                        joined.map_err(|e| JobsError::Store(StoreError::backend(e)))?;
                    done.push((i, thing, messages?));
                }
                done.sort_by_key(|(i, _, _)| *i);
                for (_, thing, messages) in done {
                    out.extend(self.outgoing(&thing, messages));
                }
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
    ) -> Result<Vec<Outgoing>, JobsError> {
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
            let targets = self.resolve(&job.value.spec, registry).await?;
            out.extend(
                self.queue_for(&id, targets.into_iter().collect(), now)
                    .await?,
            );
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
    ) -> Result<Vec<Outgoing>, JobsError> {
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

    /// Deletes a job and its executions. A job with executions still
    /// QUEUED or IN_PROGRESS is refused unless `force`, which cancels them
    /// first (the devices are told).
    pub async fn delete_job(
        &self,
        job_id: &str,
        force: bool,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
        let job = self.job(job_id).await?;
        let mut busy = false;
        for thing in &job.targets {
            let jobs = self.store.load_thing(thing).await?.value;
            busy |= jobs
                .execution(job_id)
                .is_some_and(|e| !e.status.is_terminal());
        }
        if busy && !force {
            return Err(JobsError::Invalid(format!(
                "{job_id} has executions in progress: cancel it, or delete with force"
            )));
        }
        let out = if busy {
            self.cancel_job(job_id, true, now).await?
        } else {
            Vec::new()
        };
        let record = loop {
            let Some(current) = self.store.load_job(job_id).await? else {
                return Err(JobsError::NotFound(job_id.into()));
            };
            match self.store.delete_job(job_id, current.revision).await {
                Ok(()) => break current.value,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        for thing in &record.targets {
            self.with_thing(thing, |jobs| jobs.forget(job_id)).await?;
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

    /// A job's progress now.
    pub async fn snapshot(&self, job_id: &str) -> Result<JobSnapshot, JobsError> {
        let job = self.job(job_id).await?;
        let mut executions = BTreeMap::new();
        for e in self.executions(job_id).await? {
            *executions.entry(e.execution.status).or_insert(0) += 1;
        }
        Ok(JobSnapshot {
            state: job.state,
            executions,
            not_released: job
                .rollout
                .as_ref()
                .map_or(0, |r| r.targets.iter().filter(|t| t.attempts == 0).count()),
            rollout: job.rollout.and_then(|r| r.status),
        })
    }

    /// The job's progress every `every`, sent when it changed, until it is
    /// final (the last snapshot is sent, then the channel closes). For a
    /// campaign's outcomes with verified receipts, see `watch_campaign`.
    pub fn watch_job(
        &self,
        job_id: &str,
        every: std::time::Duration,
    ) -> tokio::sync::mpsc::Receiver<Result<JobSnapshot, JobsError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        let id = job_id.to_string();
        tokio::spawn(async move {
            let mut last: Option<JobSnapshot> = None;
            loop {
                let snapshot = this.snapshot(&id).await;
                let stop = snapshot.as_ref().map_or(true, JobSnapshot::is_final);
                let changed = match (&snapshot, &last) {
                    (Ok(s), Some(l)) => s != l,
                    _ => true,
                };
                if changed {
                    if let Ok(s) = &snapshot {
                        last = Some(s.clone());
                    }
                    if tx.send(snapshot).await.is_err() {
                        return;
                    }
                }
                if stop {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        rx
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
    pub async fn handle_timeouts(&self, now: u64) -> Result<Vec<Outgoing>, JobsError> {
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

    /// Runs every rollout's controller once (the served service does, every
    /// second): refreshes targets from their executions, asks the planner,
    /// persists its decision, then queues or cancels executions.
    pub async fn drive_rollouts(&self, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        let mut out = Vec::new();
        for id in self.store.job_ids().await? {
            let Some(job) = self.store.load_job(&id).await? else {
                continue;
            };
            let running = job.value.rollout.as_ref().is_some_and(|r| {
                !matches!(
                    r.status,
                    Some(RolloutStatus::Completed | RolloutStatus::Aborted(_))
                )
            });
            if running && job.value.state == JobState::InProgress {
                out.extend(self.drive_rollout(&id, now).await?);
            }
        }
        Ok(out)
    }

    /// One step of one rollout's controller.
    pub async fn drive_rollout(&self, job_id: &str, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        // Targets whose current execution is already stored.
        let mut queued: Vec<bool> = Vec::new();
        let (record, decision) = loop {
            let Some(current) = self.store.load_job(job_id).await? else {
                return Err(JobsError::NotFound(job_id.into()));
            };
            let mut record = current.value;
            let Some(policy) = record.spec.rollout.clone() else {
                return Ok(Vec::new());
            };
            let Some(mut rs) = record.rollout.clone() else {
                return Ok(Vec::new());
            };
            // What the devices did since. Only the targets in flight can
            // have changed: an ended execution of a rollout's job changes
            // no more (only this controller queues another, and marks its
            // target queued when it does), so each run reads as many
            // things as are in flight, not every one released so far.
            queued.clear();
            queued.resize(rs.targets.len(), false);
            for (i, thing) in rs.order.iter().enumerate() {
                let t = &mut rs.targets[i];
                if t.attempts == 0 || t.status.is_terminal() {
                    continue;
                }
                let jobs = self.store.load_thing(thing).await?.value;
                let status = match jobs.execution(job_id) {
                    // Released, its execution not queued yet (a crash in
                    // between): still to be queued.
                    Some(e) if e.execution_number >= u64::from(t.attempts) => {
                        queued[i] = true;
                        match e.status {
                            JobStatus::Queued => TargetStatus::Queued,
                            JobStatus::InProgress => TargetStatus::InProgress,
                            JobStatus::Succeeded => TargetStatus::Succeeded,
                            JobStatus::Failed => TargetStatus::Failed,
                            JobStatus::TimedOut => TargetStatus::TimedOut,
                            JobStatus::Rejected => TargetStatus::Rejected,
                            JobStatus::Removed => TargetStatus::Removed,
                            JobStatus::Canceled => TargetStatus::Canceled,
                        }
                    }
                    _ => TargetStatus::Queued,
                };
                if status == TargetStatus::InProgress && t.started_at.is_none() {
                    t.started_at = Some(now);
                }
                t.status = status;
            }
            rs.recent_releases.retain(|r| now < r + 60);
            let d =
                fleet_core::jobs::plan(&policy, &rs.targets, rs.control, &rs.recent_releases, now);
            for &i in d.release.iter().chain(&d.retry) {
                let t = &mut rs.targets[i];
                t.attempts = t.attempts.saturating_add(1);
                t.status = TargetStatus::Queued;
                t.released_at = Some(now);
                t.started_at = None;
                rs.recent_releases.push(now);
            }
            for &i in &d.time_out {
                rs.targets[i].status = TargetStatus::TimedOut;
            }
            if d.cancel_queued {
                for t in &mut rs.targets {
                    if matches!(t.status, TargetStatus::Queued | TargetStatus::Pending) {
                        t.status = TargetStatus::Canceled;
                    }
                }
            }
            rs.control = d.control;
            rs.status = d.status;
            if matches!(d.status, Some(RolloutStatus::Completed)) {
                record.state = JobState::Completed;
            }
            record.targets.extend(
                rs.order
                    .iter()
                    .zip(&rs.targets)
                    .filter(|(_, t)| t.attempts > 0)
                    .map(|(thing, _)| thing.clone()),
            );
            let changed = record.rollout.as_ref() != Some(&rs);
            record.rollout = Some(rs);
            if !changed {
                break (record, d);
            }
            match self.store.save_job(&record, current.revision).await {
                Ok(_) => {
                    metrics::counter!("fleet_rollout_released_total")
                        .increment((d.release.len() + d.retry.len()) as u64);
                    if !d.release.is_empty() || !d.retry.is_empty() {
                        tracing::info!(
                            job = job_id,
                            released = d.release.len(),
                            retried = d.retry.len(),
                            "rollout released"
                        );
                    }
                    break (record, d);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The decision is persisted; now act on it. Each step is idempotent,
        // so a crash here is repaired by the next run.
        let mut out = Vec::new();
        let Some(rs) = &record.rollout else {
            return Ok(out);
        };
        rollout_progress(job_id, &rs.targets);
        let spec = &record.spec;
        for (i, (thing, t)) in rs.order.iter().zip(&rs.targets).enumerate() {
            let messages = match t.status {
                TargetStatus::Queued if !queued.get(i).copied().unwrap_or(false) => {
                    let number = u64::from(t.attempts);
                    self.with_thing(thing, |jobs| {
                        let latest = jobs.execution(job_id);
                        if latest.is_some_and(|e| {
                            e.execution_number >= number || !e.status.is_terminal()
                        }) {
                            return Vec::new();
                        }
                        jobs.queue(
                            JobExecution::new(
                                job_id,
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
                    .await?
                }
                TargetStatus::Canceled | TargetStatus::TimedOut
                    if decision.cancel_queued || !decision.time_out.is_empty() =>
                {
                    let force = t.status == TargetStatus::TimedOut;
                    self.with_thing(thing, |jobs| match jobs.execution(job_id) {
                        Some(e)
                            if (e.status == JobStatus::Queued)
                                || (force && e.status == JobStatus::InProgress) =>
                        {
                            jobs.cancel(job_id, force, now).unwrap_or_default()
                        }
                        _ => Vec::new(),
                    })
                    .await?
                }
                _ => Vec::new(),
            };
            out.extend(self.outgoing(thing, messages));
        }
        Ok(out)
    }

    async fn change_control(
        &self,
        job_id: &str,
        now: u64,
        change: impl Fn(&mut RolloutControl),
    ) -> Result<Vec<Outgoing>, JobsError> {
        loop {
            let Some(current) = self.store.load_job(job_id).await? else {
                return Err(JobsError::NotFound(job_id.into()));
            };
            let mut record = current.value;
            let Some(rs) = record.rollout.as_mut() else {
                return Err(JobsError::Invalid(format!("{job_id} has no rollout")));
            };
            change(&mut rs.control);
            match self.store.save_job(&record, current.revision).await {
                Ok(_) => break,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.drive_rollout(job_id, now).await
    }

    /// Pauses a rollout: nothing more is released until [`resume_rollout`](Self::resume_rollout).
    pub async fn pause_rollout(&self, job_id: &str, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        self.change_control(job_id, now, |c| c.paused = true).await
    }

    /// Resumes a paused rollout.
    pub async fn resume_rollout(&self, job_id: &str, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        self.change_control(job_id, now, |c| c.paused = false).await
    }

    /// Opens the next group of a rollout waiting for approval.
    pub async fn approve_next_group(
        &self,
        job_id: &str,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
        self.change_control(job_id, now, |c| {
            c.open_groups = c.open_groups.saturating_add(1)
        })
        .await
    }

    /// Aborts a rollout: queued executions are canceled, nothing more is
    /// released.
    pub async fn abort_rollout(&self, job_id: &str, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        self.change_control(job_id, now, |c| c.aborted = true).await
    }

    /// Pauses, resumes, approves the next group of, or aborts a rollout.
    pub async fn control(
        &self,
        job_id: &str,
        action: RolloutAction,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
        match action {
            RolloutAction::Pause => self.pause_rollout(job_id, now).await,
            RolloutAction::Resume => self.resume_rollout(job_id, now).await,
            RolloutAction::Approve => self.approve_next_group(job_id, now).await,
            RolloutAction::Abort => self.abort_rollout(job_id, now).await,
        }
    }

    /// What the service does as time passes, at `now`: times out
    /// executions ([`handle_timeouts`](Self::handle_timeouts)), then
    /// releases rollouts' targets ([`drive_rollouts`](Self::drive_rollouts)).
    pub async fn tick(&self, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        let mut out = self.handle_timeouts(now).await?;
        out.extend(self.drive_rollouts(now).await?);
        if let Some(registry) = &self.registry {
            use std::sync::atomic::Ordering;
            let last = self.synced.load(Ordering::Relaxed);
            if now >= last.saturating_add(CONTINUOUS_EVERY) || now < last {
                self.synced.store(now, Ordering::Relaxed);
                out.extend(self.sync_continuous(registry, now).await?);
            }
        }
        Ok(out)
    }

    /// Queues a new execution for each of the thing's executions that ended
    /// FAILED or TIMED_OUT and has retries left.
    async fn retry_ended(&self, thing: &str, now: u64) -> Result<Vec<Outgoing>, JobsError> {
        let ended = ended_executions(&self.store.load_thing(thing).await?.value);
        self.retry(thing, ended, now).await
    }

    /// Queues again the `ended` executions (FAILED or TIMED_OUT, each its
    /// job's latest) whose job allows another try.
    async fn retry(
        &self,
        thing: &str,
        ended: Vec<(String, u64)>,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
        let mut out = Vec::new();
        for (job_id, number) in ended {
            loop {
                let Some(current) = self.store.load_job(&job_id).await? else {
                    break;
                };
                let mut record = current.value;
                let used = record.retries.get(thing).copied().unwrap_or(0);
                if record.state != JobState::InProgress
                    || record.rollout.is_some()
                    || used >= record.spec.max_retries
                {
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

/// An operator's action on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RolloutAction {
    /// Release no more targets until resumed.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Open the next group (a group whose policy waits for approval).
    Approve,
    /// Stop: cancel what was not released.
    Abort,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SqliteStore};
    use fleet_core::jobs::{
        AbortCriterion, FailureType, GroupAction, RateLimit, RetryPolicy, RolloutGroup,
        RolloutPolicy, TimeoutConfig,
    };
    use serde_json::json;

    fn req<'a>(topic: &'a str, payload: &'a [u8], now: u64) -> Request<'a> {
        Request::from_broker(&TopicPrefix::AWS, topic, payload, now).expect("a request")
    }

    const T0: u64 = 1_800_000_000;

    fn rollout_spec(id: &str, things: usize, abort: bool) -> JobSpec {
        JobSpec {
            job_id: id.into(),
            document: json!({"op": "update"}),
            things: (0..things).map(|i| format!("t{i}")).collect(),
            groups: Vec::new(),
            selection: TargetSelection::Snapshot,
            timeouts: TimeoutConfig::default(),
            max_retries: 0,
            rollout: Some(RolloutPolicy {
                rate: RateLimit::Constant { per_minute: 1000 },
                groups: vec![RolloutGroup {
                    size: 3,
                    success_percent: 100,
                    on_success: GroupAction::NextGroup,
                    error_threshold: None,
                }],
                abort: if abort {
                    vec![AbortCriterion {
                        failure: FailureType::Failed,
                        threshold_percent: 50,
                        min_executed: 2,
                    }]
                } else {
                    Vec::new()
                },
                retry: RetryPolicy::default(),
                in_progress_timeout_secs: None,
            }),
        }
    }

    /// The device `thing` takes its next job and ends it with `status`.
    async fn device_does(jobs: &JobsService, thing: &str, status: &str, now: u64) {
        let topic = format!("$aws/things/{thing}/jobs/start-next");
        jobs.handle(&req(&topic, b"{}", now)).await.unwrap();
        let job = jobs.store.load_thing(thing).await.unwrap().value;
        let id = job.next_pending().map(|e| e.job_id.clone()).unwrap();
        let topic = format!("$aws/things/{thing}/jobs/{id}/update");
        let body = json!({"status": status}).to_string();
        let out = jobs
            .handle(&req(&topic, body.as_bytes(), now))
            .await
            .unwrap();
        assert!(
            out.iter().any(|m| m.topic.ends_with("/update/accepted")),
            "{out:?}"
        );
    }

    async fn released(jobs: &JobsService, id: &str) -> Vec<String> {
        jobs.executions(id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.thing)
            .collect()
    }

    #[tokio::test]
    async fn a_rollout_opens_groups_survives_a_restart_and_never_releases_twice() {
        let store = MemoryStore::new();
        let registry = Registry::in_memory().unwrap();
        let jobs = JobsService::new(store.clone());
        jobs.create_job(rollout_spec("r1", 8, false), &registry, T0)
            .await
            .unwrap();
        assert_eq!(
            released(&jobs, "r1").await,
            ["t0", "t1", "t2"],
            "the first group only"
        );
        for t in ["t0", "t1"] {
            device_does(&jobs, t, "SUCCEEDED", T0 + 1).await;
        }
        jobs.drive_rollouts(T0 + 2).await.unwrap();
        assert_eq!(
            released(&jobs, "r1").await.len(),
            3,
            "the group is not done yet"
        );
        // A restart: a new service over the same store goes on.
        let jobs = JobsService::new(store.clone());
        device_does(&jobs, "t2", "SUCCEEDED", T0 + 3).await;
        jobs.drive_rollouts(T0 + 4).await.unwrap();
        assert_eq!(
            released(&jobs, "r1").await.len(),
            8,
            "the next group opened"
        );
        jobs.drive_rollouts(T0 + 5).await.unwrap();
        for e in jobs.executions("r1").await.unwrap() {
            assert_eq!(e.execution.execution_number, 1, "{} released once", e.thing);
        }
        for i in 3..8 {
            device_does(&jobs, &format!("t{i}"), "SUCCEEDED", T0 + 6).await;
        }
        jobs.drive_rollouts(T0 + 7).await.unwrap();
        let job = jobs.job("r1").await.unwrap();
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.rollout.unwrap().status, Some(RolloutStatus::Completed));
    }

    /// An instance that dies after storing a release but before publishing
    /// its notices: the devices are reminded by whichever instance sweeps
    /// next (from a SQLite file, as after a restart).
    #[tokio::test]
    async fn notices_lost_with_their_instance_are_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let registry = Registry::in_memory().unwrap();
        {
            let jobs = JobsService::new(SqliteStore::open(&path).unwrap());
            let out = jobs
                .create_job(rollout_spec("lost", 5, false), &registry, T0)
                .await
                .unwrap();
            assert_eq!(
                out.iter()
                    .filter(|m| m.topic.ends_with("/notify-next"))
                    .count(),
                3
            );
            // ...and it dies here: none of `out` was published.
        }
        let jobs = JobsService::new(SqliteStore::open(&path).unwrap());
        let notices = |out: Vec<Outgoing>| -> Vec<String> {
            out.into_iter()
                .filter(|m| m.topic.ends_with("/notify-next"))
                .map(|m| m.topic)
                .collect()
        };
        let first = T0 + fleet_core::jobs::REMINDERS[0];
        assert!(notices(jobs.handle_timeouts(first - 1).await.unwrap()).is_empty());
        assert_eq!(
            notices(jobs.handle_timeouts(first).await.unwrap()),
            [0, 1, 2].map(|i| format!("$aws/things/t{i}/jobs/notify-next"))
        );
        // Once reminded, not again at once; a device that asks is not
        // reminded any more.
        assert!(notices(jobs.handle_timeouts(first + 1).await.unwrap()).is_empty());
        device_does(&jobs, "t0", "SUCCEEDED", first + 2).await;
        jobs.handle(&req("$aws/things/t1/jobs/get", b"{}", first + 2))
            .await
            .unwrap();
        let second = first + fleet_core::jobs::REMINDERS[1];
        assert_eq!(
            notices(jobs.handle_timeouts(second).await.unwrap()),
            ["$aws/things/t2/jobs/notify-next"]
        );
    }

    #[tokio::test]
    async fn a_paused_rollout_releases_nothing_until_resumed_and_is_watched() {
        let jobs = JobsService::new(MemoryStore::new());
        let registry = Registry::in_memory().unwrap();
        jobs.create_job(rollout_spec("p1", 6, false), &registry, T0)
            .await
            .unwrap();
        let mut watch = jobs.watch_job("p1", std::time::Duration::from_millis(10));
        let first = watch.recv().await.unwrap().unwrap();
        assert_eq!(
            (first.not_released, first.executions[&JobStatus::Queued]),
            (3, 3)
        );
        jobs.pause_rollout("p1", T0 + 1).await.unwrap();
        for t in ["t0", "t1", "t2"] {
            device_does(&jobs, t, "SUCCEEDED", T0 + 2).await;
        }
        jobs.drive_rollouts(T0 + 3).await.unwrap();
        assert_eq!(
            released(&jobs, "p1").await.len(),
            3,
            "paused: the next group waits"
        );
        assert_eq!(
            jobs.job("p1").await.unwrap().rollout.unwrap().status,
            Some(RolloutStatus::Paused)
        );
        jobs.resume_rollout("p1", T0 + 4).await.unwrap();
        assert_eq!(released(&jobs, "p1").await.len(), 6);
        for t in ["t3", "t4", "t5"] {
            device_does(&jobs, t, "SUCCEEDED", T0 + 5).await;
        }
        jobs.drive_rollouts(T0 + 6).await.unwrap();
        // The watcher saw it through to the end, then closed.
        let mut last = first;
        while let Some(s) = watch.recv().await {
            last = s.unwrap();
        }
        assert_eq!(last.state, JobState::Completed);
        assert_eq!(last.executions[&JobStatus::Succeeded], 6);
    }

    #[tokio::test]
    async fn failures_abort_a_rollout_and_cancel_what_is_queued() {
        let jobs = JobsService::new(MemoryStore::new());
        let registry = Registry::in_memory().unwrap();
        jobs.create_job(rollout_spec("r2", 8, true), &registry, T0)
            .await
            .unwrap();
        device_does(&jobs, "t0", "FAILED", T0 + 1).await;
        device_does(&jobs, "t1", "FAILED", T0 + 1).await;
        jobs.drive_rollouts(T0 + 2).await.unwrap();
        let job = jobs.job("r2").await.unwrap();
        assert!(matches!(
            job.rollout.unwrap().status,
            Some(RolloutStatus::Aborted(_))
        ));
        let execs = jobs.executions("r2").await.unwrap();
        assert_eq!(execs.len(), 3, "nothing past the first group was released");
        let t2 = execs.iter().find(|e| e.thing == "t2").unwrap();
        assert_eq!(t2.execution.status, JobStatus::Canceled);
        // Operator controls on an aborted rollout change nothing.
        jobs.resume_rollout("r2", T0 + 3).await.unwrap();
        assert_eq!(jobs.executions("r2").await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_job_in_progress_is_deleted_only_with_force() {
        for store in [StoreKind::Memory, StoreKind::Sqlite] {
            let dir = tempfile::tempdir().unwrap();
            match store {
                StoreKind::Memory => delete_scenario(JobsService::new(MemoryStore::new())).await,
                StoreKind::Sqlite => {
                    delete_scenario(JobsService::new(
                        SqliteStore::open(&dir.path().join("f.db")).unwrap(),
                    ))
                    .await
                }
            }
        }
    }

    enum StoreKind {
        Memory,
        Sqlite,
    }

    async fn delete_scenario(jobs: JobsService) {
        let registry = Registry::in_memory().unwrap();
        let mut spec = rollout_spec("d1", 2, false);
        spec.rollout = None;
        jobs.create_job(spec, &registry, T0).await.unwrap();
        assert!(matches!(
            jobs.delete_job("d1", false, T0).await,
            Err(JobsError::Invalid(_))
        ));
        assert_eq!(
            jobs.executions("d1").await.unwrap().len(),
            2,
            "nothing changed"
        );
        let out = jobs.delete_job("d1", true, T0).await.unwrap();
        assert!(
            out.iter()
                .any(|m| m.topic == "$aws/things/t0/jobs/notify-next"),
            "devices are told"
        );
        assert!(matches!(jobs.job("d1").await, Err(JobsError::NotFound(_))));
        assert!(jobs.job_ids().await.unwrap().is_empty());
        assert!(
            jobs.store
                .load_thing("t0")
                .await
                .unwrap()
                .value
                .executions()
                .is_empty()
        );
        assert!(matches!(
            jobs.delete_job("d1", true, T0).await,
            Err(JobsError::NotFound(_))
        ));
    }
}
