//! The service side of one thing's jobs: a pure function of (executions,
//! request, now) that answers the Jobs MQTT API and sends notifications.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::execution::{JobError, JobErrorCode, JobExecution, JobStatus, StatusUpdate};
use super::wire::{
    DescribeRequest, ErrorResponse, ExecutionResponse, GetPendingRequest, GetPendingResponse,
    JobExecutionData, JobExecutionSummary, NotifyMessage, StartNextRequest, UpdateRequest,
    UpdateResponse,
};
use crate::identity::ClientToken;
use crate::topic::{JobsTopicKind, Role};

/// A message the service publishes on one of the thing's jobs topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsMessage {
    /// Which topic (below `things/{thing}/jobs`).
    pub kind: JobsTopicKind<'static>,
    /// The JSON payload.
    pub payload: Vec<u8>,
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// When the service reminds a thing of a QUEUED next execution that it
/// has not asked about: seconds after the `notify-next` (or the previous
/// reminder) before each reminder.
///
/// A `notify-next` can be lost: the instance that queued the execution may
/// die between storing it and publishing the notice, or a QoS 1 message may
/// be dropped by a broker under load. A device that got no notice would
/// otherwise wait until it reconnects (or polls). A reminder repeats the
/// same `notify-next`, which devices treat as the state it is ("your next
/// job is X"), so a device that did get the first one loses nothing. The
/// reminders stop once the device starts the execution or asks for its
/// pending jobs (`get`, `$next/get`), and after the last one here.
pub const REMINDERS: [u64; 2] = [30, 300];

/// The reminder of the next execution (see [`REMINDERS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reminder {
    job_id: String,
    execution_number: u64,
    /// When the next reminder is due; `None`: no more reminders.
    due: Option<u64>,
    /// Reminders sent.
    sent: u8,
}

/// All job executions of one thing, in the order they were queued.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ThingJobs {
    thing: String,
    executions: Vec<JobExecution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reminder: Option<Reminder>,
}

impl ThingJobs {
    /// No executions yet.
    pub fn new(thing: &str) -> Self {
        Self {
            thing: thing.into(),
            executions: Vec::new(),
            reminder: None,
        }
    }

    /// The executions, oldest first.
    pub fn executions(&self) -> &[JobExecution] {
        &self.executions
    }

    /// The latest execution of `job_id`.
    pub fn execution(&self, job_id: &str) -> Option<&JobExecution> {
        self.executions.iter().rev().find(|e| e.job_id == job_id)
    }

    /// Forgets every execution of `job_id` (the job was deleted); refused
    /// (`false`, nothing changed) while one is QUEUED or IN_PROGRESS.
    pub fn forget(&mut self, job_id: &str) -> bool {
        if self
            .executions
            .iter()
            .any(|e| e.job_id == job_id && !e.status.is_terminal())
        {
            return false;
        }
        self.executions.retain(|e| e.job_id != job_id);
        true
    }

    /// The next pending execution: the oldest IN_PROGRESS, else the oldest
    /// QUEUED.
    pub fn next_pending(&self) -> Option<&JobExecution> {
        let pending = |s| self.executions.iter().find(move |e| e.status == s);
        pending(JobStatus::InProgress).or_else(|| pending(JobStatus::Queued))
    }

    fn pending_key(&self) -> Vec<(String, u64, JobStatus)> {
        self.executions
            .iter()
            .filter(|e| !e.status.is_terminal())
            .map(|e| (e.job_id.clone(), e.execution_number, e.status))
            .collect()
    }

    fn next_key(&self) -> Option<(String, u64)> {
        self.next_pending()
            .map(|e| (e.job_id.clone(), e.execution_number))
    }

    /// Runs `change`, then adds `notify` and `notify-next` messages if the
    /// pending list or the next execution changed.
    fn tracking<R>(
        &mut self,
        now: u64,
        change: impl FnOnce(&mut Self) -> R,
    ) -> (R, Vec<JobsMessage>) {
        let (pending, next) = (self.pending_key(), self.next_key());
        let result = change(self);
        let mut out = Vec::new();
        if self.pending_key() != pending {
            out.push(JobsMessage {
                kind: JobsTopicKind::Notify,
                payload: to_vec(&self.notify(now)),
            });
        }
        if self.next_key() != next {
            out.push(self.notify_next(now));
        }
        let reminder = self.reminder.take();
        self.reminder = match self.next_pending() {
            Some(e) if e.status == JobStatus::Queued => match reminder {
                Some(r) if r.job_id == e.job_id && r.execution_number == e.execution_number => {
                    Some(r)
                }
                _ => Some(Reminder {
                    job_id: e.job_id.clone(),
                    execution_number: e.execution_number,
                    due: Some(now.saturating_add(REMINDERS[0])),
                    sent: 0,
                }),
            },
            _ => None,
        };
        (result, out)
    }

    fn notify_next(&self, now: u64) -> JobsMessage {
        JobsMessage {
            kind: JobsTopicKind::NotifyNext,
            payload: to_vec(&ExecutionResponse {
                execution: self.next_pending().map(|e| JobExecutionData::of(e, true)),
                timestamp: now,
                client_token: None,
            }),
        }
    }

    /// The device asked for its pending jobs: it knows its next one, so
    /// it is not reminded of it.
    fn device_asked(&mut self) {
        if let Some(r) = &mut self.reminder {
            r.due = None;
        }
    }

    /// When the next reminder is due, if one is (see [`REMINDERS`]).
    pub fn next_reminder(&self) -> Option<u64> {
        self.reminder.as_ref().and_then(|r| r.due)
    }

    fn notify(&self, now: u64) -> NotifyMessage {
        let mut jobs: BTreeMap<JobStatus, Vec<JobExecutionSummary>> = BTreeMap::new();
        for e in self.executions.iter().filter(|e| !e.status.is_terminal()) {
            jobs.entry(e.status)
                .or_default()
                .push(JobExecutionSummary::of(e));
        }
        NotifyMessage {
            timestamp: now,
            jobs,
        }
    }

    /// Queues an execution of a job for this thing (a new execution
    /// number if the job ran here before). Refused while one is pending.
    pub fn queue(
        &mut self,
        execution: JobExecution,
        now: u64,
    ) -> Result<Vec<JobsMessage>, JobError> {
        if self
            .executions
            .iter()
            .any(|e| e.job_id == execution.job_id && !e.status.is_terminal())
        {
            return Err(JobError::new(
                JobErrorCode::InvalidRequest,
                "the job already has a pending execution on this thing",
            ));
        }
        let (_, messages) = self.tracking(now, |s| s.executions.push(execution));
        Ok(messages)
    }

    /// Cancels the pending execution of `job_id`.
    pub fn cancel(
        &mut self,
        job_id: &str,
        force: bool,
        now: u64,
    ) -> Result<Vec<JobsMessage>, JobError> {
        let (result, messages) = self.tracking(now, |s| {
            let e = s
                .executions
                .iter_mut()
                .rev()
                .find(|e| e.job_id == job_id)
                .ok_or(JobError::new(JobErrorCode::ResourceNotFound, "no such job"))?;
            e.cancel(force, now)
        });
        result.map(|()| messages)
    }

    /// When the next timer runs out: an execution's timeout, or a
    /// reminder ([`REMINDERS`]).
    pub fn next_deadline(&self) -> Option<u64> {
        self.executions
            .iter()
            .filter_map(JobExecution::deadline)
            .chain(self.next_reminder())
            .min()
    }

    /// Times out the executions whose timers ran out, and reminds the
    /// thing of its next execution if that is due ([`REMINDERS`]).
    pub fn handle_timeout(&mut self, now: u64) -> Vec<JobsMessage> {
        let mut out = self
            .tracking(now, |s| {
                for e in &mut s.executions {
                    e.handle_timeout(now);
                }
            })
            .1;
        let notified = out.iter().any(|m| m.kind == JobsTopicKind::NotifyNext);
        if let Some(r) = &mut self.reminder
            && r.due.is_some_and(|d| d <= now)
        {
            r.sent = r.sent.saturating_add(1);
            r.due = REMINDERS
                .get(usize::from(r.sent))
                .map(|after| now.saturating_add(*after));
            if !notified {
                out.push(self.notify_next(now));
            }
        }
        out
    }

    /// Answers a request the thing published on `kind` (a request topic).
    pub fn handle_request(
        &mut self,
        kind: &JobsTopicKind<'_>,
        payload: &[u8],
        now: u64,
    ) -> Vec<JobsMessage> {
        match kind {
            JobsTopicKind::GetPending(Role::Request) => self.answer(
                payload,
                now,
                |s, r: GetPendingRequest, now| {
                    s.device_asked();
                    let mut resp = GetPendingResponse {
                        timestamp: now,
                        client_token: r.client_token,
                        ..GetPendingResponse::default()
                    };
                    for e in &s.executions {
                        match e.status {
                            JobStatus::InProgress => {
                                resp.in_progress_jobs.push(JobExecutionSummary::of(e))
                            }
                            JobStatus::Queued => resp.queued_jobs.push(JobExecutionSummary::of(e)),
                            _ => {}
                        }
                    }
                    Ok((JobsTopicKind::GetPending(Role::Accepted), to_vec(&resp)))
                },
                JobsTopicKind::GetPending(Role::Rejected),
            ),
            JobsTopicKind::StartNext(Role::Request) => {
                self.answer(
                    payload,
                    now,
                    |s, r: StartNextRequest, now| {
                        // The IN_PROGRESS one if there is one (a device that
                        // restarted resumes it), else start the oldest QUEUED.
                        let i = s
                            .executions
                            .iter()
                            .position(|e| e.status == JobStatus::InProgress)
                            .or_else(|| {
                                s.executions
                                    .iter()
                                    .position(|e| e.status == JobStatus::Queued)
                            });
                        if let Some(i) = i
                            && s.executions[i].status == JobStatus::Queued
                        {
                            let update = StatusUpdate {
                                status: Some(JobStatus::InProgress),
                                status_details: r.status_details.clone(),
                                step_timeout_in_minutes: r.step_timeout_in_minutes,
                                ..StatusUpdate::default()
                            };
                            s.executions[i].update(&update, now)?;
                        }
                        let resp = ExecutionResponse {
                            execution: i.map(|i| JobExecutionData::of(&s.executions[i], true)),
                            timestamp: now,
                            client_token: r.client_token,
                        };
                        Ok((JobsTopicKind::StartNext(Role::Accepted), to_vec(&resp)))
                    },
                    JobsTopicKind::StartNext(Role::Rejected),
                )
            }
            JobsTopicKind::DescribeNext(Role::Request) => self.answer(
                payload,
                now,
                |s, r: DescribeRequest, now| {
                    s.device_asked();
                    let resp = ExecutionResponse {
                        execution: s.next_pending().map(|e| {
                            JobExecutionData::of(e, r.include_job_document.unwrap_or(true))
                        }),
                        timestamp: now,
                        client_token: r.client_token,
                    };
                    Ok((JobsTopicKind::DescribeNext(Role::Accepted), to_vec(&resp)))
                },
                JobsTopicKind::DescribeNext(Role::Rejected),
            ),
            JobsTopicKind::Describe(id, Role::Request) => {
                let id = id.clone().into_owned();
                let rejected = JobsTopicKind::Describe(id.clone(), Role::Rejected);
                self.answer(
                    payload,
                    now,
                    move |s, r: DescribeRequest, now| {
                        let e = s
                            .executions
                            .iter()
                            .rev()
                            .find(|e| {
                                e.job_id == id.as_str()
                                    && r.execution_number.is_none_or(|n| n == e.execution_number)
                            })
                            .ok_or(JobError::new(
                                JobErrorCode::ResourceNotFound,
                                "no such job execution",
                            ))?;
                        // AWS: "TerminalStateReached: occurs when a command
                        // to describe a job is performed on a job that is in
                        // a terminal state."
                        if e.status.is_terminal() {
                            return Err(JobError::new(
                                JobErrorCode::TerminalStateReached,
                                "the job execution is in a terminal state",
                            ));
                        }
                        let resp = ExecutionResponse {
                            execution: Some(JobExecutionData::of(
                                e,
                                r.include_job_document.unwrap_or(true),
                            )),
                            timestamp: now,
                            client_token: r.client_token,
                        };
                        Ok((JobsTopicKind::Describe(id, Role::Accepted), to_vec(&resp)))
                    },
                    rejected,
                )
            }
            JobsTopicKind::Update(id, Role::Request) => {
                let id = id.clone().into_owned();
                let rejected = JobsTopicKind::Update(id.clone(), Role::Rejected);
                self.answer(
                    payload,
                    now,
                    move |s, r: UpdateRequest, now| {
                        let e = s
                            .executions
                            .iter_mut()
                            .rev()
                            .find(|e| e.job_id == id.as_str())
                            .ok_or(JobError::new(
                                JobErrorCode::ResourceNotFound,
                                "no such job execution",
                            ))?;
                        let token = r.client_token.as_deref();
                        if let Some(answer) = e.answer_again(token, payload) {
                            // A retry of the update applied last (its answer
                            // was lost, or the instance that sent it died).
                            let answer = answer.to_vec();
                            return Ok((JobsTopicKind::Update(id, Role::Accepted), answer));
                        }
                        let update = StatusUpdate {
                            status: r.status,
                            status_details: r.status_details,
                            expected_version: r.expected_version,
                            execution_number: r.execution_number,
                            step_timeout_in_minutes: r.step_timeout_in_minutes,
                        };
                        e.update(&update, now)?;
                        let resp = UpdateResponse {
                            execution_state: r
                                .include_job_execution_state
                                .unwrap_or(false)
                                .then(|| e.state()),
                            job_document: r
                                .include_job_document
                                .unwrap_or(false)
                                .then(|| e.job_document.clone()),
                            timestamp: now,
                            client_token: r.client_token.clone(),
                        };
                        let accepted = to_vec(&resp);
                        e.keep_answer(r.client_token.as_deref(), payload, &accepted);
                        Ok((JobsTopicKind::Update(id, Role::Accepted), accepted))
                    },
                    rejected,
                )
            }
            _ => Vec::new(), // replies and notifications are not requests
        }
    }

    /// Parses the request, runs `f`, and turns its result (and any
    /// refusal) into messages. A refused request changes nothing: `f` runs
    /// on a copy that is kept only on success.
    fn answer<R: DeserializeOwned>(
        &mut self,
        payload: &[u8],
        now: u64,
        f: impl FnOnce(&mut Self, R, u64) -> Result<(JobsTopicKind<'static>, Vec<u8>), JobError>,
        rejected: JobsTopicKind<'static>,
    ) -> Vec<JobsMessage> {
        let reject = |error: JobError, token: Option<String>| JobsMessage {
            kind: rejected.clone(),
            payload: to_vec(&ErrorResponse {
                code: error.code,
                message: error.message.into(),
                client_token: token,
                timestamp: now,
                execution_state: error.execution_state,
            }),
        };
        let body = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Object(serde_json::Map::new())
        } else {
            match serde_json::from_slice::<Value>(payload) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return alloc::vec![reject(
                        JobError::new(JobErrorCode::InvalidJson, "invalid JSON"),
                        None
                    )];
                }
            }
        };
        let token = match body.get("clientToken") {
            None => None,
            Some(Value::String(t)) if ClientToken::new(t).is_ok() => Some(t.clone()),
            Some(_) => {
                return alloc::vec![reject(
                    JobError::new(JobErrorCode::InvalidRequest, "invalid clientToken"),
                    None
                )];
            }
        };
        let request: R = match serde_json::from_value(body) {
            Ok(r) => r,
            Err(_) => {
                return alloc::vec![reject(
                    JobError::new(JobErrorCode::InvalidRequest, "invalid request fields"),
                    token
                )];
            }
        };
        let mut scratch = self.clone();
        let (result, mut notifications) = scratch.tracking(now, |s| f(s, request, now));
        match result {
            Ok((kind, payload)) => {
                *self = scratch;
                let mut out = alloc::vec![JobsMessage { kind, payload }];
                out.append(&mut notifications);
                out
            }
            Err(e) => alloc::vec![reject(e, token)],
        }
    }
}
