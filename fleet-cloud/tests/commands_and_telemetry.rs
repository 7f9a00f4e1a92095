//! Commands and telemetry through a real Mosquitto with the fleet policy.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use fleet_cloud::telemetry::{JsonLinesSink, Predicate, Rule, TelemetryRouter};
use fleet_cloud::{BrokerConfig, CommandFailure, MemoryStore, ShadowService, serve};
use fleet_core::ThingName;
use fleet_core::jobs::{CommandInbox, CommandState, CommandStatus, Delivery};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, TestClient};
use serde_json::json;

fleet_testkit::on_both_brokers!(
    a_command_is_answered_once_and_a_silent_device_times_out,
    telemetry_is_routed_by_rule
);

fn config(broker: &Broker) -> BrokerConfig {
    broker.backend_config("cloud-1").unwrap()
}

async fn a_command_is_answered_once_and_a_silent_device_times_out(kind: BrokerKind) {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let cloud = serve(
        config(&broker),
        fleet_cloud::Services::new().with(ShadowService::new(MemoryStore::new())),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    // Subscribed to the answers before the command goes out (on a busy
    // machine the connection takes a while).
    assert!(cloud.link().wait_up(Duration::from_secs(10)).await);
    let id = broker.device_identity("dev-a").unwrap();
    let mut dev = TestClient::connect(&broker, &id, "dev-a").await.unwrap();
    assert!(
        dev.subscribe("$aws/commands/things/dev-a/executions/+/request/json")
            .await
            .unwrap()
    );
    // The device answers with fleet-core's inbox.
    let device = tokio::spawn(async move {
        let mut inbox = CommandInbox::new(16);
        let m = dev.recv(Duration::from_secs(10)).await.expect("a request");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let Delivery::Run(request) = inbox.handle_request(now, &m.payload).unwrap() else {
            panic!("first delivery runs")
        };
        assert_eq!(request.command, "set-speed");
        let answer = inbox
            .respond(
                0,
                &request.execution_id,
                CommandStatus::Succeeded,
                json!({"speed": request.payload["speed"]}),
            )
            .unwrap();
        let topic = m.topic.replace("/request/", "/response/");
        dev.publish(&topic, answer).await.unwrap();
        dev
    });
    let thing = ThingName::new("dev-a").unwrap();
    let answer = cloud
        .commands()
        .send(
            &thing,
            "set-speed",
            json!({"speed": 4}),
            Duration::from_secs(10),
        )
        .await
        .expect("an answer");
    assert_eq!(answer.status, CommandStatus::Succeeded);
    assert_eq!(answer.payload["speed"], 4);
    assert!(matches!(
        cloud.commands().state(&answer.execution_id),
        Some(CommandState::Done(_))
    ));
    let _dev = device.await.unwrap();

    // Nobody answers this one.
    let silent = ThingName::new("dev-z").unwrap();
    let err = cloud
        .commands()
        .send(&silent, "reboot", json!(null), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, CommandFailure::TimedOut));
}

async fn telemetry_is_routed_by_rule(kind: BrokerKind) {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let dir = tempfile::tempdir().unwrap();
    let hot = dir.path().join("hot.jsonl");
    let router = TelemetryRouter::new(
        vec![Rule {
            filter: "dt/+/temp".into(),
            predicate: Some(Predicate::Above {
                pointer: "/c".into(),
                threshold: 30.0,
            }),
            sink: Arc::new(JsonLinesSink::new(&hot)),
        }],
        &dir.path().join("dead.jsonl"),
    );
    let _cloud = serve(
        config(&broker),
        fleet_cloud::Services::new().with(ShadowService::new(MemoryStore::new())),
        fleet_cloud::ServeOptions {
            telemetry: Some(router),
            ..fleet_cloud::ServeOptions::default()
        },
    )
    .unwrap();
    let id = broker.device_identity("dev-a").unwrap();
    let dev = TestClient::connect(&broker, &id, "dev-a").await.unwrap();
    // The service subscribes after connecting: send until the first lands.
    for _ in 0..100 {
        dev.publish("dt/dev-a/temp", r#"{"c":31}"#).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if std::fs::read_to_string(&hot).is_ok_and(|s| !s.is_empty()) {
            break;
        }
    }
    dev.publish("dt/dev-a/temp", r#"{"c":12}"#).await.unwrap();
    dev.publish("dt/dev-a/temp", r#"{"c":40}"#).await.unwrap();
    let mut lines = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lines = std::fs::read_to_string(&hot)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        if lines.iter().any(|l| l.contains(r#""c":40"#)) {
            break;
        }
    }
    assert!(lines.iter().any(|l| l.contains(r#""c":40"#)), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains(r#""c":12"#)),
        "the predicate filters"
    );
    assert!(lines.iter().all(|l| l.contains(r#""thing":"dev-a""#)));
}
