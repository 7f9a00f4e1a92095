//! The shadow service against a real Mosquitto with mutual TLS and the
//! per-device ACL, with plain MQTT clients as devices.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fleet_cloud::BrokerPolicy;
use fleet_cloud::{BrokerConfig, ShadowService, SqliteStore, serve_shadows};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use serde_json::Value;

fleet_testkit::on_both_brokers!(
    devices_get_aws_replies_through_the_broker,
    two_instances_share_the_load_without_losing_a_version
);

const WAIT: Duration = Duration::from_secs(10);

fn config(broker: &Broker, client_id: &str, share_group: Option<&str>) -> BrokerConfig {
    BrokerConfig {
        share_group: share_group.map(String::from),
        ..broker.backend_config(client_id).expect("backend identity")
    }
}

async fn device(broker: &Broker, thing: &str) -> TestClient {
    device_under(broker, "$aws", thing).await
}

async fn device_under(broker: &Broker, prefix: &str, thing: &str) -> TestClient {
    let id = broker.device_identity(thing).unwrap();
    let mut c = TestClient::connect(broker, &id, thing).await.unwrap();
    for suffix in [
        "update/accepted",
        "update/rejected",
        "update/delta",
        "get/accepted",
        "get/rejected",
    ] {
        assert!(
            c.subscribe(&format!("{prefix}/things/{thing}/shadow/{suffix}"))
                .await
                .unwrap()
        );
    }
    c
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The service subscribes after connecting; wait until a request is answered.
async fn until_served(broker: &Broker, dev: &mut TestClient, thing: &str) {
    until_served_under(broker, "$aws", dev, thing).await;
}

async fn until_served_under(broker: &Broker, prefix: &str, dev: &mut TestClient, thing: &str) {
    for _ in 0..50 {
        dev.publish(&format!("{prefix}/things/{thing}/shadow/get"), "{}")
            .await
            .unwrap();
        if dev.recv(Duration::from_millis(200)).await.is_some() {
            while dev.recv(Duration::from_millis(100)).await.is_some() {}
            return;
        }
    }
    panic!("the service never answered; broker log:\n{}", broker.log());
}

async fn devices_get_aws_replies_through_the_broker(kind: BrokerKind) {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
    let _service =
        serve_shadows(config(&broker, "cloud-1", None), ShadowService::new(store)).unwrap();
    let mut dev = device(&broker, "dev-a").await;
    until_served(&broker, &mut dev, "dev-a").await;

    dev.publish(
        "$aws/things/dev-a/shadow/update",
        r#"{"state":{"desired":{"speed":3}},"clientToken":"t1"}"#,
    )
    .await
    .unwrap();
    let accepted = dev.recv(WAIT).await.expect("accepted");
    assert_eq!(accepted.topic, "$aws/things/dev-a/shadow/update/accepted");
    let body = json(&accepted.payload);
    assert_eq!(
        (body["version"].as_u64(), body["clientToken"].as_str()),
        (Some(1), Some("t1"))
    );
    let delta = dev.recv(WAIT).await.expect("delta");
    assert_eq!(delta.topic, "$aws/things/dev-a/shadow/update/delta");
    assert_eq!(json(&delta.payload)["state"]["speed"], 3);

    // Bad input gets AWS's rejection and changes nothing.
    dev.publish("$aws/things/dev-a/shadow/update", "{not json")
        .await
        .unwrap();
    let rejected = dev.recv(WAIT).await.expect("rejected");
    assert_eq!(rejected.topic, "$aws/things/dev-a/shadow/update/rejected");
    assert_eq!(json(&rejected.payload)["code"], 400);
    // Oversized: refused with 413 before parsing; also nothing changes.
    let huge = format!(
        r#"{{"state":{{"reported":{{"blob":"{}"}}}}}}"#,
        "x".repeat(70 * 1024)
    );
    dev.publish("$aws/things/dev-a/shadow/update", huge)
        .await
        .unwrap();
    let rejected = dev.recv(WAIT).await.expect("rejected");
    assert_eq!(rejected.topic, "$aws/things/dev-a/shadow/update/rejected");
    assert_eq!(json(&rejected.payload)["code"], 413);
    // Over the broker's 128 KiB limit: the broker drops it (and the
    // sender); the service is not disturbed.
    let attacker = device(&broker, "dev-c").await;
    let _ = attacker
        .publish("$aws/things/dev-c/shadow/update", vec![b' '; 200 * 1024])
        .await;
    // Not UTF-8: 415.
    dev.publish("$aws/things/dev-a/shadow/update", vec![0xff, 0xfe])
        .await
        .unwrap();
    let rejected = dev.recv(WAIT).await.expect("rejected");
    assert_eq!(json(&rejected.payload)["code"], 415);
    dev.publish("$aws/things/dev-a/shadow/get", r#"{"clientToken":"g"}"#)
        .await
        .unwrap();
    let got = dev.recv(WAIT).await.expect("get accepted");
    assert_eq!(json(&got.payload)["version"], 1);

    // Device B cannot touch A's shadow: its request never reaches the service.
    let b = device(&broker, "dev-b").await;
    b.publish(
        "$aws/things/dev-a/shadow/update",
        r#"{"state":{"desired":{"speed":9}}}"#,
    )
    .await
    .unwrap();
    dev.publish("$aws/things/dev-a/shadow/get", "{}")
        .await
        .unwrap();
    let got = dev.recv(WAIT).await.expect("get accepted");
    assert_eq!(json(&got.payload)["state"]["desired"]["speed"], 3);
    assert_eq!(json(&got.payload)["version"], 1);
}

async fn two_instances_share_the_load_without_losing_a_version(kind: BrokerKind) {
    // Mosquitto delivers no `$`-topics to shared subscriptions, so the
    // scaled-out service runs under a `fleet` prefix here.
    let broker = Broker::start_with(BrokerOptions {
        kind,
        policy: BrokerPolicy {
            prefix: "fleet".into(),
            ..BrokerPolicy::default()
        },
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let service = |path: &std::path::Path| {
        ShadowService::new(SqliteStore::open(path).unwrap())
            .with_prefix("fleet")
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    // Two instances, each with its own connection to the same database.
    let one = serve_shadows(config(&broker, "cloud-1", Some("fleet")), service(&path)).unwrap();
    let two = serve_shadows(config(&broker, "cloud-2", Some("fleet")), service(&path)).unwrap();
    let mut dev = device_under(&broker, "fleet", "dev-a").await;
    until_served_under(&broker, "fleet", &mut dev, "dev-a").await;

    const N: u64 = 60;
    for i in 0..N {
        let body = format!(r#"{{"state":{{"reported":{{"k{i}":{i}}}}},"clientToken":"c{i}"}}"#);
        dev.publish("fleet/things/dev-a/shadow/update", body)
            .await
            .unwrap();
    }
    let mut versions = Vec::new();
    let mut others = Vec::new();
    while versions.len() < N as usize {
        let Some(m) = dev.recv(WAIT).await else {
            let stored = service(&path)
                .get(&fleet_core::ThingName::new("dev-a").unwrap(), None)
                .await
                .map(|s| s.version());
            panic!(
                "an accepted reply for every update; got versions {versions:?} and {others:?}; stored version {stored:?}; broker log:\n{}",
                broker.log()
            );
        };
        if m.topic.ends_with("/update/accepted") {
            versions.push(json(&m.payload)["version"].as_u64().unwrap());
        } else {
            others.push((m.topic, String::from_utf8_lossy(&m.payload).into_owned()));
        }
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=N).collect::<Vec<_>>(),
        "every version exactly once"
    );
    drop((one, two));
    let shadow = service(&path)
        .get(&fleet_core::ThingName::new("dev-a").unwrap(), None)
        .await
        .unwrap();
    assert_eq!(shadow.version(), N);
    assert_eq!(shadow.state().unwrap().reported().len(), N as usize);
}
