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
//! (`ShadowSync`, `JobRunner`, `CommandInbox`, `OtaUpdate`) over MQTT 5 (or
//! 3.1.1, [`Protocol`]) with mutual TLS (rustls with `ring`, TLS 1.2 at
//! least, no plaintext). No rumqttc or rustls type appears in this crate's
//! API.
//!
//! # What it does
//! - **Connection hygiene**: reconnects with exponential backoff and full
//!   jitter, makes its subscriptions again after every reconnection, reads
//!   each shadow in full before it trusts a delta, reports a fight over its
//!   client id ([`AgentEvent::ClientIdConflict`]), and flushes what is in
//!   flight on [`Agent::shutdown`].
//! - **Durable outbox**: telemetry ([`Agent::publish`],
//!   [`Agent::publish_batch`]), shadow reports, job updates and install
//!   receipts go through a crash-safe, size-bounded queue on disk
//!   ([`AgentBuilder::state_dir`], [`Outbox`]); each publish returns a
//!   [`Delivery`] that resolves on the broker's acknowledgement; what was
//!   not acknowledged is sent again after a reconnection or a restart (at
//!   least once).
//! - **Shadows** (classic and named), **jobs**, **commands**: events from
//!   [`Agent::next_event`], answers through the agent.
//! - **OTA** ([`AgentBuilder::ota`]): signed releases checked against a
//!   trust root, fetched over the MQTT file stream into the slot that is
//!   not running ([`FirmwareSlots`], [`FileSlots`]), resumed after a power
//!   cut, trial boot, self-test, confirm or rollback, signed receipt.
//! - **Provisioning by claim** ([`provision_by_claim`]): key and CSR made on
//!   the device, certificate and registration from the fleet, identity
//!   stored in the state directory.
//! - **Hardware keys** ([`DeviceKey`]): the TLS handshake, the certificate
//!   request of provisioning ([`provision_by_claim_with_key`]) and install
//!   receipts ([`ReceiptKey`]) are signed by a key in a TPM, HSM or secure
//!   element; any PKCS#11 token by a `pkcs11:` URI ([`pkcs11`], feature
//!   `pkcs11`, on by default).

#![forbid(unsafe_code)]

mod agent;
mod key;
mod mqtt;
pub mod ota;
pub mod outbox;
pub mod provision;
mod tls;

pub use agent::{
    Agent, AgentBuilder, AgentError, AgentEvent, Backoff, Delivery, Inventory, Qos, ShadowSnapshot,
};
pub use fleet_core::{NameError, ThingName};
/// Keys in PKCS#11 tokens ([`fleet_pkcs11`]), re-exported.
#[cfg(feature = "pkcs11")]
pub use fleet_pkcs11 as pkcs11;
pub use key::{DeviceKey, KeyAlgorithm, KeyError};
pub use mqtt::Protocol;
pub use ota::{FileSlots, FirmwareSlots, OtaSettings, ReceiptKey, Slot};
pub use outbox::{MessageKind, Outbox, OutboxError, Overflow};
pub use provision::{
    ClaimConfig, ProvisionError, Provisioned, provision_by_claim, provision_by_claim_with_key,
};
