//! Commands: cloud-to-device requests with a response and a deadline
//! (like Azure direct methods and AWS IoT commands).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::JobId;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandStatus {
    /// Done.
    Succeeded,
    /// Tried and failed.
    Failed,
    /// Refused (unknown command, bad arguments).
    Rejected,
    /// No answer before the deadline.
    TimedOut,
}

/// A command sent to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandRequest {
    /// Unique per command: `[a-zA-Z0-9_-]{1,64}`.
    pub execution_id: String,
    /// Which command.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub payload: Value,
    /// Epoch seconds after which no answer counts.
    pub deadline: u64,
}

/// A device's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandResponse {
    /// The command answered.
    pub execution_id: String,
    /// How it ended.
    pub status: CommandStatus,
    /// The result.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub payload: Value,
    /// Why, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
}

/// Refused command input; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// Not the JSON of a command request or response.
    InvalidPayload,
    /// The execution id is not `[a-zA-Z0-9_-]{1,64}`.
    InvalidExecutionId,
    /// The deadline passed: the answer would not count, so none is sent.
    PastDeadline,
    /// No such command (never received, or forgotten).
    Unknown,
    /// It was answered already.
    AlreadyAnswered,
    /// An execution id already in use.
    Duplicate,
    /// As many commands are pending as the limit allows
    /// ([`PendingCommands::with_limits`]); try again when some are answered.
    TooManyPending,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidPayload => "not a command request or response",
            Self::InvalidExecutionId => "invalid execution id",
            Self::PastDeadline => "the command's deadline has passed",
            Self::Unknown => "no such command",
            Self::AlreadyAnswered => "the command was answered already",
            Self::Duplicate => "execution id already in use",
            Self::TooManyPending => "too many commands pending",
        })
    }
}

impl core::error::Error for CommandError {}

/// What to do with a request that arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// New: run it and [`CommandInbox::respond`].
    Run(CommandRequest),
    /// Seen before (MQTT redelivery): do not run again; publish `resend`
    /// on the response topic if it is `Some` (the earlier answer).
    Duplicate {
        /// The answer already given.
        resend: Option<Vec<u8>>,
    },
    /// Arrived after its deadline: not run, not answered.
    Expired,
}

#[derive(Debug)]
struct Seen {
    execution_id: String,
    deadline: u64,
    response: Option<Vec<u8>>,
}

/// The device side: runs each command once however often it is delivered,
/// and never answers after the deadline.
#[derive(Debug)]
pub struct CommandInbox {
    seen: VecDeque<Seen>,
    capacity: usize,
}

impl CommandInbox {
    /// Remembers the last `capacity` commands to deduplicate them.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// A request arrived at `now` (epoch seconds).
    pub fn handle_request(&mut self, now: u64, payload: &[u8]) -> Result<Delivery, CommandError> {
        let request: CommandRequest =
            serde_json::from_slice(payload).map_err(|_| CommandError::InvalidPayload)?;
        JobId::new(&request.execution_id).map_err(|_| CommandError::InvalidExecutionId)?;
        if let Some(s) = self
            .seen
            .iter()
            .find(|s| s.execution_id == request.execution_id)
        {
            return Ok(Delivery::Duplicate {
                resend: s.response.clone(),
            });
        }
        if now > request.deadline {
            return Ok(Delivery::Expired);
        }
        if self.seen.len() == self.capacity {
            self.seen.pop_front();
        }
        self.seen.push_back(Seen {
            execution_id: request.execution_id.clone(),
            deadline: request.deadline,
            response: None,
        });
        Ok(Delivery::Run(request))
    }

    /// Answers `execution_id`; returns the payload to publish on its
    /// response topic. Refused after the deadline.
    pub fn respond(
        &mut self,
        now: u64,
        execution_id: &str,
        status: CommandStatus,
        payload: Value,
    ) -> Result<Vec<u8>, CommandError> {
        let s = self
            .seen
            .iter_mut()
            .find(|s| s.execution_id == execution_id)
            .ok_or(CommandError::Unknown)?;
        if s.response.is_some() {
            return Err(CommandError::AlreadyAnswered);
        }
        if now > s.deadline {
            return Err(CommandError::PastDeadline);
        }
        let bytes = serde_json::to_vec(&CommandResponse {
            execution_id: execution_id.into(),
            status,
            payload,
            status_reason: None,
        })
        .map_err(|_| CommandError::InvalidPayload)?;
        s.response = Some(bytes.clone());
        Ok(bytes)
    }
}

/// The state of a command on the cloud side.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandState {
    /// Sent, no answer yet.
    Pending {
        /// Epoch seconds.
        deadline: u64,
    },
    /// Answered.
    Done(CommandResponse),
    /// No answer in time.
    TimedOut,
}

/// The cloud side: the commands sent and their outcomes.
///
/// Memory is bounded: at most `max_pending` commands wait for an answer
/// (more are refused with [`CommandError::TooManyPending`]), and the
/// outcomes of the `max_finished` most recently finished ones are kept
/// for [`state`](Self::state); older outcomes are forgotten.
#[derive(Debug)]
pub struct PendingCommands {
    commands: BTreeMap<String, (String, CommandState)>,
    /// Finished commands, oldest first.
    finished: VecDeque<String>,
    max_pending: usize,
    max_finished: usize,
}

impl Default for PendingCommands {
    fn default() -> Self {
        Self::with_limits(10_000, 10_000)
    }
}

impl PendingCommands {
    /// Nothing sent yet; 10,000 pending and 10,000 finished at most.
    pub fn new() -> Self {
        Self::default()
    }

    /// Nothing sent yet, with these limits.
    pub fn with_limits(max_pending: usize, max_finished: usize) -> Self {
        Self {
            commands: BTreeMap::new(),
            finished: VecDeque::new(),
            max_pending,
            max_finished,
        }
    }

    /// Commands waiting for an answer.
    pub fn pending(&self) -> usize {
        self.commands.len() - self.finished.len()
    }

    fn finish(&mut self, execution_id: &str) {
        self.finished.push_back(execution_id.into());
        while self.finished.len() > self.max_finished {
            if let Some(old) = self.finished.pop_front() {
                self.commands.remove(&old);
            }
        }
    }

    /// Records a command for `thing` and returns the request payload.
    pub fn send(
        &mut self,
        thing: &str,
        execution_id: &str,
        command: &str,
        payload: Value,
        deadline: u64,
    ) -> Result<Vec<u8>, CommandError> {
        JobId::new(execution_id).map_err(|_| CommandError::InvalidExecutionId)?;
        if self.commands.contains_key(execution_id) {
            return Err(CommandError::Duplicate);
        }
        if self.pending() >= self.max_pending {
            return Err(CommandError::TooManyPending);
        }
        let request = CommandRequest {
            execution_id: execution_id.into(),
            command: command.into(),
            payload,
            deadline,
        };
        let bytes = serde_json::to_vec(&request).map_err(|_| CommandError::InvalidPayload)?;
        self.commands.insert(
            execution_id.into(),
            (thing.into(), CommandState::Pending { deadline }),
        );
        Ok(bytes)
    }

    /// A response arrived from `thing`. Answers from another thing than
    /// the one asked, after the deadline, or twice are refused.
    pub fn handle_response(
        &mut self,
        now: u64,
        thing: &str,
        payload: &[u8],
    ) -> Result<&CommandState, CommandError> {
        let response: CommandResponse =
            serde_json::from_slice(payload).map_err(|_| CommandError::InvalidPayload)?;
        let id = response.execution_id.clone();
        let (owner, state) = self.commands.get_mut(&id).ok_or(CommandError::Unknown)?;
        if owner != thing {
            return Err(CommandError::Unknown);
        }
        match state {
            CommandState::Pending { deadline } if now <= *deadline => {
                *state = CommandState::Done(response);
            }
            CommandState::Pending { .. } => {
                *state = CommandState::TimedOut;
                self.finish(&id);
                return Err(CommandError::PastDeadline);
            }
            CommandState::TimedOut => return Err(CommandError::PastDeadline),
            CommandState::Done(_) => return Err(CommandError::AlreadyAnswered),
        }
        self.finish(&id);
        // Just answered, so the newest finished entry: still there unless
        // no finished command may be kept at all.
        self.commands
            .get(&id)
            .map(|(_, s)| s)
            .ok_or(CommandError::Unknown)
    }

    /// Marks commands whose deadline passed as timed out; returns them.
    pub fn handle_timeout(&mut self, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        for (id, (_, state)) in &mut self.commands {
            if matches!(state, CommandState::Pending { deadline } if *deadline < now) {
                *state = CommandState::TimedOut;
                out.push(id.clone());
            }
        }
        for id in &out {
            self.finish(id);
        }
        out
    }

    /// Marks one pending command as timed out (its waiter gave up);
    /// returns whether it was pending.
    pub fn expire(&mut self, execution_id: &str) -> bool {
        match self.commands.get_mut(execution_id) {
            Some((_, state @ CommandState::Pending { .. })) => {
                *state = CommandState::TimedOut;
                self.finish(execution_id);
                true
            }
            _ => false,
        }
    }

    /// The earliest deadline of a pending command.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.commands
            .values()
            .filter_map(|(_, s)| match s {
                CommandState::Pending { deadline } => Some(deadline + 1),
                _ => None,
            })
            .min()
    }

    /// The state of a command.
    pub fn state(&self, execution_id: &str) -> Option<&CommandState> {
        self.commands.get(execution_id).map(|(_, s)| s)
    }
}
