//! The fleet device agent.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fleet_device::{AgentBuilder, AgentEvent};
//!
//! let read = |p| std::fs::read_to_string(p);
//! let mut agent = AgentBuilder::new(
//!     "broker.example", 8883, "pump-7",
//!     &read("pump-7.pem")?, &read("pump-7.key")?, &read("ca.pem")?,
//! )
//! .start()?;
//! while let Some(event) = agent.next_event().await {
//!     if let AgentEvent::ShadowDelta { shadow, delta, .. } = event {
//!         // Apply the desired change, then report it.
//!         agent.report(shadow.as_deref(), delta).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The agent is a thin pump around the sans-I/O engines of `fleet-core`
//! (today: `ShadowSync`, `JobRunner` and `CommandInbox`) over MQTT 5 with mutual TLS (rustls, ring). It
//! reconnects by itself with exponential backoff and full jitter, makes its
//! subscriptions again after every reconnection, and reads each shadow in
//! full before it trusts a delta.
//!
//! # Status
//! Shadows, jobs and commands are built, and the durable [`Outbox`]
//! (crash-safe, size-bounded, with an overflow policy) exists but is not yet
//! wired into a telemetry API. Telemetry,
//! OTA, provisioning by claim, a signing-key trait for hardware keys and
//! MQTT 3.1.1 are not built yet. No rumqttc or rustls type appears in this
//! crate's API.

#![forbid(unsafe_code)]

mod agent;
mod key;
mod mqtt;
pub mod ota;
pub mod outbox;
pub mod provision;

pub use agent::{
    Agent, AgentBuilder, AgentError, AgentEvent, Backoff, Delivery, Qos, ShadowSnapshot,
};
pub use fleet_core::{NameError, ThingName};
pub use key::{DeviceKey, KeyAlgorithm, KeyError};
pub use mqtt::Protocol;
pub use ota::{FileSlots, FirmwareSlots, OtaSettings, Slot};
pub use outbox::{MessageKind, Outbox, OutboxError, Overflow};
pub use provision::{ClaimConfig, ProvisionError, Provisioned, provision_by_claim};
