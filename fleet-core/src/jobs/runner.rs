//! `JobRunner`: the device side of jobs, sans-I/O.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use serde_json::Value;

use super::execution::{JobErrorCode, JobStatus};
use super::wire::{
    ErrorResponse, ExecutionResponse, JobExecutionData, UpdateRequest, UpdateResponse,
};
use crate::identity::ThingName;
use crate::time::Instant;
use crate::topic::{JobsTopic, JobsTopicKind, Role, Topic, TopicError, TopicPrefix};
use crate::transmit::{QoS, Transmit};

/// Settings of a [`JobRunner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Topic prefix (`$aws` by default).
    pub prefix: String,
    /// How long to wait for a reply before sending a request again.
    pub request_timeout: Duration,
    /// How many times a progress (IN_PROGRESS) update is sent before it is
    /// given up; terminal updates are sent until the service answers.
    pub max_attempts: u32,
    /// With no job, ask for one this often anyway, to repair a lost
    /// notification. `None`: only when notified or reconnected.
    pub idle_poll_interval: Option<Duration>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            prefix: String::from("$aws"),
            request_timeout: Duration::from_secs(10),
            max_attempts: 5,
            idle_poll_interval: Some(Duration::from_secs(300)),
        }
    }
}

/// Names one [`JobRunner::update`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpdateId(u64);

/// What the runner tells the application.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum JobEvent {
    /// Run this job (or go on with it: after a restart the service hands
    /// back the IN_PROGRESS job, with the `status_details` last reported).
    Job {
        /// The job.
        job_id: String,
        /// Which execution.
        execution_number: u64,
        /// The document.
        document: Value,
        /// Details last reported for it.
        status_details: BTreeMap<String, String>,
    },
    /// An update was accepted.
    Updated {
        /// The update.
        id: UpdateId,
        /// The job.
        job_id: String,
        /// The status it set.
        status: JobStatus,
    },
    /// An update was refused, or given up (`code: None`).
    UpdateFailed {
        /// The update.
        id: UpdateId,
        /// The job.
        job_id: String,
        /// The service's code.
        code: Option<JobErrorCode>,
    },
    /// The current job is no longer pending on the service (canceled,
    /// removed or timed out): stop working on it.
    Canceled {
        /// The job.
        job_id: String,
    },
}

/// Input the runner refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunnerError {
    /// Not a jobs topic of this thing.
    UnknownTopic(TopicError),
    /// A jobs topic of another thing.
    NotOurs,
    /// The payload is not the JSON this topic carries.
    InvalidPayload,
    /// No job is running to update.
    NoCurrentJob,
}

impl core::fmt::Display for RunnerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownTopic(e) => write!(f, "not a jobs topic: {e}"),
            Self::NotOurs => f.write_str("a jobs topic of another thing"),
            Self::InvalidPayload => f.write_str("payload is not the JSON this topic carries"),
            Self::NoCurrentJob => f.write_str("no job is running"),
        }
    }
}

impl core::error::Error for RunnerError {}

#[derive(Debug, Clone)]
struct Current {
    job_id: String,
    execution_number: u64,
    version: u64,
}

#[derive(Debug)]
struct PendingUpdate {
    id: UpdateId,
    status: JobStatus,
    details: Option<BTreeMap<String, String>>,
}

#[derive(Debug)]
struct InFlight {
    token: String,
    deadline: Instant,
    attempts: u32,
}

/// The device side of jobs. It asks for the next job on every
/// (re)connection with `start-next` (which also hands back a job left
/// IN_PROGRESS by a restart), runs one job at a time, reports progress
/// with `expectedVersion`, and goes on to the next when the current one
/// ends.
///
/// Notifications never lose a job: a `notify-next` that arrives while a
/// `start-next` is out makes the runner ask again when the reply comes, and
/// one that names another job than the current makes it check with
/// `start-next`. A job is handed to the application once per execution.
/// An update whose reply was lost is sent again; if the service already
/// applied it (its state shows the status asked for) it counts as accepted.
///
/// Same shape as `ShadowSync`: `handle_*` inputs, `update` commands, and
/// `poll_transmit`/`poll_event`/`poll_timeout` outputs.
#[derive(Debug)]
pub struct JobRunner {
    thing: ThingName<'static>,
    config: RunnerConfig,
    base: String,
    session: u64,
    next_token: u64,
    next_id: u64,
    connected: bool,
    subscribed: bool,
    current: Option<Current>,
    start_next: Option<InFlight>,
    recheck: bool,
    next_idle_poll: Option<Instant>,
    update_in_flight: Option<(PendingUpdate, InFlight)>,
    updates: VecDeque<PendingUpdate>,
    /// Executions handed to the application, most recent last.
    handed: VecDeque<(String, u64)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<JobEvent>,
}

/// How many handed-out executions are remembered to avoid running one twice.
const HANDED_MEMORY: usize = 64;

impl JobRunner {
    /// A runner for `thing`; `session` makes client tokens unique across
    /// restarts.
    pub fn new(thing: ThingName<'static>, config: RunnerConfig, session: u64) -> Self {
        let base = format!("{}/things/{}/jobs", config.prefix, thing);
        Self {
            thing,
            config,
            base,
            session,
            next_token: 0,
            next_id: 0,
            connected: false,
            subscribed: false,
            current: None,
            start_next: None,
            recheck: false,
            next_idle_poll: None,
            update_in_flight: None,
            updates: VecDeque::new(),
            handed: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The topic filters the runner needs.
    pub fn subscriptions(&self) -> Vec<String> {
        [
            "notify-next",
            "start-next/accepted",
            "start-next/rejected",
            "+/update/accepted",
            "+/update/rejected",
        ]
        .iter()
        .map(|s| format!("{}/{s}", self.base))
        .collect()
    }

    /// The job being run, if any.
    pub fn current_job(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.job_id.as_str())
    }

    /// The link went up or down.
    pub fn handle_connection(&mut self, now: Instant, up: bool) {
        let _ = now;
        self.connected = up;
        self.subscribed = false;
        self.start_next = None;
        if let Some((u, _)) = self.update_in_flight.take() {
            self.updates.push_front(u);
        }
        if up {
            self.transmits.push_back(Transmit::Subscribe {
                filters: self.subscriptions(),
            });
        }
    }

    /// The broker acknowledged the subscriptions.
    pub fn handle_subscribed(&mut self, now: Instant) {
        if self.connected {
            self.subscribed = true;
            self.send_start_next(now);
        }
    }

    /// A message arrived.
    pub fn handle_message(
        &mut self,
        now: Instant,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), RunnerError> {
        let prefix = TopicPrefix::new(&self.config.prefix).map_err(RunnerError::UnknownTopic)?;
        let Topic::Jobs(JobsTopic { thing, kind }) =
            Topic::parse(&prefix, topic).map_err(RunnerError::UnknownTopic)?
        else {
            return Err(RunnerError::NotOurs);
        };
        if thing != self.thing {
            return Err(RunnerError::NotOurs);
        }
        let body: Value =
            serde_json::from_slice(payload).map_err(|_| RunnerError::InvalidPayload)?;
        let token = body
            .get("clientToken")
            .and_then(Value::as_str)
            .map(String::from);
        match kind {
            JobsTopicKind::NotifyNext => {
                let msg: ExecutionResponse =
                    serde_json::from_value(body).map_err(|_| RunnerError::InvalidPayload)?;
                let same = match (&msg.execution, &self.current) {
                    (Some(e), Some(c)) => {
                        e.job_id == c.job_id && e.execution_number == c.execution_number
                    }
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    if self.start_next.is_some() {
                        self.recheck = true;
                    } else {
                        self.send_start_next(now);
                    }
                }
            }
            JobsTopicKind::StartNext(Role::Accepted) => {
                let msg: ExecutionResponse =
                    serde_json::from_value(body).map_err(|_| RunnerError::InvalidPayload)?;
                if self
                    .start_next
                    .as_ref()
                    .is_none_or(|f| Some(&f.token) != token.as_ref())
                {
                    return Ok(()); // a reply to an earlier try, or not ours
                }
                self.start_next = None;
                self.adopt(now, msg.execution);
                if core::mem::take(&mut self.recheck) && self.current.is_none() {
                    self.send_start_next(now);
                }
            }
            JobsTopicKind::StartNext(Role::Rejected) => {
                if self
                    .start_next
                    .as_ref()
                    .is_some_and(|f| Some(&f.token) == token.as_ref())
                    && let Some(f) = self.start_next.as_mut()
                {
                    // Try again when the timer fires.
                    f.deadline = now + self.config.request_timeout;
                }
            }
            JobsTopicKind::Update(job, Role::Accepted) => {
                let msg: UpdateResponse =
                    serde_json::from_value(body).map_err(|_| RunnerError::InvalidPayload)?;
                if !self.is_update_reply(job.as_str(), token.as_deref()) {
                    return Ok(());
                }
                let version = msg.execution_state.map(|s| s.version_number);
                self.update_accepted(now, version);
            }
            JobsTopicKind::Update(job, Role::Rejected) => {
                let msg: ErrorResponse =
                    serde_json::from_value(body).map_err(|_| RunnerError::InvalidPayload)?;
                if !self.is_update_reply(job.as_str(), token.as_deref()) {
                    return Ok(());
                }
                self.update_rejected(now, msg);
            }
            _ => {}
        }
        Ok(())
    }

    /// Call when the time from [`poll_timeout`](Self::poll_timeout) has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        if self.start_next.as_ref().is_some_and(|f| f.deadline <= now) {
            self.send_start_next(now);
        }
        if self.next_idle_poll.is_some_and(|t| t <= now) {
            self.next_idle_poll = None;
            if self.current.is_none() && self.start_next.is_none() {
                self.send_start_next(now);
            }
        }
        let expired = self
            .update_in_flight
            .as_ref()
            .is_some_and(|(_, f)| f.deadline <= now);
        if expired && let Some((u, f)) = self.update_in_flight.take() {
            // A terminal status is the job's outcome: it is sent until the
            // service answers (giving it up would leave the job IN_PROGRESS
            // and this runner stuck on it). Progress updates may be given up.
            if f.attempts >= self.config.max_attempts && !u.status.is_terminal() {
                self.events.push_back(JobEvent::UpdateFailed {
                    id: u.id,
                    job_id: self.current_job().unwrap_or_default().into(),
                    code: None,
                });
                self.send_next_update(now);
            } else {
                self.send_update(now, u, f.attempts + 1);
            }
        }
    }

    /// Reports the current job's status (`details` replace the previous
    /// ones). Updates are sent one at a time, in order.
    pub fn update(
        &mut self,
        now: Instant,
        status: JobStatus,
        details: Option<BTreeMap<String, String>>,
    ) -> Result<UpdateId, RunnerError> {
        if self.current.is_none() {
            return Err(RunnerError::NoCurrentJob);
        }
        self.next_id += 1;
        let id = UpdateId(self.next_id);
        self.updates.push_back(PendingUpdate {
            id,
            status,
            details,
        });
        self.send_next_update(now);
        Ok(id)
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<JobEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        [
            self.start_next.as_ref().map(|f| f.deadline),
            self.update_in_flight.as_ref().map(|(_, f)| f.deadline),
            self.next_idle_poll,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn token(&mut self) -> String {
        self.next_token += 1;
        format!("fleet-{:x}-{}", self.session, self.next_token)
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.transmits.push_back(Transmit::Publish {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
        });
    }

    fn send_start_next(&mut self, now: Instant) {
        if !self.subscribed {
            return;
        }
        let token = self.token();
        let payload = format!(r#"{{"clientToken":"{token}"}}"#).into_bytes();
        self.start_next = Some(InFlight {
            token,
            deadline: now + self.config.request_timeout,
            attempts: 1,
        });
        let topic = format!("{}/start-next", self.base);
        self.publish(topic, payload);
    }

    /// Takes the execution `start-next` handed back.
    fn adopt(&mut self, now: Instant, execution: Option<JobExecutionData>) {
        let same = match (&execution, &self.current) {
            (Some(e), Some(c)) => e.job_id == c.job_id && e.execution_number == c.execution_number,
            _ => false,
        };
        if same {
            if let (Some(e), Some(c)) = (&execution, self.current.as_mut()) {
                c.version = c.version.max(e.version_number);
            }
            self.send_next_update(now);
            return;
        }
        if self.current.is_some() && (self.update_in_flight.is_some() || !self.updates.is_empty()) {
            // Our own update of the current job may be what ended it on the
            // service (its reply lost or late). Let that update's outcome
            // decide; it starts the next job when it is terminal, and a job
            // really ended by the service refuses it (TerminalStateReached).
            self.send_next_update(now);
            return;
        }
        if let Some(old) = self.current.take() {
            // What we were running is no longer pending on the service.
            self.drop_updates(&old.job_id);
            self.events
                .push_back(JobEvent::Canceled { job_id: old.job_id });
        }
        let Some(e) = execution else {
            self.next_idle_poll = self.config.idle_poll_interval.map(|d| now + d);
            return;
        };
        let key = (e.job_id.clone(), e.execution_number);
        self.current = Some(Current {
            job_id: e.job_id.clone(),
            execution_number: e.execution_number,
            version: e.version_number,
        });
        if !self.handed.contains(&key) {
            if self.handed.len() == HANDED_MEMORY {
                self.handed.pop_front();
            }
            self.handed.push_back(key);
            self.events.push_back(JobEvent::Job {
                job_id: e.job_id,
                execution_number: e.execution_number,
                document: e.job_document.unwrap_or(Value::Null),
                status_details: e.status_details,
            });
        }
        self.send_next_update(now);
    }

    fn drop_updates(&mut self, job_id: &str) {
        let dropped: Vec<PendingUpdate> = self
            .update_in_flight
            .take()
            .map(|(u, _)| u)
            .into_iter()
            .chain(self.updates.drain(..))
            .collect();
        for u in dropped {
            self.events.push_back(JobEvent::UpdateFailed {
                id: u.id,
                job_id: job_id.into(),
                code: Some(JobErrorCode::TerminalStateReached),
            });
        }
    }

    fn is_update_reply(&self, job_id: &str, token: Option<&str>) -> bool {
        self.current.as_ref().is_some_and(|c| c.job_id == job_id)
            && self
                .update_in_flight
                .as_ref()
                .is_some_and(|(_, f)| Some(f.token.as_str()) == token)
    }

    fn send_next_update(&mut self, now: Instant) {
        if !self.subscribed || self.update_in_flight.is_some() || self.current.is_none() {
            return;
        }
        if let Some(u) = self.updates.pop_front() {
            self.send_update(now, u, 1);
        }
    }

    fn send_update(&mut self, now: Instant, u: PendingUpdate, attempts: u32) {
        let Some(current) = &self.current else {
            return;
        };
        let topic = format!("{}/{}/update", self.base, current.job_id);
        let version = current.version;
        let token = match self.update_in_flight.as_ref() {
            Some((_, f)) => f.token.clone(),
            None => self.token(),
        };
        let request = UpdateRequest {
            status: Some(u.status),
            status_details: u.details.clone(),
            expected_version: Some(version),
            include_job_execution_state: Some(true),
            client_token: Some(token.clone()),
            ..UpdateRequest::default()
        };
        let payload = serde_json::to_vec(&request).unwrap_or_default();
        self.update_in_flight = Some((
            u,
            InFlight {
                token,
                deadline: now + self.config.request_timeout,
                attempts,
            },
        ));
        self.publish(topic, payload);
    }

    fn update_accepted(&mut self, now: Instant, version: Option<u64>) {
        let Some((u, _)) = self.update_in_flight.take() else {
            return;
        };
        let Some(current) = self.current.as_mut() else {
            return;
        };
        if let Some(v) = version {
            current.version = v;
        } else {
            current.version += 1;
        }
        let job_id = current.job_id.clone();
        self.events.push_back(JobEvent::Updated {
            id: u.id,
            job_id: job_id.clone(),
            status: u.status,
        });
        if u.status.is_terminal() {
            self.current = None;
            self.drop_updates(&job_id);
            self.send_start_next(now);
        } else {
            self.send_next_update(now);
        }
    }

    fn update_rejected(&mut self, now: Instant, msg: ErrorResponse) {
        let Some((u, f)) = self.update_in_flight.take() else {
            return;
        };
        let state = msg.execution_state;
        // The service already holds what we asked for (an earlier try was
        // applied and its reply lost): that is a success.
        if let Some(s) = &state
            && s.status == u.status
            && u.status.is_terminal()
        {
            self.update_in_flight = Some((u, f));
            self.update_accepted(now, Some(s.version_number));
            return;
        }
        match msg.code {
            JobErrorCode::VersionMismatch
                if f.attempts < self.config.max_attempts || u.status.is_terminal() =>
            {
                if let (Some(s), Some(c)) = (&state, self.current.as_mut()) {
                    c.version = s.version_number;
                }
                if state.as_ref().is_some_and(|s| s.status.is_terminal()) {
                    self.lost_current(now, u);
                } else {
                    self.send_update(now, u, f.attempts + 1);
                }
            }
            JobErrorCode::InternalError | JobErrorCode::RequestThrottled => {
                // Send again when the timer fires.
                self.update_in_flight = Some((
                    u,
                    InFlight {
                        deadline: now + self.config.request_timeout,
                        ..f
                    },
                ));
            }
            JobErrorCode::TerminalStateReached => self.lost_current(now, u),
            JobErrorCode::InvalidStateTransition
                if state.as_ref().is_some_and(|s| s.status.is_terminal()) =>
            {
                self.lost_current(now, u)
            }
            code => {
                let job_id = self.current_job().unwrap_or_default().into();
                self.events.push_back(JobEvent::UpdateFailed {
                    id: u.id,
                    job_id,
                    code: Some(code),
                });
                self.send_next_update(now);
            }
        }
    }

    /// The current job ended on the service without us (canceled, timed
    /// out): tell the application and look for the next.
    fn lost_current(&mut self, now: Instant, u: PendingUpdate) {
        let job_id: String = self.current_job().unwrap_or_default().into();
        self.events.push_back(JobEvent::UpdateFailed {
            id: u.id,
            job_id: job_id.clone(),
            code: Some(JobErrorCode::TerminalStateReached),
        });
        self.current = None;
        self.drop_updates(&job_id);
        self.events.push_back(JobEvent::Canceled { job_id });
        self.send_start_next(now);
    }
}
