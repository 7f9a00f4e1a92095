//! Over-the-air updates end to end against a real broker: a signed release
//! fetched over the MQTT file stream into file-backed A/B slots, the agent
//! killed mid-download and resumed from its record (not from zero), a trial
//! boot with a self-test, a confirm or a rollback, and a signed install
//! receipt in the job's final report. A manifest signed by the wrong key is
//! refused before anything is written.
//!
//! The jobs service is scripted (fleet-core's `ThingJobs` answering through
//! a backend client) until the cloud's own exists; streams are served by
//! fleet-cloud's `StreamService`.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use fleet_cloud::{Extras, MemoryStore, ShadowService, StreamService, serve};
use fleet_core::ThingName;
use fleet_core::jobs::{
    ImageSource, JobExecution, JobStatus, JobsMessage, OtaJob, ThingJobs, TimeoutConfig,
};
use fleet_core::ota::{InstallOutcome, InstallReceipt, ManifestBuilder, Role, TrustRootBuilder};
use fleet_core::topic::{JobsTopic, Topic, TopicPrefix};
use fleet_device::{
    Agent, AgentBuilder, AgentEvent, Backoff, FileSlots, FirmwareSlots, OtaSettings, Slot,
};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use sha2::Digest;
use tokio::sync::{mpsc, watch};

fleet_testkit::on_both_brokers!(
    an_update_survives_a_kill_mid_download_and_commits,
    a_failed_self_test_rolls_back
);

const WAIT: Duration = Duration::from_secs(30);
const BLOCK: u32 = 1024;
const IMAGE_LEN: usize = 48 * 1024;

/// The scripted jobs service; publishes each execution's state on `seen`.
fn jobs_service(
    mut backend: TestClient,
    mut queue: mpsc::Receiver<JobExecution>,
    seen: watch::Sender<Vec<JobExecution>>,
) {
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
            let out = tokio::select! {
                j = queue.recv() => match j {
                    Some(j) => jobs.queue(j, 1).unwrap(),
                    None => return,
                },
                m = backend.recv(Duration::from_millis(50)) => {
                    let Some(m) = m else { continue };
                    let Ok(Topic::Jobs(JobsTopic { kind, .. })) = Topic::parse(&TopicPrefix::AWS, &m.topic) else {
                        continue;
                    };
                    let kind = kind.clone();
                    jobs.handle_request(&kind, &m.payload, 3)
                }
            };
            for (t, p) in publish(out) {
                backend.publish(&t, p).await.unwrap();
            }
            let _ = seen.send(jobs.executions().to_vec());
        }
    });
}

struct Fleet {
    broker: Broker,
    streams: StreamService,
    queue: mpsc::Sender<JobExecution>,
    seen: watch::Receiver<Vec<JobExecution>>,
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
    let cloud = serve(
        broker.backend_config("cloud").unwrap(),
        ShadowService::new(MemoryStore::new()),
        Extras {
            streams: Some(streams.clone()),
            ..Extras::default()
        },
    )
    .unwrap();
    let backend = broker.backend_identity().unwrap();
    let mut jobs_client = TestClient::connect(&broker, &backend, "jobs-peer")
        .await
        .unwrap();
    for f in [
        "$aws/things/pump-7/jobs/get",
        "$aws/things/pump-7/jobs/start-next",
        "$aws/things/pump-7/jobs/+/get",
        "$aws/things/pump-7/jobs/+/update",
    ] {
        assert!(jobs_client.subscribe(f).await.unwrap());
    }
    let (queue, queue_rx) = mpsc::channel(4);
    let (seen_tx, seen) = watch::channel(Vec::new());
    jobs_service(jobs_client, queue_rx, seen_tx);
    let signer = SigningKey::from_bytes(&[42; 32]);
    let root = TrustRootBuilder::new(1)
        .key(&signer.verifying_key(), &[Role::Root, Role::Targets])
        .build();
    Fleet {
        broker,
        streams,
        queue,
        seen,
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
    f.streams.put(job_id, "firmware 2", vec![image.to_vec()]);
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
    f.queue
        .send(JobExecution::new(
            job_id,
            "pump-7",
            document,
            1,
            TimeoutConfig::default(),
            1,
        ))
        .await
        .unwrap();
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
        receipt_key: [7; 32],
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
                .seen
                .borrow()
                .iter()
                .find(|e| e.job_id == job && e.status.is_terminal())
            {
                return e.clone();
            }
            f.seen.changed().await.unwrap();
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
