//! The fleet device agent.
//!
//! ```
//! // The agent speaks the topics defined in fleet-core; the names it uses are
//! // validated once, on the way in.
//! let thing = fleet_device::ThingName::new("pump-7")?;
//! assert_eq!(thing.as_str(), "pump-7");
//! # Ok::<(), fleet_device::NameError>(())
//! ```
//!
//! # Status
//! This crate is the home of the device agent (tokio, MQTT with mutual TLS,
//! shadow sync, jobs, commands, telemetry with a durable outbox, OTA with A/B
//! slots). The agent itself is not built yet; today the crate re-exports the
//! `fleet-core` identity types it will take.

#![forbid(unsafe_code)]

pub use fleet_core::{NameError, ThingName};
