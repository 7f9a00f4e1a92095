//! `fleet serve` as a process: killed with SIGKILL during a stream of
//! shadow updates and restarted, it has kept every update it acknowledged;
//! SIGTERM stops it cleanly; with no `--broker` it runs the whole backend
//! (embedded broker, development CA, SQLite) in one process; two instances
//! in turn share one PostgreSQL store.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_testkit::{Broker, Postgres, TestClient};

/// The tests that load the machine (thousands of messages, a thousand
/// clients) run one at a time, so that each measures itself.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
use serde_json::Value;

fn spawn_fleet(broker: &Broker, dir: &Path) -> Child {
    let backend = broker.backend_identity().unwrap();
    std::fs::write(dir.join("backend.pem"), backend.cert_pem).unwrap();
    std::fs::write(dir.join("backend.key"), backend.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), broker.pki().ca_pem()).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--broker")
        .arg(format!("localhost:{}", broker.port()))
        .arg("--cert")
        .arg(dir.join("backend.pem"))
        .arg("--key")
        .arg(dir.join("backend.key"))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--store")
        .arg(dir.join("fleet.db"))
        .arg("--dir")
        .arg(dir)
        .arg("--no-api")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve")
}

async fn device(broker: &Broker) -> TestClient {
    let id = broker.device_identity("dev-a").unwrap();
    let mut c = TestClient::connect(broker, &id, "dev-a").await.unwrap();
    for s in [
        "update/accepted",
        "update/rejected",
        "get/accepted",
        "get/rejected",
    ] {
        assert!(
            c.subscribe(&format!("$aws/things/dev-a/shadow/{s}"))
                .await
                .unwrap()
        );
    }
    c
}

/// Asks for the shadow until the service answers; returns the answer.
async fn get(dev: &mut TestClient) -> Value {
    for _ in 0..100 {
        dev.publish("$aws/things/dev-a/shadow/get", "{}")
            .await
            .unwrap();
        if let Some(m) = dev.recv(Duration::from_millis(300)).await
            && m.topic.starts_with("$aws/things/dev-a/shadow/get/")
        {
            return serde_json::from_slice(&m.payload).unwrap();
        }
    }
    panic!("fleet serve never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_updates_survive_sigkill() {
    let broker = Broker::start().expect("start mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = spawn_fleet(&broker, dir.path());
    let mut dev = device(&broker).await;
    get(&mut dev).await;

    let mut acknowledged = BTreeSet::new();
    let mut highest = 0;
    // A steady stream, each waited for...
    for i in 0..40 {
        let body = format!(r#"{{"state":{{"reported":{{"k{i}":{i}}}}},"clientToken":"c{i}"}}"#);
        dev.publish("$aws/things/dev-a/shadow/update", body)
            .await
            .unwrap();
        let m = dev.recv(Duration::from_secs(10)).await.expect("accepted");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(m.topic.ends_with("/update/accepted"), "{}", m.topic);
        acknowledged.insert(i);
        highest = v["version"].as_u64().unwrap();
    }
    // ...then a burst that the kill cuts through.
    for i in 40..100 {
        let body = format!(r#"{{"state":{{"reported":{{"k{i}":{i}}}}},"clientToken":"c{i}"}}"#);
        dev.publish("$aws/things/dev-a/shadow/update", body)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    fleet.kill().unwrap(); // SIGKILL
    fleet.wait().unwrap();
    while let Some(m) = dev.recv(Duration::from_millis(300)).await {
        if m.topic.ends_with("/update/accepted") {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            let token = v["clientToken"].as_str().unwrap();
            acknowledged.insert(token[1..].parse::<u32>().unwrap());
            highest = highest.max(v["version"].as_u64().unwrap());
        }
    }

    let mut fleet = spawn_fleet(&broker, dir.path());
    let doc = get(&mut dev).await;
    let reported = doc["state"]["reported"].as_object().unwrap();
    for i in &acknowledged {
        assert_eq!(
            reported.get(&format!("k{i}")),
            Some(&Value::from(*i)),
            "acknowledged k{i} was lost"
        );
    }
    assert!(doc["version"].as_u64().unwrap() >= highest);
    fleet.kill().unwrap();
    fleet.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly() {
    let broker = Broker::start().expect("start mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = spawn_fleet(&broker, dir.path());
    let mut dev = device(&broker).await;
    get(&mut dev).await;
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(fleet.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..50 {
        if let Some(status) = fleet.try_wait().unwrap() {
            assert!(status.success(), "fleet serve exited with {status}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.kill().unwrap();
    panic!("fleet serve did not stop on SIGTERM");
}

#[test]
fn dev_setup_writes_a_consistent_setup() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "dev-setup",
            "--thing",
            "pump-1",
            "--thing",
            "pump-2",
            "--claim",
            "claim@line-4",
            "--port",
            "18883",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
    let policy = fleet_cloud::BrokerPolicy {
        claim_identities: vec!["claim@line-4".into()],
        ..fleet_cloud::BrokerPolicy::default()
    };
    assert_eq!(read("acl"), policy.mosquitto_acl());
    let conf = read("mosquitto.conf");
    assert!(conf.contains("listener 18883 127.0.0.1\n"));
    assert!(conf.contains("require_certificate true\nuse_identity_as_username true\n"));
    // Every identity chains to the CA and loads as a TLS client identity.
    let ca = read("ca.pem");
    for name in [
        "things/pump-1",
        "things/pump-2",
        "claims/claim@line-4",
        "backend",
    ] {
        let id = fleet_testkit::Identity {
            common_name: name.into(),
            cert_pem: read(&format!("{name}.pem")),
            key_pem: read(&format!("{name}.key")),
        };
        fleet_testkit::client_tls_config(&id, &ca).unwrap();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    }
    // Bad names are refused before anything is written.
    let bad = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "dev-setup",
            "--dir",
            "/nonexistent/x",
            "--thing",
            "bad/name",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(!std::path::Path::new("/nonexistent/x").exists());

    // With the plugin: Mosquitto loads it and admits by the roster; the
    // plugin, not the listener, names the user.
    let plugin = fleet_testkit::mosquitto_plugin().unwrap();
    let with = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["dev-setup", "--claim", "claim@line-4", "--mosquitto-plugin"])
        .arg(&plugin)
        .arg("--dir")
        .arg(with.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = std::fs::read_to_string(with.path().join("mosquitto.conf")).unwrap();
    let abs = std::fs::canonicalize(with.path()).unwrap();
    for line in [
        format!(
            "plugin {}\n",
            std::fs::canonicalize(&plugin).unwrap().display()
        ),
        format!("plugin_opt_roster {}/roster\n", abs.display()),
        "plugin_opt_backend_identities fleet-backend\n".to_string(),
        "plugin_opt_claim_identities claim@line-4\n".to_string(),
    ] {
        assert!(conf.contains(&line), "{line} missing from:\n{conf}");
    }
    assert!(!conf.contains("use_identity_as_username"), "{conf}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("--mosquitto-roster"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_it_runs_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A device the registry knows (dev-setup records it).
    let setup = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["dev-setup", "--thing", "dev-a", "--port", &port.to_string()])
        .arg("--dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(setup.status.success(), "{setup:?}");
    let mut fleet = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--claim")
        .arg("claim@factory")
        .arg("--api")
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve");
    // It writes a development CA on first start, then listens.
    let mut up = false;
    for _ in 0..200 {
        if data.join("backend.key").exists()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "fleet serve did not start its broker");
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let pki = fleet_cloud::pki::Pki::from_pem(
        &ca,
        &std::fs::read_to_string(data.join("ca.key")).unwrap(),
    )
    .unwrap();
    // A certificate of the CA for a thing the registry does not know is
    // refused: the broker asks the registry.
    let stranger = pki.client_identity("dev-z").unwrap();
    assert!(
        TestClient::connect_to(port, &ca, &stranger, "dev-z")
            .await
            .is_err()
    );
    let id = fleet_cloud::pki::Identity {
        common_name: "dev-a".into(),
        cert_pem: std::fs::read_to_string(data.join("things/dev-a.pem")).unwrap(),
        key_pem: std::fs::read_to_string(data.join("things/dev-a.key")).unwrap(),
    };
    let mut dev = TestClient::connect_to(port, &ca, &id, "dev-a")
        .await
        .unwrap();
    assert!(
        dev.subscribe("$aws/things/dev-a/shadow/get/accepted")
            .await
            .unwrap()
    );
    assert!(
        dev.subscribe("$aws/things/dev-a/shadow/get/rejected")
            .await
            .unwrap()
    );
    // Another device's topics are refused: the policy is enforced.
    assert!(
        !dev.subscribe("$aws/things/dev-b/shadow/get/accepted")
            .await
            .unwrap()
    );
    let reply = get(&mut dev).await;
    assert_eq!(reply["code"], 404, "{reply}");
    assert!(data.join("fleet.db").exists());

    let pid = fleet.id().to_string();
    Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .status()
        .unwrap();
    let status = fleet.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_a_postgres_store() {
    let pg = Postgres::start().unwrap();
    let broker = Broker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spawn = |client_id: &str| {
        let backend = broker.backend_identity().unwrap();
        std::fs::write(dir.path().join("backend.pem"), backend.cert_pem).unwrap();
        std::fs::write(dir.path().join("backend.key"), backend.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.pem"), broker.pki().ca_pem()).unwrap();
        Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args([
                "serve",
                "--no-api",
                "--client-id",
                client_id,
                "--store",
                &pg.uri(),
            ])
            .arg("--broker")
            .arg(format!("localhost:{}", broker.port()))
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fleet serve")
    };
    let mut first = spawn("cloud-1");
    let mut dev = device(&broker).await;
    assert_eq!(get(&mut dev).await["code"], 404);
    dev.publish(
        "$aws/things/dev-a/shadow/update",
        r#"{"state":{"reported":{"speed":3}},"clientToken":"t1"}"#,
    )
    .await
    .unwrap();
    let accepted = loop {
        let m = dev.recv(Duration::from_secs(10)).await.expect("an answer");
        if m.topic.ends_with("/update/accepted") {
            break m;
        }
    };
    assert!(!accepted.payload.is_empty());
    first.kill().unwrap();
    first.wait().unwrap();
    // Another instance, the same database: the state is there.
    let mut second = spawn("cloud-2");
    let doc = get(&mut dev).await;
    assert_eq!(doc["state"]["reported"]["speed"], 3, "{doc}");
    assert_eq!(doc["version"], 1, "{doc}");
    // It leads (the first's lease ran out or is taken over), and a clean
    // stop hands the lease back at once rather than when it runs out.
    let store = fleet_cloud::PgStore::connect(&pg.uri(), 1).await.unwrap();
    let holder = || fleet_cloud::PgLease::holder(&store, "jobs-sweeper");
    let started = std::time::Instant::now();
    while !holder()
        .await
        .unwrap()
        .is_some_and(|h| h.starts_with("cloud-2-"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cloud-2 never led"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(second.id().to_string())
        .status()
        .unwrap();
    assert!(second.wait().unwrap().success());
    assert_eq!(holder().await.unwrap(), None, "the lease was not released");
}

/// Starts `fleet serve` with its embedded broker on `port`, telemetry to
/// `{data}/telemetry.jsonl`.
fn spawn_embedded(data: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--dir")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--no-api")
        .arg("--telemetry-file")
        .arg(data.join("telemetry.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve")
}

/// A device's MQTT 5 connection with its `dev-setup` certificate.
fn raw_device(
    data: &Path,
    port: u16,
    thing: &str,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    use rumqttc::{TlsConfiguration, Transport};
    let id = fleet_cloud::pki::Identity {
        common_name: thing.into(),
        cert_pem: std::fs::read_to_string(data.join(format!("things/{thing}.pem"))).unwrap(),
        key_pem: std::fs::read_to_string(data.join(format!("things/{thing}.key"))).unwrap(),
    };
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let tls = fleet_testkit::client_tls_config(&id, &ca).unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(thing, "localhost", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            std::sync::Arc::new(tls),
        )));
    rumqttc::v5::AsyncClient::new(o, 256)
}

/// What one device saw acknowledged: shadow keys and telemetry topics.
#[derive(Default)]
struct Acked {
    shadow: Vec<String>,
    telemetry: Vec<String>,
}

/// Publishes `per_device` QoS 1 messages (shadow updates and telemetry,
/// alternately) and records which the broker acknowledged, until the
/// connection dies.
async fn publish_and_count(
    client: rumqttc::v5::AsyncClient,
    mut ev: rumqttc::v5::EventLoop,
    thing: String,
    per_device: usize,
    acked_total: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Acked {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    let messages: Vec<(String, String, String)> = (0..per_device)
        .map(|i| {
            if i % 2 == 0 {
                let key = format!("k{i}");
                (
                    format!("$aws/things/{thing}/shadow/update"),
                    format!(r#"{{"state":{{"reported":{{"{key}":{i}}}}}}}"#),
                    key,
                )
            } else {
                let topic = format!("dt/{thing}/m{i}");
                (topic.clone(), format!(r#"{{"i":{i}}}"#), topic)
            }
        })
        .collect();
    let sender = {
        let messages = messages.clone();
        tokio::spawn(async move {
            for (topic, body, _) in messages {
                if client
                    .publish(topic, QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    // The n-th outgoing PUBLISH is the n-th message; its packet id names
    // it until its PUBACK.
    let mut sent = 0;
    let mut in_flight = std::collections::HashMap::new();
    let mut acked = Acked::default();
    let mut done = 0;
    while done < per_device {
        match tokio::time::timeout(Duration::from_secs(20), ev.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, sent);
                sent += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                if let Some(n) = in_flight.remove(&a.pkid) {
                    done += 1;
                    if a.reason == PubAckReason::Success {
                        let key = messages[n].2.clone();
                        if n % 2 == 0 {
                            acked.shadow.push(key);
                        } else {
                            acked.telemetry.push(key);
                        }
                        acked_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            Ok(Ok(_)) => {}
            // Killed (or stalled): what was acknowledged is counted.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    sender.abort();
    acked
}

/// `fleet serve` with its embedded broker: a device's message is
/// acknowledged once the services stored it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_a_device_saw_acknowledged() {
    sigkill_during_load(false).await;
}

/// `fleet serve --broker` with Mosquitto (its `dev-setup` configuration):
/// Mosquitto acknowledges at once, and keeps what comes while the backend
/// is away for its persistent session; the backend acknowledges each
/// message after handling it, so Mosquitto sends it again if it was killed
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged_with_mosquitto() {
    sigkill_during_load(true).await;
}

/// SIGKILL during 10,000 QoS 1 messages from 100 devices (shadow updates
/// and telemetry), restart, and an exact count of what a device saw
/// acknowledged and the restarted service does not have.
async fn sigkill_during_load(mosquitto: bool) {
    let _alone = HEAVY.lock().await;
    const DEVICES: usize = 100;
    const PER_DEVICE: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let things: Vec<String> = (0..DEVICES).map(|n| format!("pump-{n:03}")).collect();
    let mut setup = Command::new(env!("CARGO_BIN_EXE_fleet"));
    setup
        .args(["dev-setup", "--port", &port.to_string()])
        .arg("--dir")
        .arg(&data);
    for t in &things {
        setup.args(["--thing", t]);
    }
    assert!(setup.output().unwrap().status.success());
    let mut broker = mosquitto.then(|| {
        let conf = data.join("mosquitto.conf");
        Command::new(fleet_testkit::mosquitto_binary().expect(
            "Mosquitto is needed: apt-get install mosquitto (or MOSQUITTO=/path/to/mosquitto)",
        ))
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto")
    });
    let start = || {
        if mosquitto {
            spawn_with_broker(&data, port)
        } else {
            spawn_embedded(&data, port)
        }
    };
    let mut fleet = start();
    // Ready when the service answers.
    answered(&data, port, &things[0]).await;

    let acked_total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in &things {
        let (client, ev) = raw_device(&data, port, t);
        tasks.push(tokio::spawn(publish_and_count(
            client,
            ev,
            t.clone(),
            PER_DEVICE,
            acked_total.clone(),
        )));
    }
    // SIGKILL while the service is handling the stream: once it has
    // written a third of the telemetry.
    let total = DEVICES * PER_DEVICE;
    let stored = || {
        std::fs::read_to_string(data.join("telemetry.jsonl"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    for _ in 0..2000 {
        if stored() >= total / 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fleet.kill().unwrap();
    fleet.wait().unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let acked_shadow: usize = acked.iter().map(|a| a.shadow.len()).sum();
    let acked_telemetry: usize = acked.iter().map(|a| a.telemetry.len()).sum();
    let stored_when_killed = stored();
    assert!(
        stored_when_killed < total / 2,
        "the kill came after the service had handled every message"
    );

    // Restarted on the same files: every acknowledged message is there.
    let mut fleet = start();
    // What was acknowledged but not yet handled comes again (with an
    // external broker): give the restarted service time to write it.
    let mut lost_telemetry: Vec<&String> = Vec::new();
    for _ in 0..100 {
        let lines = std::fs::read_to_string(data.join("telemetry.jsonl")).unwrap_or_default();
        let stored: BTreeSet<String> = lines
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["topic"].as_str().map(String::from))
            .collect();
        lost_telemetry = acked
            .iter()
            .flat_map(|a| &a.telemetry)
            .filter(|t| !stored.contains(*t))
            .collect();
        if lost_telemetry.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let mut lost_shadow = Vec::new();
    for (t, a) in things.iter().zip(&acked) {
        if a.shadow.is_empty() {
            continue;
        }
        let id = fleet_cloud::pki::Identity {
            common_name: t.clone(),
            cert_pem: std::fs::read_to_string(data.join(format!("things/{t}.pem"))).unwrap(),
            key_pem: std::fs::read_to_string(data.join(format!("things/{t}.key"))).unwrap(),
        };
        let mut dev = None;
        for _ in 0..100 {
            if let Ok(c) = TestClient::connect_to(port, &ca, &id, t).await {
                dev = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut dev = dev.expect("fleet serve is back");
        assert!(
            dev.subscribe(&format!("$aws/things/{t}/shadow/get/+"))
                .await
                .unwrap()
        );
        // A shadow that is not there (rejected, 404) lost every update.
        let mut doc = None;
        for _ in 0..60 {
            dev.publish(&format!("$aws/things/{t}/shadow/get"), "{}")
                .await
                .unwrap();
            if let Some(m) = dev.recv(Duration::from_millis(500)).await {
                doc = Some(if m.topic.ends_with("/rejected") {
                    Value::Null
                } else {
                    serde_json::from_slice::<Value>(&m.payload).unwrap()
                });
                break;
            }
        }
        let doc = doc.unwrap_or_else(|| panic!("the restarted fleet serve never answered {t}"));
        for key in &a.shadow {
            if doc["state"]["reported"].get(key).is_none() {
                lost_shadow.push(format!("{t}/{key}"));
            }
        }
    }
    println!(
        "SIGKILL after {} of {total} messages acknowledged ({acked_shadow} shadow updates, {acked_telemetry} telemetry; {stored_when_killed} telemetry stored when killed); lost: {} shadow, {} telemetry",
        acked_shadow + acked_telemetry,
        lost_shadow.len(),
        lost_telemetry.len()
    );
    assert!(
        lost_shadow.is_empty(),
        "acknowledged, then lost: {} shadow updates, among them {:?}",
        lost_shadow.len(),
        &lost_shadow[..lost_shadow.len().min(10)]
    );
    assert!(
        lost_telemetry.is_empty(),
        "acknowledged, then lost: {} telemetry messages, among them {:?}",
        lost_telemetry.len(),
        &lost_telemetry[..lost_telemetry.len().min(10)]
    );
    fleet.kill().unwrap();
    fleet.wait().unwrap();
    if let Some(b) = &mut broker {
        b.kill().unwrap();
        b.wait().unwrap();
    }
}

/// Starts `fleet serve` against the broker of `dev-setup` on `port`,
/// telemetry to `{data}/telemetry.jsonl`.
fn spawn_with_broker(data: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--dir")
        .arg(data)
        .arg("--broker")
        .arg(format!("localhost:{port}"))
        .arg("--no-api")
        .arg("--telemetry-file")
        .arg(data.join("telemetry.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve")
}

/// Waits until `thing`'s shadow requests are answered (the broker listens
/// and the service has subscribed).
async fn answered(data: &Path, port: u16, thing: &str) {
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let id = fleet_cloud::pki::Identity {
        common_name: thing.into(),
        cert_pem: std::fs::read_to_string(data.join(format!("things/{thing}.pem"))).unwrap(),
        key_pem: std::fs::read_to_string(data.join(format!("things/{thing}.key"))).unwrap(),
    };
    for _ in 0..100 {
        if let Ok(mut dev) = TestClient::connect_to(port, &ca, &id, thing).await
            && dev
                .subscribe(&format!("$aws/things/{thing}/shadow/get/+"))
                .await
                .unwrap_or(false)
        {
            for _ in 0..50 {
                dev.publish(&format!("$aws/things/{thing}/shadow/get"), "{}")
                    .await
                    .unwrap();
                if dev.recv(Duration::from_millis(200)).await.is_some() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fleet serve never answered {thing}");
}

/// MQTT 5 packets as a hostile client writes them, by hand.
mod raw {
    fn remaining(len: usize, out: &mut Vec<u8>) {
        let mut x = len;
        loop {
            let mut b = (x % 128) as u8;
            x /= 128;
            if x > 0 {
                b |= 0x80;
            }
            out.push(b);
            if x == 0 {
                break;
            }
        }
    }

    fn string(s: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        remaining(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// CONNECT, MQTT 5, clean start, keep-alive 0 (never time out).
    pub(super) fn connect(client_id: &str) -> Vec<u8> {
        let mut b = Vec::new();
        string("MQTT", &mut b);
        b.extend_from_slice(&[5, 0x02, 0, 0, 0]);
        string(client_id, &mut b);
        packet(0x10, &b)
    }

    pub(super) fn subscribe(pkid: u16, filters: &[String]) -> Vec<u8> {
        let mut b = pkid.to_be_bytes().to_vec();
        b.push(0);
        for f in filters {
            string(f, &mut b);
            b.push(0x01);
        }
        packet(0x82, &b)
    }

    /// A QoS 0 PUBLISH.
    pub(super) fn publish(topic: &str, payload: &[u8], retain: bool) -> Vec<u8> {
        let mut b = Vec::new();
        string(topic, &mut b);
        b.push(0);
        b.extend_from_slice(payload);
        packet(0x30 | u8::from(retain), &b)
    }

    /// The first `sent` bytes of a PUBLISH that declares `declared` bytes.
    pub(super) fn partial_publish(topic: &str, declared: usize, sent: usize) -> Vec<u8> {
        let mut b = Vec::new();
        string(topic, &mut b);
        b.push(0);
        b.resize(declared, b'x');
        let mut p = packet(0x30, &b);
        p.truncate(sent);
        p
    }
}

/// One hostile client: what its connection did, and the connection (held
/// open by the caller).
struct Hostile {
    connack: u8,
    stream: Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

/// Connects over TLS with `identity`'s certificate as `client_id`; the
/// CONNACK's reason code (`0xff`: no CONNACK).
async fn hostile_connect(
    port: u16,
    ca: &str,
    identity: &fleet_cloud::pki::Identity,
    client_id: &str,
) -> Hostile {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = fleet_testkit::client_tls_config(identity, ca).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(mut s) = connector.connect(name, tcp).await else {
        return Hostile {
            connack: 0xff,
            stream: None,
        };
    };
    if s.write_all(&raw::connect(client_id)).await.is_err() {
        return Hostile {
            connack: 0xff,
            stream: None,
        };
    }
    // CONNACK: 0x20, length, flags, reason code.
    let mut head = [0u8; 4];
    let connack = match tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut head)).await
    {
        Ok(Ok(_)) if head[0] == 0x20 => head[3],
        _ => 0xff,
    };
    Hostile {
        connack,
        stream: Some(s),
    }
}

/// Writes `bytes`, giving up (false) when the broker stops reading.
async fn hostile_write(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    bytes: &[u8],
) -> bool {
    use tokio::io::AsyncWriteExt;
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Everything a device may try within its own topics, at once: the most
/// subscriptions and the longest filters, retained messages of 16 KiB
/// past its quota, a flood of shadow reads it never reads the answers to,
/// and a 120 KiB packet that never ends.
async fn hostile_device(port: u16, data: &Path, ca: &str, thing: &str) -> Hostile {
    let id = fleet_cloud::pki::Identity {
        common_name: thing.into(),
        cert_pem: std::fs::read_to_string(data.join(format!("things/{thing}.pem"))).unwrap(),
        key_pem: std::fs::read_to_string(data.join(format!("things/{thing}.key"))).unwrap(),
    };
    let mut h = hostile_connect(port, ca, &id, thing).await;
    let Some(s) = h.stream.as_mut() else {
        return h;
    };
    let shadow = format!("$aws/things/{thing}/shadow");
    let mut filters = vec![format!("{shadow}/#")];
    let long = "n".repeat(256 - shadow.len() - "/name//#".len());
    for n in 0..60 {
        filters.push(format!("{shadow}/name/{n:03}{}/#", &long[3..]));
    }
    let mut script = vec![raw::subscribe(1, &filters)];
    let state = format!(
        r#"{{"state":{{"reported":{{"pad":"{}"}}}}}}"#,
        "p".repeat(7000)
    );
    script.push(raw::publish(
        &format!("{shadow}/update"),
        state.as_bytes(),
        false,
    ));
    let retained = vec![b'r'; 16 * 1024];
    for n in 0..60 {
        script.push(raw::publish(&format!("dt/{thing}/r{n}"), &retained, true));
    }
    for _ in 0..300 {
        script.push(raw::publish(&format!("{shadow}/get"), b"{}", false));
    }
    script.push(raw::partial_publish(
        &format!("dt/{thing}/big"),
        120 * 1024,
        110 * 1024,
    ));
    for bytes in script {
        if !hostile_write(s, &bytes).await {
            break;
        }
    }
    h
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// `fleet serve` with its embedded broker stays under a stated memory
/// bound while 1,000 devices attack it at once, each doing all it can
/// within its own topics (the limits of `ClientLimits` bound each), and 150
/// connections try one claim identity; a well-behaved device is still
/// served. The bound: 384 MiB resident at the peak (measured: about 330;
/// idle: 20). What makes it up, with the default limits: about 40 KiB per
/// connection, about 1.7 KiB per subscription (50 each), and the broker's
/// totals: 64 MiB of retained messages, 32 MiB queued for clients that do
/// not read, 16 MiB of large packets partly received, 16 MiB waiting in the
/// backend to be published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_1000_hostile_clients() {
    let _alone = HEAVY.lock().await;
    const CLIENTS: usize = 1000;
    const BOUND_KIB: u64 = 384 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let things: Vec<String> = (0..CLIENTS).map(|n| format!("h-{n:04}")).collect();
    let mut setup = Command::new(env!("CARGO_BIN_EXE_fleet"));
    setup
        .args(["dev-setup", "--port", &port.to_string()])
        .args(["--thing", "good", "--claim", "claim@factory"])
        .arg("--dir")
        .arg(&data);
    for t in &things {
        setup.args(["--thing", t]);
    }
    assert!(setup.output().unwrap().status.success());
    let mut fleet = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--no-api", "--claim", "claim@factory"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve");
    let pid = fleet.id();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, idle) = memory_kib(pid);
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();

    // 1,000 devices, 100 at a time until each has done its worst; each
    // connection stays open.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for t in &things {
        let (gate, data, ca, t) = (gate.clone(), data.clone(), ca.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let _turn = gate.acquire().await.unwrap();
            hostile_device(port, &data, &ca, &t).await
        }));
    }
    // 150 connections of one claim identity, each with its own client id.
    let claim = fleet_cloud::pki::Identity {
        common_name: "claim@factory".into(),
        cert_pem: std::fs::read_to_string(data.join("claims/claim@factory.pem")).unwrap(),
        key_pem: std::fs::read_to_string(data.join("claims/claim@factory.key")).unwrap(),
    };
    let mut claimants = Vec::new();
    for n in 0..150 {
        claimants.push(hostile_connect(port, &ca, &claim, &format!("claimant-{n}")).await);
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    let admitted = held.iter().filter(|h| h.connack == 0).count();
    let claims_admitted = claimants.iter().filter(|h| h.connack == 0).count();
    let claims_refused = claimants.iter().filter(|h| h.connack == 0x97).count();

    // A well-behaved device is served while the attack holds.
    let good = fleet_cloud::pki::Identity {
        common_name: "good".into(),
        cert_pem: std::fs::read_to_string(data.join("things/good.pem")).unwrap(),
        key_pem: std::fs::read_to_string(data.join("things/good.key")).unwrap(),
    };
    let mut dev = TestClient::connect_to(port, &ca, &good, "good")
        .await
        .unwrap();
    assert!(
        dev.subscribe("$aws/things/good/shadow/get/+")
            .await
            .unwrap()
    );
    // Served, not starved: within three minutes however loaded the
    // machine is (the time it took is printed, not asserted; requests are
    // served first-come, so the flood ahead of it is worked off first).
    let asked = std::time::Instant::now();
    let mut answered = None;
    for _ in 0..90 {
        dev.publish("$aws/things/good/shadow/get", "{}")
            .await
            .unwrap();
        if dev.recv(Duration::from_secs(2)).await.is_some() {
            answered = Some(asked.elapsed());
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (peak, now) = memory_kib(pid);
    println!(
        "1,000 hostile devices ({admitted} admitted), {claims_admitted} of 150 claim connections admitted ({claims_refused} refused as over quota): fleet serve {} MiB idle, {} MiB now, {} MiB at the peak (bound {} MiB); a well-behaved device answered after {answered:?}",
        idle / 1024,
        now / 1024,
        peak / 1024,
        BOUND_KIB / 1024
    );
    fleet.kill().unwrap();
    fleet.wait().unwrap();
    drop(held);
    drop(claimants);
    assert_eq!(admitted, CLIENTS, "every device was let in");
    assert_eq!(
        claims_admitted, 100,
        "one claim identity holds 100 connections at most"
    );
    assert_eq!(claims_refused, 50);
    assert!(
        answered.is_some(),
        "a well-behaved device was not served during the attack"
    );
    assert!(
        peak < BOUND_KIB,
        "fleet serve took {peak} KiB at the peak, over the bound of {BOUND_KIB} KiB"
    );
}

/// With Mosquitto, `fleet serve --mosquitto-acl` keeps the broker's ACL
/// current: a thing disabled through the API is denied at once (the ACL is
/// rewritten and Mosquitto signalled), and let back in when enabled again,
/// with nothing restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_disabling_a_thing_applies_at_once() {
    // Mosquitto as deployed: the generated ACL, and the plugin admitting by
    // the roster fleet serve keeps.
    let broker = Broker::start_with(fleet_testkit::BrokerOptions {
        plugin: true,
        ..Default::default()
    })
    .expect("start mosquitto with fleet-mosquitto-plugin");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_identities(&broker, d);
    std::fs::write(
        d.join("mosquitto.pid"),
        broker.pid().expect("mosquitto runs").to_string(),
    )
    .unwrap();
    let api_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut fleet = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--broker")
        .arg(format!("localhost:{}", broker.port()))
        .arg("--dir")
        .arg(d)
        .arg("--api")
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("--mosquitto-acl")
        .arg(broker.dir().join("acl"))
        .arg("--broker-pid-file")
        .arg(d.join("mosquitto.pid"))
        .arg("--mosquitto-roster")
        .arg(broker.roster())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve");

    let (http, token) = api_client(&broker, d, api_port).await;
    let api = |method: reqwest::Method, path: &str, body: Value| {
        http.request(method, format!("https://localhost:{api_port}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let created = api(
        reqwest::Method::POST,
        "/v1/things",
        serde_json::json!({"name": "dev-a"}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);
    // Answered once the roster has it: the device is admitted at once.
    let roster = std::fs::read_to_string(broker.roster()).unwrap();
    assert!(roster.contains("thing dev-a enabled"), "{roster}");

    let mut dev = device(&broker).await;
    get(&mut dev).await;

    // Disabled: within moments its requests reach nobody.
    let disabled = api(
        reqwest::Method::PUT,
        "/v1/things/dev-a/enabled",
        serde_json::json!({"enabled": false}),
    )
    .await
    .unwrap();
    assert_eq!(disabled.status(), reqwest::StatusCode::OK);
    let mut denied = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let acl = std::fs::read_to_string(broker.dir().join("acl")).unwrap();
        if !acl.contains("user dev-a") {
            continue;
        }
        let roster = std::fs::read_to_string(broker.roster()).unwrap();
        assert!(roster.contains("thing dev-a disabled"), "{roster}");
        // Mosquitto applies it on SIGHUP; what was in flight drains first.
        while dev.recv(Duration::from_millis(300)).await.is_some() {}
        dev.publish("$aws/things/dev-a/shadow/get", "{}")
            .await
            .unwrap();
        if dev.recv(Duration::from_secs(1)).await.is_none() {
            denied = true;
            break;
        }
    }
    assert!(denied, "a disabled thing was still answered");

    // Enabled again: answered again, nothing restarted.
    let enabled = api(
        reqwest::Method::PUT,
        "/v1/things/dev-a/enabled",
        serde_json::json!({"enabled": true}),
    )
    .await
    .unwrap();
    assert_eq!(enabled.status(), reqwest::StatusCode::OK);
    // The plugin cut the disabled device's connection (and its clean
    // session): it connects afresh.
    dev.disconnect().await;
    let mut dev = device(&broker).await;
    let doc = get(&mut dev).await;
    assert!(
        doc.get("version").is_some() || doc.get("code").is_some(),
        "{doc}"
    );
    fleet.kill().unwrap();
    fleet.wait().unwrap();
}

/// The backend's and the API server's certificates and keys, and the CA,
/// where `fleet serve --dir` looks for them.
fn write_identities(broker: &Broker, dir: &Path) {
    let backend = broker.backend_identity().unwrap();
    std::fs::write(dir.join("backend.pem"), backend.cert_pem).unwrap();
    std::fs::write(dir.join("backend.key"), backend.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), broker.pki().ca_pem()).unwrap();
    let server = broker.pki().server_identity().unwrap();
    std::fs::write(dir.join("server.pem"), server.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), server.key_pem).unwrap();
}

/// An HTTPS client trusting the fleet's CA, and the admin token, once
/// `fleet serve` on `dir` wrote it and its API on `api_port` answers.
async fn api_client(broker: &Broker, dir: &Path, api_port: u16) -> (reqwest::Client, String) {
    let tls = fleet_cloud::tls::client_config(&broker.pki().ca_pem(), None).unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..100 {
        if let Ok(t) = std::fs::read_to_string(dir.join("admin.token"))
            && std::net::TcpStream::connect(("127.0.0.1", api_port)).is_ok()
        {
            return (http, t.trim().to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fleet serve wrote no admin token or does not serve the API");
}

/// A device agent on a runtime of its own, so that it can be killed: its
/// connection dropped without a DISCONNECT, as when its process dies.
struct KillableAgent {
    stop: std::sync::mpsc::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl KillableAgent {
    fn start(builder: fleet_device::AgentBuilder) -> Self {
        let (stop, told) = std::sync::mpsc::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let agent = rt.block_on(async { builder.start().unwrap() });
            let clean = rt.block_on(async {
                tokio::task::spawn_blocking(move || told.recv().unwrap_or(false))
                    .await
                    .unwrap()
            });
            if clean {
                rt.block_on(agent.shutdown());
            } else {
                // The pump and its socket are dropped mid-connection.
                rt.shutdown_background();
                drop(agent);
            }
        });
        Self { stop, thread }
    }

    /// A clean stop: the agent says goodbye and disconnects.
    fn stop(self) {
        self.stop.send(true).unwrap();
        self.thread.join().unwrap();
    }

    /// Killed: no DISCONNECT; the broker publishes the last will.
    fn kill(self) {
        self.stop.send(false).unwrap();
        self.thread.join().unwrap();
    }
}

/// Issue 27: with an external broker (Mosquitto with the ACL `fleet serve`
/// writes), device agents tell their presence — a retained birth at each
/// connection, a retained last will, a goodbye before a clean stop — and
/// `fleet serve` keeps each thing's connectivity from them: connected,
/// stopped cleanly (CLIENT_INITIATED_DISCONNECT), killed
/// (CONNECTION_LOST); a device killed while `fleet serve` was down is
/// recorded disconnected once it is back (the broker kept the will for
/// its session); a device still connected across a restart keeps its
/// connection's start (the replayed birth is not a new connection); every
/// request moves `lastSeen`; a device cannot write another's presence; a
/// broker that dies with its devices is noticed (its session is gone when
/// fleet serve reconnects): the device that died meanwhile is recorded
/// disconnected, the one that reconnects connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_agents_tell_who_is_connected() {
    let mut broker = Broker::start().expect("start mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_identities(&broker, d);
    let api_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_fleet"))
            .arg("serve")
            .arg("--broker")
            .arg(format!("localhost:{}", broker.port()))
            .arg("--dir")
            .arg(d)
            .arg("--api")
            .arg(format!("127.0.0.1:{api_port}"))
            .args(["--seen-interval-ms", "100", "--client-id", "cloud-presence"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fleet serve")
    };
    let mut fleet = spawn();
    let (http, token) = api_client(&broker, d, api_port).await;
    for thing in ["pump-1", "pump-2"] {
        let r = http
            .post(format!("https://localhost:{api_port}/v1/things"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"name": thing}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    }
    // A thing's connectivity once `want` holds of it (within 20 s).
    let until = |thing: &'static str, want: fn(&Value) -> bool| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            let mut last = Value::Null;
            for _ in 0..200 {
                if let Ok(r) = http
                    .get(format!("https://localhost:{api_port}/v1/things/{thing}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    && let Ok(v) = r.json::<Value>().await
                {
                    last = v["connectivity"].clone();
                    if want(&last) {
                        return last;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{thing}: connectivity stayed {last}");
        }
    };
    let agent = |thing: &str| {
        let id = broker.device_identity(thing).unwrap();
        KillableAgent::start(
            fleet_device::AgentBuilder::new(
                "localhost",
                broker.port(),
                thing,
                &id.cert_pem,
                &id.key_pem,
                &broker.pki().ca_pem(),
            )
            .presence(true),
        )
    };
    let connected = |c: &Value| c["connected"] == true;
    let ended = |c: &Value| c["connected"] == false && c["disconnectReason"].is_string();

    // Connected, then stopped cleanly.
    let one = agent("pump-1");
    let c = until("pump-1", connected).await;
    assert!(c["connectedSince"].as_u64().unwrap() > 0, "{c}");
    one.stop();
    let c = until("pump-1", ended).await;
    assert_eq!(c["disconnectReason"], "CLIENT_INITIATED_DISCONNECT", "{c}");

    // Killed: the broker publishes its will.
    let two = agent("pump-2");
    until("pump-2", connected).await;
    two.kill();
    let c = until("pump-2", ended).await;
    assert_eq!(c["disconnectReason"], "CONNECTION_LOST", "{c}");

    // A device cannot speak for another: pump-2's forged birth of pump-1
    // is refused by the broker's ACL.
    let forger_id = broker.device_identity("pump-2").unwrap();
    let forger = TestClient::connect(&broker, &forger_id, "pump-2")
        .await
        .unwrap();
    forger
        .publish(
            "fleet/things/pump-1/presence",
            r#"{"clientId":"pump-1","eventType":"connected","sessionIdentifier":"forged"}"#,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = until("pump-1", |_| true).await;
    assert_eq!(
        (&c["connected"], &c["disconnectReason"]),
        (
            &Value::Bool(false),
            &Value::from("CLIENT_INITIATED_DISCONNECT")
        ),
        "{c}"
    );
    drop(forger);

    // Connected across a restart of fleet serve: the same connection.
    let one = agent("pump-1");
    let before = until("pump-1", connected).await;
    let since = before["connectedSince"].clone();
    // And killed while fleet serve is down.
    let two = agent("pump-2");
    until("pump-2", connected).await;
    sigkill(&fleet);
    fleet.wait().unwrap();
    two.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet = spawn();
    let c = until("pump-2", ended).await;
    assert_eq!(c["disconnectReason"], "CONNECTION_LOST", "{c}");
    let after = until("pump-1", connected).await;
    assert_eq!(after["connectedSince"], since, "{before} then {after}");
    // Requests are activity: lastSeen moves.
    let seen = after["lastSeen"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = broker.device_identity("pump-1").unwrap();
    let mut dev = TestClient::connect(&broker, &probe, "pump-1-probe")
        .await
        .unwrap();
    assert!(
        dev.subscribe("$aws/things/pump-1/shadow/get/+")
            .await
            .unwrap()
    );
    dev.publish("$aws/things/pump-1/shadow/get", "{}")
        .await
        .unwrap();
    until("pump-1", |c| c["lastSeen"].as_u64().unwrap_or(0) > 0).await;
    let mut last = 0;
    for _ in 0..50 {
        last = until("pump-1", |_| true).await["lastSeen"]
            .as_u64()
            .unwrap();
        if last > seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last > seen, "lastSeen stayed {seen}");
    drop(dev);

    // The broker dies with its devices' state (no persistence), and
    // pump-2 dies while it is down (no will is ever published): once the
    // broker is back, fleet serve finds its session gone, ends every
    // connection, and pump-1, which reconnects, says it is connected.
    let two = agent("pump-2");
    until("pump-2", connected).await;
    broker.stop();
    two.kill();
    broker.restart().unwrap();
    let c = until("pump-2", ended).await;
    assert_eq!(c["disconnectReason"], "SERVER_INITIATED_DISCONNECT", "{c}");
    // (pump-2's end is that of every connection; pump-1 came back after.)
    let c = until("pump-1", connected).await;
    assert!(c["connectedSince"].as_u64() > since.as_u64(), "{c}");
    one.stop();
    until("pump-1", ended).await;
    let _ = fleet.kill();
    let _ = fleet.wait();
}

/// SIGKILL, as a crash.
fn sigkill(child: &Child) {
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
}

/// Issue 23: the fleet's CA key in an HSM (SoftHSM2). `fleet dev-setup
/// --ca-key pkcs11:...` makes the key in the token and the CA certificate
/// with it (no `ca.key` is written); `fleet serve --ca-key` signs the
/// certificates of devices that provision by claim with it, and the broker
/// admits them. A wrong PIN stops `fleet serve` with what to fix. Release
/// keys: `fleet keygen --pkcs11` makes an Ed25519 key in the token,
/// `fleet manifest sign --key pkcs11:...` signs with it, and the envelope
/// verifies (`fleet manifest verify`, and fleet-core's allocation-free
/// path devices run); an ECDSA key is refused as a release key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_an_hsm_sign_device_certificates_and_releases() {
    let token = fleet_testkit::SoftHsmToken::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ca_uri = token.uri("fleet-ca").to_string();
    let setup = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "dev-setup",
            "--claim",
            "claim@factory",
            "--port",
            &port.to_string(),
        ])
        .args(["--ca-key", &ca_uri])
        .arg("--dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(setup.status.success(), "{setup:?}");
    assert!(data.join("ca.pem").exists());
    assert!(
        !data.join("ca.key").exists(),
        "the CA key stays in the token"
    );
    let ca_key = fleet_pkcs11::Pkcs11Key::open(&token.uri("fleet-ca")).unwrap();
    assert!(!ca_key.protection().unwrap().extractable);

    // A wrong PIN: fleet serve does not start, and says why.
    let pins = tempfile::tempdir().unwrap();
    std::fs::write(pins.path().join("pin"), "0000\n").unwrap();
    let mut wrong = token.uri("fleet-ca");
    wrong.pin = fleet_pkcs11::PinSource::File(pins.path().join("pin"));
    let refused = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--no-api"])
        .args(["--claim", "claim@factory", "--ca-key", &wrong.to_string()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refused the PIN"), "{stderr}");

    let mut fleet = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("serve")
        .arg("--dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--no-api"])
        .args(["--claim", "claim@factory", "--ca-key", &ca_uri])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet serve");
    let mut up = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "fleet serve did not start its broker");

    // A device provisions by claim: its certificate is signed in the token.
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = fleet_device::ClaimConfig {
        host: "localhost".into(),
        port,
        claim_cert_pem: std::fs::read_to_string(data.join("claims/claim@factory.pem")).unwrap(),
        claim_key_pem: std::fs::read_to_string(data.join("claims/claim@factory.key")).unwrap(),
        ca_pem: ca.clone(),
        template: "default".into(),
        parameters: [("SerialNumber".to_string(), "hsm-1".to_string())].into(),
        thing_name: "thing-hsm-1".into(),
        state_dir: state.path().into(),
        timeout: Duration::from_millis(800),
        protocol: Default::default(),
    };
    let mut me = None;
    for _ in 0..30 {
        match fleet_device::provision_by_claim(&config).await {
            Err(fleet_device::ProvisionError::Network(_)) => continue,
            other => {
                me = Some(other.unwrap());
                break;
            }
        }
    }
    let me = me.expect("provisioned");
    // Issued by the CA whose key is in the token: it verifies against the
    // token's public key.
    let (_, pem) = x509_parser::pem::parse_x509_pem(me.cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.as_bytes()).unwrap();
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_pem.contents).unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert_eq!(
        &*ca_cert.public_key().subject_public_key.data,
        ca_key.public_key()
    );
    let agent = me.agent("localhost", port, &ca).start().unwrap();
    let first = tokio::time::timeout(Duration::from_secs(15), agent.next_event())
        .await
        .unwrap();
    assert_eq!(first, Some(fleet_device::AgentEvent::Connected));
    agent.shutdown().await;
    Command::new("kill")
        .arg("-TERM")
        .arg(fleet.id().to_string())
        .status()
        .unwrap();
    assert!(fleet.wait().unwrap().success());

    // Release keys in the token.
    let fleet_cmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(args)
            .output()
            .unwrap()
    };
    let release_uri = token.uri("release").to_string();
    let made = fleet_cmd(&["keygen", "--pkcs11", &release_uri]);
    assert!(made.status.success(), "{made:?}");
    let public = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let image = dir.path().join("fw.bin");
    std::fs::write(&image, vec![7u8; 10_000]).unwrap();
    let envelope = dir.path().join("fw.envelope");
    let signed = fleet_cmd(&[
        "manifest",
        "sign",
        "--image",
        image.to_str().unwrap(),
        "--key",
        &release_uri,
        "--component",
        "fw",
        "--version",
        "2.0",
        "--sequence",
        "2",
        "--hardware-id",
        "b1",
        "--out",
        envelope.to_str().unwrap(),
    ]);
    assert!(signed.status.success(), "{signed:?}");
    let verified = fleet_cmd(&[
        "manifest",
        "verify",
        "--envelope",
        envelope.to_str().unwrap(),
        "--public-key",
        &public,
        "--hardware-id",
        "b1",
        "--image",
        image.to_str().unwrap(),
    ]);
    assert!(verified.status.success(), "{verified:?}");
    // The same bytes on the path firmware runs (no allocator).
    use base64::Engine as _;
    let key: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(&public)
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap();
    let root = fleet_core::ota::TrustRootBuilder::new(1)
        .key(
            &key,
            &[fleet_core::ota::Role::Root, fleet_core::ota::Role::Targets],
        )
        .build();
    let bytes = std::fs::read(&envelope).unwrap();
    let m = fleet_core::ota::TrustRoot::parse(&root)
        .unwrap()
        .verify_manifest(
            &bytes,
            &fleet_core::ota::DeviceProfile {
                hardware_id: "b1",
                installed_sequence: 1,
                max_image_size: 1 << 20,
                now: None,
            },
        )
        .unwrap();
    assert_eq!((m.sequence, m.size), (2, 10_000));
    // A second keygen under the label is refused; the CA's ECDSA key is
    // not a release key.
    assert_eq!(
        fleet_cmd(&["keygen", "--pkcs11", &release_uri])
            .status
            .code(),
        Some(5)
    );
    let ecdsa = fleet_cmd(&[
        "manifest",
        "sign",
        "--image",
        image.to_str().unwrap(),
        "--key",
        &ca_uri,
        "--component",
        "fw",
        "--version",
        "2.0",
        "--sequence",
        "2",
        "--hardware-id",
        "b1",
        "--out",
        envelope.to_str().unwrap(),
    ]);
    assert_eq!(ecdsa.status.code(), Some(5), "{ecdsa:?}");
    assert!(String::from_utf8_lossy(&ecdsa.stderr).contains("Ed25519"));
}
