//! What the application sees of the agent.

use super::*;

/// Why the agent could not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentError {
    /// The TLS identity or trust anchors are unusable.
    Tls(String),
    /// A name is invalid.
    InvalidName(String),
    /// The shadow is not one the agent tracks.
    UnknownShadow,
    /// No job is running.
    NoCurrentJob,
    /// A command answer was refused (unknown, answered, past its deadline).
    Command(String),
    /// The service refused the update (its code and message).
    Rejected {
        /// HTTP-style code (400, 409, 413, ...).
        code: u16,
        /// AWS's message.
        message: String,
    },
    /// The jobs service refused the update (its error code).
    JobRejected(String),
    /// No answer after every retry.
    TimedOut,
    /// The agent has stopped.
    Stopped,
    /// The outbox is full (and its policy keeps what it holds), or its
    /// storage failed; nothing was queued.
    Outbox(OutboxError),
    /// Not connected, and a QoS 0 message is not kept for later.
    NotConnected,
    /// The outbox's overflow policy dropped this telemetry message to make
    /// room for newer ones.
    Dropped,
    /// The MQTT client's queue is full; try again.
    ClientBusy,
    /// The broker refused the message (MQTT 5 reason: not authorized, say).
    Refused(String),
    /// The state directory cannot be used.
    StateDir(String),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls(e) => write!(f, "TLS configuration: {e}"),
            Self::InvalidName(e) => write!(f, "invalid name: {e}"),
            Self::UnknownShadow => f.write_str("not a shadow this agent tracks"),
            Self::NoCurrentJob => f.write_str("no job is running"),
            Self::Command(e) => write!(f, "command: {e}"),
            Self::Rejected { code, message } => write!(f, "rejected: {code} {message}"),
            Self::JobRejected(code) => write!(f, "job update rejected: {code}"),
            Self::TimedOut => f.write_str("no answer after every retry"),
            Self::Stopped => f.write_str("the agent has stopped"),
            Self::Outbox(e) => write!(f, "outbox: {e}"),
            Self::NotConnected => f.write_str("not connected; QoS 0 is not stored"),
            Self::Dropped => f.write_str("dropped by the outbox's overflow policy"),
            Self::ClientBusy => f.write_str("the MQTT client's queue is full"),
            Self::Refused(e) => write!(f, "the broker refused the message: {e}"),
            Self::StateDir(e) => write!(f, "state directory: {e}"),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Outbox(e) => Some(e),
            _ => None,
        }
    }
}

/// What the agent tells the application.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// Connected to the broker (again).
    Connected,
    /// The connection dropped; the agent reconnects by itself.
    Disconnected {
        /// Why.
        reason: String,
        /// How long it waits before the next try (jittered).
        retry_in: Duration,
    },
    /// Desired state differs from reported: apply `delta` and report.
    ShadowDelta {
        /// Which shadow (`None`: classic).
        shadow: Option<String>,
        /// The shadow's version.
        version: u64,
        /// Every differing key of desired.
        delta: Map<String, Value>,
    },
    /// A job to run (or to go on with after a restart: `status_details`
    /// holds what was last reported). Report with [`Agent::update_job`].
    Job {
        /// The job.
        job_id: String,
        /// Which execution.
        execution_number: u64,
        /// The job document.
        document: Value,
        /// Details last reported.
        status_details: BTreeMap<String, String>,
    },
    /// The current job was canceled (or removed, or timed out) by the
    /// service: stop working on it.
    JobCanceled {
        /// The job.
        job_id: String,
    },
    /// A command to run once; answer with [`Agent::respond`] before its
    /// deadline. A redelivered command is not handed out again.
    Command {
        /// Its execution id (for the answer).
        execution_id: String,
        /// Which command.
        command: String,
        /// Its arguments.
        payload: Value,
        /// Epoch seconds after which an answer no longer counts.
        deadline: u64,
    },
    /// Another connection keeps taking this client id (two devices with the
    /// same identity, or a stale process): the broker drops one of them each
    /// time. Reported after three take-overs in a row, each within a minute
    /// of connecting; the agent goes on reconnecting with backoff. Needs MQTT
    /// 5 (a 3.1.1 broker just closes the connection, without a reason).
    ClientIdConflict {
        /// Take-overs in a row so far.
        times: u32,
    },
    /// An update is downloading (with [`AgentBuilder::ota`]).
    OtaProgress {
        /// The job.
        job_id: String,
        /// Bytes written to the new slot.
        received: u64,
        /// Image size.
        total: u64,
    },
    /// The new image is staged and the trial boot set: restart the device
    /// (a process using [`FileSlots`](crate::FileSlots): restart it).
    RebootRequired {
        /// The job.
        job_id: String,
    },
    /// An update ended; the job is reported with a signed install receipt.
    OtaFinished {
        /// The job.
        job_id: String,
        /// The new image runs and is confirmed (`false`: the previous image
        /// runs again, or the download never verified).
        committed: bool,
    },
    /// An update job was refused before anything was written (a manifest
    /// not signed by the trust root, for another device, older than what
    /// runs...). The job is reported failed with the reason.
    OtaRejected {
        /// The job.
        job_id: String,
        /// Why.
        reason: String,
    },
    /// The broker or the service sent something the agent cannot use; it
    /// changed nothing.
    InvalidInput {
        /// The topic.
        topic: String,
        /// What was wrong.
        reason: String,
    },
}

/// Reconnection: exponential backoff with full jitter, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay's upper bound.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before try `attempt` (0-based): uniform in
    /// `[0, min(max, initial * 2^attempt)]` ("full jitter"), from `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(if millis == 0 {
            0
        } else {
            random % (millis + 1)
        })
    }
}

/// Quality of service of a telemetry message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Qos {
    /// Sent once, not stored: lost if the connection is down.
    AtMostOnce,
    /// Stored in the outbox until the broker acknowledged it; sent again
    /// after a reconnection or a restart (so it may arrive twice).
    AtLeastOnce,
}

/// The agent's copy of a shadow, as last read from the service.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSnapshot {
    /// Desired state.
    pub desired: Map<String, Value>,
    /// Reported state.
    pub reported: Map<String, Value>,
    /// The shadow's version.
    pub version: u64,
}

/// A queued message: resolves when the broker acknowledged it.
#[derive(Debug)]
pub struct Delivery {
    pub(in crate::agent) seq: u64,
    pub(in crate::agent) rx: oneshot::Receiver<Result<(), AgentError>>,
}

impl Delivery {
    /// The message's sequence number in the outbox (0 for QoS 0).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The outcome if it is known already, without waiting: `None` while the
    /// message is still on its way.
    pub fn try_result(&mut self) -> Option<Result<(), AgentError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(AgentError::Stopped)),
        }
    }

    /// Waits until the broker acknowledged the message (QoS 1), or it was
    /// handed to the network (QoS 0). If the agent stops first, the message
    /// stays in the outbox and goes out after the next start:
    /// [`AgentError::Stopped`] says only that this process will not see it.
    pub async fn acknowledged(self) -> Result<(), AgentError> {
        self.rx.await.map_err(|_| AgentError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut rng = 12345u64;
        for attempt in 0..12 {
            let cap = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
            for _ in 0..50 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let d = b.delay(attempt, rng);
                assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
                seen.insert(d.as_millis());
            }
        }
        assert!(seen.len() > 100, "delays are spread out, not fixed");
        assert!(b.delay(40, u64::MAX) <= Duration::from_secs(2));
    }
}

/// What a device runs, reported by the agent at each connection to the
/// named shadow [`INVENTORY_SHADOW`](fleet_core::shadow::INVENTORY_SHADOW)
/// (with the agent's own version and protocol), and again after an update
/// is installed (the manifest's component and version). The fleet index
/// keeps it as `inventory.*` fields of the thing:
/// `inventory.components.firmware:2.4*`, `inventory.hardwareId:board-b`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// The hardware id (as OTA manifests name it; default: the OTA
    /// settings').
    pub hardware_id: Option<String>,
    /// Each component's version (`firmware` = `2.4.1`).
    pub components: std::collections::BTreeMap<String, String>,
}
