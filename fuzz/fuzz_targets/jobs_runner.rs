//! `JobRunner` under any sequence of inputs: no panic, it only publishes to
//! its own thing's jobs topics, and it never has more than one update in
//! flight.
#![no_main]

use core::time::Duration;

use fleet_core::ThingName;
use fleet_core::jobs::{JobRunner, JobStatus, RunnerConfig};
use fleet_core::time::Instant;
use fleet_core::transmit::Transmit;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Disconnect,
    Subscribed,
    Advance(u16),
    Update(u8),
    Message {
        topic: u8,
        job: u8,
        token: Option<u8>,
        status: u8,
        version: u8,
        code: u8,
        raw: Option<Vec<u8>>,
    },
}

const STATUSES: [&str; 4] = ["QUEUED", "IN_PROGRESS", "SUCCEEDED", "CANCELED"];
const CODES: [&str; 4] = [
    "VersionMismatch",
    "InvalidStateTransition",
    "TerminalStateReached",
    "InternalError",
];

fuzz_target!(|ops: Vec<Op>| {
    let thing = ThingName::from_static("dev-1");
    let mut runner = JobRunner::new(thing, RunnerConfig::default(), 1);
    let mut now = Instant::ZERO;
    let mut tokens: Vec<String> = Vec::new();
    for op in ops.into_iter().take(300) {
        match op {
            Op::Connect => runner.handle_connection(now, true),
            Op::Disconnect => runner.handle_connection(now, false),
            Op::Subscribed => runner.handle_subscribed(now),
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                if runner.poll_timeout().is_some_and(|t| t <= now) {
                    runner.handle_timeout(now);
                }
            }
            Op::Update(s) => {
                let status = [
                    JobStatus::InProgress,
                    JobStatus::Succeeded,
                    JobStatus::Failed,
                ][usize::from(s % 3)];
                let _ = runner.update(now, status, None);
            }
            Op::Message {
                topic,
                job,
                token,
                status,
                version,
                code,
                raw,
            } => {
                let job = format!("j{}", job % 3);
                let topic = match topic % 5 {
                    0 => "$aws/things/dev-1/jobs/notify-next".to_string(),
                    1 => "$aws/things/dev-1/jobs/start-next/accepted".to_string(),
                    2 => "$aws/things/dev-1/jobs/start-next/rejected".to_string(),
                    3 => format!("$aws/things/dev-1/jobs/{job}/update/accepted"),
                    _ => format!("$aws/things/dev-1/jobs/{job}/update/rejected"),
                };
                let token =
                    token.and_then(|n| tokens.iter().rev().nth(usize::from(n % 4)).cloned());
                let payload = raw.unwrap_or_else(|| {
                    let status = STATUSES[usize::from(status % 4)];
                    json!({
                        "execution": {"jobId": job, "thingName": "dev-1", "status": status,
                                      "queuedAt": 1, "lastUpdatedAt": 1,
                                      "versionNumber": version, "executionNumber": 1,
                                      "jobDocument": {}},
                        "executionState": {"status": status, "versionNumber": version},
                        "code": CODES[usize::from(code % 4)],
                        "message": "m",
                        "timestamp": 1,
                        "clientToken": token,
                    })
                    .to_string()
                    .into_bytes()
                });
                let _ = runner.handle_message(now, &topic, &payload);
            }
        }
        let mut updates = 0;
        while let Some(t) = runner.poll_transmit() {
            if let Transmit::Publish { topic, payload, .. } = t {
                assert!(topic.starts_with("$aws/things/dev-1/jobs/"), "{topic}");
                if topic.ends_with("/update") {
                    updates += 1;
                }
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload)
                    && let Some(t) = v.get("clientToken").and_then(|t| t.as_str())
                {
                    tokens.push(t.to_string());
                }
            }
        }
        assert!(updates <= 1, "{updates} updates sent at once");
        while runner.poll_event().is_some() {}
    }
});
