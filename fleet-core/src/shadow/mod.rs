//! Device shadows: the document, the service's processing rules, and the
//! device-side sync engine. Needs the `alloc` feature.
//!
//! The cloud writes `desired`, the device writes `reported`, and the part of
//! desired that reported does not match is the `delta`. The rules here are
//! those of the AWS IoT Device Shadow service:
//!
//! - an update merges recursively into desired and reported; `null` deletes a
//!   field, `"desired": null` or `"reported": null` removes the section, and
//!   `{"state": null}` clears all state but keeps the shadow; arrays are
//!   replaced whole, and an array that contains `null` is rejected; other
//!   top-level fields of a request are ignored;
//! - every leaf carries `{"timestamp": epoch-seconds}` metadata;
//! - the delta holds every key of desired whose value is absent from or
//!   different to reported (the full path to a differing nested leaf; arrays
//!   compare whole); its metadata is desired's; the service never clears
//!   desired when the two converge;
//! - every accepted update increments `version`; a request that carries a
//!   `version` other than the current one is rejected with 409; a delete
//!   keeps the version;
//! - `clientToken` is echoed in every reply, accepted or rejected;
//! - rejections carry AWS's codes and messages ([`ShadowError`]), and a
//!   rejected request changes nothing.
//!
//! Where AWS's documentation is silent, fleet chooses and documents:
//! an object that an update leaves empty (by deleting its last field) is
//! removed, so a stored state never holds `{}`; `/update/documents` carries
//! `"previous": null` for the update that creates a shadow.
//!
//! ```
//! use fleet_core::shadow::{Shadow, ShadowLimits};
//! use serde_json::{json, Value};
//!
//! let limits = ShadowLimits::default();
//! let s0 = Shadow::new();
//! let s1 = s0.update(br#"{"state":{"desired":{"led":{"color":"red","on":true}}}}"#, 100, &limits)
//!     .unwrap().shadow;
//! let up = s1.update(br#"{"state":{"reported":{"led":{"color":"red"}}},"clientToken":"t1"}"#, 101, &limits)
//!     .unwrap();
//! let delta: Value = serde_json::from_slice(&up.delta.unwrap()).unwrap();
//! assert_eq!(delta["state"], json!({"led": {"on": true}}));
//! assert_eq!(delta["version"], 2);
//! assert_eq!(delta["clientToken"], "t1");
//! ```

mod document;
mod error;
mod json;
mod process;
mod sync;
#[cfg(test)]
mod tests;

pub use document::{Shadow, ShadowState, UpdateRequest};

/// The named shadow a device reports what it runs to (its agent, hardware
/// id and each component's version, in `reported`): the fleet device
/// agent writes it at each connection and after an update is installed,
/// and the fleet index keeps its reported fields as `inventory.*`.
pub const INVENTORY_SHADOW: &str = "fleet-inventory";
pub use error::ShadowError;
pub use json::Object;
pub use process::{Deleted, Processed, Rejection, ShadowLimits, ShadowMessage, Updated, process};
pub use sync::{RequestId, ShadowEvent, ShadowSync, SyncConfig};
