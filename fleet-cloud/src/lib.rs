//! The fleet backend.
//!
//! ```
//! // The backend parses every device topic with fleet-core's rules.
//! use fleet_cloud::{Topic, TopicPrefix};
//! let topic = Topic::parse(&TopicPrefix::AWS, "$aws/things/pump-7/shadow/update")?;
//! assert_eq!(topic.thing().map(|t| t.as_str()), Some("pump-7"));
//! # Ok::<(), fleet_cloud::TopicError>(())
//! ```
//!
//! # Status
//! This crate is the home of the backend service (broker client, storage,
//! registry, provisioning, shadow and job services, the `fleet` binary). The
//! service is not built yet; today the crate re-exports the `fleet-core`
//! topic types it will serve.

#![forbid(unsafe_code)]

pub use fleet_core::{Topic, TopicError, TopicPrefix};
