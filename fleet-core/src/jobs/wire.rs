//! Request and response shapes of the Jobs MQTT API (AWS IoT's JSON).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::execution::{ExecutionState, JobErrorCode, JobExecution, JobStatus};

/// `jobs/get` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetPendingRequest {
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// `jobs/start-next` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartNextRequest {
    /// Details to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_details: Option<BTreeMap<String, String>>,
    /// Step timer, minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_timeout_in_minutes: Option<u64>,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// `jobs/{jobId}/get` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeRequest {
    /// A particular execution (latest if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_number: Option<u64>,
    /// Include the job document (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_job_document: Option<bool>,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// `jobs/{jobId}/update` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRequest {
    /// The new status.
    pub status: Option<JobStatus>,
    /// Replaces the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_details: Option<BTreeMap<String, String>>,
    /// Refuse unless the version is this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    /// Which execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_number: Option<u64>,
    /// Include `executionState` in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_job_execution_state: Option<bool>,
    /// Include `jobDocument` in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_job_document: Option<bool>,
    /// Step timer, minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_timeout_in_minutes: Option<u64>,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// An execution in a reply or notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecutionData {
    /// The job.
    pub job_id: String,
    /// The thing.
    pub thing_name: String,
    /// The document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_document: Option<Value>,
    /// Status.
    pub status: JobStatus,
    /// Details.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub status_details: BTreeMap<String, String>,
    /// Epoch seconds.
    pub queued_at: u64,
    /// Epoch seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Epoch seconds.
    pub last_updated_at: u64,
    /// Version.
    pub version_number: u64,
    /// Execution number.
    pub execution_number: u64,
}

impl JobExecutionData {
    /// The wire form of `e`, with or without its document.
    pub fn of(e: &JobExecution, with_document: bool) -> Self {
        Self {
            job_id: e.job_id.clone(),
            thing_name: e.thing_name.clone(),
            job_document: with_document.then(|| e.job_document.clone()),
            status: e.status,
            status_details: e.status_details.clone(),
            queued_at: e.queued_at,
            started_at: e.started_at,
            last_updated_at: e.last_updated_at,
            version_number: e.version_number,
            execution_number: e.execution_number,
        }
    }
}

/// An execution in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecutionSummary {
    /// The job.
    pub job_id: String,
    /// Epoch seconds.
    pub queued_at: u64,
    /// Epoch seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Epoch seconds.
    pub last_updated_at: u64,
    /// Version.
    pub version_number: u64,
    /// Execution number.
    pub execution_number: u64,
}

impl JobExecutionSummary {
    /// The summary of `e`.
    pub fn of(e: &JobExecution) -> Self {
        Self {
            job_id: e.job_id.clone(),
            queued_at: e.queued_at,
            started_at: e.started_at,
            last_updated_at: e.last_updated_at,
            version_number: e.version_number,
            execution_number: e.execution_number,
        }
    }
}

/// `jobs/get/accepted`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetPendingResponse {
    /// IN_PROGRESS executions.
    pub in_progress_jobs: Vec<JobExecutionSummary>,
    /// QUEUED executions.
    pub queued_jobs: Vec<JobExecutionSummary>,
    /// Epoch seconds.
    pub timestamp: u64,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// `jobs/start-next/accepted`, `jobs/{jobId}/get/accepted` and
/// `jobs/notify-next`: one execution, or none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionResponse {
    /// The execution, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<JobExecutionData>,
    /// Epoch seconds.
    pub timestamp: u64,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// `jobs/{jobId}/update/accepted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateResponse {
    /// When asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_state: Option<ExecutionState>,
    /// When asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_document: Option<Value>,
    /// Epoch seconds.
    pub timestamp: u64,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

/// `jobs/notify`: the pending executions by status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotifyMessage {
    /// Epoch seconds.
    pub timestamp: u64,
    /// `{"IN_PROGRESS": [...], "QUEUED": [...]}`, empty lists left out.
    pub jobs: BTreeMap<JobStatus, Vec<JobExecutionSummary>>,
}

/// Every `/rejected` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    /// The code.
    pub code: JobErrorCode,
    /// For people.
    pub message: String,
    /// Echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// Epoch seconds.
    pub timestamp: u64,
    /// For `VersionMismatch` and `InvalidStateTransition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_state: Option<ExecutionState>,
}
