//! OTA campaigns end to end over a real broker: the cloud's jobs service
//! rolls a signed release out in groups to fleet-device agents with
//! file-backed A/B slots; receipts are checked against each device's
//! registered key. 100 devices all commit; a campaign where devices fail
//! their self-test aborts at the error threshold, the failed ones roll
//! back, and no device outside the released group gets the job.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use fleet_cloud::{
    CampaignSpec, CampaignStatus, JobsService, MemoryStore, RECEIPT_KEY_ATTRIBUTE, Registry,
    RunningService, ShadowService, Stores, StreamService, serve,
};
use fleet_core::jobs::{
    GroupAction, RateLimit, RetryPolicy, RolloutGroup, RolloutPolicy, RolloutStatus, Threshold,
    TimeoutConfig,
};
use fleet_core::ota::{ManifestBuilder, Role, TrustRootBuilder};
use fleet_device::{
    AgentBuilder, AgentEvent, Backoff, FileSlots, FirmwareSlots, OtaSettings, Slot,
};
use fleet_testkit::Broker;
use sha2::Digest;

const IMAGE_LEN: usize = 8 * 1024;

struct Fleet {
    broker: Broker,
    jobs: JobsService,
    streams: StreamService,
    registry: Registry,
    /// The fleet index (in the fleet's SQLite file), which the registry
    /// keeps and verified receipts are written to.
    index: Arc<dyn fleet_cloud::store::IndexStore>,
    signer: SigningKey,
    root: Vec<u8>,
    cloud: Mutex<Option<RunningService>>,
    db: tempfile::TempDir,
}

/// The cloud service: jobs and streams over the fleet's SQLite file; the
/// jobs service verifies install receipts with `registry`.
async fn cloud(
    broker: &Broker,
    db: &std::path::Path,
    registry: &Registry,
) -> (RunningService, JobsService, StreamService) {
    let stores = Stores::sqlite(&db.join("fleet.db")).unwrap();
    let jobs = JobsService::shared(stores.jobs.clone()).with_registry(registry.clone());
    let streams = StreamService::load(stores.streams.clone()).await.unwrap();
    let running = serve(
        broker.backend_config("cloud").unwrap(),
        fleet_cloud::Services::new()
            .with(ShadowService::new(MemoryStore::new()))
            .with(jobs.clone())
            .with(streams.clone()),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    (running, jobs, streams)
}

impl Fleet {
    /// Stops the cloud service and starts a new one on the same database.
    async fn restart_cloud(&self) {
        drop(self.cloud.lock().unwrap().take());
        let running = cloud(&self.broker, self.db.path(), &self.registry).await.0;
        *self.cloud.lock().unwrap() = Some(running);
    }
}

fn receipt_seed(i: usize) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    seed
}

async fn fleet(devices: usize) -> Fleet {
    let broker = Broker::start().expect("start mosquitto");
    let db = tempfile::tempdir().unwrap();
    let index = Stores::sqlite(&db.path().join("fleet.db")).unwrap().index;
    let registry = Registry::in_memory().unwrap().with_index(index.clone());
    let (running, jobs, streams) = cloud(&broker, db.path(), &registry).await;
    for i in 0..devices {
        // Each device's receipt key is registered with its thing.
        let public = SigningKey::from_bytes(&receipt_seed(i)).verifying_key();
        let attrs = [(
            RECEIPT_KEY_ATTRIBUTE.to_string(),
            base64::engine::general_purpose::STANDARD.encode(public.as_bytes()),
        )]
        .into();
        registry
            .create_thing(&format!("dev-{i:03}"), attrs)
            .await
            .unwrap();
    }
    let signer = SigningKey::from_bytes(&[5; 32]);
    let root = TrustRootBuilder::new(1)
        .key(&signer.verifying_key(), &[Role::Root, Role::Targets])
        .build();
    Fleet {
        broker,
        jobs,
        streams,
        registry,
        index,
        signer,
        root,
        cloud: Mutex::new(Some(running)),
        db,
    }
}

/// How many things `query` finds in the fleet index.
async fn verified(f: &Fleet, query: &str) -> u64 {
    fleet_cloud::Inventory::new(f.index.clone(), Default::default())
        .count(query)
        .await
        .unwrap()
}

fn image() -> Vec<u8> {
    (0..IMAGE_LEN).map(|i| (i * 13 % 253) as u8).collect()
}

async fn campaign(f: &Fleet, id: &str, things: Vec<String>, policy: RolloutPolicy) -> CampaignSpec {
    let image = image();
    let release = format!("{id}-release");
    let manifest = ManifestBuilder::new(
        "fw",
        "3.0",
        3,
        image.len() as u64,
        sha2::Sha256::digest(&image).into(),
    )
    .hardware_id("board-1");
    let envelope = fleet_core::ota::tools::sign_manifest(&manifest, &[&f.signer]);
    // A wrong image is refused.
    assert!(
        f.jobs
            .register_release(&release, &envelope, vec![0; IMAGE_LEN], &f.streams)
            .await
            .is_err()
    );
    f.jobs
        .register_release(&release, &envelope, image, &f.streams)
        .await
        .unwrap();
    CampaignSpec {
        campaign_id: id.into(),
        release_id: release,
        things,
        groups: Vec::new(),
        policy,
        timeouts: TimeoutConfig::default(),
    }
}

/// What a device ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Committed,
    RolledBack,
    NeverUpdated,
}

/// One device, rebooting when its update asks, until the update ends or
/// `give_up` passes without one.
async fn run_device(
    f: Arc<Fleet>,
    i: usize,
    state: PathBuf,
    healthy: bool,
    give_up: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (Outcome, Slot, Vec<String>) {
    let thing = format!("dev-{i:03}");
    let id = f.broker.device_identity(&thing).unwrap();
    let deadline = tokio::time::Instant::now() + give_up;
    let mut saw_job = false;
    let mut log: Vec<String> = Vec::new();
    loop {
        log.push("boot".into());
        let slots = Arc::new(Mutex::new(
            FileSlots::boot(&state.join("slots"), 1 << 20, 1).unwrap(),
        ));
        let settings = OtaSettings {
            trust_root: f.root.clone(),
            hardware_id: "board-1".into(),
            slots: slots.clone(),
            self_test: Arc::new(move || healthy),
            receipt_key: receipt_seed(i).into(),
            block_size: 4096,
        };
        let agent = AgentBuilder::new(
            "localhost",
            f.broker.port(),
            &thing,
            &id.cert_pem,
            &id.key_pem,
            &f.broker.pki().ca_pem(),
        )
        .state_dir(state.join("agent"))
        .ota(settings)
        .backoff(Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
        })
        .request_timeout(Duration::from_secs(5))
        .start()
        .unwrap();
        let booted = slots.lock().unwrap().booted();
        loop {
            let event = tokio::select! {
                e = tokio::time::timeout_at(deadline, agent.next_event()) => e,
                // The campaign is over: a device that never got it stops.
                Ok(()) = stop.changed(), if !saw_job => {
                    agent.shutdown().await;
                    return (Outcome::NeverUpdated, booted, log);
                }
            };
            match event {
                Err(_) => {
                    agent.shutdown().await;
                    assert!(!saw_job, "{thing} stuck mid-update: {log:?}");
                    return (Outcome::NeverUpdated, booted, log);
                }
                Ok(Some(AgentEvent::OtaProgress { received, .. })) => {
                    saw_job = true;
                    log.push(format!("progress {received}"));
                }
                Ok(Some(AgentEvent::RebootRequired { .. })) => {
                    agent.shutdown().await;
                    break;
                }
                Ok(Some(AgentEvent::OtaFinished { committed, job_id })) => {
                    // A device keeps running: wait until the service has the
                    // final report (with the receipt), answering events.
                    let reported =
                        tokio::time::timeout_at(deadline, async {
                            loop {
                                let done =
                                    f.jobs.executions(&job_id).await.unwrap().into_iter().any(
                                        |e| e.thing == thing && e.execution.status.is_terminal(),
                                    );
                                if done {
                                    return;
                                }
                                let _ = tokio::time::timeout(
                                    Duration::from_millis(100),
                                    agent.next_event(),
                                )
                                .await;
                            }
                        })
                        .await;
                    assert!(
                        reported.is_ok(),
                        "{thing}: the final report never arrived: {log:?}"
                    );
                    agent.shutdown().await;
                    let outcome = if committed {
                        Outcome::Committed
                    } else {
                        Outcome::RolledBack
                    };
                    return (outcome, booted, log);
                }
                Ok(Some(e)) => {
                    log.push(format!("{e:?}").chars().take(120).collect());
                    if matches!(e, AgentEvent::Job { .. }) {
                        saw_job = true;
                    }
                }
                Ok(None) => panic!("{thing}: the agent stopped"),
            }
        }
    }
}

async fn until_final(f: &Fleet, id: &str) -> CampaignStatus {
    let mut watch = f
        .jobs
        .watch_campaign(id, f.registry.clone(), Duration::from_millis(200));
    let mut last = None;
    let result = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(s) = watch.recv().await {
            last = Some(s.unwrap());
        }
    })
    .await;
    let last = last.expect("at least one snapshot");
    if result.is_err() {
        let stuck: Vec<_> = f
            .jobs
            .executions(id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| !e.execution.status.is_terminal())
            .map(|e| {
                (
                    e.thing,
                    e.execution.status,
                    e.execution.execution_number,
                    e.execution.status_details,
                )
            })
            .collect();
        panic!("the campaign did not end: {last:?}; unfinished: {stuck:?}");
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_devices_take_a_campaign_and_every_receipt_verifies() {
    const N: usize = 100;
    let f = Arc::new(fleet(N).await);
    let states: Vec<tempfile::TempDir> = (0..N).map(|_| tempfile::tempdir().unwrap()).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut devices = Vec::new();
    for (i, state) in states.iter().enumerate() {
        devices.push(tokio::spawn(run_device(
            f.clone(),
            i,
            state.path().into(),
            true,
            Duration::from_secs(60),
            stopped.clone(),
        )));
    }
    let policy = RolloutPolicy {
        rate: RateLimit::Constant { per_minute: 10_000 },
        groups: vec![RolloutGroup {
            size: 10,
            success_percent: 100,
            on_success: GroupAction::NextGroup,
            error_threshold: Some(Threshold::Count(1)),
        }],
        abort: Vec::new(),
        retry: RetryPolicy::default(),
        in_progress_timeout_secs: None,
    };
    let things = (0..N).map(|i| format!("dev-{i:03}")).collect();
    let out = f
        .jobs
        .start_campaign(
            campaign(&f, "fw-3", things, policy).await,
            &f.streams,
            &f.registry,
            f.jobs.now(),
        )
        .await
        .unwrap();
    assert_eq!(
        out.iter()
            .filter(|m| m.topic.ends_with("/notify-next"))
            .count(),
        10,
        "the first canary group"
    );
    // The service is restarted in the middle of the rollout.
    tokio::time::timeout(Duration::from_secs(60), async {
        while f
            .jobs
            .campaign_status("fw-3", &f.registry)
            .await
            .unwrap()
            .succeeded
            < 30
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("30 devices done");
    f.restart_cloud().await;
    let status = tokio::time::timeout(Duration::from_secs(100), until_final(&f, "fw-3")).await;
    let _ = stop.send(true);
    let Ok(status) = status else {
        let mut logs = Vec::new();
        for (i, d) in devices.into_iter().enumerate() {
            let (outcome, _, log) = d.await.unwrap();
            if outcome != Outcome::Committed {
                logs.push((i, outcome, log));
            }
        }
        panic!("the campaign did not end: {logs:?}");
    };
    assert_eq!(status.succeeded, N, "{status:?}");
    assert_eq!(status.rollout, Some(RolloutStatus::Completed));
    // What each verified receipt attests is in the fleet index.
    assert_eq!(
        verified(&f, "inventory.verified.fw:3.0 AND inventory.verified.sequence:3 AND inventory.verified.job:fw-3").await,
        N as u64
    );
    assert_eq!(
        status.unverified_receipt + status.failed + status.rolled_back,
        0
    );
    for e in f.jobs.executions("fw-3").await.unwrap() {
        assert_eq!(
            e.execution.execution_number, 1,
            "{} was released once",
            e.thing
        );
    }
    for d in devices {
        let (outcome, booted, _) = d.await.unwrap();
        assert_eq!((outcome, booted), (Outcome::Committed, Slot::B));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_self_tests_abort_the_campaign_and_roll_back() {
    const N: usize = 20;
    let f = Arc::new(fleet(N).await);
    let states: Vec<tempfile::TempDir> = (0..N).map(|_| tempfile::tempdir().unwrap()).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut devices = Vec::new();
    for (i, state) in states.iter().enumerate() {
        if i == 4 {
            // Offline: its execution stays queued until the abort cancels it.
            continue;
        }
        // Two of the first group fail their self-test.
        let healthy = !(i == 1 || i == 3);
        devices.push((
            i,
            tokio::spawn(run_device(
                f.clone(),
                i,
                state.path().into(),
                healthy,
                Duration::from_secs(60),
                stopped.clone(),
            )),
        ));
    }
    let policy = RolloutPolicy {
        rate: RateLimit::Constant { per_minute: 10_000 },
        groups: vec![RolloutGroup {
            size: 5,
            success_percent: 100,
            on_success: GroupAction::NextGroup,
            error_threshold: Some(Threshold::Count(2)),
        }],
        abort: Vec::new(),
        retry: RetryPolicy::default(),
        in_progress_timeout_secs: None,
    };
    let things = (0..N).map(|i| format!("dev-{i:03}")).collect();
    f.jobs
        .start_campaign(
            campaign(&f, "fw-bad", things, policy).await,
            &f.streams,
            &f.registry,
            f.jobs.now(),
        )
        .await
        .unwrap();
    let status = until_final(&f, "fw-bad").await;
    let _ = stop.send(true);
    assert!(
        matches!(status.rollout, Some(RolloutStatus::Aborted(_))),
        "{status:?}"
    );
    assert_eq!(status.rolled_back, 2, "{status:?}");
    assert_eq!(status.succeeded, 2, "{status:?}");
    // Only the committed installs are in the fleet index as verified.
    assert_eq!(verified(&f, "inventory.verified.fw:*").await, 2);
    assert_eq!(
        verified(&f, "thingName:dev-001 OR thingName:dev-003").await,
        2,
        "the rolled-back devices are indexed"
    );
    assert_eq!(
        verified(
            &f,
            "(thingName:dev-001 OR thingName:dev-003) AND inventory.verified.fw:*"
        )
        .await,
        0
    );
    assert_eq!(status.pending + status.canceled, N - 4, "{status:?}");
    let executions = f.jobs.executions("fw-bad").await.unwrap();
    assert_eq!(executions.len(), 5, "only the first group got the job");
    let offline = executions.iter().find(|e| e.thing == "dev-004").unwrap();
    assert_eq!(
        offline.execution.status,
        fleet_core::jobs::JobStatus::Canceled,
        "the queued execution was canceled"
    );
    for (i, d) in devices {
        let (outcome, booted, _) = d.await.unwrap();
        let expected = match i {
            1 | 3 => (Outcome::RolledBack, Slot::A),
            0..5 => (Outcome::Committed, Slot::B),
            _ => (Outcome::NeverUpdated, Slot::A),
        };
        assert_eq!((outcome, booted), expected, "dev-{i:03}");
        if i >= 5 {
            let slots = states[i].path().join("slots");
            assert!(
                !slots.join("slot-b.img").exists(),
                "dev-{i:03} was never written to"
            );
        }
    }
    // The rolled-back devices still run their old image.
    let slots = FileSlots::boot(&states[1].path().join("slots"), 1 << 20, 1).unwrap();
    assert_eq!((slots.booted(), slots.installed_sequence()), (Slot::A, 1));
}
