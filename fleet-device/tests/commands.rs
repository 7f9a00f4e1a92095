//! Commands from the fleet-cloud `CommandCenter` to the agent through a
//! real Mosquitto: answered once, and not at all after the deadline.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fleet_cloud::{CommandFailure, MemoryStore, ShadowService, serve};
use fleet_core::ThingName;
use fleet_core::jobs::CommandStatus;
use fleet_device::{AgentBuilder, AgentEvent};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions};
use serde_json::json;

fleet_testkit::on_both_brokers!(commands_reach_the_agent_and_come_back);

async fn commands_reach_the_agent_and_come_back(kind: BrokerKind) {
    let broker = Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker");
    let cloud = serve(
        broker.backend_config("cloud").unwrap(),
        fleet_cloud::Services::new().with(ShadowService::new(MemoryStore::new())),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    let id = broker.device_identity("pump-7").unwrap();
    let agent = AgentBuilder::new(
        "localhost",
        broker.port(),
        "pump-7",
        &id.cert_pem,
        &id.key_pem,
        &broker.pki().ca_pem(),
    )
    .start()
    .unwrap();
    loop {
        if let Some(AgentEvent::Connected) =
            tokio::time::timeout(Duration::from_secs(10), agent.next_event())
                .await
                .unwrap()
        {
            break;
        }
    }
    // Subscriptions follow the connection; give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let thing = ThingName::new("pump-7").unwrap().into_owned();
    let commands = cloud.commands().clone();
    let sent = tokio::spawn(async move {
        commands
            .send(
                &thing,
                "set-speed",
                json!({"speed": 4}),
                Duration::from_secs(10),
            )
            .await
    });
    loop {
        match tokio::time::timeout(Duration::from_secs(10), agent.next_event())
            .await
            .unwrap()
        {
            Some(AgentEvent::Command {
                execution_id,
                command,
                payload,
                ..
            }) => {
                assert_eq!(
                    (command.as_str(), payload["speed"].as_u64()),
                    ("set-speed", Some(4))
                );
                agent
                    .respond(&execution_id, CommandStatus::Succeeded, json!({"speed": 4}))
                    .await
                    .unwrap();
                assert!(
                    agent
                        .respond(&execution_id, CommandStatus::Failed, json!(null))
                        .await
                        .is_err(),
                    "a second answer is refused"
                );
                break;
            }
            Some(_) => {}
            None => panic!("the agent stopped"),
        }
    }
    let answer = sent.await.unwrap().expect("answered");
    assert_eq!(answer.status, CommandStatus::Succeeded);
    assert_eq!(answer.payload["speed"], 4);

    // A command the application does not answer in time.
    let thing = ThingName::new("pump-7").unwrap();
    let err = cloud
        .commands()
        .send(&thing, "reboot", json!(null), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, CommandFailure::TimedOut));
    agent.shutdown().await;
}
