//! Python and Kotlin bindings of the fleet SDK (UniFFI).
//!
//! ```
//! assert!(fleet_bindings::is_valid_thing_name("pump-7"));
//! assert!(!fleet_bindings::is_valid_thing_name("pump/7"));
//! ```
//!
//! # Status
//! The UniFFI layer (a thin wrapper over `fleet-device` and `fleet-core`) is
//! not built yet. Until it is, this crate holds only the one helper below.

#![forbid(unsafe_code)]

/// Whether `name` is a valid thing name (1–128 bytes of `[a-zA-Z0-9:_-]`).
pub fn is_valid_thing_name(name: &str) -> bool {
    fleet_core::ThingName::new(name).is_ok()
}
