//! The harness against a real Mosquitto: mutual TLS, the ACL, restarts.

use std::time::Duration;

use fleet_testkit::{Broker, Pki, TestClient};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_confines_each_device_to_its_own_topics() {
    let broker = Broker::start().expect("start mosquitto");
    let mut backend = TestClient::connect(&broker, &broker.backend_identity().unwrap(), "backend")
        .await
        .unwrap();
    let mut a = TestClient::connect(&broker, &broker.device_identity("dev-a").unwrap(), "dev-a")
        .await
        .unwrap();
    let mut b = TestClient::connect(&broker, &broker.device_identity("dev-b").unwrap(), "dev-b")
        .await
        .unwrap();

    assert!(
        backend
            .subscribe("$aws/things/+/shadow/update")
            .await
            .unwrap()
    );
    assert!(
        a.subscribe("$aws/things/dev-a/shadow/update/accepted")
            .await
            .unwrap()
    );
    assert!(
        b.subscribe("$aws/things/dev-b/shadow/update/delta")
            .await
            .unwrap()
    );

    // A's own request reaches the backend, and the backend's reply reaches A.
    a.publish("$aws/things/dev-a/shadow/update", "own request")
        .await
        .unwrap();
    let got = backend
        .recv(WAIT)
        .await
        .expect("backend receives A's request");
    assert_eq!(got.topic, "$aws/things/dev-a/shadow/update");
    backend
        .publish("$aws/things/dev-a/shadow/update/accepted", "reply")
        .await
        .unwrap();
    assert_eq!(
        a.recv(WAIT).await.expect("A receives its reply").payload,
        b"reply"
    );

    // A publishes to B's shadow, then to its own topic. Mosquitto handles one
    // connection's packets in order, so had the first been delivered it
    // would arrive before the second.
    a.publish("$aws/things/dev-b/shadow/update", "forged")
        .await
        .unwrap();
    a.publish("$aws/things/dev-a/shadow/update", "sentinel")
        .await
        .unwrap();
    let got = backend
        .recv(WAIT)
        .await
        .expect("backend receives the sentinel");
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        ("$aws/things/dev-a/shadow/update", b"sentinel".as_slice()),
        "A's publish to B's shadow topic must not be delivered"
    );

    // A may not forge the service's replies to itself either.
    a.publish("$aws/things/dev-a/shadow/update/accepted", "forged reply")
        .await
        .unwrap();
    backend
        .publish("$aws/things/dev-a/shadow/update/accepted", "real reply")
        .await
        .unwrap();
    assert_eq!(a.recv(WAIT).await.unwrap().payload, b"real reply");

    // A subscribes to B's topics. Mosquitto's ACL file checks `read` when it
    // delivers, not when it acknowledges a SUBACK, so the subscription may be
    // granted; what matters is that nothing of B's reaches A.
    let _ = a.subscribe("$aws/things/dev-b/shadow/#").await.unwrap();
    let _ = a.subscribe("$aws/things/dev-b/#").await.unwrap();
    let _ = a
        .subscribe("$aws/things/+/shadow/update/delta")
        .await
        .unwrap();
    backend
        .publish("$aws/things/dev-b/shadow/update/delta", "for B")
        .await
        .unwrap();
    backend
        .publish("$aws/things/dev-a/shadow/update/accepted", "sentinel")
        .await
        .unwrap();
    assert_eq!(
        b.recv(WAIT).await.expect("B receives its delta").payload,
        b"for B"
    );
    let got = a.recv(WAIT).await.expect("A receives the sentinel");
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        (
            "$aws/things/dev-a/shadow/update/accepted",
            b"sentinel".as_slice()
        ),
        "A must receive nothing published to B's topics"
    );
    assert_eq!(a.recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let broker = Broker::start().expect("start mosquitto");
    let stranger = Pki::new("another CA")
        .unwrap()
        .client_identity("dev-a")
        .unwrap();
    let err = TestClient::connect(&broker, &stranger, "dev-a").await;
    assert!(
        err.is_err(),
        "a client certificate from another CA must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stops_and_restarts_on_the_same_port() {
    let mut broker = Broker::start().expect("start mosquitto");
    let port = broker.port();
    let identity = broker.device_identity("dev-a").unwrap();
    let mut backend = TestClient::connect(&broker, &broker.backend_identity().unwrap(), "backend")
        .await
        .unwrap();
    let mut device = TestClient::connect(&broker, &identity, "dev-a")
        .await
        .unwrap();
    assert!(
        device
            .subscribe("$aws/things/dev-a/jobs/notify-next")
            .await
            .unwrap()
    );

    broker.stop();
    assert!(!broker.is_running());
    assert!(
        TestClient::connect(&broker, &identity, "dev-a-2")
            .await
            .is_err(),
        "nothing may accept connections while the broker is stopped"
    );

    broker.restart().expect("restart mosquitto");
    assert!(broker.is_running());
    assert_eq!(broker.port(), port);

    // The existing clients reconnect by themselves; the broker kept no
    // session, so the device subscribes again.
    device
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    backend
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        device
            .subscribe("$aws/things/dev-a/jobs/notify-next")
            .await
            .unwrap()
    );
    backend
        .publish("$aws/things/dev-a/jobs/notify-next", "{}")
        .await
        .unwrap();
    let got = device.recv(WAIT).await.expect("delivery after the restart");
    assert_eq!(got.topic, "$aws/things/dev-a/jobs/notify-next");
}

#[test]
fn a_missing_mosquitto_fails_with_install_instructions() {
    let options = fleet_testkit::BrokerOptions {
        mosquitto: Some(std::env::temp_dir().join("no-such-dir/mosquitto")),
        ..Default::default()
    };
    let err = Broker::start_with(options).unwrap_err();
    assert!(matches!(
        err,
        fleet_testkit::HarnessError::MosquittoNotFound
    ));
    let message = err.to_string();
    assert!(message.contains("apt-get install mosquitto"), "{message}");
}
