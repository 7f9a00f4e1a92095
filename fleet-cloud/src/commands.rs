//! Commands from the backend: send to a thing and await its answer.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_core::ThingName;
use fleet_core::jobs::{
    CommandError, CommandResponse, CommandState, PendingCommands, request_topic,
};
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use tokio::sync::oneshot;

/// Why a command did not get an answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum CommandFailure {
    /// Refused before sending (bad execution id, duplicate).
    Invalid(CommandError),
    /// No answer before the timeout; the command is marked TIMED_OUT and a
    /// late answer is refused.
    TimedOut,
    /// The request could not be handed to the broker client.
    Network(String),
}

impl fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "command refused: {e}"),
            Self::TimedOut => f.write_str("no answer before the timeout"),
            Self::Network(e) => write!(f, "cannot send: {e}"),
        }
    }
}

impl std::error::Error for CommandFailure {}

#[derive(Default)]
struct Inner {
    pending: PendingCommands,
    waiters: HashMap<String, oneshot::Sender<CommandResponse>>,
    next: u64,
}

/// Sends commands and matches answers. Pending commands live in this
/// instance's memory: an answer is accepted by the instance that sent it.
#[derive(Clone)]
pub struct CommandCenter {
    inner: Arc<Mutex<Inner>>,
    client: AsyncClient,
    prefix: String,
}

impl fmt::Debug for CommandCenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandCenter")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl CommandCenter {
    pub(crate) fn new(client: AsyncClient, prefix: &str) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            client,
            prefix: prefix.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; go on.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `command` with `payload` to `thing` and waits at most `timeout`
    /// for the answer.
    pub async fn send(
        &self,
        thing: &ThingName<'_>,
        command: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<CommandResponse, CommandFailure> {
        let now = now();
        let deadline = (now + timeout).as_secs();
        let (id, request, rx) = {
            let mut inner = self.lock();
            inner.next += 1;
            let id = format!("cmd-{:x}-{}", now.as_millis(), inner.next);
            let request = inner
                .pending
                .send(thing.as_str(), &id, command, payload, deadline)
                .map_err(CommandFailure::Invalid)?;
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(id.clone(), tx);
            (id, request, rx)
        };
        let topic = request_topic(&self.prefix, thing, &id);
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, request)
            .await
        {
            let mut inner = self.lock();
            inner.waiters.remove(&id);
            inner.pending.expire(&id);
            return Err(CommandFailure::Network(e.to_string()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            _ => {
                let mut inner = self.lock();
                inner.waiters.remove(&id);
                inner.pending.expire(&id);
                Err(CommandFailure::TimedOut)
            }
        }
    }

    /// The state of a command sent by this instance.
    pub fn state(&self, execution_id: &str) -> Option<CommandState> {
        self.lock().pending.state(execution_id).cloned()
    }

    /// An answer arrived from `thing`.
    pub(crate) fn handle_response(&self, thing: &str, payload: &[u8]) {
        let mut inner = self.lock();
        match inner
            .pending
            .handle_response(now().as_secs(), thing, payload)
        {
            Ok(CommandState::Done(response)) => {
                let response = response.clone();
                if let Some(waiter) = inner.waiters.remove(&response.execution_id) {
                    let _ = waiter.send(response);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("command answer from {thing} refused: {e}"),
        }
    }
}
