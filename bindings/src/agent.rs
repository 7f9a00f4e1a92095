//! The device agent: `fleet_device::Agent`, one delegation per method.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::FleetError;
use crate::key::{DeviceKey, KeyAdapter};
use crate::ota::OtaConfig;
use crate::runtime;

/// How an agent connects and what it keeps.
#[derive(Clone, uniffi::Record)]
pub struct AgentConfig {
    /// The broker's host.
    pub host: String,
    /// Its port (MQTT over TLS).
    pub port: u16,
    /// The thing name (the certificate's common name).
    pub thing: String,
    /// The device certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM); leave empty with a `device_key`.
    #[uniffi(default = "")]
    pub key_pem: String,
    /// Trust anchors of the broker's certificate (PEM).
    pub ca_pem: String,
    /// A key that signs without leaving its hardware (instead of `key_pem`).
    #[uniffi(default = None)]
    pub device_key: Option<Arc<dyn DeviceKey>>,
    /// The device's key in a PKCS#11 token (instead of `key_pem`): an RFC
    /// 7512 URI with `module-path` and a `pin-source` (a file or an
    /// environment variable, never the PIN itself).
    #[uniffi(default = None)]
    pub pkcs11_uri: Option<String>,
    /// Where the agent keeps what must survive a restart (the outbox, OTA
    /// progress); without one the outbox lives in memory.
    #[uniffi(default = None)]
    pub state_dir: Option<String>,
    /// Track the classic shadow.
    #[uniffi(default = true)]
    pub classic_shadow: bool,
    /// Named shadows to track.
    #[uniffi(default = [])]
    pub named_shadows: Vec<String>,
    /// MQTT 5 (default) or 3.1.1.
    #[uniffi(default = None)]
    pub protocol: Option<Protocol>,
    /// The MQTT client id (default: the thing name).
    #[uniffi(default = None)]
    pub client_id: Option<String>,
    /// MQTT keep-alive, seconds.
    #[uniffi(default = 30)]
    pub keep_alive_secs: u32,
    /// How long a shadow or job request waits for its answer before it is
    /// sent again, milliseconds (default: the engines' own).
    #[uniffi(default = None)]
    pub request_timeout_ms: Option<u64>,
    /// Reconnection backoff: first delay's bound and the largest delay,
    /// milliseconds (default 500 and 60 000).
    #[uniffi(default = None)]
    pub backoff_initial_ms: Option<u64>,
    /// See `backoff_initial_ms`.
    #[uniffi(default = None)]
    pub backoff_max_ms: Option<u64>,
    /// Telemetry goes to `{prefix}/{thing}/{channel}`.
    #[uniffi(default = "dt")]
    pub telemetry_prefix: String,
    /// The outbox's bound in bytes (default 16 MiB).
    #[uniffi(default = 16777216)]
    pub outbox_max_bytes: u64,
    /// What a full outbox does (default: drop the oldest telemetry).
    #[uniffi(default = None)]
    pub overflow: Option<Overflow>,
    /// Install signed releases into these slots.
    #[uniffi(default = None)]
    pub ota: Option<OtaConfig>,
    /// What the device runs, reported to the `fleet-inventory` named
    /// shadow at each connection and after an update is installed; the
    /// fleet index keeps it as `inventory.*` fields.
    #[uniffi(default = None)]
    pub inventory: Option<InventoryConfig>,
    /// Tell the backend who is connected through a broker that reports no
    /// lifecycle events (Mosquitto): a retained birth, a last will and a
    /// goodbye on `fleet/things/{thing}/presence`. Off by default (AWS IoT
    /// Core and fleet's embedded broker report connections themselves).
    #[uniffi(default = false)]
    pub presence: bool,
}

/// What a device runs, for the fleet's inventory.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct InventoryConfig {
    /// The hardware id (as OTA manifests name it; default: the OTA
    /// configuration's).
    #[uniffi(default = None)]
    pub hardware_id: Option<String>,
    /// Each component's version (`firmware` = `2.4.1`).
    #[uniffi(default)]
    pub components: std::collections::HashMap<String, String>,
}

/// MQTT version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Protocol {
    /// MQTT 5.
    V5,
    /// MQTT 3.1.1.
    V311,
}

/// What a full outbox does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Overflow {
    /// Refuse the new message.
    RejectNew,
    /// Drop the oldest telemetry (job updates and receipts never).
    DropOldestTelemetry,
}

/// Quality of service of a telemetry message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Qos {
    /// Sent once, not stored.
    AtMostOnce,
    /// Kept in the outbox until the broker acknowledged it.
    AtLeastOnce,
}

/// A command's outcome, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum CommandStatus {
    /// Done.
    Succeeded,
    /// Tried and failed.
    Failed,
    /// Refused (unknown command, bad arguments).
    Rejected,
    /// Not done in time.
    TimedOut,
}

/// A job execution's status, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum JobStatus {
    /// Working on it.
    InProgress,
    /// Done.
    Succeeded,
    /// Failed.
    Failed,
    /// Refused.
    Rejected,
}

/// The agent's copy of a shadow. `desired` and `reported` are JSON objects.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ShadowSnapshot {
    /// Desired state (JSON object).
    pub desired: String,
    /// Reported state (JSON object).
    pub reported: String,
    /// The shadow's version.
    pub version: u64,
}

/// What the agent tells the application. JSON values are JSON text.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum AgentEvent {
    /// Connected to the broker (again).
    Connected,
    /// The connection dropped; the agent reconnects by itself.
    Disconnected { reason: String, retry_in_ms: u64 },
    /// Desired state differs from reported: apply `delta`, then report.
    ShadowDelta {
        shadow: Option<String>,
        version: u64,
        delta: String,
    },
    /// A job to run; report with `update_job`.
    Job {
        job_id: String,
        execution_number: u64,
        document: String,
        status_details: HashMap<String, String>,
    },
    /// The current job was canceled by the service.
    JobCanceled { job_id: String },
    /// A command; answer with `respond` before `deadline` (epoch seconds).
    Command {
        execution_id: String,
        command: String,
        payload: String,
        deadline: u64,
    },
    /// Another connection keeps taking this client id.
    ClientIdConflict { times: u32 },
    /// An update is downloading.
    OtaProgress {
        job_id: String,
        received: u64,
        total: u64,
    },
    /// The new image is staged: restart the device (or the process).
    RebootRequired { job_id: String },
    /// An update ended (`committed`: the new image runs).
    OtaFinished { job_id: String, committed: bool },
    /// An update was refused before anything was written.
    OtaRejected { job_id: String, reason: String },
    /// Something arrived that the agent cannot use; nothing changed.
    InvalidInput { topic: String, reason: String },
    /// An event this version of the bindings does not know.
    Other { description: String },
}

/// Receives the agent's events on a runtime thread (not the caller's):
/// hand them to your own loop (asyncio's `call_soon_threadsafe`, a Kotlin
/// channel).
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    /// One event.
    fn on_event(&self, event: AgentEvent);
    /// The agent stopped; no more events.
    fn on_stopped(&self);
}

/// Stops a listener's events when cancelled, or when dropped (Kotlin:
/// `close()`).
#[derive(uniffi::Object)]
pub struct EventSubscription {
    task: tokio::task::AbortHandle,
    listener: ListenerSlot,
}

/// The listener, shared with the task that calls it. Cancelling takes it
/// out on the caller's thread, so the foreign object is released there and
/// not later on a runtime thread.
type ListenerSlot = Arc<Mutex<Option<Arc<dyn EventListener>>>>;

impl std::fmt::Debug for EventSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSubscription")
            .field("active", &self.is_active())
            .finish()
    }
}

#[uniffi::export]
impl EventSubscription {
    /// Stops delivering events.
    pub fn cancel(&self) {
        self.task.abort();
        let listener = self.listener.lock().ok().and_then(|mut l| l.take());
        drop(listener);
    }

    /// Whether events still flow.
    pub fn is_active(&self) -> bool {
        !self.task.is_finished() && self.listener.lock().is_ok_and(|l| l.is_some())
    }
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Where a queued message is.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum DeliveryState {
    /// On its way.
    Pending,
    /// The broker acknowledged it.
    Acknowledged,
    /// It will not be acknowledged by this process.
    Failed { reason: String },
}

/// A queued telemetry message: resolves when the broker acknowledged it.
#[derive(Debug, uniffi::Object)]
pub struct Delivery {
    seq: u64,
    inner: Mutex<Option<fleet_device::Delivery>>,
    outcome: Mutex<Option<Result<(), FleetError>>>,
}

impl Delivery {
    fn new(d: fleet_device::Delivery) -> Arc<Self> {
        Arc::new(Self {
            seq: d.seq(),
            inner: Mutex::new(Some(d)),
            outcome: Mutex::new(None),
        })
    }

    fn settle(&self, r: Result<(), FleetError>) -> Result<(), FleetError> {
        if let Ok(mut o) = self.outcome.lock() {
            *o = Some(r.clone());
        }
        r
    }

    fn known(&self) -> Option<Result<(), FleetError>> {
        self.outcome.lock().ok().and_then(|o| o.clone())
    }
}

#[uniffi::export]
impl Delivery {
    /// Its sequence number in the outbox (0 for QoS 0).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Where it is, without waiting.
    pub fn state(&self) -> DeliveryState {
        let outcome = self.known().or_else(|| {
            let mut inner = self.inner.lock().ok()?;
            let r = inner.as_mut()?.try_result()?.map_err(FleetError::from);
            Some(self.settle(r))
        });
        match outcome {
            None => DeliveryState::Pending,
            Some(Ok(())) => DeliveryState::Acknowledged,
            Some(Err(e)) => DeliveryState::Failed {
                reason: e.to_string(),
            },
        }
    }

    /// Waits until the broker acknowledged it. `Stopped` if the agent
    /// stopped first (the message stays in the outbox for the next start).
    pub async fn acknowledged(&self) -> Result<(), FleetError> {
        if let Some(r) = self.known() {
            return r;
        }
        let inner = self.inner.lock().ok().and_then(|mut i| i.take());
        let Some(inner) = inner else {
            return Err(FleetError::invalid(
                "another caller is already waiting for this delivery",
            ));
        };
        let r = runtime::run(inner.acknowledged()).await?;
        self.settle(r.map_err(FleetError::from))
    }
}

/// A running device agent; it connects and reconnects by itself.
#[derive(Debug, uniffi::Object)]
pub struct Agent {
    inner: Arc<fleet_device::Agent>,
}

fn object(json: &str, what: &str) -> Result<Map<String, Value>, FleetError> {
    match serde_json::from_str(json) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(FleetError::invalid(format!("{what} must be a JSON object"))),
        Err(e) => Err(FleetError::invalid(format!("{what}: {e}"))),
    }
}

fn value(json: &str, what: &str) -> Result<Value, FleetError> {
    serde_json::from_str(json).map_err(|e| FleetError::invalid(format!("{what}: {e}")))
}

fn text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[uniffi::export]
impl Agent {
    /// Starts an agent (it connects in the background; `Connected` follows).
    #[uniffi::constructor]
    pub fn start(config: AgentConfig) -> Result<Arc<Self>, FleetError> {
        let builder = builder(config)?;
        let inner = runtime::enter(|| builder.start())??;
        Ok(Arc::new(Self {
            inner: Arc::new(inner),
        }))
    }

    /// Publishes telemetry to `channel`; resolves once it is queued (QoS 1:
    /// in the outbox), with a `Delivery` for the broker's acknowledgement.
    pub async fn publish(
        &self,
        channel: String,
        payload: Vec<u8>,
        qos: Qos,
    ) -> Result<Arc<Delivery>, FleetError> {
        let (agent, qos) = (self.inner.clone(), qos.into());
        let d = runtime::run(async move { agent.publish(&channel, payload, qos).await }).await??;
        Ok(Delivery::new(d))
    }

    /// Publishes several messages at QoS 1 with one outbox write: all are
    /// queued, or none.
    pub async fn publish_batch(
        &self,
        channel: String,
        payloads: Vec<Vec<u8>>,
    ) -> Result<Vec<Arc<Delivery>>, FleetError> {
        let agent = self.inner.clone();
        let ds =
            runtime::run(async move { agent.publish_batch(&channel, payloads).await }).await??;
        Ok(ds.into_iter().map(Delivery::new).collect())
    }

    /// The agent's copy of a shadow (`None`: classic); `None` until read.
    pub async fn shadow(
        &self,
        shadow: Option<String>,
    ) -> Result<Option<ShadowSnapshot>, FleetError> {
        let agent = self.inner.clone();
        let s = runtime::run(async move { agent.shadow(shadow.as_deref()).await }).await??;
        Ok(s.map(|s| ShadowSnapshot {
            desired: text(&s.desired),
            reported: text(&s.reported),
            version: s.version,
        }))
    }

    /// Reports state (a JSON object) and waits until the service accepted
    /// it; returns the shadow's new version.
    pub async fn report(
        &self,
        shadow: Option<String>,
        reported: String,
    ) -> Result<u64, FleetError> {
        let (agent, reported) = (self.inner.clone(), object(&reported, "reported")?);
        Ok(runtime::run(async move { agent.report(shadow.as_deref(), reported).await }).await??)
    }

    /// Answers a command with a status and a JSON payload.
    pub async fn respond(
        &self,
        execution_id: String,
        status: CommandStatus,
        payload: String,
    ) -> Result<(), FleetError> {
        let (agent, payload) = (self.inner.clone(), value(&payload, "payload")?);
        let status = status.into();
        Ok(
            runtime::run(async move { agent.respond(&execution_id, status, payload).await })
                .await??,
        )
    }

    /// Reports the current job's status (`details` replace the previous).
    pub async fn update_job(
        &self,
        status: JobStatus,
        details: Option<HashMap<String, String>>,
    ) -> Result<(), FleetError> {
        let agent = self.inner.clone();
        let details = details.map(|d| d.into_iter().collect::<BTreeMap<_, _>>());
        let status = status.into();
        Ok(runtime::run(async move { agent.update_job(status, details).await }).await??)
    }

    /// The next event; `None` once the agent has stopped. Use this or
    /// `subscribe`, not both.
    pub async fn next_event(&self) -> Result<Option<AgentEvent>, FleetError> {
        let agent = self.inner.clone();
        Ok(runtime::run(async move { agent.next_event().await })
            .await?
            .map(AgentEvent::from))
    }

    /// Hands every event to `listener` (on a runtime thread) until the
    /// subscription is cancelled or dropped, or the agent stops.
    pub fn subscribe(
        &self,
        listener: Arc<dyn EventListener>,
    ) -> Result<Arc<EventSubscription>, FleetError> {
        let agent = self.inner.clone();
        let slot: ListenerSlot = Arc::new(Mutex::new(Some(listener)));
        let shared = slot.clone();
        let current = move || shared.lock().ok().and_then(|l| l.clone());
        let task = runtime::spawn(async move {
            while let Some(e) = agent.next_event().await {
                match current() {
                    Some(l) => l.on_event(e.into()),
                    None => return,
                }
            }
            if let Some(l) = current() {
                l.on_stopped();
            }
        })?;
        Ok(Arc::new(EventSubscription {
            task,
            listener: slot,
        }))
    }

    /// Stops the agent: sends what it can (up to 5 s), disconnects.
    pub async fn shutdown(&self) -> Result<(), FleetError> {
        let agent = self.inner.clone();
        runtime::run(async move { agent.shutdown().await }).await
    }
}

fn builder(c: AgentConfig) -> Result<fleet_device::AgentBuilder, FleetError> {
    let mut b = fleet_device::AgentBuilder::new(
        &c.host,
        c.port,
        &c.thing,
        &c.cert_pem,
        &c.key_pem,
        &c.ca_pem,
    );
    if let Some(key) = c.device_key {
        b = b.device_key(Arc::new(KeyAdapter(key)));
    } else if let Some(uri) = &c.pkcs11_uri {
        b = b.device_key(crate::key::open_pkcs11(uri)?);
    } else if c.key_pem.trim().is_empty() {
        return Err(FleetError::invalid(
            "key_pem is empty and no device_key or pkcs11_uri is given",
        ));
    }
    let mut shadows: Vec<Option<&str>> = Vec::new();
    if c.classic_shadow {
        shadows.push(None);
    }
    shadows.extend(c.named_shadows.iter().map(|s| Some(s.as_str())));
    b = b.shadows(&shadows);
    if let Some(dir) = c.state_dir {
        b = b.state_dir(dir);
    }
    if let Some(p) = c.protocol {
        b = b.protocol(match p {
            Protocol::V5 => fleet_device::Protocol::V5,
            Protocol::V311 => fleet_device::Protocol::V311,
        });
    }
    if let Some(id) = &c.client_id {
        b = b.client_id(id);
    }
    if let Some(ms) = c.request_timeout_ms {
        b = b.request_timeout(Duration::from_millis(ms));
    }
    let default = fleet_device::Backoff::default();
    b = b.backoff(fleet_device::Backoff {
        initial: c
            .backoff_initial_ms
            .map_or(default.initial, Duration::from_millis),
        max: c.backoff_max_ms.map_or(default.max, Duration::from_millis),
    });
    let overflow = match c.overflow.unwrap_or(Overflow::DropOldestTelemetry) {
        Overflow::RejectNew => fleet_device::Overflow::RejectNew,
        Overflow::DropOldestTelemetry => fleet_device::Overflow::DropOldestTelemetry,
    };
    let max = usize::try_from(c.outbox_max_bytes).unwrap_or(usize::MAX);
    b = b
        .outbox(max, overflow)
        .telemetry_prefix(&c.telemetry_prefix)
        .keep_alive(Duration::from_secs(c.keep_alive_secs.into()));
    if let Some(ota) = c.ota {
        b = b.ota(ota.settings()?);
    }
    if let Some(i) = c.inventory {
        b = b.inventory(fleet_device::Inventory {
            hardware_id: i.hardware_id,
            components: i.components.into_iter().collect(),
        });
    }
    Ok(b.presence(c.presence))
}

impl From<Qos> for fleet_device::Qos {
    fn from(q: Qos) -> Self {
        match q {
            Qos::AtMostOnce => Self::AtMostOnce,
            Qos::AtLeastOnce => Self::AtLeastOnce,
        }
    }
}

impl From<CommandStatus> for fleet_core::jobs::CommandStatus {
    fn from(s: CommandStatus) -> Self {
        match s {
            CommandStatus::Succeeded => Self::Succeeded,
            CommandStatus::Failed => Self::Failed,
            CommandStatus::Rejected => Self::Rejected,
            CommandStatus::TimedOut => Self::TimedOut,
        }
    }
}

impl From<JobStatus> for fleet_core::jobs::JobStatus {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::InProgress => Self::InProgress,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Rejected => Self::Rejected,
        }
    }
}

impl From<fleet_device::AgentEvent> for AgentEvent {
    fn from(e: fleet_device::AgentEvent) -> Self {
        use fleet_device::AgentEvent as E;
        match e {
            E::Connected => Self::Connected,
            E::Disconnected { reason, retry_in } => Self::Disconnected {
                reason,
                retry_in_ms: u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
            },
            E::ShadowDelta {
                shadow,
                version,
                delta,
            } => Self::ShadowDelta {
                shadow,
                version,
                delta: text(&delta),
            },
            E::Job {
                job_id,
                execution_number,
                document,
                status_details,
            } => Self::Job {
                job_id,
                execution_number,
                document: text(&document),
                status_details: status_details.into_iter().collect(),
            },
            E::JobCanceled { job_id } => Self::JobCanceled { job_id },
            E::Command {
                execution_id,
                command,
                payload,
                deadline,
            } => Self::Command {
                execution_id,
                command,
                payload: text(&payload),
                deadline,
            },
            E::ClientIdConflict { times } => Self::ClientIdConflict { times },
            E::OtaProgress {
                job_id,
                received,
                total,
            } => Self::OtaProgress {
                job_id,
                received,
                total,
            },
            E::RebootRequired { job_id } => Self::RebootRequired { job_id },
            E::OtaFinished { job_id, committed } => Self::OtaFinished { job_id, committed },
            E::OtaRejected { job_id, reason } => Self::OtaRejected { job_id, reason },
            E::InvalidInput { topic, reason } => Self::InvalidInput { topic, reason },
            other => Self::Other {
                description: format!("{other:?}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            host: "localhost".into(),
            port: 1,
            thing: "pump-7".into(),
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_pem: String::new(),
            device_key: None,
            pkcs11_uri: None,
            state_dir: None,
            classic_shadow: true,
            named_shadows: Vec::new(),
            protocol: None,
            client_id: None,
            keep_alive_secs: 30,
            request_timeout_ms: None,
            backoff_initial_ms: None,
            backoff_max_ms: None,
            telemetry_prefix: "dt".into(),
            outbox_max_bytes: 1 << 20,
            overflow: None,
            ota: None,
            inventory: None,
            presence: false,
        }
    }

    #[test]
    fn bad_configurations_are_invalid_arguments() {
        let e = Agent::start(config()).unwrap_err();
        assert!(matches!(e, FleetError::InvalidArgument { .. }), "{e}");
        let mut c = config();
        c.key_pem = "not a key".into();
        c.thing = "pump/7".into();
        let e = Agent::start(c).unwrap_err();
        assert!(matches!(e, FleetError::InvalidArgument { .. }), "{e}");
    }

    #[test]
    fn json_arguments_are_checked() {
        assert!(object("[1]", "reported").is_err());
        assert!(object("{", "reported").is_err());
        assert_eq!(object(r#"{"a":1}"#, "reported").unwrap().len(), 1);
        assert!(value("nope", "payload").is_err());
    }

    #[test]
    fn events_cross_with_json_text() {
        let mut delta = Map::new();
        delta.insert("speed".into(), Value::from(3));
        let e = AgentEvent::from(fleet_device::AgentEvent::ShadowDelta {
            shadow: None,
            version: 4,
            delta,
        });
        assert_eq!(
            e,
            AgentEvent::ShadowDelta {
                shadow: None,
                version: 4,
                delta: r#"{"speed":3}"#.into()
            }
        );
    }
}
