//! Jobs, rollouts and commands. Needs the `alloc` feature.
//!
//! - [`JobExecution`]: one thing's execution of one job, with the statuses,
//!   version rules, timers and error codes of AWS IoT Jobs.
//! - [`ThingJobs`]: the service side for one thing, answering the Jobs MQTT
//!   API (`get`, `start-next`, `{jobId}/get`, `{jobId}/update`) and sending
//!   `notify` and `notify-next`; a pure function of (state, request, now).
//! - [`JobRunner`]: the device side, sans-I/O.
//! - [`plan`]: the pure rollout planner (rates, groups, abort criteria,
//!   retries, timeouts) over a [`RolloutPolicy`].
//! - [`JobDocument`]: opaque documents, or a typed OTA operation.
//! - Commands: [`CommandInbox`] on the device (deduplicates, never answers
//!   late) and [`PendingCommands`] in the cloud.
//!
//! ```
//! use fleet_core::jobs::{JobExecution, JobStatus, StatusUpdate, TimeoutConfig};
//! use serde_json::json;
//!
//! let mut e = JobExecution::new("job-1", "pump-7", json!({"op": "reboot"}), 1,
//!                               TimeoutConfig::default(), 100);
//! e.update(&StatusUpdate { status: Some(JobStatus::InProgress), expected_version: Some(1),
//!                          ..Default::default() }, 101)?;
//! e.update(&StatusUpdate { status: Some(JobStatus::Succeeded), ..Default::default() }, 102)?;
//! assert_eq!((e.status, e.version_number), (JobStatus::Succeeded, 3));
//! // Terminal states cannot be left.
//! let err = e.update(&StatusUpdate { status: Some(JobStatus::InProgress), ..Default::default() }, 103)
//!     .unwrap_err();
//! assert_eq!(err.execution_state.unwrap().status, JobStatus::Succeeded);
//! # Ok::<(), fleet_core::jobs::JobError>(())
//! ```

mod command;
mod document;
mod execution;
mod rollout;
mod runner;
mod service;
#[cfg(test)]
mod tests;
mod wire;

pub use command::{
    CommandError, CommandInbox, CommandRequest, CommandResponse, CommandState, CommandStatus,
    Delivery, PendingCommands,
};
pub use document::{DocumentError, ImageSource, JobDocument, OTA_OPERATION, OtaJob};
pub use execution::{
    ExecutionState, JobError, JobErrorCode, JobExecution, JobStatus, MAX_STATUS_DETAILS,
    StatusUpdate, TimeoutConfig,
};
pub use rollout::{
    AbortCriterion, AbortReason, Decision, FailureType, GroupAction, RateIncrease, RateLimit,
    RetryPolicy, RolloutControl, RolloutGroup, RolloutPolicy, RolloutStatus, Target, TargetStatus,
    Threshold, current_rate, plan,
};
pub use runner::{JobEvent, JobRunner, RunnerConfig, RunnerError, UpdateId};
pub use service::{JobsMessage, REMINDERS, ThingJobs};
pub use wire::{
    DescribeRequest, ErrorResponse, ExecutionResponse, GetPendingRequest, GetPendingResponse,
    JobExecutionData, JobExecutionSummary, NotifyMessage, StartNextRequest, UpdateRequest,
    UpdateResponse,
};
