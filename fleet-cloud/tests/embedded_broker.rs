//! What the embedded broker does beyond the suites that run on both brokers:
//! MQTT 3.1.1 clients (the AWS device SDKs' default) served under `$aws`,
//! a handshake timeout, no plaintext, per-certificate revocation, client-id
//! takeover, `$aws` shared subscriptions, retained messages and wills.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use fleet_cloud::pki::{Identity, Pki};
use fleet_cloud::{
    BrokerConfig, BrokerPolicy, EmbeddedBroker, EmbeddedConfig, MemoryStore, ShadowService,
    certificate_fingerprint, serve_shadows,
};
use fleet_testkit::client_tls_config;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    pki: Pki,
    broker: EmbeddedBroker,
}

async fn setup(policy: BrokerPolicy, handshake_timeout: Duration) -> Setup {
    let pki = Pki::new("embedded test CA").unwrap();
    let server = pki.server_identity().unwrap();
    let mut config = EmbeddedConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    );
    config.policy = policy;
    config.handshake_timeout = handshake_timeout;
    let broker = EmbeddedBroker::start(config).await.unwrap();
    Setup { pki, broker }
}

/// The service's connection to the embedded broker.
fn backend_config(s: &Setup) -> BrokerConfig {
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    BrokerConfig {
        host: "localhost".into(),
        port: s.broker.local_addr().port(),
        client_id: "svc".into(),
        cert_pem: backend.cert_pem,
        key_pem: backend.key_pem,
        ca_pem: s.pki.ca_pem(),
        share_group: None,
        queue_capacity: 64,
    }
}

fn v5(s: &Setup, id: &Identity, client_id: &str) -> (AsyncClient, EventLoop) {
    let tls = client_tls_config(id, &s.pki.ca_pem()).unwrap();
    let mut o = MqttOptions::new(client_id, "localhost", s.broker.local_addr().port());
    o.set_keep_alive(Duration::from_secs(5))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    AsyncClient::new(o, 64)
}

/// Polls until a packet matching `want` arrives (errors count as packets
/// of their own: `Err(text)`).
async fn until<T>(
    ev: &mut EventLoop,
    mut want: impl FnMut(Result<&Packet, String>) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(p)) => {
                    if let Some(t) = want(Ok(&p)) {
                        return t;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    if let Some(t) = want(Err(e.to_string())) {
                        return t;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
    .expect("the expected packet arrives")
}

async fn connected(ev: &mut EventLoop) {
    until(ev, |p| matches!(p, Ok(Packet::ConnAck(_))).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_3_client_is_served_under_the_aws_prefix() {
    let s = setup(BrokerPolicy::default(), Duration::from_secs(10)).await;
    let service =
        serve_shadows(backend_config(&s), ShadowService::new(MemoryStore::new())).unwrap();

    // A 3.1.1 client, as the AWS IoT device SDKs connect by default.
    let id = s.pki.client_identity("pump-3").unwrap();
    let tls = client_tls_config(&id, &s.pki.ca_pem()).unwrap();
    let mut o = rumqttc::MqttOptions::new("pump-3", "localhost", s.broker.local_addr().port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut ev) = rumqttc::AsyncClient::new(o, 16);
    client
        .subscribe(
            "$aws/things/pump-3/shadow/update/accepted",
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    client
        .subscribe(
            "$aws/things/+/shadow/update/accepted",
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let codes = tokio::time::timeout(WAIT, async {
        let mut codes = Vec::new();
        while codes.len() < 2 {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) = ev.poll().await {
                codes.extend(a.return_codes);
            }
        }
        codes
    })
    .await
    .unwrap();
    assert!(matches!(codes[0], rumqttc::SubscribeReasonCode::Success(_)));
    // Another thing's replies: refused.
    assert_eq!(codes[1], rumqttc::SubscribeReasonCode::Failure);

    let accepted = tokio::time::timeout(WAIT, async {
        let mut n = 0;
        loop {
            // The service subscribes after it connects: ask until answered.
            if n % 20 == 0 {
                client
                    .publish(
                        "$aws/things/pump-3/shadow/update",
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        r#"{"state":{"reported":{"rpm":900}},"clientToken":"c-1"}"#,
                    )
                    .await
                    .unwrap();
            }
            n += 1;
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(50), ev.poll()).await
            {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(accepted.topic, "$aws/things/pump-3/shadow/update/accepted");
    let body: serde_json::Value = serde_json::from_slice(&accepted.payload).unwrap();
    assert_eq!(body["state"]["reported"]["rpm"], 900);
    assert_eq!(body["clientToken"], "c-1");
    service.shutdown().await;
    s.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_plaintext_connection_is_closed() {
    let s = setup(BrokerPolicy::default(), Duration::from_millis(300)).await;
    let addr = s.broker.local_addr();
    // Connects and says nothing: closed after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the broker closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Speaks plaintext MQTT: no TLS, no service.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    plain
        .write_all(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut reply)).await;
    assert!(
        !reply.starts_with(&[0x20]),
        "a plaintext client got a CONNACK: {reply:?}"
    );
    assert_eq!(s.broker.connected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_cut_off_and_the_things_other_certificate_is_not() {
    let s = setup(BrokerPolicy::default(), Duration::from_secs(10)).await;
    let old = s.pki.client_identity("dev-a").unwrap();
    let new = s.pki.client_identity("dev-a").unwrap();
    let (_c1, mut e1) = v5(&s, &old, "dev-a");
    connected(&mut e1).await;
    s.broker
        .revoke([certificate_fingerprint(&old.cert_pem).unwrap()]);
    // rumqttc reports the server's DISCONNECT as an error naming its reason.
    let reason = until(&mut e1, |p| p.err()).await;
    assert!(reason.contains("NotAuthorized"), "{reason}");
    // It cannot come back.
    let refused = until(&mut e1, |p| match p {
        Ok(Packet::ConnAck(a)) => Some(format!("{:?}", a.code)),
        Err(e) if e.contains("NotAuthorized") || e.contains("Refused") => Some(e),
        _ => None,
    })
    .await;
    assert!(refused.contains("NotAuthorized"), "{refused}");
    // The thing's other certificate still works.
    let (_c2, mut e2) = v5(&s, &new, "dev-a");
    connected(&mut e2).await;
    assert_eq!(s.broker.connected(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let s = setup(BrokerPolicy::default(), Duration::from_secs(10)).await;
    let id = s.pki.client_identity("dev-a").unwrap();
    let (_c1, mut e1) = v5(&s, &id, "dev-a");
    connected(&mut e1).await;
    let (_c2, mut e2) = v5(&s, &id, "dev-a");
    connected(&mut e2).await;
    let reason = until(&mut e1, |p| p.err()).await;
    assert!(reason.contains("SessionTakenOver"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_retained_messages_and_wills() {
    let s = setup(BrokerPolicy::default(), Duration::from_secs(10)).await;
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    // Two members of one group under `$aws` (Mosquitto cannot do this).
    let mut members = Vec::new();
    for n in 0..2 {
        let (c, mut e) = v5(&s, &backend, &format!("svc-{n}"));
        c.subscribe(
            "$share/g/$aws/things/+/shadow/update",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        until(&mut e, |p| matches!(p, Ok(Packet::SubAck(_))).then_some(())).await;
        members.push((c, e));
    }
    let dev = s.pki.client_identity("dev-a").unwrap();
    let (d, mut de) = v5(&s, &dev, "dev-a");
    connected(&mut de).await;
    let pump = tokio::spawn(async move {
        loop {
            if de.poll().await.is_err() {
                return;
            }
        }
    });
    for i in 0..10 {
        d.publish(
            "$aws/things/dev-a/shadow/update",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            format!("{i}"),
        )
        .await
        .unwrap();
    }
    let mut counts = [0usize; 2];
    let mut got = 0;
    while got < 10 {
        for (n, (_, e)) in members.iter_mut().enumerate() {
            if let Ok(Ok(Event::Incoming(Packet::Publish(_)))) =
                tokio::time::timeout(Duration::from_millis(50), e.poll()).await
            {
                counts[n] += 1;
                got += 1;
            }
        }
    }
    assert_eq!(counts[0] + counts[1], 10);
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    pump.abort();

    // Retained: a late subscriber gets the last value at once (not on
    // the reserved `$aws` topics, where AWS IoT keeps none either).
    let (b, mut be) = v5(&s, &backend, "svc-r");
    connected(&mut be).await;
    b.publish(
        "fleet/dev-a/config",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        "latest",
    )
    .await
    .unwrap();
    until(&mut be, |p| {
        matches!(p, Ok(Packet::PubAck(_))).then_some(())
    })
    .await;
    let (d2, mut d2e) = v5(&s, &backend, "svc-late");
    d2.subscribe(
        "fleet/dev-a/config",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let p = until(&mut d2e, |p| match p {
        Ok(Packet::Publish(p)) => Some(p.payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(&p[..], b"latest");

    // A will: published when a client vanishes without DISCONNECT.
    b.subscribe("dt/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut be, |p| {
        matches!(p, Ok(Packet::SubAck(_))).then_some(())
    })
    .await;
    let tls = client_tls_config(&dev, &s.pki.ca_pem()).unwrap();
    let mut o = MqttOptions::new("dev-a", "localhost", s.broker.local_addr().port());
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "dt/dev-a/status",
        "gone",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        None,
    ))
    .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (_w, mut we) = AsyncClient::new(o, 8);
    connected(&mut we).await;
    drop(we);
    let will = until(&mut be, |p| match p {
        Ok(Packet::Publish(p)) => Some((p.topic.clone(), p.payload.clone())),
        _ => None,
    })
    .await;
    assert_eq!(&will.0[..], b"dt/dev-a/status");
    assert_eq!(&will.1[..], b"gone");
}

/// An MQTT 3.1.1 claimant (no response topic), as AWS's SDKs provision.
async fn v3_claimant(s: &Setup, name: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let id = s.pki.client_identity(name).unwrap();
    let tls = client_tls_config(&id, &s.pki.ca_pem()).unwrap();
    let mut o = rumqttc::MqttOptions::new(name, "localhost", s.broker.local_addr().port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (c, mut ev) = rumqttc::AsyncClient::new(o, 16);
    for t in [
        "$aws/certificates/create-from-csr/json/accepted",
        "$aws/certificates/create-from-csr/json/rejected",
        "$aws/provisioning-templates/factory/provision/json/accepted",
        "$aws/provisioning-templates/factory/provision/json/rejected",
    ] {
        c.subscribe(t, rumqttc::QoS::AtLeastOnce).await.unwrap();
    }
    let granted = tokio::time::timeout(WAIT, async {
        let mut n = 0;
        while n < 4 {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) = ev.poll().await {
                assert!(
                    a.return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                    "{a:?}"
                );
                n += 1;
            }
        }
    })
    .await;
    assert!(granted.is_ok(), "the reply topics are granted");
    (c, ev)
}

/// Publishes until a message arrives (the service subscribes after it
/// connects); returns its topic and JSON body.
async fn ask(
    c: &rumqttc::AsyncClient,
    ev: &mut rumqttc::EventLoop,
    topic: &str,
    body: &serde_json::Value,
) -> (String, serde_json::Value) {
    tokio::time::timeout(WAIT, async {
        let mut n = 0;
        loop {
            if n % 20 == 0 {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
                    .await
                    .unwrap();
            }
            n += 1;
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(50), ev.poll()).await
            {
                return (p.topic, serde_json::from_slice(&p.payload).unwrap());
            }
        }
    })
    .await
    .expect("a reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_claimants_provision_and_see_only_their_own_replies() {
    let policy = BrokerPolicy {
        claim_identities: vec!["claim@a".into(), "claim@b".into()],
        reply_routing: true,
        ..BrokerPolicy::default()
    };
    let s = setup(policy, Duration::from_secs(10)).await;
    let ca = Pki::from_pem(&s.pki.ca_pem(), &s.pki.ca_key_pem().unwrap()).unwrap();
    let registry = fleet_cloud::Registry::in_memory().unwrap();
    let provisioning = fleet_cloud::ProvisioningService::new(
        ca,
        registry.clone(),
        vec![fleet_cloud::ProvisioningTemplate {
            allow_replace: false,
            name: "factory".into(),
            thing_name_prefix: "pump-".into(),
            name_parameter: "SerialNumber".into(),
            required_parameters: Vec::new(),
            attributes: Default::default(),
            groups: Vec::new(),
            body: None,
            webhook: None,
        }],
    );
    let _service = fleet_cloud::serve(
        backend_config(&s),
        fleet_cloud::Services::new()
            .with(ShadowService::new(MemoryStore::new()))
            .with(provisioning),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();

    let (a, mut a_ev) = v3_claimant(&s, "claim@a").await;
    let (_b, mut b_ev) = v3_claimant(&s, "claim@b").await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pump-7");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let (topic, created) = ask(
        &a,
        &mut a_ev,
        "$aws/certificates/create-from-csr/json",
        &serde_json::json!({"certificateSigningRequest": csr}),
    )
    .await;
    assert_eq!(topic, "$aws/certificates/create-from-csr/json/accepted");
    let (topic, registered) = ask(
        &a,
        &mut a_ev,
        "$aws/provisioning-templates/factory/provision/json",
        &serde_json::json!({
            "certificateOwnershipToken": created["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "7"},
        }),
    )
    .await;
    assert_eq!(
        topic, "$aws/provisioning-templates/factory/provision/json/accepted",
        "{registered}"
    );
    assert_eq!(registered["thingName"], "pump-7");
    assert_eq!(registry.certificates("pump-7").await.unwrap().len(), 1);
    // The other claimant, subscribed to the same topics, saw nothing.
    let leaked = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = b_ev.poll().await {
                return p;
            }
        }
    })
    .await;
    assert!(
        leaked.is_err(),
        "claim@b read {:?}",
        leaked.map(|p| p.topic)
    );
    // Such a policy is refused for Mosquitto, which cannot route replies.
    assert!(
        BrokerPolicy {
            reply_routing: true,
            ..BrokerPolicy::default()
        }
        .try_mosquitto_acl()
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_slows_the_publisher_and_loses_no_qos1_message() {
    let pki = Pki::new("embedded test CA").unwrap();
    let server = pki.server_identity().unwrap();
    let mut config = EmbeddedConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    );
    // A tiny queue, so that it is full at once.
    config.queue_capacity = 4;
    let s = Setup {
        pki,
        broker: EmbeddedBroker::start(config).await.unwrap(),
    };
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (sub, mut sub_ev) = {
        let tls = client_tls_config(&backend, &s.pki.ca_pem()).unwrap();
        let mut o = MqttOptions::new("svc", "localhost", s.broker.local_addr().port());
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(64 * 1024))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        AsyncClient::new(o, 64)
    };
    connected(&mut sub_ev).await;
    sub.subscribe("dt/+/t", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut sub_ev, |p| {
        matches!(p, Ok(Packet::SubAck(_))).then_some(())
    })
    .await;

    // The publisher sends 16 MiB while the subscriber reads nothing: more
    // than the queue and the sockets hold.
    const COUNT: usize = 2000;
    let id = s.pki.client_identity("dev-pub").unwrap();
    let (publisher, mut pub_ev) = v5(&s, &id, "dev-pub");
    let sending = tokio::spawn(async move {
        let mut acked = 0;
        let sender = tokio::spawn(async move {
            for i in 0..COUNT {
                let mut payload = vec![b'x'; 8 * 1024];
                payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
                publisher
                    .publish(
                        "dt/dev-pub/t",
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .unwrap();
            }
            publisher
        });
        while acked < COUNT {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = pub_ev.poll().await {
                acked += 1;
            }
        }
        sender.await.unwrap()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !sending.is_finished(),
        "the publisher was not slowed while the subscriber read nothing"
    );
    // The subscriber reads again: every message arrives, in order.
    let mut next = 0u64;
    tokio::time::timeout(Duration::from_secs(60), async {
        while next < COUNT as u64 {
            if let Ok(Event::Incoming(Packet::Publish(p))) = sub_ev.poll().await {
                let mut n = [0u8; 8];
                n.copy_from_slice(&p.payload[..8]);
                assert_eq!(u64::from_be_bytes(n), next, "out of order or lost");
                next += 1;
            }
        }
    })
    .await
    .expect("every message arrives");
    let _publisher = tokio::time::timeout(WAIT, sending)
        .await
        .expect("the publisher finishes")
        .unwrap();
    assert_eq!(s.broker.dropped_messages(), 0);
}

/// A device's MQTT 5 connection with Clean Start `clean` and a Session
/// Expiry Interval; the CONNACK's session-present flag and granted expiry.
async fn session(
    s: &Setup,
    id: &Identity,
    clean: bool,
    expiry: Option<u32>,
) -> (AsyncClient, EventLoop, bool, Option<u32>) {
    let tls = client_tls_config(id, &s.pki.ca_pem()).unwrap();
    let mut o = MqttOptions::new(&id.common_name, "localhost", s.broker.local_addr().port());
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_start(clean)
        .set_session_expiry_interval(expiry)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    let (c, mut ev) = AsyncClient::new(o, 64);
    let (present, granted) = until(&mut ev, |p| match p {
        Ok(Packet::ConnAck(a)) => Some((
            a.session_present,
            a.properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval),
        )),
        _ => None,
    })
    .await;
    (c, ev, present, granted)
}

/// The payloads that arrive within `d`, in order.
async fn received(ev: &mut EventLoop, d: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(d, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = ev.poll().await {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
    })
    .await;
    got
}

async fn leave(c: AsyncClient, mut ev: EventLoop) {
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

/// The MQTT 3.1.1 CONNACK's session-present flag.
async fn connack3(ev: &mut rumqttc::EventLoop) -> bool {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) = ev.poll().await {
                return a.session_present;
            }
        }
    })
    .await
    .expect("a CONNACK")
}

/// Issue 21: persistent sessions, as AWS IoT keeps them. MQTT 5 Clean
/// Start=false with a Session Expiry Interval (capped by the broker) and
/// MQTT 3.1.1 cleanSession=false: the subscriptions are kept, QoS 1
/// messages published while the device is away (not QoS 0) are delivered
/// in order when it comes back (session present), at most
/// `max_session_messages` (the oldest dropped first); a clean start ends
/// the session, and so does its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_keep_subscriptions_and_qos1_messages() {
    let pki = Pki::new("session test CA").unwrap();
    let server = pki.server_identity().unwrap();
    let mut config = EmbeddedConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    );
    config.limits.max_session_messages = 3;
    config.limits.max_session_expiry = Duration::from_secs(600);
    config.policy.claim_identities = vec!["claim@factory".into()];
    let s = Setup {
        broker: EmbeddedBroker::start(config).await.unwrap(),
        pki,
    };
    let dev = s.pki.client_identity("dev-1").unwrap();
    let topic = "$aws/things/dev-1/shadow/update/delta";
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, mut be) = v5(&s, &backend, "svc");
    connected(&mut be).await;
    let backend_pump = tokio::spawn(async move { while be.poll().await.is_ok() {} });
    let send = |payload: &'static str, qos: rumqttc::v5::mqttbytes::QoS| {
        let b = b.clone();
        async move { b.publish(topic, qos, false, payload).await.unwrap() }
    };
    use rumqttc::v5::mqttbytes::QoS;

    // A claimant keeps no session (its client ids are its own choice):
    // granted an expiry of 0, and nothing kept.
    let claim = s.pki.client_identity("claim@factory").unwrap();
    let (c, ev, _, granted) = session(&s, &claim, false, Some(600)).await;
    assert_eq!(granted, Some(0));
    leave(c, ev).await;
    let (c, ev, present, _) = session(&s, &claim, false, Some(600)).await;
    assert!(!present);
    leave(c, ev).await;

    // A new session: not present; an expiry past the broker's is capped.
    let (c, mut ev, present, granted) = session(&s, &dev, false, Some(100_000)).await;
    assert!(!present);
    assert_eq!(granted, Some(600));
    c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    until(&mut ev, |p| {
        matches!(p, Ok(Packet::SubAck(_))).then_some(())
    })
    .await;
    leave(c, ev).await;

    // Away: QoS 1 messages wait (the newest three), QoS 0 does not.
    for m in ["m1", "m2", "m3", "m4"] {
        send(m, QoS::AtLeastOnce).await;
    }
    send("q0", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, mut ev, present, _) = session(&s, &dev, false, Some(600)).await;
    assert!(present, "the session was kept");
    assert_eq!(
        received(&mut ev, Duration::from_secs(1)).await,
        ["m2", "m3", "m4"]
    );
    // Still subscribed without subscribing again.
    send("live", QoS::AtLeastOnce).await;
    assert_eq!(received(&mut ev, Duration::from_secs(1)).await, ["live"]);
    leave(c, ev).await;

    // A clean start ends it: nothing waits, nothing is subscribed.
    send("m5", QoS::AtLeastOnce).await;
    let (c, mut ev, present, _) = session(&s, &dev, true, None).await;
    assert!(!present);
    send("m6", QoS::AtLeastOnce).await;
    assert!(
        received(&mut ev, Duration::from_millis(500))
            .await
            .is_empty()
    );
    leave(c, ev).await;

    // Without an expiry (MQTT 5 default 0) nothing outlives the connection.
    let (c, mut ev, _, _) = session(&s, &dev, false, None).await;
    c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    until(&mut ev, |p| {
        matches!(p, Ok(Packet::SubAck(_))).then_some(())
    })
    .await;
    leave(c, ev).await;
    send("m7", QoS::AtLeastOnce).await;
    let (c, mut ev, present, _) = session(&s, &dev, false, Some(600)).await;
    assert!(!present);
    assert!(
        received(&mut ev, Duration::from_millis(500))
            .await
            .is_empty()
    );
    leave(c, ev).await;

    // MQTT 3.1.1, cleanSession=false: the same.
    let v3 = |clean: bool| {
        let tls = client_tls_config(&dev, &s.pki.ca_pem()).unwrap();
        let mut o = rumqttc::MqttOptions::new("dev-1", "localhost", s.broker.local_addr().port());
        o.set_clean_session(clean)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        rumqttc::AsyncClient::new(o, 16)
    };
    // (A clean start first: the MQTT 5 session above was kept.)
    let (c3, mut ev3) = v3(true);
    assert!(!connack3(&mut ev3).await);
    c3.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while ev3.poll().await.is_ok() {}
    })
    .await;
    let (c3, mut ev3) = v3(false);
    assert!(!connack3(&mut ev3).await);
    c3.subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while !matches!(
            ev3.poll().await,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))
        ) {}
    })
    .await
    .unwrap();
    c3.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while ev3.poll().await.is_ok() {}
    })
    .await;
    drop(ev3);
    send("v3-away", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c3, mut ev3) = v3(false);
    assert!(connack3(&mut ev3).await, "session present");
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev3.poll().await {
                return String::from_utf8_lossy(&p.payload).into_owned();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, "v3-away");
    backend_pump.abort();
}

/// A kept session ends when its expiry passes: the client comes back to no
/// session, and what was published meanwhile is not kept for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_ends_at_its_expiry() {
    use rumqttc::v5::mqttbytes::QoS;
    let pki = Pki::new("expiry test CA").unwrap();
    let server = pki.server_identity().unwrap();
    let mut config = EmbeddedConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    );
    config.limits.max_session_expiry = Duration::from_secs(1);
    let s = Setup {
        broker: EmbeddedBroker::start(config).await.unwrap(),
        pki,
    };
    let dev = s.pki.client_identity("dev-1").unwrap();
    let topic = "$aws/things/dev-1/shadow/update/delta";
    let (c, mut ev, _, granted) = session(&s, &dev, false, Some(60)).await;
    assert_eq!(granted, Some(1));
    c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    until(&mut ev, |p| {
        matches!(p, Ok(Packet::SubAck(_))).then_some(())
    })
    .await;
    leave(c, ev).await;
    // Within the expiry it is there.
    let (c, ev, present, _) = session(&s, &dev, false, Some(1)).await;
    assert!(present);
    leave(c, ev).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, mut be) = v5(&s, &backend, "svc");
    connected(&mut be).await;
    b.publish(topic, QoS::AtLeastOnce, false, "late")
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while be.poll().await.is_ok() {}
    })
    .await;
    let (_c, mut ev, present, _) = session(&s, &dev, false, Some(1)).await;
    assert!(!present, "expired");
    assert!(
        received(&mut ev, Duration::from_millis(500))
            .await
            .is_empty()
    );
}

/// The next lifecycle event `ev` receives: its topic and JSON.
async fn presence_event(ev: &mut EventLoop) -> (String, serde_json::Value) {
    until(ev, |p| match p {
        Ok(Packet::Publish(p)) => Some((
            String::from_utf8_lossy(&p.topic).into_owned(),
            serde_json::from_slice(&p.payload).unwrap(),
        )),
        _ => None,
    })
    .await
}

/// Issue 27: the embedded broker publishes AWS IoT's lifecycle events
/// (`$aws/events/presence/connected|disconnected/{clientId}`, AWS's JSON:
/// clientId, timestamp, eventType, sessionIdentifier, principalIdentifier,
/// ipAddress, versionNumber; clientInitiatedDisconnect and disconnectReason
/// on a disconnect) to a backend; a device may not subscribe to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_reach_a_backend_and_not_a_device() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    let s = setup(BrokerPolicy::default(), Duration::from_secs(10)).await;
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (watcher, mut we) = v5(&s, &backend, "watcher");
    connected(&mut we).await;
    watcher
        .subscribe("$aws/events/presence/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut we, |p| {
        matches!(p, Ok(Packet::SubAck(_))).then_some(())
    })
    .await;

    let dev = s.pki.client_identity("dev-a").unwrap();
    let (d, mut de) = v5(&s, &dev, "dev-a");
    connected(&mut de).await;
    let (topic, up) = presence_event(&mut we).await;
    assert_eq!(topic, "$aws/events/presence/connected/dev-a");
    assert_eq!(up["clientId"], "dev-a");
    assert_eq!(up["eventType"], "connected");
    assert_eq!(up["ipAddress"], "127.0.0.1");
    assert_eq!(
        up["principalIdentifier"],
        certificate_fingerprint(&dev.cert_pem).unwrap().as_str()
    );
    let session = up["sessionIdentifier"].as_str().unwrap().to_string();
    assert_eq!(session.len(), 36, "a UUID: {session}");
    assert!(
        up["timestamp"].as_u64().unwrap() > 1_700_000_000_000,
        "{up}"
    );
    assert!(up.get("disconnectReason").is_none(), "{up}");

    // A device may not listen to the fleet's presence.
    d.subscribe("$aws/events/presence/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = until(&mut de, |p| match p {
        Ok(Packet::SubAck(a)) => Some(a.return_codes.clone()),
        _ => None,
    })
    .await;
    assert!(
        !matches!(codes[0], SubscribeReasonCode::Success(_)),
        "{codes:?}"
    );

    // A clean disconnect, with the same session identifier.
    leave(d, de).await;
    let (topic, down) = presence_event(&mut we).await;
    assert_eq!(topic, "$aws/events/presence/disconnected/dev-a");
    assert_eq!(down["eventType"], "disconnected");
    assert_eq!(down["clientInitiatedDisconnect"], true);
    assert_eq!(down["disconnectReason"], "CLIENT_INITIATED_DISCONNECT");
    assert_eq!(down["sessionIdentifier"], session.as_str());
    assert_eq!(down["versionNumber"], up["versionNumber"]);

    // Taken over: the first connection ends DUPLICATE_CLIENTID; each has
    // its own session and a higher version.
    let (_c1, mut e1) = v5(&s, &dev, "dev-a");
    connected(&mut e1).await;
    let (_, first) = presence_event(&mut we).await;
    assert!(first["versionNumber"].as_u64() > up["versionNumber"].as_u64());
    let (_c2, mut e2) = v5(&s, &dev, "dev-a");
    connected(&mut e2).await;
    let mut events = [presence_event(&mut we).await, presence_event(&mut we).await];
    events.sort_by(|a, b| a.0.cmp(&b.0));
    let (topic, second) = &events[0];
    assert_eq!(topic, "$aws/events/presence/connected/dev-a");
    assert_ne!(second["sessionIdentifier"], first["sessionIdentifier"]);
    let (topic, taken) = &events[1];
    assert_eq!(topic, "$aws/events/presence/disconnected/dev-a");
    assert_eq!(taken["disconnectReason"], "DUPLICATE_CLIENTID");
    assert_eq!(taken["clientInitiatedDisconnect"], false);
    assert_eq!(taken["sessionIdentifier"], first["sessionIdentifier"]);
}
