//! The shared truth of the fleet SDK: the wire format and every rule, defined
//! once and used unchanged by the device agent, the cloud service, the
//! bindings and firmware.
//!
//! ```
//! use fleet_core::topic::{JobsTopic, JobsTopicKind, Topic, TopicPrefix};
//! use fleet_core::ThingName;
//!
//! // Which topic announces the next job to thing `pump-7`?
//! let topic = Topic::Jobs(JobsTopic {
//!     thing: ThingName::new("pump-7")?,
//!     kind: JobsTopicKind::NotifyNext,
//! });
//! assert_eq!(
//!     topic.display(&TopicPrefix::AWS).to_string(),
//!     "$aws/things/pump-7/jobs/notify-next"
//! );
//!
//! // And what is this topic that just arrived?
//! let incoming = "$aws/things/pump-7/jobs/notify-next";
//! assert_eq!(Topic::parse(&TopicPrefix::AWS, incoming)?, topic);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What is here
//! - [`identity`]: validated thing names, shadow names, job and stream ids,
//!   provisioning template names and client tokens.
//! - `admission` (with `alloc`): who may connect to the fleet's broker, as
//!   what and under which client id, the same for every broker.
//! - [`topic`]: every MQTT topic of the protocol (the AWS IoT device API
//!   layout under a configurable prefix), built and parsed without
//!   allocating.
//! - `shadow` (with `alloc`): shadow documents, the service's processing
//!   rules (exactly AWS IoT's) and `ShadowSync`, the device-side engine.
//! - `jobs` (with `alloc`): job executions with AWS IoT Jobs semantics, the
//!   service side per thing, `JobRunner` on the device, the pure rollout
//!   planner, job documents and commands.
//! - [`ota`]: signed manifests, trust roots with k-of-n thresholds and
//!   rotation, streaming image verification (no allocator), the A/B
//!   `OtaUpdate` state machine and signed install receipts.
//! - [`time`]: the monotonic [`time::Instant`] that state machines are given.
//!
//! # State machines
//! The engines here are sans-I/O, in the style of quinn-proto: inputs go in
//! through `handle_*` methods (a message, a connection change, a timeout,
//! each with the current time), commands through plain methods, and outputs
//! come back from `poll_transmit` (what to send), `poll_timeout` (when to
//! call `handle_timeout` next) and `poll_event` (what to tell the
//! application). Drain all three after every input.
//!
//! # What is not here
//! No I/O, no clock, no random numbers, no async runtime and no TLS: time and
//! input are always arguments. The crate is `no_std`; the `alloc` feature adds
//! owned names, and `std` (the default) adds nothing but `std::error::Error`
//! integration through `core::error::Error`.
//!
//! # Features
//! | feature | default | what it adds |
//! |---|---|---|
//! | `std` | yes | implies `alloc` |
//! | `alloc` | via `std` | owned names, shadows and `ShadowSync` (serde_json without std) |
//!
//! Build for a microcontroller with `--no-default-features` (optionally
//! `--features alloc`); CI builds both for `thumbv7em-none-eabihf`.

#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod admission;
pub mod identity;
#[cfg(feature = "alloc")]
pub mod jobs;
pub mod ota;
#[cfg(feature = "alloc")]
pub mod presence;
#[cfg(feature = "alloc")]
mod replay;
#[cfg(feature = "alloc")]
pub mod shadow;
#[cfg(feature = "alloc")]
pub mod stream;
#[cfg(test)]
mod testutil;
pub mod time;
pub mod topic;
#[cfg(feature = "alloc")]
pub mod transmit;

pub use identity::{
    ClientName, ClientToken, JobId, NameError, NameKind, NameProblem, ShadowName, StreamId,
    TemplateName, ThingName,
};
pub use topic::{Topic, TopicError, TopicPrefix};
