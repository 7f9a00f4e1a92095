//! Regression tests for what an attacker tried against the embedded
//! broker and provisioning (issue 19): a claim certificate that became any
//! identity, a deep filter that crashed the process, client ids taken from
//! others, replies steered onto other devices' topics, disabled things
//! that stayed connected, and clients that held unbounded resources.
//! Each test failed on the code before the fix (see the issue's note).

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use fleet_cloud::pki::{Identity, Pki};
use fleet_cloud::{
    BrokerConfig, BrokerPolicy, ClientLimits, EmbeddedBroker, EmbeddedConfig, MemoryStore,
    ProvisioningService, ProvisioningTemplate, Registry, ShadowService, certificate_fingerprint,
    serve,
};
use fleet_testkit::client_tls_config;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PubAckReason, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// A broker under attack: the embedded broker, or Mosquitto with
/// `fleet-mosquitto-plugin` admitting by a roster of the registry.
struct Setup {
    pki: Pki,
    port: u16,
    broker: Option<EmbeddedBroker>,
    mosquitto: Option<fleet_testkit::Broker>,
    /// The registry the roster is written from (Mosquitto).
    registry: Option<Registry>,
}

impl Setup {
    fn embedded(&self) -> &EmbeddedBroker {
        self.broker.as_ref().expect("an embedded-broker test")
    }

    /// Mosquitto: writes the registry's roster for the plugin (as `fleet
    /// serve --mosquitto-roster` does after each change). Embedded: nothing
    /// (it asks the registry itself).
    async fn sync_roster(&self) {
        if let (Some(m), Some(r)) = (&self.mosquitto, &self.registry) {
            write_roster(r, &m.roster()).await;
        }
    }
}

async fn write_roster(registry: &Registry, path: &std::path::Path) {
    let text = registry.roster().await.unwrap().to_text();
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Mosquitto with the plugin, admitting by `registry`'s roster.
fn setup_mosquitto(policy: BrokerPolicy, registry: Registry) -> Setup {
    let broker = fleet_testkit::Broker::start_with(fleet_testkit::BrokerOptions {
        policy,
        plugin: true,
        ..Default::default()
    })
    .expect("start mosquitto with fleet-mosquitto-plugin");
    let pki = Pki::from_pem(&broker.pki().ca_pem(), &broker.pki().ca_key_pem().unwrap()).unwrap();
    Setup {
        pki,
        port: broker.port(),
        broker: None,
        mosquitto: Some(broker),
        registry: Some(registry),
    }
}

async fn setup_with(
    policy: BrokerPolicy,
    limits: ClientLimits,
    directory: Option<Registry>,
) -> Setup {
    let pki = Pki::new("security test CA").unwrap();
    let server = pki.server_identity().unwrap();
    let mut config = EmbeddedConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    );
    config.policy = policy;
    config.limits = limits;
    config.directory = directory.map(|r| Arc::new(r) as Arc<dyn fleet_cloud::Directory>);
    let broker = EmbeddedBroker::start(config).await.unwrap();
    Setup {
        pki,
        port: broker.local_addr().port(),
        broker: Some(broker),
        mosquitto: None,
        registry: None,
    }
}

async fn setup() -> Setup {
    setup_with(BrokerPolicy::default(), ClientLimits::default(), None).await
}

fn options(s: &Setup, id: &Identity, client_id: &str) -> MqttOptions {
    let tls = client_tls_config(id, &s.pki.ca_pem()).unwrap();
    let mut o = MqttOptions::new(client_id, "localhost", s.port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    o
}

fn v5(s: &Setup, id: &Identity, client_id: &str) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options(s, id, client_id), 64)
}

/// Polls until `want` picks something (errors count as packets of their
/// own: `Err(text)`).
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

/// The CONNACK's code (a refusal surfaces as an error naming it).
async fn connack(ev: &mut EventLoop) -> String {
    until(ev, |p| match p {
        Ok(Packet::ConnAck(a)) => Some(format!("{:?}", a.code)),
        Err(e) if e.contains("Connection refused") => Some(e),
        _ => None,
    })
    .await
}

async fn connected(ev: &mut EventLoop) {
    let code = connack(ev).await;
    assert_eq!(code, format!("{:?}", ConnectReturnCode::Success));
}

/// Keeps polling in the background; returns the handle to stop it.
fn pump(mut ev: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if ev.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

async fn suback(ev: &mut EventLoop) -> Vec<SubscribeReasonCode> {
    until(ev, |p| match p {
        Ok(Packet::SubAck(a)) => Some(a.return_codes.clone()),
        _ => None,
    })
    .await
}

async fn puback(ev: &mut EventLoop) -> PubAckReason {
    until(ev, |p| match p {
        Ok(Packet::PubAck(a)) => Some(a.reason),
        _ => None,
    })
    .await
}

/// Whether a message arrives on `ev` within `d`.
async fn receives(ev: &mut EventLoop, d: Duration) -> Option<(String, Vec<u8>)> {
    tokio::time::timeout(d, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = ev.poll().await {
                return (
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                );
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_filter_neither_crashes_the_broker_nor_is_accepted_from_a_device() {
    let s = setup().await;
    // 5,000 levels under the device's own prefix, about 10 KB: a device's
    // filter is refused by the depth limit.
    let dev = s.pki.client_identity("dev-a").unwrap();
    let (d, mut de) = v5(&s, &dev, "dev-a");
    connected(&mut de).await;
    let deep = format!("$aws/things/dev-a/shadow/{}", vec!["x"; 5_000].join("/"));
    d.subscribe(deep.clone(), QoS::AtLeastOnce).await.unwrap();
    assert_eq!(
        suback(&mut de).await,
        vec![SubscribeReasonCode::TopicFilterInvalid]
    );
    d.unsubscribe(deep.clone()).await.unwrap();
    until(&mut de, |p| {
        matches!(p, Ok(Packet::UnsubAck(_))).then_some(())
    })
    .await;
    // A backend identity is not limited: its deep filter is added,
    // matched and removed (the walk that overflowed the stack).
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, mut be) = v5(&s, &backend, "svc");
    connected(&mut be).await;
    let deeper = vec!["y"; 20_000].join("/");
    b.subscribe(deeper.clone(), QoS::AtLeastOnce).await.unwrap();
    assert_eq!(
        suback(&mut be).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    b.unsubscribe(deeper).await.unwrap();
    until(&mut be, |p| {
        matches!(p, Ok(Packet::UnsubAck(_))).then_some(())
    })
    .await;
    drop(b);
    drop(be);
    drop(d);
    drop(de);
    // Still serving.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_c, mut ce) = v5(&s, &dev, "dev-a");
    connected(&mut ce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_beyond_aws_limits_are_refused_with_a_reason() {
    let s = setup().await;
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, mut be) = v5(&s, &backend, "svc");
    connected(&mut be).await;
    b.subscribe("dt/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut be).await;
    let dev = s.pki.client_identity("dev-a").unwrap();
    let (d, mut de) = v5(&s, &dev, "dev-a");
    connected(&mut de).await;
    // Eight levels pass, nine do not; 256 bytes pass, 257 do not.
    let ok = "dt/dev-a/1/2/3/4/5/6";
    let too_deep = "dt/dev-a/1/2/3/4/5/6/7";
    let long_ok = format!("dt/dev-a/{}", "l".repeat(256 - 9));
    let too_long = format!("dt/dev-a/{}", "l".repeat(256 - 8));
    for (topic, accepted) in [
        (ok.to_owned(), true),
        (too_deep.to_owned(), false),
        (long_ok, true),
        (too_long, false),
    ] {
        d.publish(topic.clone(), QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        if accepted {
            // The device's PUBACK waits for the backend's: both at once.
            let (reason, got) = tokio::join!(puback(&mut de), receives(&mut be, WAIT));
            assert_eq!(reason, PubAckReason::Success, "{topic}");
            assert_eq!(got.expect("delivered").0, topic);
        } else {
            let reason = puback(&mut de).await;
            assert_eq!(reason, PubAckReason::TopicNameInvalid, "{topic}");
        }
    }
    assert!(
        receives(&mut be, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_are_bound_to_identities() {
    let policy = BrokerPolicy {
        claim_identities: vec!["claim@f".into()],
        ..BrokerPolicy::default()
    };
    let s = setup_with(policy, ClientLimits::default(), None).await;
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (_b, mut be) = v5(&s, &backend, "fleet-cloud");
    connected(&mut be).await;
    let a = s.pki.client_identity("dev-a").unwrap();
    let (_a, mut ae) = v5(&s, &a, "dev-a");
    connected(&mut ae).await;

    // Another device's id, the backend's id, or any other id: refused,
    // and whoever holds the id keeps it.
    let mallory = s.pki.client_identity("mallory").unwrap();
    for id in ["dev-a", "fleet-cloud", "not-my-name"] {
        let (_m, mut me) = v5(&s, &mallory, id);
        let code = connack(&mut me).await;
        assert!(code.contains("NotAuthorized"), "{id}: {code}");
    }
    assert_eq!(s.embedded().connected(), 2);
    assert!(
        receives(&mut ae, Duration::from_millis(300))
            .await
            .is_none()
    );
    // A thing named like the backend's client id cannot take it either.
    let named = s.pki.client_identity("fleet-cloud").unwrap();
    let (_n, mut ne) = v5(&s, &named, "fleet-cloud");
    assert!(connack(&mut ne).await.contains("NotAuthorized"));
    assert_eq!(s.embedded().connected(), 2);

    // An empty client id is the device's own name.
    let mut o = options(&s, &mallory, "");
    o.set_clean_start(true);
    let (_m, mut me) = AsyncClient::new(o, 8);
    let assigned = until(&mut me, |p| match p {
        Ok(Packet::ConnAck(a)) => Some(
            a.properties
                .as_ref()
                .and_then(|p| p.assigned_client_identifier.clone()),
        ),
        _ => None,
    })
    .await;
    assert_eq!(assigned.as_deref(), Some("mallory"));

    // Claimants: no takeover of each other's ids; a device reclaims its
    // own name from a claimant squatting on it.
    let claim = s.pki.client_identity("claim@f").unwrap();
    let (_c1, mut c1e) = v5(&s, &claim, "claimant-1");
    connected(&mut c1e).await;
    let (_c2, mut c2e) = v5(&s, &claim, "claimant-1");
    assert!(connack(&mut c2e).await.contains("NotAuthorized"));
    let (_sq, mut sqe) = v5(&s, &claim, "dev-b");
    connected(&mut sqe).await;
    let b = s.pki.client_identity("dev-b").unwrap();
    let (_d, mut de) = v5(&s, &b, "dev-b");
    connected(&mut de).await;
    let reason = until(&mut sqe, |p| p.err()).await;
    assert!(reason.contains("SessionTakenOver"), "{reason}");
    // The first claimant was never disturbed.
    assert!(
        receives(&mut c1e, Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_connections_per_identity_are_limited() {
    let policy = BrokerPolicy {
        claim_identities: vec!["claim@f".into()],
        ..BrokerPolicy::default()
    };
    let mut limits = ClientLimits::default();
    limits.max_claim_connections = 2;
    let s = setup_with(policy, limits, None).await;
    let claim = s.pki.client_identity("claim@f").unwrap();
    let mut held = Vec::new();
    for n in 0..2 {
        let (c, mut e) = v5(&s, &claim, &format!("c{n}"));
        connected(&mut e).await;
        held.push((c, e));
    }
    let (_c, mut e) = v5(&s, &claim, "c2");
    let code = connack(&mut e).await;
    assert!(code.contains("QuotaExceeded"), "{code}");
    // One leaves: room for another.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c, mut e) = v5(&s, &claim, "c3");
    connected(&mut e).await;
}

/// A CSR for `common_name`.
fn csr(common_name: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// A claimant's MQTT 5 request-response: publishes `body` on `topic` with
/// a response topic in its own namespace until the reply comes.
async fn ask(c: &AsyncClient, ev: &mut EventLoop, topic: &str, body: &Value) -> (String, Value) {
    let response = format!("$aws/clients/claimant/{topic}");
    tokio::time::timeout(WAIT, async {
        let mut n = 0;
        loop {
            if n % 20 == 0 {
                let props = PublishProperties {
                    response_topic: Some(response.clone()),
                    ..PublishProperties::default()
                };
                c.publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_string(), props)
                    .await
                    .unwrap();
            }
            n += 1;
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(50), ev.poll()).await
            {
                let outcome = String::from_utf8_lossy(&p.topic)
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                return (outcome, serde_json::from_slice(&p.payload).unwrap());
            }
        }
    })
    .await
    .expect("a reply")
}

struct Provisioning {
    s: Setup,
    registry: Registry,
    _service: fleet_cloud::RunningService,
    claimant: AsyncClient,
    claimant_ev: EventLoop,
}

async fn provisioning(allow_replace: bool) -> Provisioning {
    provisioning_on(allow_replace, false).await
}

/// Provisioning by claim on the embedded broker, or on Mosquitto with the
/// plugin (`mosquitto`), where the roster is rewritten before
/// `RegisterThing` is answered, as `fleet serve` does.
async fn provisioning_on(allow_replace: bool, mosquitto: bool) -> Provisioning {
    provisioning_with(
        allow_replace,
        mosquitto,
        true,
        Registry::in_memory().unwrap(),
    )
    .await
}

/// `subject_names_thing`: whether a CSR's common name must be the thing
/// name (a broker that knows devices by common name), or is free (the
/// embedded broker, which knows a device by its certificate's binding).
async fn provisioning_with(
    allow_replace: bool,
    mosquitto: bool,
    subject_names_thing: bool,
    registry: Registry,
) -> Provisioning {
    let policy = BrokerPolicy {
        claim_identities: vec!["claim@f".into()],
        ..BrokerPolicy::default()
    };
    let s = if mosquitto {
        setup_mosquitto(policy, registry.clone())
    } else {
        setup_with(policy, ClientLimits::default(), Some(registry.clone())).await
    };
    s.sync_roster().await;
    let mut service = ProvisioningService::new(
        Pki::from_pem(&s.pki.ca_pem(), &s.pki.ca_key_pem().unwrap()).unwrap(),
        registry.clone(),
        vec![ProvisioningTemplate {
            allow_replace,
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
    service.subject_names_thing = subject_names_thing;
    if let Some(m) = &s.mosquitto {
        let (registry, roster) = (registry.clone(), m.roster());
        service = service.with_on_registered(Arc::new(move |_: &str, _: bool| {
            let (registry, roster) = (registry.clone(), roster.clone());
            Box::pin(async move { write_roster(&registry, &roster).await })
                as fleet_cloud::api::HookFuture
        }));
    }
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let running = serve(
        BrokerConfig {
            host: "localhost".into(),
            port: s.port,
            client_id: "svc".into(),
            cert_pem: backend.cert_pem,
            key_pem: backend.key_pem,
            ca_pem: s.pki.ca_pem(),
            share_group: None,
            queue_capacity: 64,
        },
        fleet_cloud::Services::new()
            .with(ShadowService::new(MemoryStore::new()))
            .with(service),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    let claim = s.pki.client_identity("claim@f").unwrap();
    let (claimant, mut claimant_ev) = v5(&s, &claim, "claimant");
    connected(&mut claimant_ev).await;
    claimant
        .subscribe("$aws/clients/claimant/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut claimant_ev).await;
    Provisioning {
        s,
        registry,
        _service: running,
        claimant,
        claimant_ev,
    }
}

impl Provisioning {
    async fn create(&mut self, common_name: &str) -> (String, Value, rcgen::KeyPair) {
        let (key, pem) = csr(common_name);
        let (outcome, v) = ask(
            &self.claimant,
            &mut self.claimant_ev,
            "$aws/certificates/create-from-csr/json",
            &json!({"certificateSigningRequest": pem}),
        )
        .await;
        (outcome, v, key)
    }

    async fn register(&mut self, token: &Value, serial: &str) -> (String, Value) {
        ask(
            &self.claimant,
            &mut self.claimant_ev,
            "$aws/provisioning-templates/factory/provision/json",
            &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}}),
        )
        .await
    }

    /// Connects as `thing` with a certificate and key; the CONNACK.
    async fn connect(&self, thing: &str, cert_pem: &str, key: &rcgen::KeyPair) -> String {
        let id = Identity {
            common_name: thing.into(),
            cert_pem: cert_pem.into(),
            key_pem: key.serialize_pem(),
        };
        let (_c, mut e) = v5(&self.s, &id, thing);
        connack(&mut e).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_certificate_grants_nothing_until_registered_and_never_a_privileged_or_taken_identity()
 {
    let mut p = provisioning(false).await;
    // Privileged names and claim names are not thing names.
    let (outcome, v, _) = p.create("fleet-backend").await;
    assert_eq!(
        (outcome.as_str(), v["errorCode"].as_str()),
        ("rejected", Some("InvalidCSR")),
        "{v}"
    );
    let (outcome, _, _) = p.create("claim@f").await;
    assert_eq!(outcome, "rejected");
    // An existing thing cannot be claimed.
    p.registry
        .create_thing("pump-1", Default::default())
        .await
        .unwrap();
    let (outcome, v, _) = p.create("pump-1").await;
    assert_eq!(
        (outcome.as_str(), v["statusCode"].as_u64()),
        ("rejected", Some(403)),
        "{v}"
    );

    // A new thing: the certificate is issued, but the broker refuses it
    // until RegisterThing has bound it.
    let (outcome, created, key) = p.create("pump-9").await;
    assert_eq!(outcome, "accepted", "{created}");
    let cert = created["certificatePem"].as_str().unwrap().to_owned();
    let code = p.connect("pump-9", &cert, &key).await;
    assert!(
        code.contains("NotAuthorized"),
        "before registration: {code}"
    );
    let (outcome, r) = p.register(&created["certificateOwnershipToken"], "9").await;
    assert_eq!(outcome, "accepted", "{r}");
    assert_eq!(p.connect("pump-9", &cert, &key).await, "Success");

    // A certificate the provisioning CA signed for a privileged name (as an
    // older service would have) is still only a device, and unbound.
    let ca = Pki::from_pem(&p.s.pki.ca_pem(), &p.s.pki.ca_key_pem().unwrap()).unwrap();
    let (key, pem) = csr("fleet-backend");
    let (forged, _) = ca.sign_claimed_csr(&pem, 1).unwrap();
    let code = p.connect("fleet-backend", &forged, &key).await;
    assert!(code.contains("NotAuthorized"), "{code}");

    // Registering onto an existing thing is refused (the template does
    // not allow replacing), and the token stays unspent.
    let (outcome, created, _) = p.create("pump-5").await;
    assert_eq!(outcome, "accepted");
    p.registry
        .create_thing("pump-5", Default::default())
        .await
        .unwrap();
    let (outcome, r) = p.register(&created["certificateOwnershipToken"], "5").await;
    assert_eq!(
        (outcome.as_str(), r["statusCode"].as_u64()),
        ("rejected", Some(403)),
        "{r}"
    );
    assert!(p.registry.certificates("pump-5").await.unwrap().is_empty());
    // The API cannot create a thing named like the backend either.
    assert!(matches!(
        p.registry
            .create_thing("fleet-backend", Default::default())
            .await,
        Err(fleet_cloud::RegistryError::InvalidName(_))
    ));
}

/// Issue 21: as with AWS IoT, a certificate is bound to a thing, not read
/// from its common name. On the embedded broker a CSR may name anything;
/// the device is the thing RegisterThing bound its certificate to, connects
/// under that thing's name only, and is confined to that thing's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_its_things_whatever_its_subject() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&dir.path().join("registry.db")).unwrap();
    certificate_binding(provisioning_with(false, false, false, registry).await).await;
}

/// The same with the registry in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_its_things_whatever_its_subject_on_postgres() {
    let pg = fleet_testkit::Postgres::start().unwrap();
    let stores = fleet_cloud::Stores::postgres(&pg.url(), 4).await.unwrap();
    let registry = Registry::new(stores.registry.clone());
    certificate_binding(provisioning_with(false, false, false, registry).await).await;
}

async fn certificate_binding(mut p: Provisioning) {
    let (outcome, created, key) = p.create("serial-A17").await;
    assert_eq!(outcome, "accepted", "{created}");
    let cert = created["certificatePem"].as_str().unwrap().to_owned();
    let (outcome, r) = p.register(&created["certificateOwnershipToken"], "1").await;
    assert_eq!(
        (outcome.as_str(), r["thingName"].as_str()),
        ("accepted", Some("pump-1")),
        "{r}"
    );
    let bound = p.registry.certificates("pump-1").await.unwrap();
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0].id, certificate_fingerprint(&cert).unwrap());

    // Even a subject that names a privileged identity or another thing is
    // only the thing it was registered as.
    p.registry
        .create_thing("pump-7", Default::default())
        .await
        .unwrap();
    let (outcome, created2, key2) = p.create("fleet-backend").await;
    assert_eq!(outcome, "accepted", "{created2}");
    let cert2 = created2["certificatePem"].as_str().unwrap().to_owned();
    let (outcome, r) = p
        .register(&created2["certificateOwnershipToken"], "2")
        .await;
    assert_eq!(
        (outcome.as_str(), r["thingName"].as_str()),
        ("accepted", Some("pump-2")),
        "{r}"
    );

    let id = |cert: &str, key: &rcgen::KeyPair| Identity {
        common_name: "ignored".into(),
        cert_pem: cert.into(),
        key_pem: key.serialize_pem(),
    };
    // Not under the subject's name, nor another thing's.
    for (cert, key, name) in [
        (&cert, &key, "serial-A17"),
        (&cert, &key, "pump-7"),
        (&cert2, &key2, "fleet-backend"),
        (&cert2, &key2, "pump-1"),
    ] {
        let (_c, mut e) = v5(&p.s, &id(cert, key), name);
        let code = connack(&mut e).await;
        assert!(code.contains("NotAuthorized"), "{name}: {code}");
    }

    // As its thing: admitted, its own topics work, nobody else's.
    let (c, mut e) = v5(&p.s, &id(&cert, &key), "pump-1");
    connected(&mut e).await;
    c.subscribe(
        "$aws/things/pump-1/shadow/update/accepted",
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    assert_eq!(
        suback(&mut e).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    for filter in [
        "$aws/things/pump-7/shadow/update/accepted",
        "$aws/things/+/shadow/#",
        "#",
    ] {
        c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        assert_eq!(
            suback(&mut e).await,
            [SubscribeReasonCode::NotAuthorized],
            "{filter}"
        );
    }
    c.publish(
        "$aws/things/pump-7/shadow/update",
        QoS::AtLeastOnce,
        false,
        r#"{"state":{"reported":{"x":1}}}"#,
    )
    .await
    .unwrap();
    assert_eq!(puback(&mut e).await, PubAckReason::NotAuthorized);
    c.publish(
        "$aws/things/pump-1/shadow/update",
        QoS::AtLeastOnce,
        false,
        r#"{"state":{"reported":{"x":1}},"clientToken":"own"}"#,
    )
    .await
    .unwrap();
    let (topic, payload) = receives(&mut e, WAIT).await.expect("its shadow answers");
    assert_eq!(topic, "$aws/things/pump-1/shadow/update/accepted");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["clientToken"],
        "own"
    );

    // An empty client id is given the thing's name.
    let (_c2, mut e2) = v5(&p.s, &id(&cert2, &key2), "");
    connected(&mut e2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_needs_the_template_and_never_revives_a_disabled_or_revoked_thing() {
    let mut p = provisioning(true).await;
    // A first registration, then the device is wiped and claims again.
    let (_, created, key) = p.create("pump-3").await;
    let (outcome, _) = p.register(&created["certificateOwnershipToken"], "3").await;
    assert_eq!(outcome, "accepted");
    let old_cert = created["certificatePem"].as_str().unwrap().to_owned();
    let (outcome, again, new_key) = p.create("pump-3").await;
    assert_eq!(outcome, "accepted", "{again}");
    let (outcome, r) = p.register(&again["certificateOwnershipToken"], "3").await;
    assert_eq!(outcome, "accepted", "{r}");
    let new_cert = again["certificatePem"].as_str().unwrap().to_owned();
    assert_eq!(p.connect("pump-3", &new_cert, &new_key).await, "Success");
    // The replaced certificate is revoked.
    assert!(
        p.connect("pump-3", &old_cert, &key)
            .await
            .contains("NotAuthorized")
    );
    // Now revoked: no claimant may provision it again, nor a disabled one.
    let (outcome, v, _) = p.create("pump-3").await;
    assert_eq!(
        (outcome.as_str(), v["statusCode"].as_u64()),
        ("rejected", Some(403)),
        "{v}"
    );
    let (_, created, _) = p.create("pump-4").await;
    p.register(&created["certificateOwnershipToken"], "4").await;
    p.registry.set_enabled("pump-4", false).await.unwrap();
    let (outcome, v, _) = p.create("pump-4").await;
    assert_eq!(
        (outcome.as_str(), v["statusCode"].as_u64()),
        ("rejected", Some(403)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_or_deleting_a_thing_cuts_it_off_at_once() {
    let registry = Registry::in_memory().unwrap();
    let s = setup_with(
        BrokerPolicy::default(),
        ClientLimits::default(),
        Some(registry.clone()),
    )
    .await;
    let dev = s.pki.client_identity("dev-a").unwrap();
    // Not in the registry: refused.
    let (_c, mut e) = v5(&s, &dev, "dev-a");
    assert!(connack(&mut e).await.contains("NotAuthorized"));
    registry
        .create_thing("dev-a", Default::default())
        .await
        .unwrap();
    let (_c, mut e) = v5(&s, &dev, "dev-a");
    connected(&mut e).await;
    // Disabled: cut, and refused until enabled again.
    registry.set_enabled("dev-a", false).await.unwrap();
    assert_eq!(s.embedded().disconnect_identity("dev-a"), 1);
    let reason = until(&mut e, |p| p.err()).await;
    assert!(reason.contains("NotAuthorized"), "{reason}");
    let code = connack(&mut e).await;
    assert!(code.contains("NotAuthorized"), "{code}");
    registry.set_enabled("dev-a", true).await.unwrap();
    let (_c, mut e) = v5(&s, &dev, "dev-a");
    connected(&mut e).await;
    // Deleted: the same.
    registry.delete_thing("dev-a").await.unwrap();
    assert_eq!(s.embedded().disconnect_identity("dev-a"), 1);
    let code = connack(&mut e).await;
    assert!(code.contains("NotAuthorized"), "{code}");
    // A certificate bound to another thing is refused for this one.
    registry
        .create_thing("dev-a", Default::default())
        .await
        .unwrap();
    registry
        .create_thing("dev-b", Default::default())
        .await
        .unwrap();
    registry
        .add_certificate(
            &certificate_fingerprint(&dev.cert_pem).unwrap(),
            "dev-b",
            &dev.cert_pem,
        )
        .await
        .unwrap();
    let (_c, mut e) = v5(&s, &dev, "dev-a");
    assert!(connack(&mut e).await.contains("NotAuthorized"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_only_to_the_requesters_own_namespace() {
    let mut p = provisioning(false).await;
    // A response topic in someone else's namespace, or one dressed as the
    // broker's own routed reply, is refused before the service sees it.
    for response in [
        "$aws/clients/victim/x",
        "$aws/clients/claimant/aws-reply/1/$aws/things/victim/shadow/get",
        "$aws/things/victim/shadow/get",
    ] {
        let props = PublishProperties {
            response_topic: Some(response.into()),
            ..PublishProperties::default()
        };
        p.claimant
            .publish_with_properties(
                "$aws/certificates/create-from-csr/json",
                QoS::AtLeastOnce,
                false,
                "{}",
                props,
            )
            .await
            .unwrap();
        assert_eq!(
            puback(&mut p.claimant_ev).await,
            PubAckReason::NotAuthorized,
            "{response}"
        );
    }
    // A device listening on its reply topics heard nothing.
    let victim = p.s.pki.client_identity("victim").unwrap();
    p.registry
        .create_thing("victim", Default::default())
        .await
        .unwrap();
    let (v, mut ve) = v5(&p.s, &victim, "victim");
    connected(&mut ve).await;
    v.subscribe("$aws/things/victim/shadow/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    v.subscribe("$aws/clients/victim/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let props = PublishProperties {
        response_topic: Some("$aws/clients/victim/steal".into()),
        ..PublishProperties::default()
    };
    p.claimant
        .publish_with_properties(
            "$aws/certificates/create-from-csr/json",
            QoS::AtLeastOnce,
            false,
            "{}",
            props,
        )
        .await
        .unwrap();
    assert!(
        receives(&mut ve, Duration::from_millis(700))
            .await
            .is_none()
    );
    // A device may name as its response topic one it may read itself (a
    // request/response client such as mosquitto_rr names the shadow's
    // `/accepted`), never another device's or another client's.
    for (response, want) in [
        (
            "$aws/things/victim/shadow/update/accepted",
            PubAckReason::Success,
        ),
        (
            "$aws/things/other/shadow/update/accepted",
            PubAckReason::NotAuthorized,
        ),
        ("$aws/clients/claimant/x", PubAckReason::NotAuthorized),
    ] {
        let props = PublishProperties {
            response_topic: Some(response.into()),
            ..PublishProperties::default()
        };
        v.publish_with_properties(
            "$aws/things/victim/shadow/update",
            QoS::AtLeastOnce,
            false,
            r#"{"state":{"reported":{"a":1}}}"#,
            props,
        )
        .await
        .unwrap();
        assert_eq!(puback(&mut ve).await, want, "{response}");
    }
}

/// Connects with a hand-written MQTT 5 CONNECT asking for `keep_alive`
/// seconds; the server keep-alive the CONNACK imposes, if any.
async fn raw_connect_keep_alive(s: &Setup, id: &Identity, keep_alive: u16) -> Option<u16> {
    use rumqttc::v5::mqttbytes::v5::Connect;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = client_tls_config(id, &s.pki.ca_pem()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(s.embedded().local_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let connect = Connect {
        keep_alive,
        client_id: id.common_name.clone(),
        clean_start: true,
        properties: None,
    };
    let mut buf = bytes::BytesMut::new();
    Packet::Connect(connect, None, None)
        .write(&mut buf, None)
        .unwrap();
    stream.write_all(&buf).await.unwrap();
    let mut read = bytes::BytesMut::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Packet::ConnAck(a)) = Packet::read(&mut read, None) {
                assert_eq!(a.code, ConnectReturnCode::Success);
                return a.properties.and_then(|p| p.server_keep_alive);
            }
            assert!(stream.read_buf(&mut read).await.unwrap() > 0, "closed");
        }
    })
    .await
    .expect("a CONNACK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_requests_keep_alive_packet_size_and_quotas() {
    let mut limits = ClientLimits::default();
    limits.max_retained_per_identity = 3;
    limits.max_subscriptions = 4;
    let s = setup_with(BrokerPolicy::default(), limits, None).await;
    let dev = s.pki.client_identity("dev-a").unwrap();

    // Keep-alive 0 (never time out) is granted AWS's 1,200 s instead
    // (rumqttc will not send 0: a CONNECT written by hand).
    assert_eq!(raw_connect_keep_alive(&s, &dev, 0).await, Some(1200));
    assert_eq!(raw_connect_keep_alive(&s, &dev, 5000).await, Some(1200));
    assert_eq!(raw_connect_keep_alive(&s, &dev, 60).await, None);
    let (d, mut de) = v5(&s, &dev, "dev-a");
    connected(&mut de).await;

    // A retained request on a reserved topic is refused, and kept nowhere.
    d.publish(
        "$aws/things/dev-a/shadow/update",
        QoS::AtLeastOnce,
        true,
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(puback(&mut de).await, PubAckReason::NotAuthorized);
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, mut be) = v5(&s, &backend, "svc");
    connected(&mut be).await;
    b.subscribe("$aws/things/+/shadow/update", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut be).await;
    assert!(
        receives(&mut be, Duration::from_millis(300))
            .await
            .is_none()
    );
    let _backend_pump = pump(be);

    // Retained messages per identity: three, then QuotaExceeded; replacing
    // one of its own is fine.
    for n in 0..3 {
        d.publish(format!("dt/dev-a/r{n}"), QoS::AtLeastOnce, true, "v")
            .await
            .unwrap();
        assert_eq!(puback(&mut de).await, PubAckReason::Success);
    }
    d.publish("dt/dev-a/r3", QoS::AtLeastOnce, true, "v")
        .await
        .unwrap();
    assert_eq!(puback(&mut de).await, PubAckReason::QuotaExceeded);
    d.publish("dt/dev-a/r0", QoS::AtLeastOnce, true, "w")
        .await
        .unwrap();
    assert_eq!(puback(&mut de).await, PubAckReason::Success);

    // Subscriptions per connection: four, then QuotaExceeded.
    for n in 0..5 {
        d.subscribe(
            format!("$aws/things/dev-a/jobs/j{n}/get/accepted"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        let codes = suback(&mut de).await;
        let want = if n < 4 {
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        } else {
            SubscribeReasonCode::QuotaExceeded
        };
        assert_eq!(codes, vec![want], "subscription {n}");
    }

    // The client's Maximum Packet Size: a larger message is not sent to it.
    let small = s.pki.client_identity("dev-s").unwrap();
    let mut o = options(&s, &small, "dev-s");
    o.set_max_packet_size(Some(1024));
    let (c, mut ce) = AsyncClient::new(o, 64);
    until(&mut ce, |p| {
        matches!(p, Ok(Packet::ConnAck(_))).then_some(())
    })
    .await;
    c.subscribe("$aws/things/dev-s/shadow/update/delta", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut ce).await;
    for size in [4096, 100] {
        b.publish(
            "$aws/things/dev-s/shadow/update/delta",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; size],
        )
        .await
        .unwrap();
    }
    let (_, payload) = receives(&mut ce, WAIT).await.expect("the small one");
    assert_eq!(payload.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_holds_a_bounded_queue_and_slows_nobody() {
    let mut limits = ClientLimits::default();
    limits.max_queued_bytes = 64 * 1024;
    let s = setup_with(BrokerPolicy::default(), limits, None).await;
    let dev = s.pki.client_identity("dev-a").unwrap();
    let (d, mut de) = v5(&s, &dev, "dev-a");
    connected(&mut de).await;
    d.subscribe("$aws/things/dev-a/shadow/update/delta", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut de).await;
    // The device stops reading: its event loop is no longer polled.
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, be) = v5(&s, &backend, "svc");
    let stop = pump(be);
    // 5,000 messages of 4 KiB (20 MiB) to the silent device: the backend's
    // publishes all complete (acknowledged by the broker), and most are
    // dropped for the device instead of piling up.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let publisher = tokio::spawn(async move {
        for _ in 0..5_000 {
            b.publish(
                "$aws/things/dev-a/shadow/update/delta",
                QoS::AtLeastOnce,
                false,
                vec![b'x'; 4096],
            )
            .await
            .unwrap();
        }
        let _ = tx.send(()).await;
        b
    });
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the backend is never held up by a silent device");
    let _b = publisher.await.unwrap();
    // Let the broker route what is in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        s.embedded().dropped_messages() >= 1_000,
        "dropped {}",
        s.embedded().dropped_messages()
    );
    stop.abort();
    drop(de);
}

// The same attacks against Mosquitto with `fleet-mosquitto-plugin` (each
// succeeded against Mosquitto with the ACL alone: see SECURITY.md before
// the plugin).

/// Polls `ev` for `d`; the first error (a disconnection), if any.
async fn dropped(ev: &mut EventLoop, d: Duration) -> Option<String> {
    tokio::time::timeout(d, async {
        loop {
            if let Err(e) = ev.poll().await {
                return e.to_string();
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_client_ids_are_bound_to_identities() {
    let registry = Registry::in_memory().unwrap();
    for t in ["dev-a", "dev-b", "mallory"] {
        registry.create_thing(t, Default::default()).await.unwrap();
    }
    let policy = BrokerPolicy {
        claim_identities: vec!["claim@f".into()],
        ..BrokerPolicy::default()
    };
    let s = setup_mosquitto(policy, registry);
    s.sync_roster().await;
    let backend = s.pki.client_identity("fleet-backend").unwrap();
    let (b, mut be) = v5(&s, &backend, "fleet-cloud");
    connected(&mut be).await;
    b.subscribe("dt/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut be).await;
    let a = s.pki.client_identity("dev-a").unwrap();
    let (ac, mut ae) = v5(&s, &a, "dev-a");
    connected(&mut ae).await;

    // Another device's id, the backend's id, or any other id: refused.
    let mallory = s.pki.client_identity("mallory").unwrap();
    for id in ["dev-a", "fleet-cloud", "not-my-name"] {
        let (_m, mut me) = v5(&s, &mallory, id);
        let code = connack(&mut me).await;
        assert!(code.contains("NotAuthorized"), "{id}: {code}");
    }
    // A thing the registry does not know is refused, whatever its id.
    let ghost = s.pki.client_identity("ghost").unwrap();
    let (_g, mut ge) = v5(&s, &ghost, "ghost");
    assert!(connack(&mut ge).await.contains("NotAuthorized"));
    // Whoever held the ids still holds them: dev-a was never thrown off,
    // and the backend still hears it.
    assert_eq!(dropped(&mut ae, Duration::from_millis(300)).await, None);
    let _pump = pump(ae);
    ac.publish("dt/dev-a/still-here", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    let (topic, _) = receives(&mut be, WAIT)
        .await
        .expect("the backend hears dev-a");
    assert_eq!(topic, "dt/dev-a/still-here");

    // Claimants: no takeover of each other's ids; a device reclaims its
    // own name from a claimant squatting on it.
    let claim = s.pki.client_identity("claim@f").unwrap();
    let (_c1, mut c1e) = v5(&s, &claim, "claimant-1");
    connected(&mut c1e).await;
    let (_c2, mut c2e) = v5(&s, &claim, "claimant-1");
    assert!(connack(&mut c2e).await.contains("NotAuthorized"));
    let (_sq, mut sqe) = v5(&s, &claim, "dev-b");
    connected(&mut sqe).await;
    let devb = s.pki.client_identity("dev-b").unwrap();
    let (_d, mut de) = v5(&s, &devb, "dev-b");
    connected(&mut de).await;
    // (Mosquitto closes the squatter's connection without a DISCONNECT.)
    let reason = dropped(&mut sqe, WAIT).await;
    assert!(reason.is_some(), "the squatting claimant kept dev-b's id");
    assert_eq!(dropped(&mut c1e, Duration::from_millis(200)).await, None);
    // The first claimant leaves: its id is free for another connection.
    drop(c1e);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c3, mut c3e) = v5(&s, &claim, "claimant-1");
    connected(&mut c3e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_a_claim_certificate_grants_nothing_until_registered() {
    let mut p = provisioning_on(false, true).await;
    let (outcome, created, key) = p.create("pump-9").await;
    assert_eq!(outcome, "accepted", "{created}");
    let cert = created["certificatePem"].as_str().unwrap().to_owned();
    let code = p.connect("pump-9", &cert, &key).await;
    assert!(
        code.contains("NotAuthorized"),
        "before registration: {code}"
    );
    let (outcome, r) = p.register(&created["certificateOwnershipToken"], "9").await;
    assert_eq!(outcome, "accepted", "{r}");
    // Answered only once the roster binds it: connecting at once works.
    assert_eq!(p.connect("pump-9", &cert, &key).await, "Success");
    // ...under its own name only.
    let id = Identity {
        common_name: "pump-9".into(),
        cert_pem: cert.clone(),
        key_pem: key.serialize_pem(),
    };
    let (_c, mut e) = v5(&p.s, &id, "pump-1");
    assert!(connack(&mut e).await.contains("NotAuthorized"));

    // A certificate the provisioning CA signed for a privileged name is
    // only a device, and unbound.
    let ca = Pki::from_pem(&p.s.pki.ca_pem(), &p.s.pki.ca_key_pem().unwrap()).unwrap();
    let (key, pem) = csr("fleet-backend");
    let (forged, _) = ca.sign_claimed_csr(&pem, 1).unwrap();
    let code = p.connect("fleet-backend", &forged, &key).await;
    assert!(code.contains("NotAuthorized"), "{code}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_replies_go_only_to_the_requesters_own_namespace() {
    let mut p = provisioning_on(false, true).await;
    p.registry
        .create_thing("victim", Default::default())
        .await
        .unwrap();
    p.s.sync_roster().await;
    let victim = p.s.pki.client_identity("victim").unwrap();
    let (v, mut ve) = v5(&p.s, &victim, "victim");
    connected(&mut ve).await;
    v.subscribe("$aws/things/victim/shadow/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut ve).await;
    // A response topic in someone else's namespace, and a retained
    // request: refused by the broker, before the service sees them.
    for (response, retain) in [
        (Some("$aws/clients/victim/x"), false),
        (Some("$aws/things/victim/shadow/get"), false),
        (None, true),
    ] {
        let props = PublishProperties {
            response_topic: response.map(String::from),
            ..PublishProperties::default()
        };
        p.claimant
            .publish_with_properties(
                "$aws/certificates/create-from-csr/json",
                QoS::AtLeastOnce,
                retain,
                "{}",
                props,
            )
            .await
            .unwrap();
        assert_eq!(
            puback(&mut p.claimant_ev).await,
            PubAckReason::NotAuthorized,
            "{response:?} retain {retain}"
        );
    }
    assert!(
        receives(&mut ve, Duration::from_millis(700))
            .await
            .is_none(),
        "the victim heard a reply it never asked for"
    );
    // The claimant's own namespace still works.
    let (outcome, created, _) = p.create("pump-2").await;
    assert_eq!(outcome, "accepted", "{created}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_disabling_deleting_or_revoking_cuts_a_device_off_at_once() {
    let registry = Registry::in_memory().unwrap();
    registry
        .create_thing("dev-a", Default::default())
        .await
        .unwrap();
    let s = setup_mosquitto(BrokerPolicy::default(), registry.clone());
    s.sync_roster().await;
    let dev = s.pki.client_identity("dev-a").unwrap();
    let fingerprint = certificate_fingerprint(&dev.cert_pem).unwrap();
    registry
        .add_certificate(&fingerprint, "dev-a", &dev.cert_pem)
        .await
        .unwrap();
    s.sync_roster().await;
    for change in ["disable", "delete", "revoke"] {
        let (_c, mut e) = v5(&s, &dev, "dev-a");
        connected(&mut e).await;
        match change {
            "disable" => registry.set_enabled("dev-a", false).await.unwrap(),
            "delete" => registry.delete_thing("dev-a").await.unwrap(),
            _ => registry.revoke_certificate(&fingerprint).await.unwrap(),
        }
        s.sync_roster().await;
        // The plugin looks at the roster every second.
        let reason = dropped(&mut e, Duration::from_secs(5)).await;
        assert!(reason.is_some(), "{change}: dev-a stayed connected");
        let code = connack(&mut e).await;
        assert!(code.contains("NotAuthorized"), "{change}: {code}");
        // Back in good standing for the next round.
        match change {
            "disable" => registry.set_enabled("dev-a", true).await.unwrap(),
            "delete" => {
                registry
                    .create_thing("dev-a", Default::default())
                    .await
                    .unwrap();
                registry
                    .add_certificate(&fingerprint, "dev-a", &dev.cert_pem)
                    .await
                    .unwrap();
            }
            _ => {}
        }
        s.sync_roster().await;
    }
}
