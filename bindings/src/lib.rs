//! Python and Kotlin bindings of the fleet SDK, made with UniFFI: the same
//! device agent and the same `fleet-core` rules as Rust applications use,
//! not a re-implementation.
//!
//! ```
//! use fleet_bindings::{shadow_delta, is_valid_thing_name};
//!
//! assert!(is_valid_thing_name("pump-7".into()));
//! let delta = shadow_delta(r#"{"speed": 3, "on": true}"#.into(), r#"{"on": true}"#.into())?;
//! assert_eq!(delta, r#"{"speed":3}"#);
//! # Ok::<(), fleet_bindings::FleetError>(())
//! ```
//!
//! From Python (the `fleet` wheel) the agent reads:
//!
//! ```text
//! agent = Agent.start(AgentConfig(host="localhost", port=8883, thing="pump-7",
//!                                 cert_pem=cert, key_pem=key, ca_pem=ca))
//! await agent.publish("telemetry", b'{"t": 21.5}', Qos.AT_LEAST_ONCE)
//! ```
//!
//! # What it is
//! A thin layer: every exported method delegates to `fleet-device` or
//! `fleet-core` in a line or two. What it adds is only what crossing the
//! boundary needs:
//! - one small error enum for foreign callers, [`FleetError`], one variant
//!   per thing a caller can do about it;
//! - JSON values (shadow state, job documents, command payloads) cross as
//!   JSON text, parsed and checked on the Rust side;
//! - async methods run on a tokio runtime owned by this library (two worker
//!   threads, started on first use); the foreign side awaits them with its
//!   own executor (asyncio, Kotlin coroutines);
//! - the event stream is [`Agent::next_event`], or a listener callback
//!   ([`Agent::subscribe`]) with an [`EventSubscription`] that stops it
//!   when cancelled or dropped;
//! - what the application supplies is a foreign trait: firmware slots
//!   ([`FirmwareSlots`]) and the self-test ([`SelfTest`]) for OTA, a key
//!   held in hardware ([`DeviceKey`]), event listeners ([`EventListener`]).
//!
//! # What it is not
//! Not the cloud side (`fleet-cloud` has its CLI and HTTP API for other
//! languages), and no Python or Kotlin logic of its own beyond the small
//! helpers of each package.

#![forbid(unsafe_code)]
// The exported items are documented; UniFFI's generated scaffolding is not
// ours to document.
#![allow(missing_docs)]

mod agent;
mod error;
mod key;
mod ota;
mod provision;
mod runtime;
mod tools;

pub use agent::{
    Agent, AgentConfig, AgentEvent, CommandStatus, Delivery, DeliveryState, EventListener,
    EventSubscription, JobStatus, Overflow, Protocol, Qos, ShadowSnapshot,
};
pub use error::FleetError;
pub use key::{DeviceKey, KeyAlgorithm, pkcs11_generate_key, pkcs11_public_key};
pub use ota::{FirmwareSlots, OtaConfig, SelfTest, Slot};
pub use provision::{ClaimConfig, Provisioned, load_provisioned, provision_by_claim};
pub use runtime::shutdown_runtime;
pub use tools::{
    ManifestSpec, ShadowMessage, ShadowOperation, ShadowOutcome, SigningKeyPair,
    generate_signing_key, is_valid_thing_name, manifest_for_image, public_key_of, shadow_delta,
    shadow_process, sign_manifest, trust_root_for_key, verify_image, verify_manifest,
};

uniffi::setup_scaffolding!("fleet");
