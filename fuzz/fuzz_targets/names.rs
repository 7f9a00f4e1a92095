//! Any text: a name that validates never contains a topic metacharacter.
#![no_main]

use fleet_core::{ClientToken, JobId, ShadowName, StreamId, TemplateName, ThingName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let topic_safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#', '\0']);
    if let Ok(n) = ThingName::new(text) {
        assert!(topic_safe(n.as_str()) && n.as_str().len() <= 128);
    }
    if let Ok(n) = ShadowName::new(text) {
        assert!(topic_safe(n.as_str()) && n.as_str().len() <= 64);
    }
    if let Ok(n) = JobId::new(text) {
        assert!(topic_safe(n.as_str()) && n.as_str().len() <= 64);
    }
    if let Ok(n) = StreamId::new(text) {
        assert!(topic_safe(n.as_str()));
    }
    if let Ok(n) = TemplateName::new(text) {
        assert!(topic_safe(n.as_str()));
    }
    if let Ok(n) = ClientToken::new(text) {
        assert!(n.as_str().len() <= 64 && !n.as_str().contains('\0'));
    }
});
