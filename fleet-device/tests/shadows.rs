//! The agent against a real Mosquitto (mutual TLS, the fleet ACL) and the
//! fleet-cloud shadow service on SQLite.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use fleet_cloud::{RunningService, ShadowService, SqliteStore, serve_shadows};
use fleet_core::ThingName;
use fleet_core::shadow::UpdateRequest;
use fleet_device::{Agent, AgentBuilder, AgentEvent, Backoff};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use serde_json::{Map, Value, json};

fleet_testkit::on_both_brokers!(
    the_device_converges_on_desired_state,
    bad_input_from_the_broker_is_reported_and_changes_nothing
);

const WAIT: Duration = Duration::from_secs(15);

fn cloud(broker: &Broker, db: &Path) -> RunningService {
    let config = broker.backend_config("cloud").unwrap();
    serve_shadows(config, ShadowService::new(SqliteStore::open(db).unwrap())).unwrap()
}

fn agent(broker: &Broker) -> Agent {
    let id = broker.device_identity("pump-7").unwrap();
    AgentBuilder::new(
        "localhost",
        broker.port(),
        "pump-7",
        &id.cert_pem,
        &id.key_pem,
        &broker.pki().ca_pem(),
    )
    .backoff(Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(800),
    })
    .request_timeout(Duration::from_secs(2))
    .start()
    .unwrap()
}

async fn next_delta(agent: &mut Agent) -> Map<String, Value> {
    loop {
        match tokio::time::timeout(WAIT, agent.next_event())
            .await
            .expect("an event in time")
        {
            Some(AgentEvent::ShadowDelta { delta, .. }) => return delta,
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

async fn the_device_converges_on_desired_state(kind: BrokerKind) {
    let mut broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fleet.db");
    let _cloud = cloud(&broker, &db);
    let mut backend = TestClient::connect(&broker, &broker.backend_identity().unwrap(), "app")
        .await
        .unwrap();

    // The device reports; the cloud accepted it.
    let mut dev = agent(&broker);
    let version = tokio::time::timeout(
        WAIT,
        dev.report(None, obj(json!({"fw": "1.0", "speed": 1}))),
    )
    .await
    .expect("in time")
    .expect("accepted");
    assert!(version >= 1);

    // An application sets desired while the device is online.
    backend
        .publish(
            "$aws/things/pump-7/shadow/update",
            r#"{"state":{"desired":{"speed":3}}}"#,
        )
        .await
        .unwrap();
    let delta = next_delta(&mut dev).await;
    assert_eq!(Value::Object(delta.clone()), json!({"speed": 3}));
    dev.report(None, delta).await.unwrap();

    // The device goes offline; desired changes through the Rust API.
    dev.shutdown().await;
    let service = ShadowService::new(SqliteStore::open(&db).unwrap());
    let thing = ThingName::new("pump-7").unwrap();
    service
        .update(
            &thing,
            None,
            &UpdateRequest::desired(json!({"speed": 5, "mode": "eco"})),
            1_800_000_000,
        )
        .await
        .unwrap();
    // It comes back (a new process), reads the shadow and converges.
    let mut dev = agent(&broker);
    let delta = next_delta(&mut dev).await;
    assert_eq!(
        Value::Object(delta.clone()),
        json!({"speed": 5, "mode": "eco"})
    );
    dev.report(None, delta).await.unwrap();
    let shadow = service.get(&thing, None).await.unwrap();
    assert!(shadow.state().unwrap().delta().0.is_empty(), "converged");

    // The broker dies and comes back: the agent reconnects by itself,
    // subscribes again, and still receives deltas.
    broker.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.restart().unwrap();
    let mut reconnected = false;
    while !reconnected {
        match tokio::time::timeout(WAIT, dev.next_event())
            .await
            .expect("reconnects in time")
        {
            Some(AgentEvent::Connected) => reconnected = true,
            Some(AgentEvent::Disconnected { retry_in, .. }) => {
                assert!(retry_in <= Duration::from_millis(800))
            }
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
    // The application's client reconnects too.
    backend.wait_connected(WAIT).await.unwrap();
    let mut delivered = false;
    for _ in 0..20 {
        backend
            .publish(
                "$aws/things/pump-7/shadow/update",
                r#"{"state":{"desired":{"speed":7}}}"#,
            )
            .await
            .unwrap();
        if let Ok(Some(AgentEvent::ShadowDelta { delta, .. })) =
            tokio::time::timeout(Duration::from_millis(700), dev.next_event()).await
        {
            assert_eq!(delta.get("speed"), Some(&json!(7)));
            delivered = true;
            break;
        }
    }
    assert!(delivered, "a delta after the broker restart");
    dev.shutdown().await;
}

async fn bad_input_from_the_broker_is_reported_and_changes_nothing(kind: BrokerKind) {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let dir = tempfile::tempdir().unwrap();
    let _cloud = cloud(&broker, &dir.path().join("fleet.db"));
    let dev = agent(&broker);
    dev.report(None, obj(json!({"a": 1}))).await.unwrap();
    let before = dev
        .shadow(None)
        .await
        .unwrap()
        .expect("the replica after a report");
    assert_eq!(before.reported.get("a"), Some(&json!(1)));
    let backend = TestClient::connect(&broker, &broker.backend_identity().unwrap(), "app")
        .await
        .unwrap();
    // Malformed JSON, a wrong shape, a payload far larger than any shadow,
    // on every kind of topic the agent reads.
    let huge = "x".repeat(100 * 1024);
    let bad: [(&str, &str); 5] = [
        ("$aws/things/pump-7/shadow/update/delta", "{not json"),
        ("$aws/things/pump-7/shadow/update/accepted", &huge),
        ("$aws/things/pump-7/shadow/get/accepted", "[1,2,3]"),
        ("$aws/things/pump-7/jobs/notify-next", "{\"execution\": 7}"),
        (
            "$aws/commands/things/pump-7/executions/c1/request/json",
            "no command",
        ),
    ];
    for (topic, payload) in bad {
        backend.publish(topic, payload).await.unwrap();
    }
    let mut reported = std::collections::BTreeSet::new();
    while reported.len() < bad.len() {
        match tokio::time::timeout(WAIT, dev.next_event())
            .await
            .expect("an event")
        {
            Some(AgentEvent::InvalidInput { topic, .. }) => {
                reported.insert(topic);
            }
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
    let expected: std::collections::BTreeSet<String> =
        bad.iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(reported, expected);
    // Nothing changed, and it still works.
    assert_eq!(dev.shadow(None).await.unwrap(), Some(before));
    dev.report(None, obj(json!({"a": 2}))).await.unwrap();
}
