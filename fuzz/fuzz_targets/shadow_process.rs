//! Any request to any shadow operation: no panic; a rejection changes
//! nothing and says so in one message; an accepted update moves the version
//! by exactly one and publishes a delta exactly when desired and reported
//! differ.
#![no_main]

use fleet_core::shadow::{Shadow, ShadowLimits, process};
use fleet_core::topic::{Role, ShadowOp, ShadowTopicKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, Vec<u8>, Vec<u8>)| {
    let (selector, setup, request) = input;
    let limits = ShadowLimits::default();
    let mut shadow = Shadow::new();
    // Some inputs start from a shadow that the first bytes built.
    if selector & 4 != 0
        && let Ok(u) = shadow.update(&setup, 1, &limits)
    {
        shadow = u.shadow;
    }
    let op = match selector % 3 {
        0 => ShadowOp::Update,
        1 => ShadowOp::Get,
        _ => ShadowOp::Delete,
    };
    let before = shadow.to_stored_json();
    let out = process(&shadow, "fuzz", op, &request, 2, &limits);
    assert_eq!(
        shadow.to_stored_json(),
        before,
        "process must not touch its input"
    );
    let rejected = out
        .messages
        .iter()
        .any(|m| matches!(m.kind, ShadowTopicKind::Op(_, Role::Rejected)));
    if rejected {
        assert!(out.shadow.is_none());
        assert_eq!(out.messages.len(), 1);
        return;
    }
    if op == ShadowOp::Update {
        let new = out.shadow.expect("an accepted update yields a shadow");
        assert_eq!(new.version(), shadow.version() + 1);
        let (delta, _) = new.state().expect("exists after update").delta();
        let sent_delta = out
            .messages
            .iter()
            .any(|m| m.kind == ShadowTopicKind::Delta);
        assert_eq!(sent_delta, !delta.is_empty());
        assert_eq!(
            Shadow::from_stored_json(&new.to_stored_json()).ok(),
            Some(new)
        );
    }
});
