//! Telemetry through the outbox, against real brokers: a broker outage
//! loses nothing, a restart of the device sends what was never
//! acknowledged, MQTT 3.1.1 works as 5 does, and a client-id fight is
//! reported.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_cloud::{MemoryStore, ShadowService, serve_shadows};
use fleet_device::{Agent, AgentBuilder, AgentEvent, Backoff, Protocol, Qos};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, Proxy, TestClient};
use serde_json::{Value, json};

fleet_testkit::on_both_brokers!(
    a_broker_outage_loses_no_telemetry,
    what_was_never_acknowledged_is_sent_after_a_restart,
    mqtt_3_1_1_works_too
);

const WAIT: Duration = Duration::from_secs(30);

fn start(kind: BrokerKind) -> Broker {
    Broker::start_with(BrokerOptions {
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker")
}

fn builder(broker: &Broker, port: u16, state: &std::path::Path) -> AgentBuilder {
    let id = broker.device_identity("pump-7").unwrap();
    AgentBuilder::new(
        "localhost",
        port,
        "pump-7",
        &id.cert_pem,
        &id.key_pem,
        &broker.pki().ca_pem(),
    )
    .state_dir(state)
    .backoff(Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(1000),
    })
    .request_timeout(Duration::from_secs(2))
}

async fn until_connected(agent: &mut Agent) {
    tokio::time::timeout(WAIT, async {
        while !matches!(agent.next_event().await, Some(AgentEvent::Connected)) {}
    })
    .await
    .expect("the agent connects");
}

async fn backend(broker: &Broker) -> TestClient {
    let id = broker.backend_identity().unwrap();
    let mut c = TestClient::connect(broker, &id, "telemetry-sink")
        .await
        .unwrap();
    assert!(c.subscribe("dt/#").await.unwrap());
    c
}

/// Receives telemetry until every `i` in `0..n` has come; returns how many
/// messages came in all (duplicates included).
async fn collect(sink: &mut TestClient, n: usize) -> usize {
    let mut seen = vec![false; n];
    let mut total = 0;
    while seen.iter().any(|s| !s) {
        let Some(m) = sink.recv(WAIT).await else {
            let missing: Vec<usize> = (0..n).filter(|i| !seen[*i]).collect();
            panic!(
                "telemetry lost: {} missing, first {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        };
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        seen[usize::try_from(v["i"].as_u64().unwrap()).unwrap()] = true;
        total += 1;
    }
    total
}

async fn a_broker_outage_loses_no_telemetry(kind: BrokerKind) {
    const N: usize = 1000;
    let mut broker = start(kind);
    let proxy = Proxy::start(broker.port()).await.unwrap();
    let _cloud = serve_shadows(
        broker.backend_config("cloud").unwrap(),
        ShadowService::new(MemoryStore::new()),
    )
    .unwrap();
    let mut sink = backend(&broker).await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = builder(&broker, proxy.port(), state.path())
        .start()
        .unwrap();
    until_connected(&mut agent).await;

    let mut deliveries = Vec::with_capacity(N);
    for i in 0..N {
        if i == 300 {
            // The device's link goes first (what is in flight drains), then
            // the broker dies.
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(500)).await;
            broker.stop();
        }
        let d = agent
            .publish("telemetry", json!({"i": i}).to_string(), Qos::AtLeastOnce)
            .await
            .unwrap();
        deliveries.push(d);
    }
    // Shadow reports made during the outage wait, then go through.
    let (r1, r2, ()) = tokio::join!(
        agent.report(
            None,
            json!({"firmware": "1.2.0"}).as_object().unwrap().clone()
        ),
        agent.report(None, json!({"rpm": 1200}).as_object().unwrap().clone()),
        async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            broker.restart().unwrap();
            sink.wait_connected(WAIT).await.unwrap();
            // A fresh session: subscribe again before the device is back.
            assert!(sink.subscribe("dt/#").await.unwrap());
            proxy.restore();
        }
    );
    assert!(r1.is_ok() && r2.is_ok(), "{r1:?} {r2:?}");
    for d in deliveries {
        tokio::time::timeout(WAIT, d.acknowledged())
            .await
            .expect("acknowledged in time")
            .unwrap();
    }
    let total = collect(&mut sink, N).await;
    // At least once: a message whose PUBACK was lost in the cut comes twice.
    assert!(total >= N, "{total}");
    agent.shutdown().await;
}

async fn what_was_never_acknowledged_is_sent_after_a_restart(kind: BrokerKind) {
    const N: usize = 50;
    let broker = start(kind);
    let proxy = Proxy::start(broker.port()).await.unwrap();
    proxy.cut();
    let mut sink = backend(&broker).await;
    let state = tempfile::tempdir().unwrap();
    // The device cannot reach the broker; it queues, then is stopped.
    let agent = builder(&broker, proxy.port(), state.path())
        .start()
        .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..N {
        deliveries.push(
            agent
                .publish("telemetry", json!({"i": i}).to_string(), Qos::AtLeastOnce)
                .await
                .unwrap(),
        );
    }
    agent.shutdown().await;
    for d in deliveries {
        assert!(
            d.acknowledged().await.is_err(),
            "nothing could be acknowledged"
        );
    }
    assert_eq!(sink.recv(Duration::from_millis(300)).await, None);
    // The next run sends them.
    proxy.restore();
    let mut agent = builder(&broker, proxy.port(), state.path())
        .start()
        .unwrap();
    until_connected(&mut agent).await;
    assert_eq!(collect(&mut sink, N).await, N, "each exactly once here");
    agent.shutdown().await;
}

async fn mqtt_3_1_1_works_too(kind: BrokerKind) {
    let broker = start(kind);
    let _cloud = serve_shadows(
        broker.backend_config("cloud").unwrap(),
        ShadowService::new(MemoryStore::new()),
    )
    .unwrap();
    let mut sink = backend(&broker).await;
    let state = tempfile::tempdir().unwrap();
    let mut agent = builder(&broker, broker.port(), state.path())
        .protocol(Protocol::V311)
        .start()
        .unwrap();
    until_connected(&mut agent).await;
    let d = agent
        .publish("telemetry", json!({"i": 0}).to_string(), Qos::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, d.acknowledged())
        .await
        .unwrap()
        .unwrap();
    // A batch: one write to the outbox, a delivery each.
    let batch = (1..=20)
        .map(|i| json!({"i": i}).to_string().into_bytes())
        .collect();
    for d in agent.publish_batch("telemetry", batch).await.unwrap() {
        tokio::time::timeout(WAIT, d.acknowledged())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(collect(&mut sink, 21).await, 21);
    let version = tokio::time::timeout(
        WAIT,
        agent.report(None, json!({"on": true}).as_object().unwrap().clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(version >= 1);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_fighting_over_a_client_id_are_told() {
    let broker = start(BrokerKind::Embedded);
    let state = tempfile::tempdir().unwrap();
    let fast = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let a = builder(&broker, broker.port(), &state.path().join("a"))
        .backoff(fast)
        .start()
        .unwrap();
    let _b = builder(&broker, broker.port(), &state.path().join("b"))
        .backoff(fast)
        .start()
        .unwrap();
    let mut kinds = BTreeMap::new();
    let conflict = tokio::time::timeout(WAIT, async {
        loop {
            match a.next_event().await {
                Some(AgentEvent::ClientIdConflict { times }) => return times,
                Some(e) => {
                    *kinds
                        .entry(format!("{e:?}").chars().take(12).collect::<String>())
                        .or_insert(0) += 1
                }
                None => panic!("stopped"),
            }
        }
    })
    .await;
    let times = conflict.unwrap_or_else(|_| panic!("no conflict reported; events: {kinds:?}"));
    assert!(times >= 3);
}
