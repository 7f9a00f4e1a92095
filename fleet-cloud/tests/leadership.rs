//! With several instances, only the lease holder sweeps: a service that
//! does not hold the lease leaves due timeouts alone until it does.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleet_cloud::{
    JobSpec, JobsService, Leadership, MemoryStore, Registry, ShadowService, TargetSelection, serve,
};
use fleet_core::jobs::{JobStatus, TimeoutConfig};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions};
use serde_json::json;

#[derive(Debug)]
struct Switch(AtomicBool);

impl Leadership for Switch {
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move { self.0.load(Ordering::SeqCst) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_sweeps() {
    let broker = Broker::start_with(BrokerOptions {
        kind: BrokerKind::Embedded,
        ..BrokerOptions::default()
    })
    .unwrap();
    const T0: u64 = 1_800_000_000;
    // The clock stands an hour after the job started: its timeout is due.
    let store = MemoryStore::new();
    let jobs =
        JobsService::new(store.clone()).with_clock(fleet_cloud::Clock::from_fn(|| T0 + 3600));
    let registry = Registry::in_memory().unwrap();
    jobs.create_job(
        JobSpec {
            job_id: "j1".into(),
            document: json!({}),
            things: vec!["t1".into()],
            groups: Vec::new(),
            selection: TargetSelection::Snapshot,
            timeouts: TimeoutConfig {
                in_progress_timeout_in_minutes: Some(1),
            },
            max_retries: 0,
            rollout: None,
        },
        &registry,
        T0,
    )
    .await
    .unwrap();
    let start = fleet_cloud::Request::from_broker(
        &fleet_core::TopicPrefix::AWS,
        "$aws/things/t1/jobs/start-next",
        br#"{"clientToken":"s"}"#,
        T0,
    )
    .unwrap();
    jobs.handle(&start).await.unwrap();
    let status =
        |jobs: JobsService| async move { jobs.executions("j1").await.unwrap()[0].execution.status };
    assert_eq!(status(jobs.clone()).await, JobStatus::InProgress);
    let switch = Arc::new(Switch(AtomicBool::new(false)));
    let _running = serve(
        broker.backend_config("cloud-1").unwrap(),
        fleet_cloud::Services::new()
            .with(ShadowService::new(store))
            .with(jobs.clone()),
        fleet_cloud::ServeOptions {
            leadership: Some(switch.clone()),
            clock: jobs.clock().clone(),
            ..fleet_cloud::ServeOptions::default()
        },
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        status(jobs.clone()).await,
        JobStatus::InProgress,
        "swept without the lease"
    );
    switch.0.store(true, Ordering::SeqCst);
    let mut timed_out = false;
    for _ in 0..30 {
        if status(jobs.clone()).await == JobStatus::TimedOut {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(timed_out, "the lease holder sweeps");
}
