//! The service side of jobs under any operations and request payloads: no
//! panic; a rejected request changes nothing; versions only grow; terminal
//! executions stay terminal.
#![no_main]

use fleet_core::JobId;
use fleet_core::jobs::{JobExecution, ThingJobs, TimeoutConfig};
use fleet_core::topic::{JobsTopicKind, Role};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Queue { job: u8, timeout: Option<u8> },
    Cancel { job: u8, force: bool },
    Request { kind: u8, job: u8, payload: Vec<u8> },
    Advance(u16),
}

fuzz_target!(|ops: Vec<Op>| {
    let mut jobs = ThingJobs::new("dev-1");
    let mut now = 1_000u64;
    for op in ops.into_iter().take(200) {
        let before = jobs.clone();
        match op {
            Op::Queue { job, timeout } => {
                let timeouts = TimeoutConfig {
                    in_progress_timeout_in_minutes: timeout.map(u64::from),
                };
                let e = JobExecution::new(
                    &format!("j{}", job % 4),
                    "dev-1",
                    serde_json::json!({}),
                    1,
                    timeouts,
                    now,
                );
                let _ = jobs.queue(e, now);
            }
            Op::Cancel { job, force } => {
                let _ = jobs.cancel(&format!("j{}", job % 4), force, now);
            }
            Op::Request { kind, job, payload } => {
                let id = JobId::try_from(format!("j{}", job % 4)).expect("valid id");
                let kind = match kind % 5 {
                    0 => JobsTopicKind::GetPending(Role::Request),
                    1 => JobsTopicKind::StartNext(Role::Request),
                    2 => JobsTopicKind::Describe(id, Role::Request),
                    3 => JobsTopicKind::DescribeNext(Role::Request),
                    _ => JobsTopicKind::Update(id, Role::Request),
                };
                let out = jobs.handle_request(&kind, &payload, now);
                let rejected = out.iter().any(|m| {
                    matches!(
                        m.kind,
                        JobsTopicKind::GetPending(Role::Rejected)
                            | JobsTopicKind::StartNext(Role::Rejected)
                            | JobsTopicKind::Describe(_, Role::Rejected)
                            | JobsTopicKind::DescribeNext(Role::Rejected)
                            | JobsTopicKind::Update(_, Role::Rejected)
                    )
                });
                if rejected {
                    assert_eq!(jobs, before, "a rejected request changed state");
                }
            }
            Op::Advance(s) => {
                now += u64::from(s);
                let _ = jobs.handle_timeout(now);
            }
        }
        for (old, new) in before.executions().iter().zip(jobs.executions()) {
            assert!(new.version_number >= old.version_number);
            if old.status.is_terminal() {
                assert_eq!(old.status, new.status, "a terminal execution changed");
            }
        }
    }
});
