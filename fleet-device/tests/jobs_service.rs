//! The cloud's jobs service (SQLite, over a real broker) with the device
//! agent and with a plain AWS-style client: jobs for things and groups run in
//! order, cancellation, a stuck execution timed out by the service without
//! any device message and retried up to its limit, continuous jobs for
//! things that join a group later, and a restart of the service mid-job.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleet_cloud::{
    JobSpec, JobsService, Registry, RunningService, ShadowService, SqliteStore, TargetSelection,
    serve,
};
use fleet_core::jobs::{JobStatus, TimeoutConfig};
use fleet_device::{Agent, AgentBuilder, AgentEvent, Backoff};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use serde_json::{Value, json};

fleet_testkit::on_both_brokers!(
    jobs_run_in_order_and_a_cancel_is_reported,
    a_stuck_execution_times_out_and_is_retried,
    an_aws_style_device_works_unchanged
);

const WAIT: Duration = Duration::from_secs(20);

struct Cloud {
    broker: Broker,
    jobs: JobsService,
    registry: Registry,
    clock: Arc<AtomicU64>,
    db: tempfile::TempDir,
    running: Option<RunningService>,
}

fn spec(id: &str, things: &[&str], groups: &[&str]) -> JobSpec {
    JobSpec {
        job_id: id.into(),
        document: json!({"op": id}),
        things: things.iter().map(|s| s.to_string()).collect(),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        selection: TargetSelection::Snapshot,
        timeouts: TimeoutConfig::default(),
        max_retries: 0,
        rollout: None,
    }
}

impl Cloud {
    fn start(kind: BrokerKind) -> Self {
        let broker = Broker::start_with(BrokerOptions {
            kind,
            ..BrokerOptions::default()
        })
        .unwrap();
        let db = tempfile::tempdir().unwrap();
        let clock = Arc::new(AtomicU64::new(1_800_000_000));
        let mut c = Self {
            jobs: Self::service(&db, &clock),
            broker,
            registry: Registry::in_memory().unwrap(),
            clock,
            db,
            running: None,
        };
        c.serve();
        c
    }

    fn service(db: &tempfile::TempDir, clock: &Arc<AtomicU64>) -> JobsService {
        let clock = clock.clone();
        JobsService::new(SqliteStore::open(&db.path().join("fleet.db")).unwrap()).with_clock(
            fleet_cloud::Clock::from_fn(move || clock.load(Ordering::SeqCst)),
        )
    }

    /// (Re)starts the served service, on the same database.
    fn serve(&mut self) {
        self.running = None;
        self.jobs = Self::service(&self.db, &self.clock);
        self.running = Some(
            serve(
                self.broker.backend_config("cloud").unwrap(),
                fleet_cloud::Services::new()
                    .with(ShadowService::new(
                        SqliteStore::open(&self.db.path().join("fleet.db")).unwrap(),
                    ))
                    .with(self.jobs.clone()),
                fleet_cloud::ServeOptions {
                    clock: self.jobs.clock().clone(),
                    ..fleet_cloud::ServeOptions::default()
                },
            )
            .unwrap(),
        );
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// Creates a job and publishes its notifications (what an operator's
    /// API call does).
    async fn create(&self, spec: JobSpec) {
        let out = self
            .jobs
            .create_job(spec, &self.registry, self.now())
            .await
            .unwrap();
        self.publish(out).await;
    }

    async fn publish(&self, out: Vec<fleet_cloud::Outgoing>) {
        let app = TestClient::connect(
            &self.broker,
            &self.broker.backend_identity().unwrap(),
            "operator",
        )
        .await
        .unwrap();
        for m in out {
            app.publish(&m.topic, m.payload).await.unwrap();
        }
        app.disconnect().await;
    }

    async fn status(&self, job: &str, thing: &str) -> (JobStatus, u64) {
        let e = self
            .jobs
            .executions(job)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.thing == thing)
            .unwrap();
        (e.execution.status, e.execution.execution_number)
    }

    async fn until_status(&self, job: &str, thing: &str, want: JobStatus) -> u64 {
        for _ in 0..200 {
            let (s, n) = self.status(job, thing).await;
            if s == want {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{job} on {thing} never became {want:?}: {:?}",
            self.status(job, thing).await
        );
    }
}

fn agent(broker: &Broker, thing: &str) -> Agent {
    let id = broker.device_identity(thing).unwrap();
    AgentBuilder::new(
        "localhost",
        broker.port(),
        thing,
        &id.cert_pem,
        &id.key_pem,
        &broker.pki().ca_pem(),
    )
    .backoff(Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(500),
    })
    .request_timeout(Duration::from_secs(2))
    .start()
    .unwrap()
}

async fn next_job(agent: &mut Agent) -> (String, u64, Value) {
    tokio::time::timeout(WAIT, async {
        loop {
            match agent.next_event().await {
                Some(AgentEvent::Job {
                    job_id,
                    execution_number,
                    document,
                    ..
                }) => return (job_id, execution_number, document),
                Some(_) => {}
                None => panic!("the agent stopped"),
            }
        }
    })
    .await
    .expect("a job")
}

async fn jobs_run_in_order_and_a_cancel_is_reported(kind: BrokerKind) {
    let mut cloud = Cloud::start(kind);
    cloud
        .registry
        .create_thing("pump-7", Default::default())
        .await
        .unwrap();
    cloud.registry.create_group("pumps", None).await.unwrap();
    cloud
        .registry
        .add_to_group("pumps", "pump-7")
        .await
        .unwrap();
    cloud.create(spec("first", &["pump-7"], &[])).await;
    cloud.create(spec("second", &[], &["pumps"])).await;
    cloud.create(spec("third", &["pump-7"], &[])).await;
    let mut dev = agent(&cloud.broker, "pump-7");

    let (id, n, doc) = next_job(&mut dev).await;
    assert_eq!(
        (id.as_str(), n, doc["op"].as_str()),
        ("first", 1, Some("first"))
    );
    dev.update_job(JobStatus::Succeeded, None).await.unwrap();
    // The service restarts between two jobs; the next one comes anyway.
    cloud.serve();
    let (id, ..) = next_job(&mut dev).await;
    assert_eq!(id, "second");
    // Canceled while it runs (forced): the device is told.
    let out = cloud
        .jobs
        .cancel_job("second", true, cloud.now())
        .await
        .unwrap();
    cloud.publish(out).await;
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(AgentEvent::JobCanceled { job_id }) = dev.next_event().await {
                assert_eq!(job_id, "second");
                return;
            }
        }
    })
    .await
    .expect("the cancellation reaches the device");
    let (id, ..) = next_job(&mut dev).await;
    assert_eq!(id, "third");
    dev.update_job(JobStatus::Succeeded, None).await.unwrap();
    assert_eq!(
        cloud.status("first", "pump-7").await.0,
        JobStatus::Succeeded
    );
    assert_eq!(
        cloud.status("second", "pump-7").await.0,
        JobStatus::Canceled
    );
    assert_eq!(
        cloud.status("third", "pump-7").await.0,
        JobStatus::Succeeded
    );
    assert!(matches!(
        cloud
            .jobs
            .create_job(
                spec("first", &["pump-7"], &[]),
                &cloud.registry,
                cloud.now()
            )
            .await,
        Err(fleet_cloud::JobsError::AlreadyExists(_))
    ));

    // A continuous job reaches a thing that joins its group later.
    let mut continuous = spec("fleet-config", &[], &["pumps"]);
    continuous.selection = TargetSelection::Continuous;
    cloud.create(continuous).await;
    let (id, ..) = next_job(&mut dev).await;
    assert_eq!(id, "fleet-config");
    cloud
        .registry
        .create_thing("pump-8", Default::default())
        .await
        .unwrap();
    cloud
        .registry
        .add_to_group("pumps", "pump-8")
        .await
        .unwrap();
    let out = cloud
        .jobs
        .sync_continuous(&cloud.registry, cloud.now())
        .await
        .unwrap();
    cloud.publish(out).await;
    let mut late = agent(&cloud.broker, "pump-8");
    let (id, ..) = next_job(&mut late).await;
    assert_eq!(id, "fleet-config");
}

async fn a_stuck_execution_times_out_and_is_retried(kind: BrokerKind) {
    let cloud = Cloud::start(kind);
    let mut s = spec("stuck", &["pump-7"], &[]);
    s.timeouts.in_progress_timeout_in_minutes = Some(10);
    s.max_retries = 1;
    cloud.create(s).await;
    let mut dev = agent(&cloud.broker, "pump-7");
    let (id, n, _) = next_job(&mut dev).await;
    assert_eq!((id.as_str(), n), ("stuck", 1));
    cloud
        .until_status("stuck", "pump-7", JobStatus::InProgress)
        .await;
    // The device says nothing more. Eleven minutes later the service's own
    // timer has run out.
    cloud.clock.fetch_add(11 * 60, Ordering::SeqCst);
    // Retried once: execution 2 reaches the device.
    let (id, n, _) = next_job(&mut dev).await;
    assert_eq!((id.as_str(), n), ("stuck", 2));
    cloud
        .until_status("stuck", "pump-7", JobStatus::InProgress)
        .await;
    cloud.clock.fetch_add(11 * 60, Ordering::SeqCst);
    let n = cloud
        .until_status("stuck", "pump-7", JobStatus::TimedOut)
        .await;
    assert_eq!(n, 2, "no retry beyond the limit");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cloud.status("stuck", "pump-7").await,
        (JobStatus::TimedOut, 2)
    );
}

async fn an_aws_style_device_works_unchanged(kind: BrokerKind) {
    let cloud = Cloud::start(kind);
    cloud.create(spec("aws-1", &["pump-9"], &[])).await;
    // A device as AWS's SDK samples write it: start-next, then update with
    // expectedVersion, on the raw topics.
    let id = cloud.broker.device_identity("pump-9").unwrap();
    let mut dev = TestClient::connect(&cloud.broker, &id, "pump-9")
        .await
        .unwrap();
    for t in [
        "$aws/things/pump-9/jobs/start-next/accepted",
        "$aws/things/pump-9/jobs/start-next/rejected",
        "$aws/things/pump-9/jobs/aws-1/update/accepted",
        "$aws/things/pump-9/jobs/aws-1/update/rejected",
    ] {
        assert!(dev.subscribe(t).await.unwrap());
    }
    let started = loop {
        dev.publish(
            "$aws/things/pump-9/jobs/start-next",
            r#"{"clientToken":"t1"}"#,
        )
        .await
        .unwrap();
        if let Some(m) = dev.recv(Duration::from_millis(500)).await {
            break serde_json::from_slice::<Value>(&m.payload).unwrap();
        }
    };
    let execution = &started["execution"];
    assert_eq!(execution["jobId"], "aws-1");
    assert_eq!(execution["status"], "IN_PROGRESS");
    assert_eq!(started["clientToken"], "t1");
    let version = execution["versionNumber"].as_u64().unwrap();
    // A stale expectedVersion is refused; the right one is accepted.
    dev.publish(
        "$aws/things/pump-9/jobs/aws-1/update",
        json!({"status": "SUCCEEDED", "expectedVersion": version + 5, "clientToken": "t2"})
            .to_string(),
    )
    .await
    .unwrap();
    let m = dev.recv(WAIT).await.unwrap();
    assert_eq!(m.topic, "$aws/things/pump-9/jobs/aws-1/update/rejected");
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap()["code"],
        "VersionMismatch"
    );
    dev.publish(
        "$aws/things/pump-9/jobs/aws-1/update",
        json!({"status": "SUCCEEDED", "expectedVersion": version, "clientToken": "t3"}).to_string(),
    )
    .await
    .unwrap();
    let m = dev.recv(WAIT).await.unwrap();
    assert_eq!(m.topic, "$aws/things/pump-9/jobs/aws-1/update/accepted");
    assert_eq!(
        cloud.status("aws-1", "pump-9").await.0,
        JobStatus::Succeeded
    );
}
