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
