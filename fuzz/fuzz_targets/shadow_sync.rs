//! `ShadowSync` driven by any sequence of inputs: connection changes, time,
//! well-formed and malformed messages, and application updates. It must
//! never panic, only ever publish to its own thing's shadow topics, and never
//! move a synced replica's version backwards between two full reads (a GET
//! reply is the truth, whatever version it carries).
#![no_main]

use core::time::Duration;

use fleet_core::shadow::{ShadowSync, SyncConfig};
use fleet_core::time::Instant;
use fleet_core::transmit::Transmit;
use fleet_core::{ShadowName, ThingName};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

#[derive(Arbitrary, Debug)]
enum Suffix {
    GetAccepted,
    GetRejected,
    UpdateAccepted,
    UpdateRejected,
    Delta,
    DeleteAccepted,
    Documents,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    Reply {
        version: u8,
        /// Use the client token of the n-th most recent request, or none.
        token: Option<u8>,
        code: u16,
        key: u8,
        value: Option<u8>,
        desired: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Disconnect,
    Subscribed,
    Advance(u16),
    Message {
        named: bool,
        suffix: Suffix,
        body: Body,
    },
    Report {
        named: bool,
        key: u8,
        value: Option<u8>,
    },
}

fuzz_target!(|ops: Vec<Op>| {
    let thing = ThingName::from_static("dev-1");
    let cfg = ShadowName::from_static("cfg");
    let mut sync = ShadowSync::new(thing, &[None, Some(cfg.clone())], SyncConfig::default(), 1);
    let mut now = Instant::ZERO;
    let mut tokens: Vec<String> = Vec::new();
    let mut versions = [None::<u64>; 2];
    for op in ops.into_iter().take(256) {
        match op {
            Op::Connect => sync.handle_connection(now, true),
            Op::Disconnect => sync.handle_connection(now, false),
            Op::Subscribed => sync.handle_subscribed(now),
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                if sync.poll_timeout().is_some_and(|t| t <= now) {
                    sync.handle_timeout(now);
                }
            }
            Op::Message {
                named,
                suffix,
                body,
            } => {
                if matches!(suffix, Suffix::GetAccepted) {
                    versions[usize::from(named)] = None;
                }
                let base = if named {
                    "$aws/things/dev-1/shadow/name/cfg"
                } else {
                    "$aws/things/dev-1/shadow"
                };
                let suffix = match suffix {
                    Suffix::GetAccepted => "get/accepted",
                    Suffix::GetRejected => "get/rejected",
                    Suffix::UpdateAccepted => "update/accepted",
                    Suffix::UpdateRejected => "update/rejected",
                    Suffix::Delta => "update/delta",
                    Suffix::DeleteAccepted => "delete/accepted",
                    Suffix::Documents => "update/documents",
                };
                let payload = match body {
                    Body::Raw(bytes) => bytes,
                    Body::Reply {
                        version,
                        token,
                        code,
                        key,
                        value,
                        desired,
                    } => {
                        let token = token
                            .and_then(|n| tokens.iter().rev().nth(usize::from(n % 8)).cloned());
                        let leaf = json!({ format!("k{}", key % 4): value });
                        let section = if desired { "desired" } else { "reported" };
                        json!({
                            "state": { section: leaf },
                            "version": version,
                            "code": code,
                            "clientToken": token,
                        })
                        .to_string()
                        .into_bytes()
                    }
                };
                let _ = sync.handle_message(now, &format!("{base}/{suffix}"), &payload);
            }
            Op::Report { named, key, value } => {
                let shadow = named.then_some(&cfg);
                let patch = json!({ format!("k{}", key % 4): value });
                let _ = sync.update(now, shadow, None, Some(patch));
            }
        }
        while let Some(t) = sync.poll_transmit() {
            if let Transmit::Publish { topic, payload, .. } = t {
                assert!(topic.starts_with("$aws/things/dev-1/shadow/"), "{topic}");
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload)
                    && let Some(t) = v.get("clientToken").and_then(|t| t.as_str())
                {
                    tokens.push(t.to_string());
                }
            }
        }
        while sync.poll_event().is_some() {}
        for (i, shadow) in [None, Some(&cfg)].into_iter().enumerate() {
            let now_version = sync.document(shadow).map(|(_, _, v)| v);
            if let (Some(before), Some(after)) = (versions[i], now_version) {
                assert!(
                    after >= before,
                    "replica version went back: {before} -> {after}"
                );
            }
            if now_version.is_some() {
                versions[i] = now_version;
            }
        }
    }
});
