//! Jobs: every transition, the timers, the service's replies, the rollout
//! planner's properties, commands, and a simulation of `JobRunner` against
//! the service with loss, duplication, reordering and restarts.

use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::identity::JobId;
use crate::topic::{JobsTopicKind, Role};

const T0: u64 = 1_700_000_000;
const ALL: [JobStatus; 8] = [
    JobStatus::Queued,
    JobStatus::InProgress,
    JobStatus::Succeeded,
    JobStatus::Failed,
    JobStatus::TimedOut,
    JobStatus::Rejected,
    JobStatus::Removed,
    JobStatus::Canceled,
];

fn exec(timeout_min: Option<u64>) -> JobExecution {
    JobExecution::new(
        "job-1",
        "dev-1",
        json!({"op": "x"}),
        1,
        TimeoutConfig {
            in_progress_timeout_in_minutes: timeout_min,
        },
        T0,
    )
}

fn to(status: JobStatus) -> StatusUpdate {
    StatusUpdate {
        status: Some(status),
        ..StatusUpdate::default()
    }
}

/// Puts an execution in `status` the way the service would.
fn in_status(status: JobStatus) -> JobExecution {
    let mut e = exec(None);
    match status {
        JobStatus::Queued => {}
        JobStatus::InProgress => e.update(&to(status), T0).unwrap(),
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Rejected => {
            e.update(&to(JobStatus::InProgress), T0).unwrap();
            e.update(&to(status), T0).unwrap();
        }
        JobStatus::TimedOut => {
            let mut t = exec(Some(1));
            t.update(&to(JobStatus::InProgress), T0).unwrap();
            assert!(t.handle_timeout(T0 + 60));
            return t;
        }
        JobStatus::Removed => e.remove(T0),
        JobStatus::Canceled => e.cancel(false, T0).unwrap(),
    }
    assert_eq!(e.status, status);
    e
}

#[test]
fn every_device_transition() {
    for from in ALL {
        for target in ALL {
            let mut e = in_status(from);
            let before = e.clone();
            let result = e.update(&to(target), T0 + 5);
            let allowed = !from.is_terminal() && target.device_may_set();
            assert_eq!(result.is_ok(), allowed, "{from:?} -> {target:?}");
            match result {
                Ok(()) => {
                    assert_eq!(e.status, target);
                    assert_eq!(e.version_number, before.version_number + 1);
                    assert_eq!(e.last_updated_at, T0 + 5);
                }
                Err(err) => {
                    assert_eq!(e, before, "a refused update changes nothing");
                    let expected = if matches!(from, JobStatus::Canceled | JobStatus::Removed) {
                        JobErrorCode::TerminalStateReached
                    } else {
                        JobErrorCode::InvalidStateTransition
                    };
                    assert_eq!(err.code, expected, "{from:?} -> {target:?}");
                    assert_eq!(err.execution_state.map(|s| s.status), Some(from));
                }
            }
        }
    }
}

#[test]
fn in_progress_may_repeat_to_update_details() {
    let mut e = in_status(JobStatus::InProgress);
    for step in 1..=3 {
        let details = BTreeMap::from([("step".to_string(), step.to_string())]);
        e.update(
            &StatusUpdate {
                status: Some(JobStatus::InProgress),
                status_details: Some(details.clone()),
                expected_version: Some(e.version_number),
                ..StatusUpdate::default()
            },
            T0,
        )
        .unwrap();
        assert_eq!(e.status_details, details);
    }
    assert_eq!(e.version_number, 5);
}

#[test]
fn version_and_details_rules() {
    let mut e = in_status(JobStatus::InProgress);
    let err = e
        .update(
            &StatusUpdate {
                status: Some(JobStatus::Succeeded),
                expected_version: Some(1),
                ..StatusUpdate::default()
            },
            T0,
        )
        .unwrap_err();
    assert_eq!(err.code, JobErrorCode::VersionMismatch);
    assert_eq!(
        err.execution_state.unwrap(),
        ExecutionState {
            status: JobStatus::InProgress,
            status_details: BTreeMap::new(),
            version_number: 2
        }
    );
    let eleven: BTreeMap<String, String> = (0..11).map(|i| (i.to_string(), "v".into())).collect();
    let err = e
        .update(
            &StatusUpdate {
                status_details: Some(eleven),
                ..StatusUpdate::default()
            },
            T0,
        )
        .unwrap_err();
    assert_eq!(err.code, JobErrorCode::InvalidRequest);
    let err = e
        .update(
            &StatusUpdate {
                execution_number: Some(9),
                ..to(JobStatus::Succeeded)
            },
            T0,
        )
        .unwrap_err();
    assert_eq!(err.code, JobErrorCode::ResourceNotFound);
    assert_eq!(e.version_number, 2);
}

#[test]
fn timers() {
    // In-progress timer: 10 minutes from IN_PROGRESS.
    let mut e = exec(Some(10));
    assert_eq!(e.deadline(), None, "no timer while QUEUED");
    e.update(&to(JobStatus::InProgress), T0).unwrap();
    assert_eq!(e.deadline(), Some(T0 + 600));
    // A step timer of 2 minutes, then another replaces it.
    let step = |m| StatusUpdate {
        step_timeout_in_minutes: Some(m),
        ..to(JobStatus::InProgress)
    };
    e.update(&step(2), T0 + 60).unwrap();
    assert_eq!(e.deadline(), Some(T0 + 180));
    e.update(&step(3), T0 + 120).unwrap();
    assert_eq!(e.deadline(), Some(T0 + 300));
    // Never past the in-progress deadline.
    e.update(&step(60), T0 + 200).unwrap();
    assert_eq!(e.deadline(), Some(T0 + 600));
    assert!(!e.handle_timeout(T0 + 599));
    assert!(e.handle_timeout(T0 + 600));
    assert_eq!(e.status, JobStatus::TimedOut);
    assert_eq!(e.deadline(), None);
    // Step timer alone, without an in-progress timeout.
    let mut e = exec(None);
    e.update(&step(1), T0).unwrap();
    assert!(e.handle_timeout(T0 + 60));
    assert_eq!(e.status, JobStatus::TimedOut);
}

#[test]
fn cancel_rules() {
    let mut q = in_status(JobStatus::Queued);
    q.cancel(false, T0).unwrap();
    assert_eq!(q.status, JobStatus::Canceled);
    let mut p = in_status(JobStatus::InProgress);
    assert_eq!(
        p.cancel(false, T0).unwrap_err().code,
        JobErrorCode::InvalidStateTransition
    );
    assert_eq!(p.status, JobStatus::InProgress);
    p.cancel(true, T0).unwrap();
    assert_eq!(p.status, JobStatus::Canceled);
    assert_eq!(
        p.update(&to(JobStatus::Succeeded), T0).unwrap_err().code,
        JobErrorCode::TerminalStateReached
    );
    let mut done = in_status(JobStatus::Succeeded);
    assert!(done.cancel(true, T0).is_err());
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn kind_of(m: &JobsMessage) -> String {
    format!("{:?}", m.kind)
}

#[test]
fn service_answers_the_jobs_api() {
    let mut jobs = ThingJobs::new("dev-1");
    // Queueing notifies.
    let msgs = jobs
        .queue(
            JobExecution::new(
                "a",
                "dev-1",
                json!({"n": 1}),
                1,
                TimeoutConfig::default(),
                T0,
            ),
            T0,
        )
        .unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].kind, JobsTopicKind::Notify);
    assert_eq!(parse(&msgs[0].payload)["jobs"]["QUEUED"][0]["jobId"], "a");
    assert_eq!(msgs[1].kind, JobsTopicKind::NotifyNext);
    assert_eq!(
        parse(&msgs[1].payload)["execution"]["jobDocument"],
        json!({"n": 1})
    );
    // A second job changes the list but not the next.
    let msgs = jobs
        .queue(
            JobExecution::new(
                "b",
                "dev-1",
                json!({"n": 2}),
                1,
                TimeoutConfig::default(),
                T0 + 1,
            ),
            T0 + 1,
        )
        .unwrap();
    assert_eq!(msgs.len(), 1);

    let get = jobs.handle_request(
        &JobsTopicKind::GetPending(Role::Request),
        br#"{"clientToken":"g"}"#,
        T0 + 2,
    );
    let body = parse(&get[0].payload);
    assert_eq!(get[0].kind, JobsTopicKind::GetPending(Role::Accepted));
    assert_eq!(body["queuedJobs"].as_array().unwrap().len(), 2);
    assert_eq!(body["clientToken"], "g");
    assert_eq!(body["timestamp"], T0 + 2);

    // start-next starts the oldest QUEUED job.
    let start = jobs.handle_request(
        &JobsTopicKind::StartNext(Role::Request),
        br#"{"clientToken":"s"}"#,
        T0 + 3,
    );
    let body = parse(&start[0].payload);
    assert_eq!(body["execution"]["jobId"], "a");
    assert_eq!(body["execution"]["status"], "IN_PROGRESS");
    assert_eq!(body["execution"]["versionNumber"], 2);
    assert_eq!(body["clientToken"], "s");
    // ...and again returns the IN_PROGRESS one (a restarted device resumes).
    let again = jobs.handle_request(&JobsTopicKind::StartNext(Role::Request), b"", T0 + 4);
    assert_eq!(parse(&again[0].payload)["execution"]["jobId"], "a");

    let id = JobId::new("a").unwrap().into_owned();
    let update = jobs.handle_request(
        &JobsTopicKind::Update(id.clone(), Role::Request),
        br#"{"status":"SUCCEEDED","expectedVersion":2,"includeJobExecutionState":true,"clientToken":"u"}"#,
        T0 + 5,
    );
    assert_eq!(
        update[0].kind,
        JobsTopicKind::Update(id.clone(), Role::Accepted)
    );
    let body = parse(&update[0].payload);
    assert_eq!(body["executionState"]["status"], "SUCCEEDED");
    assert_eq!(body["executionState"]["versionNumber"], 3);
    // The next job is announced.
    assert!(
        update.iter().any(|m| m.kind == JobsTopicKind::NotifyNext
            && parse(&m.payload)["execution"]["jobId"] == "b")
    );

    // A stale version is refused with the state, and changes nothing.
    let before = jobs.clone();
    let refused = jobs.handle_request(
        &JobsTopicKind::Update(id.clone(), Role::Request),
        br#"{"status":"FAILED","expectedVersion":2,"clientToken":"late"}"#,
        T0 + 6,
    );
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].kind,
        JobsTopicKind::Update(id.clone(), Role::Rejected)
    );
    let body = parse(&refused[0].payload);
    assert_eq!(body["code"], "VersionMismatch");
    assert_eq!(body["clientToken"], "late");
    assert_eq!(body["executionState"]["status"], "SUCCEEDED");
    assert_eq!(jobs, before);

    // Describe: an execution in a terminal state is refused with AWS's
    // TerminalStateReached ("a command to describe a job is performed on a
    // job that is in a terminal state"); a pending one is described.
    let before = jobs.clone();
    let d = jobs.handle_request(
        &JobsTopicKind::Describe(id.clone(), Role::Request),
        br#"{"includeJobDocument":false,"clientToken":"d"}"#,
        T0 + 7,
    );
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].kind,
        JobsTopicKind::Describe(id.clone(), Role::Rejected)
    );
    let body = parse(&d[0].payload);
    assert_eq!(body["code"], "TerminalStateReached");
    assert_eq!(body["clientToken"], "d");
    assert_eq!(jobs, before);
    let b = JobId::new("b").unwrap().into_owned();
    let d = jobs.handle_request(
        &JobsTopicKind::Describe(b.clone(), Role::Request),
        br#"{"includeJobDocument":false}"#,
        T0 + 7,
    );
    assert_eq!(d[0].kind, JobsTopicKind::Describe(b, Role::Accepted));
    let body = parse(&d[0].payload);
    assert_eq!(body["execution"]["status"], "QUEUED");
    assert!(body["execution"].get("jobDocument").is_none());
    let missing = JobId::new("zz").unwrap().into_owned();
    let d = jobs.handle_request(&JobsTopicKind::Describe(missing, Role::Request), b"{}", T0);
    assert_eq!(parse(&d[0].payload)["code"], "ResourceNotFound");

    // Bad input.
    for (payload, code) in [
        (&b"{nope"[..], "InvalidJson"),
        (br#"{"status":"DONE"}"#, "InvalidRequest"),
        (
            br#"{"status":"SUCCEEDED","expectedVersion":"x"}"#,
            "InvalidRequest",
        ),
        (br#"{"clientToken":5}"#, "InvalidRequest"),
    ] {
        let out = jobs.handle_request(
            &JobsTopicKind::Update(id.clone(), Role::Request),
            payload,
            T0,
        );
        assert_eq!(parse(&out[0].payload)["code"], code, "{}", kind_of(&out[0]));
    }
    assert_eq!(jobs, before);
}

#[test]
fn a_retried_update_is_answered_again_not_applied_twice() {
    let mut jobs = ThingJobs::new("dev-1");
    for (job, at) in [("a", T0), ("b", T0 + 1)] {
        let e = JobExecution::new(job, "dev-1", json!({}), 1, TimeoutConfig::default(), at);
        jobs.queue(e, at).unwrap();
    }
    jobs.handle_request(&JobsTopicKind::StartNext(Role::Request), b"{}", T0 + 2);
    let id = JobId::new("a").unwrap().into_owned();
    let topic = JobsTopicKind::Update(id.clone(), Role::Request);
    let accepted = JobsTopicKind::Update(id.clone(), Role::Accepted);

    // A progress update, then its retry (the answer was lost): the retry
    // gets the same answer, and neither the version nor the step timer
    // moves again.
    let progress = br#"{"status":"IN_PROGRESS","statusDetails":{"step":"1"},"expectedVersion":2,"stepTimeoutInMinutes":5,"includeJobExecutionState":true,"clientToken":"p1"}"#;
    let first = jobs.handle_request(&topic, progress, T0 + 3);
    assert_eq!(first[0].kind, accepted);
    assert_eq!(
        parse(&first[0].payload)["executionState"]["versionNumber"],
        3
    );
    let after_first = jobs.clone();
    let retry = jobs.handle_request(&topic, progress, T0 + 300);
    assert_eq!(retry.len(), 1, "a retry notifies nothing");
    assert_eq!(retry[0], first[0]);
    assert_eq!(jobs, after_first);

    // The terminal update and its retry, at another time: answered again
    // (not refused as a move from a terminal state), nothing changes.
    let done = br#"{"status":"SUCCEEDED","expectedVersion":3,"includeJobExecutionState":true,"clientToken":"d1"}"#;
    let first = jobs.handle_request(&topic, done, T0 + 4);
    assert_eq!(first[0].kind, accepted);
    assert!(first.iter().any(|m| m.kind == JobsTopicKind::NotifyNext));
    let after_done = jobs.clone();
    let retry = jobs.handle_request(&topic, done, T0 + 60);
    assert_eq!(retry, vec![first[0].clone()]);
    assert_eq!(jobs, after_done);
    assert_eq!(jobs.execution("a").unwrap().version_number, 4);

    // The kept answer survives the store (the retry may reach another
    // instance, which loads the executions from the database).
    let stored = serde_json::to_vec(&jobs).unwrap();
    let mut reloaded: ThingJobs = serde_json::from_slice(&stored).unwrap();
    assert_eq!(reloaded, jobs);
    let retry = reloaded.handle_request(&topic, done, T0 + 61);
    assert_eq!(retry, vec![first[0].clone()]);

    // The same token with other bytes is a new request: refused here.
    let other = br#"{"status":"FAILED","expectedVersion":3,"clientToken":"d1"}"#;
    let refused = jobs.handle_request(&topic, other, T0 + 62);
    assert_eq!(
        refused[0].kind,
        JobsTopicKind::Update(id.clone(), Role::Rejected)
    );
    // Without a token there is nothing to recognise a retry by: each
    // request is applied (version 1 -> 2 -> 3).
    let untokened = br#"{"status":"IN_PROGRESS"}"#;
    let topic_b = JobsTopicKind::Update(JobId::new("b").unwrap().into_owned(), Role::Request);
    jobs.handle_request(&topic_b, untokened, T0 + 63);
    jobs.handle_request(&topic_b, untokened, T0 + 64);
    assert_eq!(jobs.execution("b").unwrap().version_number, 3);
}

#[test]
fn service_times_out_without_device_messages() {
    let mut jobs = ThingJobs::new("dev-1");
    jobs.queue(
        JobExecution::new(
            "a",
            "dev-1",
            json!({}),
            1,
            TimeoutConfig {
                in_progress_timeout_in_minutes: Some(1),
            },
            T0,
        ),
        T0,
    )
    .unwrap();
    jobs.handle_request(&JobsTopicKind::StartNext(Role::Request), b"", T0);
    assert_eq!(jobs.next_deadline(), Some(T0 + 60));
    let msgs = jobs.handle_timeout(T0 + 60);
    assert_eq!(jobs.execution("a").unwrap().status, JobStatus::TimedOut);
    assert!(msgs.iter().any(|m| m.kind == JobsTopicKind::NotifyNext));
    assert_eq!(jobs.next_deadline(), None);
}

fn queued(job: &str, now: u64) -> JobExecution {
    JobExecution::new(
        job,
        "dev-1",
        json!({"job": job}),
        1,
        TimeoutConfig::default(),
        now,
    )
}

fn next_named(msgs: &[JobsMessage]) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m.kind == JobsTopicKind::NotifyNext)
        .map(|m| parse(&m.payload)["execution"]["jobId"].clone())
        .collect()
}

#[test]
fn a_queued_execution_the_device_never_asks_about_is_reminded() {
    let mut jobs = ThingJobs::new("dev-1");
    // The notice of the queue is lost (its sender died, say).
    jobs.queue(queued("a", T0), T0).unwrap();
    let mut at = T0;
    for after in REMINDERS {
        at += after;
        assert_eq!(jobs.next_deadline(), Some(at));
        assert!(
            jobs.handle_timeout(at - 1).is_empty(),
            "not before it is due"
        );
        assert_eq!(next_named(&jobs.handle_timeout(at)), [json!("a")]);
    }
    // After the last reminder: silence (the device asks when it reconnects).
    assert_eq!(jobs.next_deadline(), None);
    assert!(jobs.handle_timeout(at + 100_000).is_empty());
    assert_eq!(jobs.execution("a").unwrap().status, JobStatus::Queued);

    // The stored form round-trips with its reminder; a record stored
    // before reminders existed reads as one without.
    let mut fresh = ThingJobs::new("dev-1");
    fresh.queue(queued("a", T0), T0).unwrap();
    let text = serde_json::to_string(&fresh).unwrap();
    let back: ThingJobs = serde_json::from_str(&text).unwrap();
    assert_eq!(back, fresh);
    assert_eq!(back.next_deadline(), Some(T0 + REMINDERS[0]));
    let mut old: Value = serde_json::from_str(&text).unwrap();
    old.as_object_mut().unwrap().remove("reminder").unwrap();
    let old: ThingJobs = serde_json::from_value(old).unwrap();
    assert_eq!(old.next_deadline(), None);
}

#[test]
fn reminders_stop_once_the_device_knows_and_follow_the_next_job() {
    // Starting the job ends them.
    let mut jobs = ThingJobs::new("dev-1");
    jobs.queue(queued("a", T0), T0).unwrap();
    jobs.queue(queued("b", T0 + 1), T0 + 1).unwrap();
    assert_eq!(jobs.next_deadline(), Some(T0 + REMINDERS[0]), "for a, once");
    jobs.handle_request(&JobsTopicKind::StartNext(Role::Request), b"", T0 + 5);
    assert_eq!(jobs.next_deadline(), None);
    // Its end makes b the next: b is announced, and reminded of later.
    let a = JobId::new("a").unwrap().into_owned();
    let out = jobs.handle_request(
        &JobsTopicKind::Update(a, Role::Request),
        br#"{"status":"SUCCEEDED"}"#,
        T0 + 10,
    );
    assert_eq!(next_named(&out), [json!("b")]);
    assert_eq!(jobs.next_deadline(), Some(T0 + 10 + REMINDERS[0]));
    let out = jobs.handle_timeout(T0 + 10 + REMINDERS[0]);
    assert_eq!(next_named(&out), [json!("b")]);

    // Asking for the pending jobs ends them too: the device knows.
    for ask in [
        JobsTopicKind::GetPending(Role::Request),
        JobsTopicKind::DescribeNext(Role::Request),
    ] {
        let mut jobs = ThingJobs::new("dev-1");
        jobs.queue(queued("a", T0), T0).unwrap();
        let out = jobs.handle_request(&ask, b"{}", T0 + 1);
        assert!(
            kind_of(&out[0]).ends_with("Accepted)"),
            "{}",
            kind_of(&out[0])
        );
        assert_eq!(jobs.next_deadline(), None, "{ask:?}");
        assert!(jobs.handle_timeout(T0 + 10_000).is_empty());
        // A refused request is no sign of anything: nothing changes.
        let mut jobs = ThingJobs::new("dev-1");
        jobs.queue(queued("a", T0), T0).unwrap();
        let before = jobs.clone();
        jobs.handle_request(&ask, b"{nope", T0 + 1);
        assert_eq!(jobs, before);
    }

    // A canceled next job: the reminder moves to the one after it.
    let mut jobs = ThingJobs::new("dev-1");
    jobs.queue(queued("a", T0), T0).unwrap();
    jobs.queue(queued("b", T0), T0).unwrap();
    jobs.cancel("a", false, T0 + 20).unwrap();
    assert_eq!(jobs.next_deadline(), Some(T0 + 20 + REMINDERS[0]));
    assert_eq!(
        next_named(&jobs.handle_timeout(T0 + 20 + REMINDERS[0])),
        [json!("b")]
    );
    jobs.cancel("b", false, T0 + 60).unwrap();
    assert_eq!(jobs.next_deadline(), None);
}

#[test]
fn next_get_describes_the_next_pending_execution() {
    let mut jobs = ThingJobs::new("dev-1");
    let next = JobsTopicKind::DescribeNext(Role::Request);
    // Nothing pending: accepted, with no execution.
    let out = jobs.handle_request(&next, br#"{"clientToken":"n0"}"#, T0);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].kind, JobsTopicKind::DescribeNext(Role::Accepted));
    let body = parse(&out[0].payload);
    assert!(body.get("execution").is_none(), "{body}");
    assert_eq!(body["clientToken"], "n0");

    jobs.queue(queued("a", T0), T0).unwrap();
    jobs.queue(queued("b", T0), T0).unwrap();
    let out = jobs.handle_request(&next, br#"{"clientToken":"n1"}"#, T0 + 1);
    let body = parse(&out[0].payload);
    assert_eq!(body["execution"]["jobId"], "a");
    assert_eq!(body["execution"]["status"], "QUEUED");
    assert_eq!(body["execution"]["jobDocument"], json!({"job": "a"}));
    // Describing does not start it.
    assert_eq!(jobs.execution("a").unwrap().status, JobStatus::Queued);
    let out = jobs.handle_request(&next, br#"{"includeJobDocument":false}"#, T0 + 2);
    assert!(
        parse(&out[0].payload)["execution"]
            .get("jobDocument")
            .is_none()
    );
    // The IN_PROGRESS one comes first.
    let b = JobId::new("b").unwrap().into_owned();
    jobs.handle_request(
        &JobsTopicKind::Update(b, Role::Request),
        br#"{"status":"IN_PROGRESS"}"#,
        T0 + 3,
    );
    let out = jobs.handle_request(&next, b"", T0 + 4);
    assert_eq!(parse(&out[0].payload)["execution"]["jobId"], "b");
    // Bad input is refused on $next/get/rejected.
    let out = jobs.handle_request(&next, br#"{"includeJobDocument":"yes"}"#, T0 + 5);
    assert_eq!(out[0].kind, JobsTopicKind::DescribeNext(Role::Rejected));
    assert_eq!(parse(&out[0].payload)["code"], "InvalidRequest");
}

// ---- documents and commands ------------------------------------------------

#[test]
fn ota_job_documents() {
    let job = OtaJob::new(
        b"FLE1 envelope bytes",
        ImageSource::Stream("img-1".into()),
        b"nonce-1",
    );
    let value = job.to_value();
    assert_eq!(value["operation"], "fleet.ota");
    assert_eq!(value["image"], json!({"stream": "img-1"}));
    let JobDocument::Ota(back) = JobDocument::parse(&value).unwrap() else {
        panic!("an OTA document")
    };
    assert_eq!(back.manifest_bytes().unwrap(), b"FLE1 envelope bytes");
    assert_eq!(back.nonce_bytes().unwrap(), b"nonce-1");
    assert_eq!(
        JobDocument::parse(&json!({"op": "reboot"})).unwrap(),
        JobDocument::Other(json!({"op": "reboot"}))
    );
    assert_eq!(
        JobDocument::parse(&json!({"operation": "fleet.ota", "manifest": "!!"})),
        Err(DocumentError::InvalidOtaJob)
    );
    let mut bad = value.clone();
    bad["nonce"] = json!("not base64!");
    assert_eq!(JobDocument::parse(&bad), Err(DocumentError::BadEncoding));
}

#[test]
fn pending_commands_use_bounded_memory() {
    let mut cloud = PendingCommands::with_limits(2, 3);
    cloud.send("d", "c1", "x", json!(null), T0 + 10).unwrap();
    cloud.send("d", "c2", "x", json!(null), T0 + 10).unwrap();
    assert_eq!(
        cloud.send("d", "c3", "x", json!(null), T0 + 10),
        Err(CommandError::TooManyPending)
    );
    assert_eq!(cloud.state("c3"), None, "a refused command is not recorded");
    // An answer frees a place; its outcome stays readable.
    let answer = |id: &str| {
        serde_json::to_vec(&json!({"executionId": id, "status": "SUCCEEDED", "result": null}))
            .unwrap()
    };
    assert!(matches!(
        cloud.handle_response(T0 + 1, "d", &answer("c1")),
        Ok(CommandState::Done(_))
    ));
    cloud.send("d", "c3", "x", json!(null), T0 + 10).unwrap();
    assert_eq!(cloud.pending(), 2);
    // Finished outcomes beyond the limit are forgotten, oldest first.
    assert_eq!(cloud.handle_timeout(T0 + 11).len(), 2);
    cloud.send("d", "c4", "x", json!(null), T0 + 20).unwrap();
    assert!(cloud.expire("c4"));
    assert_eq!(cloud.state("c1"), None);
    assert_eq!(cloud.state("c2"), Some(&CommandState::TimedOut));
    assert_eq!(cloud.state("c4"), Some(&CommandState::TimedOut));
    assert_eq!(cloud.pending(), 0);
}

#[test]
fn commands_run_once_and_never_answer_late() {
    let mut cloud = PendingCommands::new();
    let request = cloud
        .send("dev-1", "cmd-1", "reboot", json!({"delay": 5}), T0 + 30)
        .unwrap();
    assert_eq!(
        cloud.send("dev-1", "cmd-1", "x", json!(null), T0),
        Err(CommandError::Duplicate)
    );
    assert_eq!(
        cloud.send("dev-1", "bad/id", "x", json!(null), T0),
        Err(CommandError::InvalidExecutionId)
    );

    let mut inbox = CommandInbox::new(16);
    let Delivery::Run(r) = inbox.handle_request(T0, &request).unwrap() else {
        panic!("first delivery runs")
    };
    assert_eq!(
        (r.command.as_str(), r.payload["delay"].as_u64()),
        ("reboot", Some(5))
    );
    // Redelivered before the answer: not run again, nothing to resend yet.
    assert_eq!(
        inbox.handle_request(T0 + 1, &request).unwrap(),
        Delivery::Duplicate { resend: None }
    );
    let answer = inbox
        .respond(
            T0 + 2,
            "cmd-1",
            CommandStatus::Succeeded,
            json!({"ok": true}),
        )
        .unwrap();
    assert_eq!(
        inbox.respond(T0 + 2, "cmd-1", CommandStatus::Failed, json!(null)),
        Err(CommandError::AlreadyAnswered)
    );
    // Redelivered after: the same answer again.
    assert_eq!(
        inbox.handle_request(T0 + 3, &request).unwrap(),
        Delivery::Duplicate {
            resend: Some(answer.clone())
        }
    );
    // Only the thing asked may answer.
    assert_eq!(
        cloud.handle_response(T0 + 3, "dev-2", &answer),
        Err(CommandError::Unknown)
    );
    let state = cloud.handle_response(T0 + 3, "dev-1", &answer).unwrap();
    assert!(matches!(state, CommandState::Done(r) if r.status == CommandStatus::Succeeded));

    // A late command: not run; a late answer: refused on both sides.
    let late = cloud
        .send("dev-1", "cmd-2", "x", json!(null), T0 + 10)
        .unwrap();
    assert_eq!(
        inbox.handle_request(T0 + 11, &late).unwrap(),
        Delivery::Expired
    );
    let slow = cloud
        .send("dev-1", "cmd-3", "x", json!(null), T0 + 10)
        .unwrap();
    assert!(matches!(
        inbox.handle_request(T0 + 5, &slow).unwrap(),
        Delivery::Run(_)
    ));
    assert_eq!(
        inbox.respond(T0 + 11, "cmd-3", CommandStatus::Succeeded, json!(null)),
        Err(CommandError::PastDeadline)
    );
    assert_eq!(cloud.poll_timeout(), Some(T0 + 11));
    assert_eq!(
        cloud.handle_timeout(T0 + 11),
        vec!["cmd-2".to_string(), "cmd-3".to_string()]
    );
    assert_eq!(cloud.state("cmd-3"), Some(&CommandState::TimedOut));
    assert_eq!(
        inbox.handle_request(T0, b"{}"),
        Err(CommandError::InvalidPayload)
    );
}

// ---- rollout planner -------------------------------------------------------

fn policy(rate: u32) -> RolloutPolicy {
    RolloutPolicy {
        rate: RateLimit::Constant { per_minute: rate },
        groups: Vec::new(),
        abort: Vec::new(),
        retry: RetryPolicy::default(),
        in_progress_timeout_secs: None,
    }
}

fn control() -> RolloutControl {
    RolloutControl {
        open_groups: 1,
        paused: false,
        aborted: false,
    }
}

/// Applies a decision the way the orchestrator does.
fn apply(targets: &mut [Target], d: &Decision, now: u64) {
    for &i in d.release.iter().chain(&d.retry) {
        targets[i].status = TargetStatus::Queued;
        targets[i].attempts += 1;
        targets[i].released_at = Some(now);
        targets[i].started_at = None;
    }
    for &i in &d.time_out {
        targets[i].status = TargetStatus::TimedOut;
    }
    if d.cancel_queued {
        for t in targets
            .iter_mut()
            .filter(|t| t.status == TargetStatus::Queued)
        {
            t.status = TargetStatus::Canceled;
        }
    }
}

#[test]
fn rollout_policies_read_from_json() {
    let p: RolloutPolicy =
        serde_json::from_str(r#"{"rate":{"constant":{"perMinute":600}}}"#).unwrap();
    assert_eq!(p.rate, RateLimit::Constant { per_minute: 600 });
    assert!(p.groups.is_empty() && p.abort.is_empty());
    assert_eq!(p.retry, RetryPolicy::default());
    // The form stored by earlier versions still reads.
    let old = r#"{"rate":{"exponential":{"base_per_minute":10,"increment_factor_permille":2000,"criterion":{"notified":5},"max_per_minute":100}},"groups":[],"abort":[],"retry":{"failed":0,"timedOut":0},"inProgressTimeoutSecs":null}"#;
    let p: RolloutPolicy = serde_json::from_str(old).unwrap();
    let again: RolloutPolicy = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
    assert_eq!(p, again);
    assert!(
        serde_json::to_string(&p)
            .unwrap()
            .contains("\"basePerMinute\":10")
    );
    assert!(serde_json::from_str::<RolloutPolicy>(r#"{"rate":"fast"}"#).is_err());
}

#[test]
fn releases_are_spread_over_the_minute() {
    // 3,000 a minute: 50 a second, not 3,000 at once.
    let p = policy(3000);
    let mut targets = vec![Target::PENDING; 1000];
    let d = plan(&p, &targets, control(), &[], T0);
    assert_eq!(d.release, (0..50).collect::<Vec<_>>());
    apply(&mut targets, &d, T0);
    let mut recent = vec![T0; 50];
    let again = plan(&p, &targets, d.control, &recent, T0);
    assert!(again.release.is_empty());
    assert_eq!(again.wake_at, Some(T0 + 1), "the next second");
    let next = plan(&p, &targets, d.control, &recent, T0 + 1);
    assert_eq!(next.release, (50..100).collect::<Vec<_>>());
    // A slow rate still releases one a second until its minute is full.
    let p = policy(3);
    let targets = vec![Target::PENDING; 10];
    recent = vec![T0, T0 + 1, T0 + 2];
    let d = plan(&p, &targets, control(), &recent[..2], T0 + 2);
    assert_eq!(d.release.len(), 1);
    let d = plan(&p, &targets, control(), &recent, T0 + 3);
    assert!(d.release.is_empty());
    assert_eq!(
        d.wake_at,
        Some(T0 + 60),
        "when the oldest leaves the window"
    );
}

#[test]
fn groups_open_in_order_and_pause_for_approval() {
    let mut p = policy(600);
    p.groups = vec![
        RolloutGroup {
            size: 2,
            success_percent: 100,
            on_success: GroupAction::NextGroup,
            error_threshold: None,
        },
        RolloutGroup {
            size: 3,
            success_percent: 50,
            on_success: GroupAction::Pause,
            error_threshold: None,
        },
    ];
    let mut targets = vec![Target::PENDING; 8];
    let d = plan(&p, &targets, control(), &[], T0);
    assert_eq!(d.release, vec![0, 1]);
    apply(&mut targets, &d, T0);
    targets[0].status = TargetStatus::Succeeded;
    assert!(
        plan(&p, &targets, d.control, &[], T0 + 1)
            .release
            .is_empty()
    );
    targets[1].status = TargetStatus::Succeeded;
    let d = plan(&p, &targets, d.control, &[], T0 + 2);
    assert_eq!(d.release, vec![2, 3, 4]);
    assert_eq!(d.control.open_groups, 2);
    apply(&mut targets, &d, T0 + 2);
    targets[2].status = TargetStatus::Succeeded;
    targets[3].status = TargetStatus::Succeeded;
    let d = plan(&p, &targets, d.control, &[], T0 + 3);
    assert_eq!(d.status, Some(RolloutStatus::AwaitingApproval(1)));
    assert!(d.release.is_empty());
    // The operator approves: the last (implicit) group opens.
    let approved = RolloutControl {
        open_groups: d.control.open_groups + 1,
        ..d.control
    };
    let d = plan(&p, &targets, approved, &[], T0 + 4);
    assert_eq!(d.release, vec![5, 6, 7]);
}

#[test]
fn group_error_threshold_aborts() {
    let mut p = policy(600);
    p.groups = vec![RolloutGroup {
        size: 4,
        success_percent: 100,
        on_success: GroupAction::NextGroup,
        error_threshold: Some(Threshold::Count(2)),
    }];
    let mut targets = vec![Target::PENDING; 6];
    let d = plan(&p, &targets, control(), &[], T0);
    apply(&mut targets, &d, T0);
    targets[0].status = TargetStatus::Failed;
    assert!(!plan(&p, &targets, control(), &[], T0).cancel_queued);
    targets[1].status = TargetStatus::Rejected;
    let d = plan(&p, &targets, control(), &[], T0);
    assert_eq!(
        d.status,
        Some(RolloutStatus::Aborted(AbortReason::GroupErrors(0)))
    );
    assert!(d.cancel_queued && d.control.aborted);
    apply(&mut targets, &d, T0);
    assert_eq!(
        targets[2].status,
        TargetStatus::Canceled,
        "QUEUED executions are canceled"
    );
    assert_eq!(
        targets[4].status,
        TargetStatus::Pending,
        "nothing else is released"
    );
}

#[test]
fn exponential_rate_grows_with_notified_devices() {
    let p = RolloutPolicy {
        rate: RateLimit::Exponential {
            base_per_minute: 2,
            increment_factor_permille: 2000,
            criterion: RateIncrease::Notified(4),
            max_per_minute: 10,
        },
        ..policy(0)
    };
    let mut targets = vec![Target::PENDING; 40];
    assert_eq!(current_rate(&p, &targets), 2);
    for t in targets.iter_mut().take(4) {
        t.attempts = 1;
    }
    assert_eq!(current_rate(&p, &targets), 4);
    for t in targets.iter_mut().take(8) {
        t.attempts = 1;
    }
    assert_eq!(current_rate(&p, &targets), 8);
    for t in targets.iter_mut().take(12) {
        t.attempts = 1;
    }
    assert_eq!(current_rate(&p, &targets), 10, "capped");
}

#[test]
fn retries_and_stuck_executions() {
    let mut p = policy(100);
    p.retry = RetryPolicy {
        failed: 1,
        timed_out: 0,
    };
    p.in_progress_timeout_secs = Some(300);
    let mut targets = vec![Target::PENDING; 2];
    let d = plan(&p, &targets, control(), &[], T0);
    apply(&mut targets, &d, T0);
    targets[0].status = TargetStatus::Failed;
    targets[1].status = TargetStatus::InProgress;
    targets[1].started_at = Some(T0);
    let d = plan(&p, &targets, control(), &[], T0 + 100);
    assert_eq!(d.retry, vec![0]);
    assert_eq!(d.wake_at, Some(T0 + 300));
    apply(&mut targets, &d, T0 + 100);
    targets[0].status = TargetStatus::Failed;
    let d = plan(&p, &targets, control(), &[], T0 + 300);
    assert!(d.retry.is_empty(), "one retry only");
    assert_eq!(d.time_out, vec![1]);
    apply(&mut targets, &d, T0 + 300);
    assert_eq!(
        plan(&p, &targets, control(), &[], T0 + 301).status,
        Some(RolloutStatus::Completed)
    );
}

fn arb_status() -> impl Strategy<Value = TargetStatus> {
    prop_oneof![
        Just(TargetStatus::Pending),
        Just(TargetStatus::Queued),
        Just(TargetStatus::InProgress),
        Just(TargetStatus::Succeeded),
        Just(TargetStatus::Failed),
        Just(TargetStatus::TimedOut),
        Just(TargetStatus::Rejected),
        Just(TargetStatus::Canceled),
    ]
}

fn arb_policy() -> impl Strategy<Value = RolloutPolicy> {
    let rate = prop_oneof![
        (1u32..20).prop_map(|per_minute| RateLimit::Constant { per_minute }),
        (1u32..5, 1000u32..3000, 1u32..10, 1u32..30).prop_map(|(b, f, n, m)| {
            RateLimit::Exponential {
                base_per_minute: b,
                increment_factor_permille: f,
                criterion: RateIncrease::Notified(n),
                max_per_minute: m,
            }
        }),
    ];
    let group = (1u32..10, 0u8..=100, any::<bool>()).prop_map(|(size, pct, pause)| RolloutGroup {
        size,
        success_percent: pct,
        on_success: if pause {
            GroupAction::Pause
        } else {
            GroupAction::NextGroup
        },
        error_threshold: None,
    });
    (rate, proptest::collection::vec(group, 0..3), 0u8..3, 0u8..2).prop_map(
        |(rate, groups, f, t)| RolloutPolicy {
            rate,
            groups,
            abort: Vec::new(),
            retry: RetryPolicy {
                failed: f,
                timed_out: t,
            },
            in_progress_timeout_secs: Some(600),
        },
    )
}

proptest! {
    #[test]
    fn releases_never_exceed_the_rate_and_every_target_ends_once(
        p in arb_policy(),
        n in 1usize..40,
        seed in any::<u64>(),
    ) {
        let mut rng = seed | 1;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut targets = vec![Target::PENDING; n];
        let mut ctl = control();
        let mut now = T0;
        let mut releases: Vec<(u64, u32)> = Vec::new(); // (time, rate then)
        for _ in 0..2000 {
            let log: Vec<u64> = releases.iter().map(|r| r.0).collect();
            let d = plan(&p, &targets, ctl, &log, now);
            let rate = current_rate(&p, &targets);
            for _ in d.release.iter().chain(&d.retry) {
                releases.push((now, rate));
            }
            apply(&mut targets, &d, now);
            ctl = d.control;
            match d.status {
                Some(RolloutStatus::Completed) => break,
                Some(RolloutStatus::AwaitingApproval(_)) => ctl.open_groups += 1,
                _ => {}
            }
            // Devices make progress.
            for t in targets.iter_mut() {
                match t.status {
                    TargetStatus::Queued if next() % 3 == 0 => {
                        t.status = TargetStatus::InProgress;
                        t.started_at = Some(now);
                    }
                    TargetStatus::InProgress if next() % 4 == 0 => {
                        t.status = match next() % 6 {
                            0 => TargetStatus::Failed,
                            1 => TargetStatus::Rejected,
                            _ => TargetStatus::Succeeded,
                        };
                    }
                    _ => {}
                }
            }
            now += 1 + next() % 40;
        }
        // The rate: no 60-second window holds more releases than the
        // highest rate in force during it.
        for (i, &(t, _)) in releases.iter().enumerate() {
            let window: Vec<_> = releases[i..].iter().take_while(|(r, _)| *r < t + 60).collect();
            let max_rate = window.iter().map(|(_, r)| *r).max().unwrap_or(0) as usize;
            prop_assert!(window.len() <= max_rate, "{} releases in a minute at rate {}", window.len(), max_rate);
        }
        // Every target ended in exactly one terminal state.
        prop_assert!(targets.iter().all(|t| t.status.is_terminal()), "{:?}", targets);
        prop_assert!(plan(&p, &targets, ctl, &[], now).release.is_empty());
    }

    #[test]
    fn abort_triggers_exactly_at_the_threshold(
        statuses in proptest::collection::vec(arb_status(), 1..60),
        pct in 1u8..=100,
        min in 0u32..30,
        failure in prop_oneof![Just(FailureType::Failed), Just(FailureType::Rejected), Just(FailureType::TimedOut), Just(FailureType::All)],
    ) {
        let mut p = policy(10);
        p.abort = vec![AbortCriterion { failure, threshold_percent: pct, min_executed: min }];
        let targets: Vec<Target> = statuses.iter().map(|&status| Target { status, attempts: 1, released_at: Some(T0), started_at: Some(T0) }).collect();
        let finished = statuses.iter().filter(|s| s.is_terminal()).count();
        let failed = statuses.iter().filter(|s| match failure {
            FailureType::Failed => **s == TargetStatus::Failed,
            FailureType::Rejected => **s == TargetStatus::Rejected,
            FailureType::TimedOut => **s == TargetStatus::TimedOut,
            FailureType::All => matches!(s, TargetStatus::Failed | TargetStatus::Rejected | TargetStatus::TimedOut),
        }).count();
        let expected = finished > 0 && finished >= min as usize && failed * 100 >= usize::from(pct) * finished;
        let d = plan(&p, &targets, control(), &[], T0);
        prop_assert_eq!(d.cancel_queued, expected);
        prop_assert_eq!(matches!(d.status, Some(RolloutStatus::Aborted(AbortReason::Criterion(0)))), expected);
        if expected {
            prop_assert!(d.release.is_empty() && d.retry.is_empty());
        }
    }

    #[test]
    fn a_paused_rollout_releases_nothing(
        statuses in proptest::collection::vec(arb_status(), 1..40),
        p in arb_policy(),
    ) {
        let targets: Vec<Target> = statuses.iter().map(|&status| Target { status, attempts: 1, released_at: None, started_at: Some(T0) }).collect();
        let ctl = RolloutControl { open_groups: 9, paused: true, aborted: false };
        let d = plan(&p, &targets, ctl, &[], T0 + 10_000);
        prop_assert!(d.release.is_empty());
        prop_assert!(d.retry.is_empty());
    }
}

// ---- JobRunner against the service ----------------------------------------

mod sim {
    use std::collections::BTreeMap;
    use std::format;

    use super::*;
    use crate::identity::ThingName;
    use crate::testutil::SimRng;
    use crate::time::Instant;
    use crate::topic::{JobsTopic, Topic, TopicPrefix};
    use crate::transmit::Transmit;
    use core::time::Duration;

    #[derive(Clone)]
    enum Wire {
        Up(String, Vec<u8>),
        Down(String, Vec<u8>),
    }

    struct World {
        now: Instant,
        rng: SimRng,
        loss: u64,
        dup: u64,
        jitter: u64,
        service: ThingJobs,
        runner: JobRunner,
        wire: BTreeMap<(Instant, u64), Wire>,
        seq: u64,
        connected: bool,
        reconnect_at: Option<Instant>,
        subscribed_at: Option<Instant>,
        /// Jobs handed to the device application, with how often.
        handed: BTreeMap<String, u32>,
        /// Jobs the runner reported as canceled.
        canceled: Vec<String>,
        /// The device application's work: job id -> when it finishes.
        working: Option<(String, Instant)>,
        session: u64,
    }

    impl World {
        fn new(seed: u64) -> Self {
            let thing = ThingName::new("dev-1").unwrap().into_owned();
            let config = RunnerConfig {
                request_timeout: Duration::from_secs(2),
                // Well inside the healing period of the runs.
                idle_poll_interval: Some(Duration::from_secs(30)),
                ..RunnerConfig::default()
            };
            Self {
                now: Instant::ZERO,
                rng: SimRng::new(seed),
                loss: 0,
                dup: 0,
                jitter: 0,
                service: ThingJobs::new("dev-1"),
                runner: JobRunner::new(thing, config, seed),
                wire: BTreeMap::new(),
                seq: 0,
                connected: false,
                reconnect_at: Some(Instant::ZERO),
                subscribed_at: None,
                handed: BTreeMap::new(),
                canceled: Vec::new(),
                working: None,
                session: seed,
            }
        }

        fn epoch(&self) -> u64 {
            T0 + self.now.as_millis() / 1000
        }

        fn send(&mut self, w: Wire) {
            if !self.connected || self.rng.chance(self.loss) {
                return;
            }
            let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.now + Duration::from_millis(5 + self.rng.next() % (self.jitter + 1));
                self.seq += 1;
                self.wire.insert((at, self.seq), w.clone());
            }
        }

        fn publish_service(&mut self, msgs: Vec<JobsMessage>) {
            for m in msgs {
                let topic = Topic::Jobs(JobsTopic {
                    thing: ThingName::new("dev-1").unwrap(),
                    kind: m.kind,
                })
                .display(&TopicPrefix::AWS)
                .to_string();
                self.send(Wire::Down(topic, m.payload));
            }
        }

        fn queue_job(&mut self, id: &str) {
            let e = JobExecution::new(
                id,
                "dev-1",
                json!({"job": id}),
                1,
                TimeoutConfig::default(),
                self.epoch(),
            );
            let msgs = self.service.queue(e, self.epoch()).unwrap();
            self.publish_service(msgs);
        }

        fn app(&mut self) {
            while let Some(e) = self.runner.poll_event() {
                match e {
                    JobEvent::Job { job_id, .. } => {
                        *self.handed.entry(job_id.clone()).or_default() += 1;
                        let _ = self.runner.update(
                            self.now,
                            JobStatus::InProgress,
                            Some(BTreeMap::from([("step".into(), "1".into())])),
                        );
                        let done = self.now + Duration::from_millis(500 + self.rng.next() % 3000);
                        self.working = Some((job_id, done));
                    }
                    JobEvent::Canceled { job_id }
                        if self.working.as_ref().is_some_and(|(j, _)| *j == job_id) =>
                    {
                        self.working = None;
                    }
                    JobEvent::Canceled { job_id } => self.canceled.push(job_id),
                    _ => {}
                }
            }
        }

        fn pump(&mut self) {
            loop {
                self.app();
                let Some(t) = self.runner.poll_transmit() else {
                    break;
                };
                match t {
                    Transmit::Subscribe { .. } => {
                        self.subscribed_at = Some(self.now + Duration::from_millis(10))
                    }
                    Transmit::Publish { topic, payload, .. } => self.send(Wire::Up(topic, payload)),
                }
            }
        }

        fn disconnect(&mut self) {
            self.connected = false;
            self.wire.clear();
            self.subscribed_at = None;
            self.reconnect_at =
                Some(self.now + Duration::from_millis(300 + self.rng.next() % 2000));
            self.runner.handle_connection(self.now, false);
        }

        fn run(&mut self, until: Instant, drops: u64, new_jobs: u64) {
            let mut next_second = self.now + Duration::from_secs(1);
            let mut job_n = self.service.executions().len();
            while self.now < until {
                let next = [
                    self.wire.keys().next().map(|k| k.0),
                    self.runner.poll_timeout(),
                    self.reconnect_at,
                    self.subscribed_at,
                    self.working.as_ref().map(|w| w.1),
                    Some(next_second),
                ]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(until)
                .min(until);
                self.now = next.max(self.now);
                if let Some(k) = self.wire.keys().next().copied().filter(|k| k.0 <= self.now) {
                    match self.wire.remove(&k) {
                        Some(Wire::Up(topic, payload)) => {
                            let Ok(Topic::Jobs(JobsTopic { kind, .. })) =
                                Topic::parse(&TopicPrefix::AWS, &topic)
                            else {
                                panic!("runner published to {topic}")
                            };
                            let kind = kind.clone();
                            let out = self.service.handle_request(&kind, &payload, self.epoch());
                            self.publish_service(out);
                        }
                        Some(Wire::Down(topic, payload)) => {
                            self.runner
                                .handle_message(self.now, &topic, &payload)
                                .unwrap();
                        }
                        None => {}
                    }
                }
                if self.reconnect_at.is_some_and(|t| t <= self.now) {
                    self.reconnect_at = None;
                    self.connected = true;
                    self.runner.handle_connection(self.now, true);
                }
                if self.subscribed_at.is_some_and(|t| t <= self.now) {
                    self.subscribed_at = None;
                    self.runner.handle_subscribed(self.now);
                }
                if self.runner.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.runner.handle_timeout(self.now);
                }
                if let Some((job, at)) = self.working.clone()
                    && at <= self.now
                {
                    self.working = None;
                    let status = if self.rng.chance(20) {
                        JobStatus::Failed
                    } else {
                        JobStatus::Succeeded
                    };
                    if self.runner.current_job() == Some(job.as_str()) {
                        self.runner.update(self.now, status, None).unwrap();
                    }
                }
                if next_second <= self.now {
                    next_second += Duration::from_secs(1);
                    if self.connected && self.rng.chance(drops) {
                        self.disconnect();
                    }
                    if new_jobs > 0 && self.rng.next().is_multiple_of(new_jobs) {
                        job_n += 1;
                        self.queue_job(&format!("job-{job_n}"));
                    }
                    let timeouts = self.service.handle_timeout(self.epoch());
                    self.publish_service(timeouts);
                }
                self.pump();
            }
        }

        fn heal_and_finish(&mut self) {
            self.loss = 0;
            self.dup = 0;
            self.jitter = 0;
            if !self.connected && self.reconnect_at.is_none() {
                self.reconnect_at = Some(self.now);
            }
            let end = self.now + Duration::from_secs(300);
            self.run(end, 0, 0);
        }

        fn assert_all_terminal(&self, seed: u64) {
            for e in self.service.executions() {
                assert!(
                    e.status.is_terminal(),
                    "seed {seed}: {} is {:?}",
                    e.job_id,
                    e.status
                );
            }
        }
    }

    #[test]
    fn every_job_ends_and_none_runs_twice() {
        for seed in 1..=30 {
            let mut w = World::new(seed);
            w.loss = 10;
            w.dup = 10;
            w.jitter = 300;
            w.run(Instant::ZERO + Duration::from_secs(300), 2, 6);
            w.heal_and_finish();
            w.assert_all_terminal(seed);
            assert!(!w.service.executions().is_empty());
            for (job, n) in &w.handed {
                assert_eq!(*n, 1, "seed {seed}: {job} handed out {n} times");
            }
            assert!(
                w.canceled.is_empty(),
                "seed {seed}: nothing was canceled, yet {:?} was reported",
                w.canceled
            );
            assert_eq!(
                w.handed.len(),
                w.service.executions().len(),
                "seed {seed}: every job was run"
            );
        }
    }

    #[test]
    fn a_restarted_device_resumes_its_in_progress_job() {
        let mut w = World::new(3);
        w.queue_job("job-1");
        w.queue_job("job-2");
        w.run(Instant::ZERO + Duration::from_millis(300), 0, 0);
        assert_eq!(w.runner.current_job(), Some("job-1"));
        assert_eq!(
            w.service.execution("job-1").unwrap().status,
            JobStatus::InProgress
        );
        // The device process dies mid-job and comes back with a new runner.
        w.disconnect();
        w.session += 1;
        w.runner = JobRunner::new(
            ThingName::new("dev-1").unwrap().into_owned(),
            RunnerConfig::default(),
            w.session,
        );
        w.working = None;
        w.handed.clear();
        w.reconnect_at = Some(w.now);
        w.run(w.now + Duration::from_millis(200), 0, 0);
        assert_eq!(
            w.runner.current_job(),
            Some("job-1"),
            "the IN_PROGRESS job is resumed, not job-2"
        );
        assert_eq!(w.handed.get("job-1"), Some(&1));
        w.heal_and_finish();
        w.assert_all_terminal(3);
    }

    #[test]
    fn a_job_canceled_while_running_is_reported() {
        let mut w = World::new(4);
        w.queue_job("job-1");
        w.run(Instant::ZERO + Duration::from_millis(200), 0, 0);
        assert_eq!(w.runner.current_job(), Some("job-1"));
        w.working = None; // the application is slow
        let msgs = w.service.cancel("job-1", true, w.epoch()).unwrap();
        w.publish_service(msgs);
        w.queue_job("job-2");
        w.run(w.now + Duration::from_secs(10), 0, 0);
        assert_eq!(
            w.service.execution("job-1").unwrap().status,
            JobStatus::Canceled
        );
        assert_ne!(w.runner.current_job(), Some("job-1"));
        assert_eq!(w.handed.get("job-2"), Some(&1));
    }

    #[test]
    fn bad_input_is_refused() {
        let mut w = World::new(5);
        w.run(Instant::ZERO + Duration::from_millis(100), 0, 0);
        for (topic, payload) in [
            ("$aws/things/dev-1/shadow/update", &b"{}"[..]),
            ("$aws/things/dev-2/jobs/notify-next", b"{}"),
            ("$aws/things/dev-1/jobs/notify-next", b"not json"),
            (
                "$aws/things/dev-1/jobs/start-next/accepted",
                br#"{"execution": 5}"#,
            ),
            ("nope", b""),
        ] {
            assert!(
                w.runner.handle_message(w.now, topic, payload).is_err(),
                "{topic}"
            );
        }
        assert!(w.runner.poll_transmit().is_none());
        assert_eq!(
            w.runner.update(w.now, JobStatus::Succeeded, None),
            Err(RunnerError::NoCurrentJob)
        );
    }
}
