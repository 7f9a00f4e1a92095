//! The `device` example runs against a real broker with certificates from
//! files, and its readings arrive.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use fleet_testkit::{Broker, TestClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_example_publishes_through_a_real_broker() {
    let broker = Broker::start().expect("start mosquitto");
    let _cloud = fleet_cloud::serve_shadows(
        broker.backend_config("cloud").unwrap(),
        fleet_cloud::ShadowService::new(fleet_cloud::MemoryStore::new()),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = broker.device_identity("pump-1").unwrap();
    let (cert, key, ca) = (
        dir.path().join("pump-1.pem"),
        dir.path().join("pump-1.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &id.cert_pem).unwrap();
    std::fs::write(&key, &id.key_pem).unwrap();
    std::fs::write(&ca, broker.pki().ca_pem()).unwrap();
    let mut sink = TestClient::connect(&broker, &broker.backend_identity().unwrap(), "sink")
        .await
        .unwrap();
    assert!(sink.subscribe("dt/pump-1/#").await.unwrap());

    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_device"))
            .args(["--host", "localhost", "--port", &broker.port().to_string()])
            .args(["--thing", "pump-1", "--every", "0.05", "--count", "3"])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--ca")
            .arg(&ca)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 readings acknowledged"), "{stdout}");
    assert!(stdout.contains("shadow reported, version 1"), "{stdout}");
    for seq in 0..3 {
        let m = sink.recv(Duration::from_secs(10)).await.expect("a reading");
        assert_eq!(m.topic, "dt/pump-1/telemetry");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["seq"], seq);
    }
}
