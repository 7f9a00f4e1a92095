//! Scale-out, end to end: three `fleet serve` processes share one broker
//! (MQTT 5 shared subscriptions) and one PostgreSQL. 1,000 devices
//! (`fleet_device::Agent`s, mutual TLS) report their shadows about once a
//! second and run a job released by a rollout (created with `fleet job
//! create --rollout`). Mid-run, the instance driving the rollout is killed
//! with SIGKILL. Then:
//!
//! - no accepted update is lost and none is applied twice: each device's
//!   accepted versions are 1, 2, 3, ... with no gap or repeat, and its
//!   stored shadow holds its last accepted report at its last accepted
//!   version;
//! - the rollout finishes: every device SUCCEEDED, each released once;
//! - exactly one instance drives it at any time: the killed one until it
//!   died, then the one that took its lease over (after it expired), and
//!   the third never (from the instances' logs).
//!
//! Each instance has a directory of its own, as on a machine of its own:
//! what they share (shadows, jobs, the registry and its API tokens,
//! release images) is in PostgreSQL.
//!
//! The broker is fleet's embedded broker (Mosquitto 2.0 does not deliver
//! `$aws` topics to shared subscriptions), on its own runtime.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet_cloud::store::{ShadowKey, ShadowStore};
use fleet_cloud::{JobStore, JobsService, PgLease, PgStore};
use fleet_core::jobs::JobStatus;
use fleet_device::{Agent, AgentBuilder, AgentEvent};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, Postgres};
use serde_json::{Map, json};

const DEVICES: usize = 1000;
const INSTANCES: usize = 3;
const JOB: &str = "wave-1";
/// 50 releases a second: the rollout lasts about 20 s, across the kill.
const RATE_PER_MINUTE: u32 = 3000;
const LEASE: &str = "jobs-sweeper";
const DEADLINE: Duration = Duration::from_secs(240);
/// The admin token the first instance wrote, used against every instance.
const ADMIN_TOKEN: &str = "cloud-0/admin.token";

/// A `fleet serve` process, killed when dropped.
struct Instance {
    child: Child,
    log: PathBuf,
    /// Its lease holder id (`cloud-{k}-{random}`), from its log.
    id: String,
    api: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a line of `log` containing `needle`; returns it.
fn wait_line(log: &Path, needle: &str, child: &mut Child) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("fleet serve exited ({status}) before `{needle}`:\n{text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fleet serve did not log `{needle}` within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `fleet serve` number `k` with a directory of its own (holding
/// copies of the certificates), as on a machine of its own: everything the
/// instances share is in PostgreSQL. The first writes the admin token
/// ([`ADMIN_TOKEN`]); the others find a token in the registry and write none.
fn start_instance(k: usize, dir: &Path, broker: &Broker, store: &str) -> Instance {
    let log = dir.join(format!("cloud-{k}.log"));
    let own = dir.join(format!("cloud-{k}"));
    std::fs::create_dir_all(&own).unwrap();
    for name in [
        "ca.pem",
        "server.pem",
        "server.key",
        "backend.pem",
        "backend.key",
        "ca.key",
    ] {
        if dir.join(name).exists() {
            std::fs::copy(dir.join(name), own.join(name)).unwrap();
        }
    }
    let dir = own.as_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--broker")
        .arg(format!("localhost:{}", broker.port()))
        .arg("--dir")
        .arg(dir)
        .args(["--store", store, "--share-group", "fleet"])
        .args(["--client-id", &format!("cloud-{k}"), "--api", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("start fleet serve");
    let line = wait_line(&log, "store: PostgreSQL; instance ", &mut child);
    let id = line.rsplit("instance ").next().unwrap().trim().to_string();
    let line = wait_line(&log, "management API on https://", &mut child);
    let api = line.rsplit("https://").next().unwrap().trim().to_string();
    let port = api.rsplit(':').next().unwrap().to_string();
    wait_line(&log, "connected; serving shadow requests", &mut child);
    Instance {
        child,
        log,
        id,
        api: format!("https://localhost:{port}"),
    }
}

/// What one device saw.
#[derive(Debug, Default)]
struct Seen {
    /// The versions its accepted reports got, in order (report `n` carried
    /// `seq: n`).
    versions: Vec<u64>,
    /// Reports or job updates given up (with why).
    failures: Vec<String>,
    /// Job updates to SUCCEEDED accepted.
    jobs_done: usize,
    /// Connections lost (with why): a report in flight then goes out again
    /// as a new request after the reconnection.
    disconnects: Vec<String>,
}

async fn run_device(agent: Arc<Agent>, offset: Duration, stop: Arc<AtomicBool>) -> Seen {
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    // Events: each job notice is answered SUCCEEDED (in its own task, so
    // events keep flowing while the update waits for its answer).
    let events = {
        let (agent, seen) = (agent.clone(), seen.clone());
        tokio::spawn(async move {
            while let Some(event) = agent.next_event().await {
                if let AgentEvent::Disconnected { reason, .. } = &event {
                    seen.lock().unwrap().disconnects.push(reason.clone());
                }
                if let AgentEvent::Job { job_id, .. } = event {
                    let (agent, seen) = (agent.clone(), seen.clone());
                    tokio::spawn(async move {
                        let r = agent.update_job(JobStatus::Succeeded, None).await;
                        let mut s = seen.lock().unwrap();
                        match r {
                            Ok(()) => s.jobs_done += 1,
                            Err(e) => s.failures.push(format!("job {job_id}: {e}")),
                        }
                    });
                }
            }
        })
    };
    tokio::time::sleep(offset).await;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let mut reported = Map::new();
        reported.insert("seq".into(), json!(seq));
        match agent.report(None, reported).await {
            Ok(version) => seen.lock().unwrap().versions.push(version),
            Err(e) => {
                seen.lock()
                    .unwrap()
                    .failures
                    .push(format!("report {seq}: {e}"));
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Let a job update still in flight finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.shutdown().await;
    let _ = events.await;
    std::mem::take(&mut *seen.lock().unwrap())
}

/// `(timestamp, instance, message)` of the log lines containing `needle`.
fn log_events(instances: &[Instance], needle: &str) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    for (k, i) in instances.iter().enumerate() {
        for line in std::fs::read_to_string(&i.log).unwrap().lines() {
            if line.contains(needle) {
                let ts = line.split_whitespace().next().unwrap_or("").to_string();
                out.push((ts, k, line.to_string()));
            }
        }
    }
    // RFC 3339 timestamps of one clock, same width: they sort as text.
    out.sort();
    out
}

/// A PostgreSQL, the embedded broker, and a directory with the
/// certificates every `fleet serve` of the test shares.
fn setup() -> (Postgres, Broker, tempfile::TempDir) {
    let pg = Postgres::start().expect("start PostgreSQL");
    let broker = Broker::start_with(BrokerOptions {
        kind: BrokerKind::Embedded,
        ..BrokerOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = broker.pki().server_identity().unwrap();
    let backend = broker.backend_identity().unwrap();
    for (name, text) in [
        ("ca.pem", broker.pki().ca_pem()),
        ("server.pem", server.cert_pem),
        ("server.key", server.key_pem),
        ("backend.pem", backend.cert_pem),
        ("backend.key", backend.key_pem),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    (pg, broker, dir)
}

/// Runs the `fleet` CLI against `instance`'s API; its stdout, or the test
/// fails with its stderr.
fn cli(instance: &Instance, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(args)
        .env("FLEET_API", &instance.api)
        .env("FLEET_TOKEN_FILE", dir.join(ADMIN_TOKEN))
        .env("FLEET_CA", dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_survive_a_sigkill_mid_run() {
    let (pg, broker, dir) = setup();
    let url = pg.uri();
    let d = dir.path();
    let mut instances: Vec<Instance> = (0..INSTANCES)
        .map(|k| start_instance(k, d, &broker, &url))
        .collect();
    let store = PgStore::connect(&url, 4).await.unwrap();
    let jobs = JobsService::new(store.clone());

    // The devices connect, 50 at a time.
    let names: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:04}")).collect();
    let mut agents = Vec::with_capacity(DEVICES);
    for batch in names.chunks(50) {
        let mut starting = Vec::new();
        for name in batch {
            let id = broker.device_identity(name).unwrap();
            let agent = AgentBuilder::new(
                "localhost",
                broker.port(),
                name,
                &id.cert_pem,
                &id.key_pem,
                &broker.pki().ca_pem(),
            )
            .request_timeout(Duration::from_secs(3))
            .keep_alive(Duration::from_secs(60))
            .start()
            .unwrap();
            starting.push(tokio::spawn(async move {
                let wait = async {
                    while let Some(e) = agent.next_event().await {
                        if matches!(e, AgentEvent::Connected) {
                            return;
                        }
                    }
                    panic!("the agent stopped");
                };
                tokio::time::timeout(Duration::from_secs(60), wait)
                    .await
                    .expect("a device connects within 60 s");
                agent
            }));
        }
        for s in starting {
            agents.push(Arc::new(s.await.unwrap()));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let devices: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let offset = Duration::from_millis((i as u64 * 997) % 1000);
            tokio::spawn(run_device(a, offset, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The rollout, created through the lease holder's API (its first
    // release happens there, at creation).
    let holder = PgLease::holder(&store, LEASE)
        .await
        .unwrap()
        .expect("a leader");
    let leader = instances
        .iter()
        .position(|i| i.id == holder)
        .expect("the leader is one of ours");
    let mut create = Command::new(env!("CARGO_BIN_EXE_fleet"));
    create
        .args(["job", "create", JOB, r#"{"op":"noop"}"#, "--json"])
        .arg("--rollout")
        .arg(format!(
            r#"{{"rate":{{"constant":{{"perMinute":{RATE_PER_MINUTE}}}}}}}"#
        ))
        .env("FLEET_API", &instances[leader].api)
        .env("FLEET_TOKEN_FILE", d.join(ADMIN_TOKEN))
        .env("FLEET_CA", d.join("ca.pem"));
    for name in &names {
        create.arg("--thing").arg(name);
    }
    let out = create.output().unwrap();
    assert!(
        out.status.success(),
        "fleet job create: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Mid-run: once a tenth has succeeded, the leader dies (early, so that a slow
    // machine still kills it well before the last release).
    let started = Instant::now();
    loop {
        let s = jobs.snapshot(JOB).await.unwrap();
        let done = s
            .executions
            .get(&JobStatus::Succeeded)
            .copied()
            .unwrap_or(0);
        if done >= DEVICES / 10 {
            assert!(
                s.not_released > 0,
                "the rollout ended before the kill: {s:?}"
            );
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the rollout stalled: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    instances[leader].child.kill().unwrap(); // SIGKILL
    instances[leader].child.wait().unwrap();
    let before_kill = jobs.snapshot(JOB).await.unwrap();

    // The rollout finishes without it.
    let finished = loop {
        let s = jobs.snapshot(JOB).await.unwrap();
        if s.is_final() {
            break s;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the rollout did not finish after the kill: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // A few more seconds of shadow traffic on two instances, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::with_capacity(DEVICES);
    for d in devices {
        seen.push(d.await.unwrap());
    }

    // The rollout: every device SUCCEEDED, each released once.
    assert_eq!(
        finished.executions,
        BTreeMap::from([(JobStatus::Succeeded, DEVICES)]),
        "{finished:?}"
    );
    assert_eq!(finished.not_released, 0);
    for name in &names {
        let e = store.load_thing(name).await.unwrap().value;
        let e = e.execution(JOB).expect("an execution");
        assert_eq!(
            (e.status, e.execution_number),
            (JobStatus::Succeeded, 1),
            "{name}"
        );
    }

    // The shadows: nothing given up, nothing lost, nothing applied twice.
    let failures: Vec<_> = seen.iter().flat_map(|s| s.failures.iter()).collect();
    assert!(
        failures.is_empty(),
        "{} gave up: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut updates = 0;
    for (name, s) in names.iter().zip(&seen) {
        assert_eq!(s.jobs_done, 1, "{name}: its job update accepted once");
        let expected: Vec<u64> = (1..=s.versions.len() as u64).collect();
        assert_eq!(
            s.versions, expected,
            "{name}: accepted versions (disconnects: {:?})",
            s.disconnects
        );
        let key = ShadowKey {
            thing: name.clone(),
            shadow: None,
        };
        let stored = store.load(&key).await.unwrap().value;
        assert_eq!(
            stored.version(),
            s.versions.len() as u64,
            "{name}: stored version"
        );
        let reported = stored.state().expect("a shadow").reported();
        assert_eq!(
            reported.get("seq"),
            Some(&json!(s.versions.len())),
            "{name}: the last accepted report is stored"
        );
        updates += s.versions.len();
    }
    assert!(
        updates >= 10 * DEVICES,
        "only {updates} shadow updates in the run"
    );

    // Leadership: the killed leader drove the rollout until it died; one
    // other instance took the lease over and drove it from then on; the
    // third never did.
    let releases = log_events(&instances, "rollout released");
    let taken = log_events(&instances, "lease taken");
    let drivers: Vec<usize> = releases.iter().map(|(_, k, _)| *k).collect();
    let split = drivers
        .iter()
        .position(|&k| k != leader)
        .expect("someone took over");
    let successor = drivers[split];
    assert!(
        drivers[..split].iter().all(|&k| k == leader)
            && drivers[split..].iter().all(|&k| k == successor),
        "more than one driver at a time: {releases:#?}"
    );
    let took: Vec<_> = taken.iter().filter(|(_, k, _)| *k == successor).collect();
    assert_eq!(took.len(), 1, "{taken:#?}");
    assert!(
        releases[split - 1].0 < took[0].0 && took[0].0 <= releases[split].0,
        "the successor drove before it held the lease: {releases:#?} {taken:#?}"
    );
    assert_eq!(
        taken.iter().filter(|(_, k, _)| *k == leader).count(),
        1,
        "{taken:#?}"
    );
    assert_eq!(taken.len(), 2, "the third instance never leads: {taken:#?}");
    println!(
        "{DEVICES} devices, {updates} shadow updates; leader cloud-{leader} killed at {} succeeded / {} not released; cloud-{successor} took over; {} release steps ({} before the kill)",
        before_kill
            .executions
            .get(&JobStatus::Succeeded)
            .copied()
            .unwrap_or(0),
        before_kill.not_released,
        releases.len(),
        split
    );
}

/// A release uploaded through one instance's API is kept in PostgreSQL:
/// after that instance is killed, another starts a campaign with it and
/// serves its image to a device, block for block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_uploaded_through_one_instance_is_served_by_another() {
    use fleet_core::stream::{DataBlock, DescribeRequest, Format, GetRequest, StreamDescription};
    let (pg, broker, dir) = setup();
    let d = dir.path();
    let mut first = start_instance(0, d, &broker, &pg.uri());
    let second = start_instance(1, d, &broker, &pg.uri());

    let image: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("fw.bin"), &image).unwrap();
    let path = |name: &str| d.join(name).display().to_string();
    cli(&first, d, &["keygen", "--out", &path("release.key")]);
    cli(
        &first,
        d,
        &[
            "manifest",
            "sign",
            "--image",
            &path("fw.bin"),
            "--key",
            &path("release.key"),
            "--component",
            "fw",
            "--version",
            "2.0.0",
            "--sequence",
            "2",
            "--hardware-id",
            "p100",
            "--out",
            &path("fw.envelope"),
        ],
    );
    cli(
        &first,
        d,
        &[
            "release",
            "upload",
            "fw-2",
            "--envelope",
            &path("fw.envelope"),
            "--image",
            &path("fw.bin"),
        ],
    );
    cli(&first, d, &["thing", "create", "dev-ota"]);
    assert!(
        !d.join("cloud-1/admin.token").exists(),
        "the registry, with its tokens, is shared: the second instance made none"
    );
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();

    // The other instance knows the release: the campaign starts.
    let c = cli(
        &second,
        d,
        &[
            "campaign",
            "start",
            "c1",
            "--release",
            "fw-2",
            "--thing",
            "dev-ota",
            "--json",
        ],
    );
    assert!(c.contains("\"campaignId\""), "{c}");

    // And it serves the image (the only instance left answers).
    let id = broker.device_identity("dev-ota").unwrap();
    let mut dev = fleet_testkit::TestClient::connect(&broker, &id, "dev-ota")
        .await
        .unwrap();
    let base = "$aws/things/dev-ota/streams/fw-2";
    assert!(dev.subscribe(&format!("{base}/+/json")).await.unwrap());
    let describe = DescribeRequest {
        client_token: Some("d1".into()),
    };
    dev.publish(
        &format!("{base}/describe/json"),
        describe.encode(Format::Json),
    )
    .await
    .unwrap();
    let m = next_answer(&mut dev, "/description/json").await;
    let desc = StreamDescription::decode(&m.payload, Format::Json).unwrap();
    assert_eq!(desc.files[0].size as usize, image.len());
    let block_size = 4096u32;
    let blocks = (image.len() as u32).div_ceil(block_size);
    let get = GetRequest {
        client_token: Some("g1".into()),
        version: Some(desc.version),
        file_id: 0,
        block_size,
        offset: 0,
        count: blocks,
        bitmap: None,
    };
    dev.publish(&format!("{base}/get/json"), get.encode(Format::Json))
        .await
        .unwrap();
    let mut got = vec![Vec::new(); blocks as usize];
    for _ in 0..blocks {
        let m = next_answer(&mut dev, "/data/json").await;
        let block = DataBlock::decode(&m.payload, Format::Json).unwrap();
        got[block.block_id as usize] = block.payload;
    }
    assert_eq!(got.concat(), image, "the image, block for block");
}

/// The next message on a topic ending with `suffix` (a rejection fails).
async fn next_answer(dev: &mut fleet_testkit::TestClient, suffix: &str) -> fleet_testkit::Message {
    loop {
        let m = dev
            .recv(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no {suffix} within 10 s"));
        assert!(
            !m.topic.ends_with("/rejected/json"),
            "rejected: {}",
            String::from_utf8_lossy(&m.payload)
        );
        if m.topic.ends_with(suffix) {
            return m;
        }
    }
}

/// Provisioning by claim with two instances: a device's certificate request
/// and its registration are shared requests, so either instance may take
/// either; the ownership token is kept in PostgreSQL, so every device
/// registers, whichever instance took which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_provision_by_claim_through_two_instances() {
    use fleet_device::{ClaimConfig, provision_by_claim};
    const DEVICES: usize = 12;
    let pg = Postgres::start().expect("start PostgreSQL");
    let broker = Broker::start_with(BrokerOptions {
        kind: BrokerKind::Embedded,
        policy: fleet_testkit::BrokerPolicy {
            claim_identities: vec!["claim@factory".into()],
            ..fleet_testkit::BrokerPolicy::default()
        },
        ..BrokerOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = broker.pki().server_identity().unwrap();
    let backend = broker.backend_identity().unwrap();
    for (name, text) in [
        ("ca.pem", broker.pki().ca_pem()),
        // The fleet CA signs the devices' certificates.
        ("ca.key", broker.pki().ca_key_pem().unwrap()),
        ("server.pem", server.cert_pem),
        ("server.key", server.key_pem),
        ("backend.pem", backend.cert_pem),
        ("backend.key", backend.key_pem),
    ] {
        std::fs::write(d.join(name), text).unwrap();
    }
    let instances: Vec<Instance> = (0..2)
        .map(|k| start_instance(k, d, &broker, &pg.uri()))
        .collect();
    let claim = broker.claim_identity("claim@factory").unwrap();
    // One certificate request that is refused (and so never registered):
    // the broker hands shared requests out in turn per topic filter, and
    // this puts the certificate requests and the registrations out of step,
    // so that a device's two requests reach different instances.
    let mut odd = fleet_testkit::TestClient::connect(&broker, &claim, "claim@factory")
        .await
        .unwrap();
    assert!(odd.subscribe("$aws/clients/claim@factory/#").await.unwrap());
    odd.publish_with_response_topic(
        "$aws/certificates/create-from-csr/json",
        "{}",
        "$aws/clients/claim@factory/csr",
    )
    .await
    .unwrap();
    let refused = odd.recv(Duration::from_secs(10)).await.expect("an answer");
    assert!(refused.topic.ends_with("/rejected"), "{}", refused.topic);
    odd.disconnect().await;
    for serial in 0..DEVICES {
        let config = ClaimConfig {
            host: "localhost".into(),
            port: broker.port(),
            claim_cert_pem: claim.cert_pem.clone(),
            claim_key_pem: claim.key_pem.clone(),
            ca_pem: broker.pki().ca_pem(),
            template: "default".into(),
            parameters: [("SerialNumber".to_string(), serial.to_string())].into(),
            thing_name: format!("thing-{serial}"),
            state_dir: d.join(format!("device-{serial}")),
            timeout: Duration::from_secs(10),
            protocol: Default::default(),
        };
        let me = provision_by_claim(&config)
            .await
            .unwrap_or_else(|e| panic!("device {serial}: {e}"));
        assert_eq!(me.thing_name, format!("thing-{serial}"));
    }
    // Each registered once, with its certificate, in the shared registry.
    let store = PgStore::connect(&pg.uri(), 2).await.unwrap();
    let registry = fleet_cloud::Registry::postgres(&store);
    let things = registry.things(None, 100).await.unwrap();
    assert_eq!(things.len(), DEVICES);
    for t in &things {
        let certificates = registry.certificates(&t.name).await.unwrap();
        assert_eq!(certificates.len(), 1, "{}", t.name);
    }
    // Which instance issued each certificate and which registered it, from
    // their logs: some devices crossed from one to the other.
    let issued = log_events(&instances, "provisioning: issued a certificate for ");
    let registered = log_events(&instances, "provisioning: registered ");
    let by = |events: &[(String, usize, String)], needle: &str| {
        events
            .iter()
            .find(|(_, _, line)| line.contains(needle))
            .map(|(_, k, _)| *k)
            .unwrap_or_else(|| panic!("no log line for {needle}"))
    };
    let crossed = (0..DEVICES)
        .filter(|serial| {
            let issued_by = by(&issued, &format!("certificate for thing-{serial} "));
            let registered_by = by(&registered, &format!("registered thing-{serial} "));
            issued_by != registered_by
        })
        .count();
    println!("{crossed} of {DEVICES} devices registered at another instance than issued");
    assert!(
        crossed > 0,
        "no device's registration reached another instance: the test shows nothing"
    );
}
