//! A tour of fleet-core, in memory: a device's `ShadowSync` converging on
//! what the cloud wants, a job handed out through the Jobs API, and a signed
//! release installed into A/B slots, with a power cut in the middle.
//!
//! ```text
//! cargo run -p examples --bin core_tour
//! ```

use std::process::ExitCode;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use fleet_core::jobs::{ImageSource, JobDocument, JobExecution, OtaJob, ThingJobs, TimeoutConfig};
use fleet_core::ota::{
    DeviceProfile, InstallReceipt, MAX_RECEIPT_LEN, OtaAction, OtaConfig, OtaEvent, OtaUpdate,
    Role, Slot, TrustRoot, TrustRootBuilder, tools,
};
use fleet_core::shadow::{Shadow, ShadowEvent, ShadowLimits, ShadowSync, SyncConfig, process};
use fleet_core::time::Instant;
use fleet_core::topic::{JobsTopicKind, Role as TopicRole, ShadowTopic, Topic, TopicPrefix};
use fleet_core::transmit::Transmit;
use fleet_core::{ThingName, shadow::UpdateRequest};
use serde_json::json;
use sha2::{Digest, Sha256};

const NOW: u64 = 1_780_000_000;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let thing = ThingName::new("pump-7")?.into_owned();
    let limits = ShadowLimits::default();

    println!("1. Shadows: the cloud sets desired while the device is offline");
    let mut stored = Shadow::new();
    let request = UpdateRequest::desired(json!({"speed": 3, "mode": "eco"})).to_payload();
    let out = process(
        &stored,
        thing.as_str(),
        fleet_core::topic::ShadowOp::Update,
        &request,
        NOW,
        &limits,
    );
    stored = out.shadow.ok_or("update refused")?;
    println!(
        "   cloud: desired = speed 3, mode eco (version {})",
        stored.version()
    );

    let mut device = ShadowSync::new(thing.clone(), &[None], SyncConfig::default(), 1);
    let now = Instant::ZERO;
    device.handle_connection(now, true);
    let mut messages = 0;
    // The broker: device publishes go to the service, replies come back.
    loop {
        while let Some(event) = device.poll_event() {
            match event {
                ShadowEvent::Synced { version, .. } => {
                    println!("   device: read the shadow (version {version})")
                }
                ShadowEvent::Delta { delta, .. } => {
                    println!(
                        "   device: asked to change {}",
                        serde_json::Value::Object(delta.clone())
                    );
                    device.report(now, None, delta)?;
                }
                ShadowEvent::Accepted { version, .. } => {
                    println!("   device: report accepted (version {version})")
                }
                _ => {}
            }
        }
        let Some(t) = device.poll_transmit() else {
            break;
        };
        match t {
            Transmit::Subscribe { filters } => {
                println!("   device: subscribes to {} shadow topics", filters.len());
                device.handle_subscribed(now);
            }
            Transmit::Publish { topic, payload, .. } => {
                let prefix = TopicPrefix::AWS;
                let Topic::Shadow(ShadowTopic {
                    thing,
                    kind: fleet_core::topic::ShadowTopicKind::Op(op, _),
                    ..
                }) = Topic::parse(&prefix, &topic)?
                else {
                    return Err("unexpected topic".into());
                };
                let out = process(&stored, thing.as_str(), op, &payload, NOW + 1, &limits);
                if let Some(s) = out.shadow {
                    stored = s;
                }
                for m in out.messages {
                    if m.kind == fleet_core::topic::ShadowTopicKind::Documents {
                        continue;
                    }
                    let reply = Topic::Shadow(ShadowTopic {
                        thing: thing.clone(),
                        shadow: None,
                        kind: m.kind,
                    })
                    .display(&prefix)
                    .to_string();
                    device.handle_message(now, &reply, &m.payload)?;
                    messages += 1;
                }
            }
        }
    }
    let (delta, _) = stored.state().ok_or("no shadow")?.delta();
    println!(
        "   converged after {messages} messages: delta is {}",
        if delta.is_empty() {
            "empty"
        } else {
            "not empty"
        }
    );

    println!("\n2. A signed release: 2-of-2 targets keys, root keys apart");
    let root_keys = [
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    ];
    let target_keys = [
        SigningKey::from_bytes(&[11; 32]),
        SigningKey::from_bytes(&[12; 32]),
    ];
    let root = TrustRoot::parse(
        &TrustRootBuilder::new(1)
            .key(&root_keys[0].verifying_key(), &[Role::Root])
            .key(&root_keys[1].verifying_key(), &[Role::Root])
            .key(&target_keys[0].verifying_key(), &[Role::Targets])
            .key(&target_keys[1].verifying_key(), &[Role::Targets])
            .threshold(Role::Root, 2)
            .threshold(Role::Targets, 2)
            .build(),
    )?;
    let image: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let manifest = fleet_core::ota::ManifestBuilder::new(
        "firmware",
        "2.1.0",
        42,
        image.len() as u64,
        Sha256::digest(&image).into(),
    )
    .hardware_id("pump-board-rev-c")
    .expires(NOW + 30 * 86_400);
    let envelope = tools::sign_manifest(&manifest, &[&target_keys[0], &target_keys[1]]);
    println!(
        "   manifest envelope: {} bytes, 2 signatures",
        envelope.len()
    );

    println!("\n3. The job that carries it, through the Jobs API");
    let mut jobs = ThingJobs::new(thing.as_str());
    let job = OtaJob::new(
        &envelope,
        ImageSource::Stream("fw-2-1-0".into()),
        b"job-nonce-1",
    );
    jobs.queue(
        JobExecution::new(
            "ota-2-1-0",
            thing.as_str(),
            job.to_value(),
            1,
            TimeoutConfig::default(),
            NOW,
        ),
        NOW,
    )?;
    let started = jobs.handle_request(
        &JobsTopicKind::StartNext(TopicRole::Request),
        br#"{"clientToken":"s1"}"#,
        NOW,
    );
    let reply: serde_json::Value = serde_json::from_slice(&started[0].payload)?;
    println!(
        "   start-next -> {} is {}",
        reply["execution"]["jobId"], reply["execution"]["status"]
    );
    let JobDocument::Ota(job) = JobDocument::parse(&reply["execution"]["jobDocument"])? else {
        return Err("not an OTA job".into());
    };
    let envelope = job.manifest_bytes()?;

    println!("\n4. The device verifies and installs into slot B; power is cut mid-download");
    let device_profile = DeviceProfile {
        hardware_id: "pump-board-rev-c",
        installed_sequence: 41,
        max_image_size: 1 << 20,
        now: Some(NOW),
    };
    let verified = root.verify_manifest(&envelope, &device_profile)?;
    let manifest_digest: [u8; 32] = Sha256::digest(&envelope).into();
    let config = OtaConfig {
        block_size: 4096,
        trial_timeout: Duration::from_secs(60),
        ..OtaConfig::default()
    };
    let mut ota = OtaUpdate::start(&verified, manifest_digest, 41, Slot::B, config);
    let (mut slot_b, mut record, mut trial, mut active) =
        (vec![0u8; image.len()], None, None, Slot::A);
    let (mut fetched, mut cut_done, mut block) = (0usize, false, Vec::new());
    let device_key = SigningKey::from_bytes(&[50; 32]);
    loop {
        while let Some(event) = ota.poll_event() {
            if let OtaEvent::Finished {
                outcome,
                installed_sequence,
                manifest_digest,
            } = event
            {
                let receipt = InstallReceipt {
                    manifest_digest,
                    outcome,
                    installed_sequence,
                    nonce: b"job-nonce-1",
                };
                let mut buf = [0u8; MAX_RECEIPT_LEN];
                let n = receipt.sign(&device_key, &mut buf)?;
                let checked = InstallReceipt::verify(&buf[..n], &device_key.verifying_key())?;
                println!(
                    "   finished: {:?}, sequence {}; signed receipt of {n} bytes verifies",
                    checked.outcome, checked.installed_sequence
                );
            }
        }
        let Some(action) = ota.poll_action() else {
            break;
        };
        let mut reboot = false;
        match action {
            OtaAction::Fetch { offset, len } => {
                block = image[offset as usize..(offset + u64::from(len)) as usize].to_vec();
                fetched += block.len();
                ota.handle_block(now, offset, &block)?;
            }
            OtaAction::Write { offset, len, .. } => {
                slot_b[offset as usize..offset as usize + len as usize].copy_from_slice(&block);
                ota.handle_done(now)?;
            }
            OtaAction::Persist(r) => {
                record = Some(r.encode());
                ota.handle_done(now)?;
                if !cut_done && fetched >= image.len() / 2 {
                    cut_done = true;
                    println!(
                        "   power cut after {} KiB; resuming from the persisted record",
                        fetched / 1024
                    );
                    reboot = true;
                }
            }
            OtaAction::SetTrialBoot { slot } => {
                trial = Some(slot);
                ota.handle_done(now)?;
            }
            OtaAction::Reboot => {
                println!("   rebooting into the new image on trial");
                reboot = true;
            }
            OtaAction::RunSelfTest => {
                println!("   self-test passes");
                ota.handle_self_test(now, true)?;
            }
            OtaAction::Confirm { slot } => {
                active = slot;
                ota.handle_done(now)?;
            }
        }
        if reboot {
            let booted = trial.take().unwrap_or(active);
            ota = OtaUpdate::resume(record.as_ref().ok_or("no record")?, booted, now, config)?;
        }
    }
    println!(
        "   fetched {} KiB for a {} KiB image; slot B active: {}",
        fetched / 1024,
        image.len() / 1024,
        active == Slot::B
    );
    Ok(())
}
