//! Over-the-air updates end to end against a real broker: a signed release
//! fetched over the MQTT file stream into file-backed A/B slots, the agent
//! killed mid-download and resumed from its record (not from zero), a trial
//! boot with a self-test, a confirm or a rollback, and a signed install
//! receipt in the job's final report. A manifest signed by the wrong key is
//! refused before anything is written.
//!
//! The jobs and stream services are fleet-cloud's.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use fleet_cloud::{
    JobSpec, JobsService, MemoryStore, Registry, ShadowService, StreamService, TargetSelection,
    serve,
};
use fleet_core::jobs::{ImageSource, JobExecution, JobStatus, OtaJob, TimeoutConfig};
use fleet_core::ota::{InstallOutcome, InstallReceipt, ManifestBuilder, Role, TrustRootBuilder};
use fleet_device::{
    Agent, AgentBuilder, AgentEvent, Backoff, FileSlots, FirmwareSlots, OtaSettings, Slot,
};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use sha2::Digest;

fleet_testkit::on_both_brokers!(
    an_update_survives_a_kill_mid_download_and_commits,
    a_failed_self_test_rolls_back
);

const WAIT: Duration = Duration::from_secs(30);
const BLOCK: u32 = 1024;
const IMAGE_LEN: usize = 48 * 1024;

struct Fleet {
    broker: Broker,
    streams: StreamService,
    jobs: JobsService,
    registry: Registry,
    /// Publishes what operator calls on the jobs service send.
    operator: TestClient,
    _cloud: fleet_cloud::RunningService,
    signer: SigningKey,
    root: Vec<u8>,
}

async fn fleet(kind: BrokerKind) -> Fleet {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .unwrap();
    let streams = StreamService::new();
    let jobs = JobsService::new(MemoryStore::new());
    let cloud = serve(
        broker.backend_config("cloud").unwrap(),
        fleet_cloud::Services::new()
            .with(ShadowService::new(MemoryStore::new()))
            .with(streams.clone())
            .with(jobs.clone()),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    let backend = broker.backend_identity().unwrap();
    let operator = TestClient::connect(&broker, &backend, "operator")
        .await
        .unwrap();
    let signer = SigningKey::from_bytes(&[42; 32]);
    let root = TrustRootBuilder::new(1)
        .key(&signer.verifying_key(), &[Role::Root, Role::Targets])
        .build();
    Fleet {
        broker,
        streams,
        jobs,
        registry: Registry::in_memory().unwrap(),
        operator,
        _cloud: cloud,
        signer,
        root,
    }
}

fn image() -> Vec<u8> {
    (0..IMAGE_LEN).map(|i| (i * 7 % 251) as u8).collect()
}

/// Queues an OTA job for `image`, signed by `key`.
async fn release(f: &Fleet, job_id: &str, key: &SigningKey, image: &[u8]) -> Vec<u8> {
    f.streams
        .save(job_id, "firmware 2", vec![image.to_vec()])
        .await
        .unwrap();
    let manifest = ManifestBuilder::new(
        "fw",
        "2.0",
        2,
        image.len() as u64,
        sha2::Sha256::digest(image).into(),
    )
    .hardware_id("board-1");
    let envelope = fleet_core::ota::tools::sign_manifest(&manifest, &[key]);
    let nonce = job_id.as_bytes().to_vec();
    let document = serde_json::to_value(OtaJob::new(
        &envelope,
        ImageSource::Stream(job_id.into()),
        &nonce,
    ))
    .unwrap();
    let spec = JobSpec {
        job_id: job_id.into(),
        document,
        things: vec!["pump-7".into()],
        groups: Vec::new(),
        selection: TargetSelection::Snapshot,
        timeouts: TimeoutConfig::default(),
        max_retries: 0,
        rollout: None,
    };
    for m in f
        .jobs
        .create_job(spec, &f.registry, f.jobs.now())
        .await
        .unwrap()
    {
        f.operator.publish(&m.topic, m.payload).await.unwrap();
    }
    nonce
}

/// One "boot" of the device: the slots boot (taking a pending trial), the
/// agent starts on a runtime of its own, so that the test can kill it
/// (drop the runtime: no goodbye, no flush) as a power cut would.
struct Device {
    runtime: Option<tokio::runtime::Runtime>,
    agent: Option<Agent>,
    slots: Arc<Mutex<FileSlots>>,
}

fn boot(f: &Fleet, state: &Path, self_test: Arc<AtomicBool>) -> Device {
    let slots = Arc::new(Mutex::new(
        FileSlots::boot(&state.join("slots"), 1 << 20, 1).unwrap(),
    ));
    let id = f.broker.device_identity("pump-7").unwrap();
    let settings = OtaSettings {
        trust_root: f.root.clone(),
        hardware_id: "board-1".into(),
        slots: slots.clone(),
        self_test: Arc::new(move || self_test.load(Ordering::SeqCst)),
        receipt_key: [7; 32].into(),
        block_size: BLOCK,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let agent = {
        let _guard = runtime.enter();
        AgentBuilder::new(
            "localhost",
            f.broker.port(),
            "pump-7",
            &id.cert_pem,
            &id.key_pem,
            &f.broker.pki().ca_pem(),
        )
        .state_dir(state.join("agent"))
        .ota(settings)
        .backoff(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
        })
        .request_timeout(Duration::from_secs(2))
        .start()
        .unwrap()
    };
    Device {
        runtime: Some(runtime),
        agent: Some(agent),
        slots,
    }
}

impl Device {
    async fn next(&mut self) -> AgentEvent {
        tokio::time::timeout(WAIT, self.agent.as_mut().unwrap().next_event())
            .await
            .expect("an event in time")
            .expect("the agent runs")
    }

    /// Waits for an event matching `want`, skipping others.
    async fn until<T>(&mut self, mut want: impl FnMut(&AgentEvent) -> Option<T>) -> T {
        loop {
            let e = self.next().await;
            if let Some(t) = want(&e) {
                return t;
            }
        }
    }

    /// A power cut: the agent's runtime is dropped where it stands.
    fn kill(mut self) {
        drop(self.agent.take());
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn final_execution(f: &mut Fleet, job: &str) -> JobExecution {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(e) = f
                .jobs
                .executions(job)
                .await
                .unwrap()
                .into_iter()
                .find(|e| e.execution.status.is_terminal())
            {
                return e.execution;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the job ends")
}

fn receipt_of(e: &JobExecution) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(&e.status_details["receipt"])
        .unwrap()
}

async fn an_update_survives_a_kill_mid_download_and_commits(kind: BrokerKind) {
    let mut f = fleet(kind).await;
    let state = tempfile::tempdir().unwrap();
    let healthy = Arc::new(AtomicBool::new(true));

    // A release signed by a key the device does not trust: refused, and
    // nothing is written.
    let rogue = SigningKey::from_bytes(&[9; 32]);
    release(&f, "rogue", &rogue, &image()).await;
    let mut dev = boot(&f, state.path(), healthy.clone());
    let reason = dev
        .until(|e| match e {
            AgentEvent::OtaRejected { job_id, reason } if job_id == "rogue" => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(
        reason.contains("signature") || reason.contains("key"),
        "{reason}"
    );
    assert_eq!(
        final_execution(&mut f, "rogue").await.status,
        JobStatus::Rejected
    );
    let slots_dir: PathBuf = state.path().join("slots");
    assert!(!slots_dir.join("slot-b.img").exists());
    assert!(!slots_dir.join("ota.record").exists());

    // The real release. Killed a third of the way through.
    let signer = f.signer.clone();
    let nonce = release(&f, "fw-2", &signer, &image()).await;
    let before_kill = dev
        .until(|e| match e {
            AgentEvent::OtaProgress { received, .. } if *received >= (IMAGE_LEN / 3) as u64 => {
                Some(*received)
            }
            _ => None,
        })
        .await;
    dev.kill();

    // Restarted: it goes on from its record, not from zero.
    let mut dev = boot(&f, state.path(), healthy.clone());
    let first = dev
        .until(|e| match e {
            AgentEvent::OtaProgress { received, .. } => Some(*received),
            _ => None,
        })
        .await;
    assert!(
        first > before_kill.saturating_sub(u64::from(BLOCK)),
        "resumed at {first}, had {before_kill}"
    );
    dev.until(|e| matches!(e, AgentEvent::RebootRequired { .. }).then_some(()))
        .await;
    dev.kill();

    // The trial boot into B: self-test passes, B is confirmed.
    let mut dev = boot(&f, state.path(), healthy);
    assert_eq!(dev.slots.lock().unwrap().booted(), Slot::B);
    let committed = dev
        .until(|e| match e {
            AgentEvent::OtaFinished { committed, .. } => Some(*committed),
            _ => None,
        })
        .await;
    assert!(committed);
    // Power cut right as it ends: the report (with its receipt) is kept and
    // sent by the next start.
    dev.kill();
    let dev = boot(&f, state.path(), Arc::new(AtomicBool::new(true)));
    let done = final_execution(&mut f, "fw-2").await;
    assert_eq!(
        done.status,
        JobStatus::Succeeded,
        "{:?}",
        done.status_details
    );
    let signed = receipt_of(&done);
    let receipt =
        InstallReceipt::verify(&signed, &SigningKey::from_bytes(&[7; 32]).verifying_key()).unwrap();
    assert_eq!(receipt.outcome, InstallOutcome::Committed);
    assert_eq!((receipt.installed_sequence, receipt.nonce), (2, &nonce[..]));
    assert_eq!(
        std::fs::read(dev.slots.lock().unwrap().image_path(Slot::B)).unwrap(),
        image()
    );
    dev.kill();
    // It stays on B.
    let dev = boot(&f, state.path(), Arc::new(AtomicBool::new(true)));
    assert_eq!(dev.slots.lock().unwrap().booted(), Slot::B);
    assert!(
        !state.path().join("slots").join("ota.record").exists(),
        "the update is over"
    );
    assert_eq!(dev.slots.lock().unwrap().installed_sequence(), 2);
}

async fn a_failed_self_test_rolls_back(kind: BrokerKind) {
    let mut f = fleet(kind).await;
    let state = tempfile::tempdir().unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let signer = f.signer.clone();
    release(&f, "fw-bad", &signer, &image()).await;
    let mut dev = boot(&f, state.path(), healthy.clone());
    dev.until(|e| matches!(e, AgentEvent::RebootRequired { .. }).then_some(()))
        .await;
    dev.kill();
    // Trial boot into B; the self-test fails; back to A.
    let mut dev = boot(&f, state.path(), healthy.clone());
    assert_eq!(dev.slots.lock().unwrap().booted(), Slot::B);
    dev.until(|e| matches!(e, AgentEvent::RebootRequired { .. }).then_some(()))
        .await;
    dev.kill();
    let mut dev = boot(&f, state.path(), healthy);
    assert_eq!(dev.slots.lock().unwrap().booted(), Slot::A);
    let committed = dev
        .until(|e| match e {
            AgentEvent::OtaFinished { committed, .. } => Some(*committed),
            _ => None,
        })
        .await;
    assert!(!committed);
    let done = final_execution(&mut f, "fw-bad").await;
    assert_eq!(done.status, JobStatus::Failed);
    let signed = receipt_of(&done);
    let receipt =
        InstallReceipt::verify(&signed, &SigningKey::from_bytes(&[7; 32]).verifying_key()).unwrap();
    assert_eq!(receipt.outcome, InstallOutcome::RolledBack);
    assert_eq!(receipt.installed_sequence, 1);
}
