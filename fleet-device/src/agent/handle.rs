//! [`Agent`]: the application's handle; each call is a command to the
//! pump.

use super::*;

pub(super) enum Command {
    PublishBatch {
        channel: String,
        payloads: Vec<Vec<u8>>,
        done: oneshot::Sender<Result<Vec<Delivery>, AgentError>>,
    },
    GetShadow {
        shadow: Option<String>,
        done: oneshot::Sender<Result<Option<ShadowSnapshot>, AgentError>>,
    },
    Publish {
        channel: String,
        payload: Vec<u8>,
        qos: Qos,
        done: oneshot::Sender<Result<Delivery, AgentError>>,
    },
    Respond {
        execution_id: String,
        status: CommandStatus,
        payload: Value,
        done: oneshot::Sender<Result<(), AgentError>>,
    },
    UpdateJob {
        status: JobStatus,
        details: Option<BTreeMap<String, String>>,
        done: oneshot::Sender<Result<(), AgentError>>,
    },
    Report {
        shadow: Option<String>,
        reported: Map<String, Value>,
        done: oneshot::Sender<Result<u64, AgentError>>,
    },
    Stop,
}

/// A running device agent. Dropping it stops it.
///
/// Every method takes `&self`: share the agent (in an `Arc`) between a task
/// that reads its events and the tasks that publish, report and answer.
#[derive(Debug)]
pub struct Agent {
    pub(in crate::agent) commands: mpsc::Sender<Command>,
    pub(in crate::agent) events: tokio::sync::Mutex<mpsc::Receiver<AgentEvent>>,
    pub(in crate::agent) task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Agent {
    /// Publishes telemetry to `channel` (topic
    /// `{telemetry_prefix}/{thing}/{channel}`). With [`Qos::AtLeastOnce`]
    /// the message is first written to the outbox (on disk with a state
    /// directory), so it survives an outage or a restart; the returned
    /// [`Delivery`] resolves when the broker acknowledged it. Fails at once
    /// with [`AgentError::Outbox`] when the outbox is full and its policy
    /// keeps what it holds.
    pub async fn publish(
        &self,
        channel: &str,
        payload: impl Into<Vec<u8>>,
        qos: Qos,
    ) -> Result<Delivery, AgentError> {
        if channel.is_empty() || channel.contains(['+', '#', '\0']) {
            return Err(AgentError::InvalidName(format!(
                "telemetry channel {channel:?}"
            )));
        }
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish {
                channel: channel.into(),
                payload: payload.into(),
                qos,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Publishes several telemetry messages to `channel` at QoS 1 with one
    /// write to the outbox (one flush to disk instead of one per message):
    /// all are queued, or none (the outbox is full). Each message is its
    /// own MQTT publish with its own [`Delivery`].
    pub async fn publish_batch(
        &self,
        channel: &str,
        payloads: Vec<Vec<u8>>,
    ) -> Result<Vec<Delivery>, AgentError> {
        if channel.is_empty() || channel.contains(['+', '#', '\0']) {
            return Err(AgentError::InvalidName(format!(
                "telemetry channel {channel:?}"
            )));
        }
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::PublishBatch {
                channel: channel.into(),
                payloads,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// The agent's copy of a shadow (`None`: classic): what it last read
    /// from the service, kept current by deltas and accepted updates.
    /// `None` until it was read (after connecting), or if it does not exist.
    pub async fn shadow(&self, shadow: Option<&str>) -> Result<Option<ShadowSnapshot>, AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::GetShadow {
                shadow: shadow.map(String::from),
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Reports state to a shadow and waits until the service accepted it;
    /// returns the shadow's new version. While offline, the report waits
    /// and goes out after the next connection.
    pub async fn report(
        &self,
        shadow: Option<&str>,
        reported: Map<String, Value>,
    ) -> Result<u64, AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Report {
                shadow: shadow.map(String::from),
                reported,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Answers a command. Refused after its deadline, or a second time.
    pub async fn respond(
        &self,
        execution_id: &str,
        status: CommandStatus,
        payload: Value,
    ) -> Result<(), AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Respond {
                execution_id: execution_id.into(),
                status,
                payload,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Reports the status of the current job and waits until the service
    /// accepted it (`details` replace the previous ones). A terminal status
    /// ends the job; the agent then asks for the next.
    pub async fn update_job(
        &self,
        status: JobStatus,
        details: Option<BTreeMap<String, String>>,
    ) -> Result<(), AgentError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::UpdateJob {
                status,
                details,
                done,
            })
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// The next event; `None` once the agent has stopped. Events go to one
    /// reader: two tasks calling this at once get alternate events.
    pub async fn next_event(&self) -> Option<AgentEvent> {
        self.events.lock().await.recv().await
    }

    /// Stops the agent: sends what it can (for up to 5 s), disconnects.
    /// Every later call fails with [`AgentError::Stopped`].
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Stop).await;
        let task = self.task.lock().map(|mut t| t.take()).unwrap_or_default();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}
