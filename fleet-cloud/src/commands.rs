//! Commands from the backend: send to a thing and await its answer.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_core::jobs::{CommandError, CommandResponse, CommandState, PendingCommands};
use fleet_core::topic::{CommandTopic, CommandTopicKind, Format, Service, Topic, TopicPrefix};
use fleet_core::{JobId, ThingName};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::Outgoing;
use crate::clock::Clock;
use crate::service::{Handler, HandlerError, Request, Sender};

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
    publisher: Arc<dyn Sender>,
    prefix: String,
    clock: Clock,
    /// Tells this instance's execution ids from others'.
    nonce: u32,
}

impl fmt::Debug for CommandCenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandCenter")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl CommandCenter {
    pub(crate) fn new(publisher: Arc<dyn Sender>, prefix: &str, clock: Clock) -> Self {
        let mut nonce = [0u8; 4];
        // Without randomness ids still differ by time and counter.
        let _ = getrandom::fill(&mut nonce);
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            publisher,
            prefix: prefix.into(),
            clock,
            nonce: u32::from_le_bytes(nonce),
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
        let now = self.clock.now();
        let deadline = now + timeout.as_secs().max(1);
        let (id, request, rx) = {
            let mut inner = self.lock();
            inner.next += 1;
            let id = format!("cmd-{now:x}-{:08x}-{}", self.nonce, inner.next);
            let request = inner
                .pending
                .send(thing.as_str(), &id, command, payload, deadline)
                .map_err(CommandFailure::Invalid)?;
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(id.clone(), tx);
            (id, request, rx)
        };
        let topic = TopicPrefix::new(&self.prefix)
            .map_err(|e| CommandFailure::Network(e.to_string()))
            .and_then(|prefix| {
                let execution = JobId::new(&id)
                    .map_err(|_| CommandFailure::Invalid(CommandError::InvalidExecutionId))?;
                Ok(Topic::Command(CommandTopic {
                    thing: thing.borrow(),
                    execution,
                    kind: CommandTopicKind::Request,
                    format: Format::Json,
                })
                .to_string_under(&prefix))
            });
        let sent = match topic {
            Ok(topic) => self
                .publisher
                .send(Outgoing {
                    topic,
                    payload: request,
                })
                .await
                .map_err(|e| CommandFailure::Network(e.to_string())),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            let mut inner = self.lock();
            inner.waiters.remove(&id);
            inner.pending.expire(&id);
            return Err(e);
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

    /// An answer arrived from `thing` at `now` (epoch seconds).
    fn handle_response(&self, thing: &str, payload: &[u8], now: u64) {
        let mut inner = self.lock();
        match inner.pending.handle_response(now, thing, payload) {
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

/// The devices' answers (`.../executions/{id}/response/json`). Not
/// shareable: the instance that sent a command holds its waiter, and the
/// answer comes back on that instance's own subscription.
#[async_trait::async_trait]
impl Handler for CommandCenter {
    fn service(&self) -> Service {
        Service::Commands
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn shareable(&self) -> bool {
        false
    }

    async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, HandlerError> {
        if let Topic::Command(c) = &request.topic {
            self.handle_response(c.thing.as_str(), request.payload, request.received_at);
        }
        Ok(Vec::new())
    }
}
