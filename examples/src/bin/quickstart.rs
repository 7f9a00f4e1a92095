//! The whole product in one command, on this machine, in a temporary
//! directory:
//!
//! ```text
//! cargo run --release -p examples --bin quickstart
//! ```
//!
//! It starts the fleet cloud with its embedded broker (mutual TLS) and
//! SQLite, makes a development CA and a claim certificate, provisions six
//! simulated devices by claim, sets desired state and shows each device
//! converge, sends a command, routes telemetry to a JSON-lines file, then
//! signs a release and rolls it out as a campaign in two groups with A/B
//! slots, where one device fails its self-test and rolls back while the
//! rollout goes on, as its policy allows. It prints each step and a summary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use fleet_cloud::pki::Pki;
use fleet_cloud::store::StoreLocation;
use fleet_cloud::telemetry::{JsonLinesSink, Rule, TelemetryRouter};
use fleet_cloud::{
    BackendIdentity, BrokerPolicy, BrokerSetup, CampaignSpec, EmbeddedConfig, FleetConfig,
    FleetServer, JobsService, ProvisioningSetup, ProvisioningTemplate, Publisher,
    RECEIPT_KEY_ATTRIBUTE, Registry, ShadowService, StreamService,
};
use fleet_core::ThingName;
use fleet_core::jobs::{
    CommandStatus, GroupAction, RateLimit, RetryPolicy, RolloutGroup, RolloutPolicy, RolloutStatus,
    Threshold, TimeoutConfig,
};
use fleet_core::ota::{ManifestBuilder, Role, TrustRootBuilder};
use fleet_core::shadow::UpdateRequest;
use fleet_device::{AgentEvent, Backoff, ClaimConfig, FileSlots, OtaSettings, provision_by_claim};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sha2::Digest;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const DEVICES: usize = 6;
/// This device's new image fails its self-test.
const FAULTY: usize = 1;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let started = Instant::now();
    match run().await {
        Ok(()) => {
            println!("\nDone in {:.1} s.", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/7] {text}");
}

fn epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Cloud {
    pki: Pki,
    /// Where devices connect (the embedded broker).
    broker_addr: SocketAddr,
    /// Publishes through the backend's connection.
    publisher: Publisher,
    shadows: ShadowService,
    jobs: JobsService,
    streams: StreamService,
    registry: Registry,
    telemetry_file: PathBuf,
    server: FleetServer,
}

/// The backend, started as `fleet serve` starts it ([`FleetServer`]).
async fn start_cloud(dir: &Path) -> Result<Cloud, BoxError> {
    let pki = Pki::new("quickstart CA")?;
    let server = pki.server_identity()?;
    let mut broker = EmbeddedConfig::new(
        "127.0.0.1:0".parse()?,
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    );
    broker.policy = BrokerPolicy {
        claim_identities: vec!["claim@factory".into()],
        reply_routing: true,
        ..BrokerPolicy::default()
    };
    let backend = pki.client_identity(fleet_cloud::DEFAULT_BACKEND_IDENTITY)?;
    let mut config = FleetConfig::new(
        StoreLocation::Sqlite(dir.join("fleet.db")),
        // The broker admits a device only as the registry binds its
        // certificate: a claim certificate grants nothing until registered.
        BrokerSetup::Embedded(broker),
        BackendIdentity {
            client_id: "fleet-cloud".into(),
            cert_pem: backend.cert_pem,
            key_pem: backend.key_pem,
            ca_pem: pki.ca_pem(),
        },
    );
    config.provisioning = Some(ProvisioningSetup {
        ca: pki.clone(),
        templates: vec![ProvisioningTemplate {
            allow_replace: false,
            name: "factory".into(),
            thing_name_prefix: "pump-".into(),
            name_parameter: "SerialNumber".into(),
            required_parameters: Vec::new(),
            attributes: BTreeMap::from([("model".to_string(), "P100".to_string())]),
            groups: Vec::new(),
            body: None,
            webhook: None,
        }],
    });
    let telemetry_file = dir.join("telemetry.jsonl");
    config.telemetry = Some(TelemetryRouter::new(
        vec![Rule {
            filter: "dt/+/telemetry".into(),
            predicate: None,
            sink: Arc::new(JsonLinesSink::new(&telemetry_file)),
        }],
        &dir.join("dead-letters.jsonl"),
    ));
    let fleet = FleetServer::start(config).await?;
    fleet.registry().create_group("early", None).await?;
    Ok(Cloud {
        pki,
        broker_addr: fleet.broker_addr().ok_or("the embedded broker")?,
        publisher: fleet.publisher(),
        shadows: fleet.shadows().clone(),
        jobs: fleet.jobs().clone(),
        streams: fleet.streams().clone(),
        registry: fleet.registry().clone(),
        telemetry_file,
        server: fleet,
    })
}

/// What the quickstart's devices saw, for the summary.
#[derive(Default)]
struct Seen {
    converged: AtomicUsize,
    commands: AtomicUsize,
}

/// One simulated device: applies desired state, answers commands,
/// publishes telemetry, installs updates (restarting when asked).
async fn device(
    cloud: Arc<Cloud>,
    root: Vec<u8>,
    i: usize,
    dir: PathBuf,
    seen: Arc<Seen>,
) -> Result<(String, bool), BoxError> {
    let claim = cloud.pki.client_identity("claim@factory")?;
    let serial = format!("{:04}", 100 + i);
    let config = ClaimConfig {
        host: "localhost".into(),
        port: cloud.broker_addr.port(),
        claim_cert_pem: claim.cert_pem,
        claim_key_pem: claim.key_pem,
        ca_pem: cloud.pki.ca_pem(),
        template: "factory".into(),
        parameters: BTreeMap::from([("SerialNumber".to_string(), serial.clone())]),
        thing_name: format!("pump-{serial}"),
        state_dir: dir.join("identity"),
        timeout: Duration::from_secs(3),
        protocol: Default::default(),
    };
    // A device asks again when nobody answered (the cloud may still be
    // starting); a refusal is final.
    let mut attempt = 0;
    let me = loop {
        attempt += 1;
        match provision_by_claim(&config).await {
            Err(fleet_device::ProvisionError::Network(_)) if attempt < 20 => {}
            other => break other?,
        }
    };
    // The device's receipt key, registered with its thing.
    let mut receipt_key = [0u8; 32];
    getrandom::fill(&mut receipt_key)?;
    let public = SigningKey::from_bytes(&receipt_key).verifying_key();
    let mut attrs = cloud.registry.thing(&me.thing_name).await?.attributes;
    attrs.insert(
        RECEIPT_KEY_ATTRIBUTE.into(),
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes()),
    );
    cloud
        .registry
        .set_attributes(&me.thing_name, &attrs)
        .await?;
    if i < 3 {
        cloud.registry.add_to_group("early", &me.thing_name).await?;
    }
    let mut sent_telemetry = false;
    loop {
        let slots = Arc::new(Mutex::new(FileSlots::boot(&dir.join("slots"), 1 << 20, 1)?));
        let healthy = i != FAULTY;
        let agent = me
            .agent("localhost", cloud.broker_addr.port(), &cloud.pki.ca_pem())
            .state_dir(dir.join("agent"))
            .backoff(Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
            })
            .ota(OtaSettings {
                trust_root: root.clone(),
                hardware_id: "p100".into(),
                slots,
                self_test: Arc::new(move || healthy),
                receipt_key: receipt_key.into(),
                block_size: 4096,
            })
            .start()?;
        loop {
            match agent.next_event().await {
                Some(AgentEvent::Connected) if !sent_telemetry => {
                    sent_telemetry = true;
                    let readings = (0..5)
                        .map(|k| {
                            json!({"pressure": 2.0 + k as f64 / 10.0})
                                .to_string()
                                .into_bytes()
                        })
                        .collect();
                    for d in agent.publish_batch("telemetry", readings).await? {
                        d.acknowledged().await?;
                    }
                }
                Some(AgentEvent::ShadowDelta { shadow, delta, .. }) => {
                    agent.report(shadow.as_deref(), delta).await?;
                    seen.converged.fetch_add(1, Ordering::SeqCst);
                }
                Some(AgentEvent::Command {
                    execution_id,
                    command,
                    ..
                }) => {
                    let answer = json!({"pong": command == "ping", "thing": me.thing_name});
                    agent
                        .respond(&execution_id, CommandStatus::Succeeded, answer)
                        .await?;
                    seen.commands.fetch_add(1, Ordering::SeqCst);
                }
                Some(AgentEvent::RebootRequired { .. }) => {
                    agent.shutdown().await;
                    break;
                }
                Some(AgentEvent::OtaFinished { committed, .. }) => {
                    // Stay up until the report with the receipt is in.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    agent.shutdown().await;
                    return Ok((me.thing_name, committed));
                }
                Some(_) => {}
                None => return Err("the agent stopped".into()),
            }
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();

    step(
        1,
        "Starting the fleet cloud: embedded MQTT broker (mutual TLS), SQLite, development CA",
    );
    let cloud = Arc::new(start_cloud(dir).await?);
    println!(
        "  broker on {}  store {}",
        cloud.broker_addr,
        dir.join("fleet.db").display()
    );

    step(
        2,
        &format!("Provisioning {DEVICES} devices by claim (keys made on the devices)"),
    );
    let targets_key = SigningKey::from_bytes(&{
        let mut k = [0u8; 32];
        getrandom::fill(&mut k)?;
        k
    });
    let root = TrustRootBuilder::new(1)
        .key(&targets_key.verifying_key(), &[Role::Root, Role::Targets])
        .build();
    let seen = Arc::new(Seen::default());
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        devices.push(tokio::spawn(device(
            cloud.clone(),
            root.clone(),
            i,
            dir.join(format!("device-{i}")),
            seen.clone(),
        )));
    }
    let bar = ProgressBar::new(DEVICES as u64).with_style(
        ProgressStyle::with_template("  {bar:30} {pos}/{len} {msg}")?.progress_chars("=> "),
    );
    let mut things = Vec::new();
    for _ in 0..1200 {
        things = cloud
            .registry
            .things(None, 100)
            .await?
            .into_iter()
            .map(|t| t.name)
            .collect();
        bar.set_position(things.len() as u64);
        if things.len() == DEVICES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_with_message("registered");
    if things.len() != DEVICES {
        return Err(format!("only {} devices provisioned", things.len()).into());
    }
    println!("  {}", things.join(", "));

    step(
        3,
        "Setting desired state from the Rust API; devices converge",
    );
    for t in &things {
        let thing = ThingName::new(t)?;
        let out = cloud
            .shadows
            .update(
                &thing,
                None,
                &UpdateRequest::desired(json!({"speed": 3})),
                epoch(),
            )
            .await?;
        for m in out {
            cloud.publisher.publish(&m.topic, m.payload).await?;
        }
    }
    let converged = wait_for(Duration::from_secs(20), || async {
        let mut n = 0;
        for t in &things {
            let s = cloud
                .shadows
                .get(&ThingName::new(t).ok()?, None)
                .await
                .ok()?;
            if s.state()
                .is_some_and(|st| st.reported().get("speed") == Some(&json!(3)))
            {
                n += 1;
            }
        }
        (n == things.len()).then_some(n)
    })
    .await
    .ok_or("devices did not converge")?;
    println!("  {converged}/{DEVICES} devices report speed = 3");

    step(4, "Sending a command and awaiting the answers");
    for t in &things {
        let answer = cloud
            .server
            .commands()
            .send(
                &ThingName::new(t)?,
                "ping",
                json!({}),
                Duration::from_secs(10),
            )
            .await?;
        println!("  {t}: {:?} {}", answer.status, answer.payload);
    }

    step(
        5,
        "Telemetry routed by rule `dt/+/telemetry` to a JSON-lines file",
    );
    let lines = wait_for(Duration::from_secs(10), || async {
        let n = std::fs::read_to_string(&cloud.telemetry_file)
            .ok()?
            .lines()
            .count();
        (n >= DEVICES * 5).then_some(n)
    })
    .await
    .ok_or("telemetry did not arrive")?;
    println!("  {lines} readings in {}", cloud.telemetry_file.display());

    step(
        6,
        "Signing a release and rolling it out: group `early` first, then the rest",
    );
    let image: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let manifest = ManifestBuilder::new(
        "pump-fw",
        "2.0.0",
        2,
        image.len() as u64,
        sha2::Sha256::digest(&image).into(),
    )
    .hardware_id("p100");
    let envelope = fleet_core::ota::tools::sign_manifest(&manifest, &[&targets_key]);
    cloud
        .jobs
        .register_release("fw-2-0-0", &envelope, image, &cloud.streams)
        .await?;
    let policy = RolloutPolicy {
        rate: RateLimit::Constant { per_minute: 600 },
        groups: vec![RolloutGroup {
            size: 3,
            // One failure of three is within this policy: the rollout goes on.
            success_percent: 60,
            on_success: GroupAction::NextGroup,
            error_threshold: Some(Threshold::Count(2)),
        }],
        abort: Vec::new(),
        retry: RetryPolicy::default(),
        in_progress_timeout_secs: None,
    };
    // The early group first, then everyone else.
    let early = cloud.registry.group_members("early").await?;
    let mut order = early.clone();
    order.extend(things.iter().filter(|t| !early.contains(t)).cloned());
    let out = cloud
        .jobs
        .start_campaign(
            CampaignSpec {
                campaign_id: "rollout-2-0-0".into(),
                release_id: "fw-2-0-0".into(),
                things: order,
                groups: Vec::new(),
                policy,
                timeouts: TimeoutConfig::default(),
            },
            &cloud.streams,
            &cloud.registry,
            cloud.jobs.now(),
        )
        .await?;
    for m in out {
        cloud.publisher.publish(&m.topic, m.payload).await?;
    }
    let bar = ProgressBar::new(DEVICES as u64).with_style(
        ProgressStyle::with_template("  {bar:30} {pos}/{len} done  {msg}")?.progress_chars("=> "),
    );
    let mut watch = cloud.jobs.watch_campaign(
        "rollout-2-0-0",
        cloud.registry.clone(),
        Duration::from_millis(200),
    );
    let mut last = None;
    while let Some(s) = tokio::time::timeout(Duration::from_secs(40), watch.recv())
        .await
        .ok()
        .flatten()
    {
        let s = s?;
        bar.set_position((s.succeeded + s.rolled_back + s.failed) as u64);
        bar.set_message(format!(
            "{} committed, {} rolled back, {} in progress",
            s.succeeded, s.rolled_back, s.in_progress
        ));
        last = Some(s);
    }
    bar.finish();
    let status = last.ok_or("no campaign status")?;
    println!("  rollout: {:?}", status.rollout);

    step(7, "Summary");
    let mut results = Vec::new();
    for d in devices {
        results.push(d.await??);
    }
    results.sort();
    println!("  {:<12} {:<10} {:<12}", "device", "firmware", "receipt");
    for (thing, committed) in &results {
        println!(
            "  {:<12} {:<10} {:<12}",
            thing,
            if *committed { "2.0.0" } else { "1 (kept)" },
            if *committed {
                "committed"
            } else {
                "rolled back"
            }
        );
    }
    println!(
        "  shadows converged: {}  commands answered: {}  receipts verified: {}",
        seen.converged.load(Ordering::SeqCst),
        seen.commands.load(Ordering::SeqCst),
        status.succeeded + status.rolled_back
    );
    if status.rollout != Some(RolloutStatus::Completed)
        || status.rolled_back != 1
        || status.succeeded != DEVICES - 1
    {
        return Err(format!("unexpected campaign outcome: {status:?}").into());
    }
    Ok(())
}

/// Polls `check` until it gives a value or `timeout` passes.
async fn wait_for<T, F, Fut>(timeout: Duration, check: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = check().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
