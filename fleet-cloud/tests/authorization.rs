//! The generated broker policy against a real Mosquitto and against the
//! embedded broker: for every topic family, device A can neither write nor
//! read device B's topics, and a claim identity can touch provisioning only.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fleet_cloud::BrokerPolicy;
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, Message, TestClient};

const WAIT: Duration = Duration::from_secs(5);

/// B's topics in every family: requests, replies, notifications.
const B_TOPICS: &[&str] = &[
    "$aws/things/dev-b/shadow/update",
    "$aws/things/dev-b/shadow/get",
    "$aws/things/dev-b/shadow/update/accepted",
    "$aws/things/dev-b/shadow/update/delta",
    "$aws/things/dev-b/shadow/name/cfg/update",
    "$aws/things/dev-b/shadow/name/cfg/update/delta",
    "$aws/things/dev-b/jobs/start-next",
    "$aws/things/dev-b/jobs/notify-next",
    "$aws/things/dev-b/jobs/job-1/update",
    "$aws/things/dev-b/jobs/job-1/update/accepted",
    "$aws/things/dev-b/streams/s1/get/json",
    "$aws/things/dev-b/streams/s1/data/json",
    "$aws/commands/things/dev-b/executions/c1/request/json",
    "$aws/commands/things/dev-b/executions/c1/response/json",
    "dt/dev-b/temperature",
];

fleet_testkit::on_both_brokers!(
    a_device_cannot_write_another_devices_topics,
    a_device_cannot_read_another_devices_topics,
    a_claim_identity_reaches_provisioning,
    revoking_every_certificate_cuts_a_connected_device_off,
);

fn start(kind: BrokerKind, policy: BrokerPolicy) -> Broker {
    Broker::start_with(BrokerOptions {
        policy,
        kind,
        ..BrokerOptions::default()
    })
    .expect("start the broker")
}

async fn broker_with_claims(kind: BrokerKind) -> Broker {
    start(
        kind,
        BrokerPolicy {
            claim_identities: vec!["claim@factory".into()],
            ..BrokerPolicy::default()
        },
    )
}

async fn client(broker: &Broker, name: &str) -> TestClient {
    let id = broker.pki().client_identity(name).unwrap();
    TestClient::connect(broker, &id, name).await.unwrap()
}

/// Receives until `sentinel` arrives; returns what came before it.
async fn before_sentinel(c: &mut TestClient, sentinel: &str) -> Vec<Message> {
    let mut before = Vec::new();
    loop {
        let m = next_from_a_client(c).await;
        if m.payload == sentinel.as_bytes() {
            return before;
        }
        before.push(m);
    }
}

/// The next message a client published: the embedded broker's own
/// lifecycle events (`$aws/events/presence/...`, which a backend
/// subscribed to `$aws/#` receives too) are passed over.
async fn next_from_a_client(c: &mut TestClient) -> Message {
    loop {
        let m = c.recv(WAIT).await.expect("a message arrives");
        if !m.topic.starts_with("$aws/events/presence/") {
            return m;
        }
    }
}

async fn a_device_cannot_write_another_devices_topics(kind: BrokerKind) {
    let broker = broker_with_claims(kind).await;
    let mut backend = client(&broker, "fleet-backend").await;
    for f in ["$aws/#", "dt/#"] {
        assert!(backend.subscribe(f).await.unwrap());
    }
    for who in ["dev-a", "claim@factory"] {
        let c = client(&broker, who).await;
        for topic in B_TOPICS {
            c.publish(topic, "forged").await.unwrap();
        }
        // Each may write something of its own: the sentinel.
        let own = if who == "dev-a" {
            "$aws/things/dev-a/shadow/update"
        } else {
            "$aws/certificates/create-from-csr/json"
        };
        c.publish(own, "sentinel").await.unwrap();
        let leaked = before_sentinel(&mut backend, "sentinel").await;
        assert!(
            leaked.is_empty(),
            "{who} wrote {:?}",
            leaked.iter().map(|m| &m.topic).collect::<Vec<_>>()
        );
    }
}

async fn a_device_cannot_read_another_devices_topics(kind: BrokerKind) {
    let broker = broker_with_claims(kind).await;
    let backend = client(&broker, "fleet-backend").await;
    for who in ["dev-a", "claim@factory"] {
        let mut c = client(&broker, who).await;
        for f in [
            "$aws/things/dev-b/#",
            "$aws/things/+/shadow/#",
            "$aws/commands/things/dev-b/#",
            "dt/#",
            "$aws/#",
        ] {
            let _ = c.subscribe(f).await.unwrap();
        }
        let own = if who == "dev-a" {
            "$aws/things/dev-a/jobs/notify-next"
        } else {
            // A claim identity reads only its own client's response topics.
            "$aws/clients/claim@factory/provisioning/accepted"
        };
        assert!(c.subscribe(own).await.unwrap());
        for topic in B_TOPICS {
            backend.publish(topic, "secret").await.unwrap();
        }
        backend.publish(own, "sentinel").await.unwrap();
        let leaked = before_sentinel(&mut c, "sentinel").await;
        assert!(
            leaked.is_empty(),
            "{who} read {:?}",
            leaked.iter().map(|m| &m.topic).collect::<Vec<_>>()
        );
    }
}

async fn a_claim_identity_reaches_provisioning(kind: BrokerKind) {
    let broker = broker_with_claims(kind).await;
    let mut backend = client(&broker, "fleet-backend").await;
    assert!(backend.subscribe("$aws/#").await.unwrap());
    let claim = client(&broker, "claim@factory").await;
    for topic in [
        "$aws/certificates/create-from-csr/json",
        "$aws/provisioning-templates/factory/provision/json",
    ] {
        claim.publish(topic, "request").await.unwrap();
        let got = next_from_a_client(&mut backend).await;
        assert_eq!(got.topic, topic);
    }
}

async fn revoking_every_certificate_cuts_a_connected_device_off(kind: BrokerKind) {
    let mut broker = start(kind, BrokerPolicy::default());
    let registry = fleet_cloud::Registry::in_memory().unwrap();
    registry
        .create_thing("dev-a", Default::default())
        .await
        .unwrap();
    let id = broker.device_identity("dev-a").unwrap();
    registry
        .add_certificate("cert-1", "dev-a", &id.cert_pem)
        .await
        .unwrap();

    let mut backend = client(&broker, "fleet-backend").await;
    assert!(
        backend
            .subscribe("$aws/things/+/shadow/update")
            .await
            .unwrap()
    );
    let mut dev = TestClient::connect(&broker, &id, "dev-a").await.unwrap();
    assert!(
        dev.subscribe("$aws/things/dev-a/shadow/update/delta")
            .await
            .unwrap()
    );
    dev.publish("$aws/things/dev-a/shadow/update", "before")
        .await
        .unwrap();
    assert_eq!(backend.recv(WAIT).await.unwrap().payload, b"before");

    registry.revoke_certificate("cert-1").await.unwrap();
    let policy = BrokerPolicy {
        denied_identities: registry.denied_identities().await.unwrap(),
        ..BrokerPolicy::default()
    };
    assert_eq!(policy.denied_identities, ["dev-a"]);
    broker.reload_policy(&policy).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The still-connected device can neither publish nor receive.
    dev.publish("$aws/things/dev-a/shadow/update", "after")
        .await
        .unwrap();
    backend
        .publish("$aws/things/dev-a/shadow/update/delta", "for dev-a")
        .await
        .unwrap();
    let other = client(&broker, "dev-b").await;
    other
        .publish("$aws/things/dev-b/shadow/update", "sentinel")
        .await
        .unwrap();
    let leaked = before_sentinel(&mut backend, "sentinel").await;
    assert!(
        leaked.is_empty(),
        "a revoked device still publishes: {leaked:?}"
    );
    assert_eq!(
        dev.recv(Duration::from_millis(500)).await,
        None,
        "a revoked device still receives"
    );
}
