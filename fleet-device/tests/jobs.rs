//! The agent's jobs against a real Mosquitto, with a scripted jobs service
//! (fleet-core's `ThingJobs` answering through a backend client) until the
//! cloud's jobs service exists.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_core::ThingName;
use fleet_core::jobs::{JobExecution, JobStatus, JobsMessage, ThingJobs, TimeoutConfig};
use fleet_core::topic::{JobsTopic, Topic, TopicPrefix};
use fleet_device::{AgentBuilder, AgentEvent};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use serde_json::json;
use tokio::sync::mpsc;

fleet_testkit::on_both_brokers!(jobs_are_run_in_order_and_cancellation_is_reported);

const WAIT: Duration = Duration::from_secs(15);

enum Control {
    Queue(&'static str),
    Cancel(&'static str),
}

/// The scripted service: answers every jobs request of `pump-7` with
/// `ThingJobs` and publishes its notifications.
fn jobs_service(
    mut backend: TestClient,
    mut control: mpsc::Receiver<Control>,
) -> tokio::task::JoinHandle<ThingJobs> {
    tokio::spawn(async move {
        let mut jobs = ThingJobs::new("pump-7");
        let thing = ThingName::new("pump-7").unwrap();
        let publish = |msgs: Vec<JobsMessage>| {
            msgs.into_iter()
                .map(|m| {
                    let topic = Topic::Jobs(JobsTopic {
                        thing: thing.clone(),
                        kind: m.kind,
                    })
                    .display(&TopicPrefix::AWS)
                    .to_string();
                    (topic, m.payload)
                })
                .collect::<Vec<_>>()
        };
        loop {
            tokio::select! {
                c = control.recv() => {
                    let msgs = match c {
                        Some(Control::Queue(id)) => jobs
                            .queue(JobExecution::new(id, "pump-7", json!({"op": id}), 1, TimeoutConfig::default(), 1), 1)
                            .unwrap(),
                        Some(Control::Cancel(id)) => jobs.cancel(id, true, 2).unwrap(),
                        None => return jobs,
                    };
                    for (t, p) in publish(msgs) {
                        backend.publish(&t, p).await.unwrap();
                    }
                }
                m = backend.recv(Duration::from_millis(50)) => {
                    let Some(m) = m else { continue };
                    let Ok(Topic::Jobs(JobsTopic { kind, .. })) = Topic::parse(&TopicPrefix::AWS, &m.topic) else {
                        continue;
                    };
                    let kind = kind.clone();
                    let out = jobs.handle_request(&kind, &m.payload, 3);
                    for (t, p) in publish(out) {
                        backend.publish(&t, p).await.unwrap();
                    }
                }
            }
        }
    })
}

async fn jobs_are_run_in_order_and_cancellation_is_reported(kind: BrokerKind) {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let mut backend = TestClient::connect(&broker, &broker.backend_identity().unwrap(), "jobs")
        .await
        .unwrap();
    for req in ["start-next", "get", "+/get", "+/update"] {
        assert!(
            backend
                .subscribe(&format!("$aws/things/pump-7/jobs/{req}"))
                .await
                .unwrap()
        );
    }
    let (control, control_rx) = mpsc::channel(8);
    let service = jobs_service(backend, control_rx);
    control.send(Control::Queue("job-1")).await.unwrap();
    control.send(Control::Queue("job-2")).await.unwrap();

    let id = broker.device_identity("pump-7").unwrap();
    let mut agent = AgentBuilder::new(
        "localhost",
        broker.port(),
        "pump-7",
        &id.cert_pem,
        &id.key_pem,
        &broker.pki().ca_pem(),
    )
    .request_timeout(Duration::from_secs(2))
    .start()
    .unwrap();

    let mut ran = Vec::new();
    while ran.len() < 2 {
        match tokio::time::timeout(WAIT, agent.next_event())
            .await
            .expect("a job in time")
        {
            Some(AgentEvent::Job {
                job_id, document, ..
            }) => {
                assert_eq!(document["op"], job_id.as_str());
                let details = BTreeMap::from([("step".to_string(), "download".to_string())]);
                agent
                    .update_job(JobStatus::InProgress, Some(details))
                    .await
                    .unwrap();
                agent.update_job(JobStatus::Succeeded, None).await.unwrap();
                ran.push(job_id);
            }
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
    assert_eq!(ran, ["job-1", "job-2"]);

    // A job canceled while it runs is reported, and updates are refused.
    control.send(Control::Queue("job-3")).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, agent.next_event())
            .await
            .expect("job-3")
        {
            Some(AgentEvent::Job { job_id, .. }) if job_id == "job-3" => break,
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
    agent.update_job(JobStatus::InProgress, None).await.unwrap();
    control.send(Control::Cancel("job-3")).await.unwrap();
    let mut canceled = false;
    while !canceled {
        // The service's notify-next makes the agent check with start-next.
        match tokio::time::timeout(WAIT, agent.next_event())
            .await
            .expect("the cancel")
        {
            Some(AgentEvent::JobCanceled { job_id }) => {
                assert_eq!(job_id, "job-3");
                canceled = true;
            }
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
    assert!(agent.update_job(JobStatus::Succeeded, None).await.is_err());
    agent.shutdown().await;
    drop(control);
    let jobs = service.await.unwrap();
    let status = |id| jobs.execution(id).unwrap().status;
    assert_eq!(
        (status("job-1"), status("job-2"), status("job-3")),
        (
            JobStatus::Succeeded,
            JobStatus::Succeeded,
            JobStatus::Canceled
        )
    );
}
