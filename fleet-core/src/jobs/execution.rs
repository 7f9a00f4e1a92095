//! The job execution state machine, with AWS IoT Jobs semantics.

use alloc::collections::BTreeMap;
use alloc::string::String;
use core::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::replay::LastRequest;

/// Most `statusDetails` pairs an execution may carry.
pub const MAX_STATUS_DETAILS: usize = 10;

/// The status of a job execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for the device.
    Queued,
    /// The device is working on it.
    InProgress,
    /// Done, successfully.
    Succeeded,
    /// Done, unsuccessfully.
    Failed,
    /// The in-progress or step timer ran out.
    TimedOut,
    /// The device refused the job.
    Rejected,
    /// The thing was removed from the job's targets.
    Removed,
    /// The job was canceled.
    Canceled,
}

impl JobStatus {
    /// The status as AWS IoT writes it (`IN_PROGRESS`, `SUCCEEDED`, ...).
    ///
    /// ```
    /// use fleet_core::jobs::JobStatus;
    /// assert_eq!(JobStatus::InProgress.as_str(), "IN_PROGRESS");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::InProgress => "IN_PROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::TimedOut => "TIMED_OUT",
            Self::Rejected => "REJECTED",
            Self::Removed => "REMOVED",
            Self::Canceled => "CANCELED",
        }
    }

    /// Whether the execution can no longer change.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::InProgress)
    }

    /// Whether a device may set this status.
    pub fn device_may_set(self) -> bool {
        matches!(
            self,
            Self::InProgress | Self::Succeeded | Self::Failed | Self::Rejected
        )
    }
}

/// The error codes of the Jobs MQTT API.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobErrorCode {
    /// The topic is not a jobs topic.
    InvalidTopic,
    /// The payload is not JSON.
    InvalidJson,
    /// The request is not valid (types, limits).
    InvalidRequest,
    /// The status change is not allowed from the current status.
    InvalidStateTransition,
    /// No such job or execution.
    ResourceNotFound,
    /// `expectedVersion` is not the current version.
    VersionMismatch,
    /// The service failed.
    InternalError,
    /// Too many requests.
    RequestThrottled,
    /// The execution is in a terminal state (canceled, removed) and cannot
    /// be acted on.
    TerminalStateReached,
}

/// The part of an execution that rejections carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionState {
    /// Current status.
    pub status: JobStatus,
    /// Current details.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub status_details: BTreeMap<String, String>,
    /// Current version.
    pub version_number: u64,
}

/// A refused jobs request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// The error code.
    pub code: JobErrorCode,
    /// A message for people.
    pub message: &'static str,
    /// The execution's state, for `VersionMismatch` and
    /// `InvalidStateTransition`.
    pub execution_state: Option<ExecutionState>,
}

impl JobError {
    pub(crate) fn new(code: JobErrorCode, message: &'static str) -> Self {
        Self {
            code,
            message,
            execution_state: None,
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl core::error::Error for JobError {}

/// Timers of an execution, from the job's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutConfig {
    /// Minutes an execution may stay IN_PROGRESS before it is TIMED_OUT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress_timeout_in_minutes: Option<u64>,
}

/// One thing's execution of one job, as the service keeps it.
///
/// Every change increments `version_number`. The device may set only
/// IN_PROGRESS (again and again, to update `status_details`), SUCCEEDED,
/// FAILED and REJECTED; a terminal status is final. The in-progress timer
/// starts when the execution goes IN_PROGRESS; a step timer, set with each
/// update, replaces the previous one and never reaches past the in-progress
/// deadline. Cancel affects a QUEUED execution, or an IN_PROGRESS one when
/// forced, after which the device can no longer update it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecution {
    /// The job.
    pub job_id: String,
    /// The thing.
    pub thing_name: String,
    /// Current status.
    pub status: JobStatus,
    /// Details the device reported (at most 10 pairs).
    #[serde(default)]
    pub status_details: BTreeMap<String, String>,
    /// The job document.
    pub job_document: Value,
    /// Epoch seconds.
    pub queued_at: u64,
    /// Epoch seconds, when it first went IN_PROGRESS.
    pub started_at: Option<u64>,
    /// Epoch seconds.
    pub last_updated_at: u64,
    /// Increments on every change.
    pub version_number: u64,
    /// Which execution of this job on this thing (retries make more).
    pub execution_number: u64,
    /// Timers.
    pub timeouts: TimeoutConfig,
    in_progress_deadline: Option<u64>,
    step_deadline: Option<u64>,
    force_canceled: bool,
    /// The last update applied with a client token, and its answer: a retry
    /// of it is answered again, not applied twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_update: Option<LastRequest>,
}

/// A status change asked by a device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusUpdate {
    /// The new status.
    pub status: Option<JobStatus>,
    /// Replaces the details when given.
    pub status_details: Option<BTreeMap<String, String>>,
    /// Refuse unless the current version is this.
    pub expected_version: Option<u64>,
    /// Refuse unless this is the current execution number.
    pub execution_number: Option<u64>,
    /// A new step timer, minutes from now (0 or absent: none).
    pub step_timeout_in_minutes: Option<u64>,
}

impl JobExecution {
    /// A new QUEUED execution at version 1.
    pub fn new(
        job_id: &str,
        thing_name: &str,
        job_document: Value,
        execution_number: u64,
        timeouts: TimeoutConfig,
        now: u64,
    ) -> Self {
        Self {
            job_id: job_id.into(),
            thing_name: thing_name.into(),
            status: JobStatus::Queued,
            status_details: BTreeMap::new(),
            job_document,
            queued_at: now,
            started_at: None,
            last_updated_at: now,
            version_number: 1,
            execution_number,
            timeouts,
            in_progress_deadline: None,
            step_deadline: None,
            force_canceled: false,
            last_update: None,
        }
    }

    /// The answer kept for a retry of `request` (sent with `token`), if
    /// it is one: the last update applied to this execution with the same
    /// token and the same bytes.
    pub(crate) fn answer_again(&self, token: Option<&str>, request: &[u8]) -> Option<&[u8]> {
        self.last_update.as_ref()?.answer(token, request)
    }

    /// Keeps the answer of an update applied to this execution, for its
    /// retries.
    pub(crate) fn keep_answer(&mut self, token: Option<&str>, request: &[u8], accepted: &[u8]) {
        self.last_update = LastRequest::keep(token, request, accepted);
    }

    /// The state a rejection carries.
    pub fn state(&self) -> ExecutionState {
        ExecutionState {
            status: self.status,
            status_details: self.status_details.clone(),
            version_number: self.version_number,
        }
    }

    fn error(&self, code: JobErrorCode, message: &'static str) -> JobError {
        JobError {
            code,
            message,
            execution_state: Some(self.state()),
        }
    }

    /// Applies a device's update.
    pub fn update(&mut self, update: &StatusUpdate, now: u64) -> Result<(), JobError> {
        if self.force_canceled || matches!(self.status, JobStatus::Canceled | JobStatus::Removed) {
            return Err(self.error(
                JobErrorCode::TerminalStateReached,
                "the job execution was canceled or removed",
            ));
        }
        if let Some(n) = update.execution_number
            && n != self.execution_number
        {
            return Err(JobError::new(
                JobErrorCode::ResourceNotFound,
                "no such execution number",
            ));
        }
        if let Some(v) = update.expected_version
            && v != self.version_number
        {
            return Err(self.error(JobErrorCode::VersionMismatch, "version mismatch"));
        }
        if self.status.is_terminal() {
            return Err(self.error(
                JobErrorCode::InvalidStateTransition,
                "the job execution is in a terminal state",
            ));
        }
        let status = update.status.unwrap_or(self.status);
        if status != self.status && !status.device_may_set() {
            return Err(self.error(
                JobErrorCode::InvalidStateTransition,
                "a device may set only IN_PROGRESS, SUCCEEDED, FAILED or REJECTED",
            ));
        }
        if status == JobStatus::Queued && update.status.is_some() {
            return Err(self.error(
                JobErrorCode::InvalidStateTransition,
                "a device may set only IN_PROGRESS, SUCCEEDED, FAILED or REJECTED",
            ));
        }
        if let Some(details) = &update.status_details
            && details.len() > MAX_STATUS_DETAILS
        {
            return Err(JobError::new(
                JobErrorCode::InvalidRequest,
                "statusDetails may hold at most 10 pairs",
            ));
        }
        self.set_status(status, now);
        if let Some(details) = &update.status_details {
            self.status_details = details.clone();
        }
        if status == JobStatus::InProgress {
            self.step_deadline = match update.step_timeout_in_minutes {
                Some(m) if m > 0 => {
                    let step = now.saturating_add(m.saturating_mul(60));
                    Some(self.in_progress_deadline.map_or(step, |d| step.min(d)))
                }
                _ => None,
            };
        }
        Ok(())
    }

    fn set_status(&mut self, status: JobStatus, now: u64) {
        if status == JobStatus::InProgress && self.status == JobStatus::Queued {
            self.started_at = Some(now);
            self.in_progress_deadline = self
                .timeouts
                .in_progress_timeout_in_minutes
                .map(|m| now.saturating_add(m.saturating_mul(60)));
        }
        if status.is_terminal() {
            self.in_progress_deadline = None;
            self.step_deadline = None;
        }
        self.status = status;
        self.version_number += 1;
        self.last_updated_at = now;
    }

    /// Cancels: a QUEUED execution always, an IN_PROGRESS one only with
    /// `force` (the device can then no longer update it).
    pub fn cancel(&mut self, force: bool, now: u64) -> Result<(), JobError> {
        match self.status {
            JobStatus::Queued => {}
            JobStatus::InProgress if force => self.force_canceled = true,
            JobStatus::InProgress => {
                return Err(self.error(
                    JobErrorCode::InvalidStateTransition,
                    "an IN_PROGRESS execution is canceled only with force",
                ));
            }
            _ => {
                return Err(self.error(
                    JobErrorCode::InvalidStateTransition,
                    "the job execution is in a terminal state",
                ));
            }
        }
        self.set_status(JobStatus::Canceled, now);
        Ok(())
    }

    /// Removes the execution (the thing left the job's targets).
    pub fn remove(&mut self, now: u64) {
        if !self.status.is_terminal() {
            self.set_status(JobStatus::Removed, now);
        }
    }

    /// When a timer runs out, if one is running.
    pub fn deadline(&self) -> Option<u64> {
        match (self.in_progress_deadline, self.step_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Applies the timers: an IN_PROGRESS execution whose deadline has
    /// passed becomes TIMED_OUT. Returns whether it did.
    pub fn handle_timeout(&mut self, now: u64) -> bool {
        if self.status == JobStatus::InProgress && self.deadline().is_some_and(|d| d <= now) {
            self.set_status(JobStatus::TimedOut, now);
            return true;
        }
        false
    }
}
