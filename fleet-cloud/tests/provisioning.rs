//! Provisioning by claim, end to end through Mosquitto: a device with only
//! a claim certificate ends up registered with its own certificate and
//! connects with it; expired or reused tokens are refused; a second
//! claimant never sees the first one's replies.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_cloud::pki::Pki;
use fleet_cloud::{
    BrokerPolicy, MemoryStore, PreProvisioningHook, ProvisioningService, ProvisioningTemplate,
    Registry, ShadowService, serve,
};
use fleet_testkit::{Broker, BrokerOptions, Identity, TestClient};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde_json::{Value, json};

struct DenySerial13;
impl PreProvisioningHook for DenySerial13 {
    fn check(&self, _: &str, parameters: &BTreeMap<String, String>) -> Result<(), String> {
        if parameters.get("SerialNumber").map(String::as_str) == Some("13") {
            Err("serial 13 is on the deny list".into())
        } else {
            Ok(())
        }
    }
}

fn csr(common_name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

fn template() -> ProvisioningTemplate {
    ProvisioningTemplate {
        allow_replace: false,
        name: "factory".into(),
        thing_name_prefix: "pump-".into(),
        name_parameter: "SerialNumber".into(),
        required_parameters: vec!["Model".into()],
        attributes: BTreeMap::from([("fleet".to_string(), "pumps".to_string())]),
        groups: vec!["new-pumps".into()],
        body: None,
        webhook: None,
    }
}

struct Setup {
    broker: Broker,
    registry: Registry,
    _cloud: fleet_cloud::RunningService,
}

async fn setup(token_lifetime: Duration) -> Setup {
    let broker = Broker::start_with(BrokerOptions {
        policy: BrokerPolicy {
            claim_identities: vec!["claim@factory".into(), "claim@rival".into()],
            ..BrokerPolicy::default()
        },
        ..BrokerOptions::default()
    })
    .expect("start mosquitto");
    // The fleet CA is the broker's CA here, so issued certificates connect.
    let ca = Pki::from_pem(&broker.pki().ca_pem(), &broker.pki().ca_key_pem().unwrap()).unwrap();
    let registry = Registry::in_memory().unwrap();
    registry.create_group("new-pumps", None).await.unwrap();
    let mut provisioning =
        ProvisioningService::new(ca, registry.clone(), vec![template()]).with_hook(DenySerial13);
    provisioning.token_lifetime = token_lifetime;
    let config = broker.backend_config("cloud").unwrap();
    let cloud = serve(
        config,
        fleet_cloud::Services::new()
            .with(ShadowService::new(MemoryStore::new()))
            .with(provisioning),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    Setup {
        broker,
        registry,
        _cloud: cloud,
    }
}

async fn claimant(broker: &Broker, name: &str) -> TestClient {
    let id = broker.claim_identity(name).unwrap();
    let mut c = TestClient::connect(broker, &id, name).await.unwrap();
    assert!(
        c.subscribe(&format!("$aws/clients/{name}/#"))
            .await
            .unwrap()
    );
    c
}

/// Sends a request until the service (which subscribes after it connects)
/// answers; returns the reply's outcome and body.
async fn request(
    c: &mut TestClient,
    name: &str,
    topic: &str,
    body: &Value,
    what: &str,
) -> (String, Value) {
    let response = format!("$aws/clients/{name}/{what}");
    for _ in 0..50 {
        c.publish_with_response_topic(topic, body.to_string(), &response)
            .await
            .unwrap();
        if let Some(m) = c.recv(Duration::from_millis(300)).await {
            let outcome = m.topic.rsplit('/').next().unwrap().to_string();
            return (outcome, serde_json::from_slice(&m.payload).unwrap());
        }
    }
    panic!("no reply to {topic}");
}

const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";
const REGISTER_TOPIC: &str = "$aws/provisioning-templates/factory/provision/json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_device_registers_and_connects_with_its_own_certificate() {
    let s = setup(Duration::from_secs(3600)).await;
    let mut rival = claimant(&s.broker, "claim@rival").await;
    for f in ["$aws/#", "#", "$aws/clients/claim@factory/#"] {
        let _ = rival.subscribe(f).await.unwrap();
    }
    let mut claim = claimant(&s.broker, "claim@factory").await;

    let (csr_pem, key_pem) = csr("pump-42");
    let (outcome, created) = request(
        &mut claim,
        "claim@factory",
        CSR_TOPIC,
        &json!({"certificateSigningRequest": csr_pem}),
        "csr",
    )
    .await;
    assert_eq!(outcome, "accepted", "{created}");
    let token = created["certificateOwnershipToken"]
        .as_str()
        .unwrap()
        .to_string();
    let cert_pem = created["certificatePem"].as_str().unwrap().to_string();

    // Parameters are validated, and the hook may refuse.
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        REGISTER_TOPIC,
        &json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "42"}}),
        "reg",
    )
    .await;
    assert_eq!(
        (outcome.as_str(), body["errorCode"].as_str()),
        ("rejected", Some("InvalidParameters"))
    );
    let register = json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "42", "Model": "p7"}});
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        REGISTER_TOPIC,
        &register,
        "reg",
    )
    .await;
    assert_eq!(outcome, "accepted", "{body}");
    assert_eq!(body["thingName"], "pump-42");

    // Registered, with its certificate, attributes and group.
    let thing = s.registry.thing("pump-42").await.unwrap();
    assert_eq!(thing.attributes["Model"], "p7");
    assert_eq!(thing.attributes["fleet"], "pumps");
    assert_eq!(
        s.registry.certificates("pump-42").await.unwrap()[0].pem,
        cert_pem
    );
    assert_eq!(
        s.registry.group_members("new-pumps").await.unwrap(),
        ["pump-42"]
    );

    // It connects with its own key and certificate, as pump-42.
    let own = Identity {
        common_name: "pump-42".into(),
        cert_pem,
        key_pem,
    };
    let mut device = TestClient::connect(&s.broker, &own, "pump-42")
        .await
        .unwrap();
    assert!(
        device
            .subscribe("$aws/things/pump-42/shadow/update/delta")
            .await
            .unwrap()
    );

    // The token is spent.
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        REGISTER_TOPIC,
        &register,
        "reg",
    )
    .await;
    assert_eq!(
        (outcome.as_str(), body["errorCode"].as_str()),
        ("rejected", Some("InvalidToken"))
    );

    // The rival, subscribed to all it may read, saw none of it.
    assert_eq!(rival.recv(Duration::from_millis(500)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registrations() {
    let s = setup(Duration::from_secs(3)).await;
    let mut claim = claimant(&s.broker, "claim@factory").await;

    // A CSR that is not a CSR, and one whose name cannot be a thing name.
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        CSR_TOPIC,
        &json!({"certificateSigningRequest": "garbage"}),
        "csr",
    )
    .await;
    assert_eq!(
        (outcome.as_str(), body["errorCode"].as_str()),
        ("rejected", Some("InvalidCSR"))
    );
    let (bad_csr, _) = csr("not a thing name");
    let (outcome, _) = request(
        &mut claim,
        "claim@factory",
        CSR_TOPIC,
        &json!({"certificateSigningRequest": bad_csr}),
        "csr",
    )
    .await;
    assert_eq!(outcome, "rejected");

    // The hook refuses serial 13.
    let (csr13, _) = csr("pump-13");
    let (_, created) = request(
        &mut claim,
        "claim@factory",
        CSR_TOPIC,
        &json!({"certificateSigningRequest": csr13}),
        "csr",
    )
    .await;
    let token13 = created["certificateOwnershipToken"].clone();
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        REGISTER_TOPIC,
        &json!({"certificateOwnershipToken": token13, "parameters": {"SerialNumber": "13", "Model": "p7"}}),
        "reg",
    )
    .await;
    assert_eq!(
        (outcome.as_str(), body["errorCode"].as_str()),
        ("rejected", Some("AccessDenied"))
    );

    // A template that names another thing than the certificate.
    let (csr7, _) = csr("pump-7");
    let (_, created) = request(
        &mut claim,
        "claim@factory",
        CSR_TOPIC,
        &json!({"certificateSigningRequest": csr7}),
        "csr",
    )
    .await;
    let token7 = created["certificateOwnershipToken"].clone();
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        REGISTER_TOPIC,
        &json!({"certificateOwnershipToken": token7, "parameters": {"SerialNumber": "8", "Model": "p7"}}),
        "reg",
    )
    .await;
    assert_eq!(
        (outcome.as_str(), body["errorCode"].as_str()),
        ("rejected", Some("InvalidParameters"))
    );

    // An expired token (lifetime 3 s here, counted in whole seconds).
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let (outcome, body) = request(
        &mut claim,
        "claim@factory",
        REGISTER_TOPIC,
        &json!({"certificateOwnershipToken": token7, "parameters": {"SerialNumber": "7", "Model": "p7"}}),
        "reg",
    )
    .await;
    assert_eq!(
        (outcome.as_str(), body["errorCode"].as_str()),
        ("rejected", Some("InvalidToken"))
    );
    assert!(
        s.registry.things(None, 10).await.unwrap().is_empty(),
        "nothing was registered"
    );
}

/// A pre-provisioning webhook over HTTPS (the test's own CA): it records
/// each request; it refuses serial 13 and otherwise sets `Site` to north.
struct Hook {
    url: String,
    ca_pem: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    _task: tokio::task::JoinHandle<()>,
}

async fn hook() -> Hook {
    let pki = Pki::new("hook CA").unwrap();
    let server = pki.server_identity().unwrap();
    let tls = fleet_cloud::tls::server_config(&server.cert_pem, &server.key_pem, None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let log = log.clone();
            async move {
                let deny = body["parameters"]["SerialNumber"] == "13";
                log.lock().unwrap().push(body);
                axum::Json(if deny {
                    json!({"allowProvisioning": false})
                } else {
                    json!({"allowProvisioning": true, "parameterOverrides": {"Site": "north"}})
                })
            }
        }),
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Hook {
        url: format!("https://localhost:{port}/hook"),
        ca_pem: pki.ca_pem(),
        seen,
        _task: task,
    }
}

/// Asks `service` over its MQTT API: the outcome (`accepted`,
/// `rejected`) and the answer.
async fn call(service: &ProvisioningService, topic: &str, body: Value) -> (String, Value) {
    use fleet_core::topic::TopicPrefix;
    let payload = body.to_string();
    let request =
        fleet_cloud::Request::from_broker(&TopicPrefix::AWS, topic, payload.as_bytes(), 1_000)
            .unwrap();
    let reply = service.handle(&request).await.pop().unwrap();
    let outcome = reply.topic.rsplit('/').next().unwrap().to_string();
    (
        outcome,
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
    )
}

/// A claimant's CreateCertificateFromCsr then RegisterThing by
/// `template` with `SerialNumber = serial`: the outcome, the answer, and
/// what CreateCertificateFromCsr answered.
async fn register(
    service: &ProvisioningService,
    template: &str,
    serial: &str,
) -> (String, Value, Value) {
    let (csr_pem, _) = csr("any-subject");
    let (outcome, created) = call(
        service,
        CSR_TOPIC,
        json!({"certificateSigningRequest": csr_pem}),
    )
    .await;
    assert_eq!(outcome, "accepted", "{created}");
    let topic = format!("$aws/provisioning-templates/{template}/provision/json");
    let (outcome, answer) = call(
        service,
        &topic,
        json!({
            "certificateOwnershipToken": created["certificateOwnershipToken"],
            "parameters": {"SerialNumber": serial}
        }),
    )
    .await;
    (outcome, answer, created)
}

/// Issue 26: a template made through the API is kept in the store and
/// served by every instance sharing it (two registries on one SQLite
/// file, as two `fleet serve` on one PostgreSQL): created, its hook asked,
/// replaced, disabled and deleted, each seen by the other instance's
/// provisioning at its next registration; a template that does not hold
/// is refused with its path and nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_made_through_the_api_is_served_by_every_instance() {
    let hook = hook().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    // Instance A takes the API's changes; instance B provisions.
    let a = Registry::open(&db).unwrap();
    let b = Registry::open(&db).unwrap();
    b.create_group("site-north", None).await.unwrap();
    let mut service = ProvisioningService::new(Pki::new("fleet CA").unwrap(), b.clone(), vec![]);
    service.subject_names_thing = false;
    let document = |group: &str| {
        json!({
            "Parameters": {
                "SerialNumber": {"Type": "String"},
                "Site": {"Type": "String", "Default": "unknown"}
            },
            "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["", ["valve-", {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"site": {"Ref": "Site"}},
                "ThingGroups": [{"Fn::Sub": group}]
            }}}
        })
    };
    let mut stored = fleet_cloud::StoredTemplate {
        name: "valves".into(),
        description: "valves from the north line".into(),
        enabled: true,
        document: document("site-${Site}"),
        allow_replace: false,
        hook: Some(fleet_cloud::StoredHook {
            url: hook.url.clone(),
            ca_pem: Some(hook.ca_pem.clone()),
            timeout_ms: 5_000,
        }),
        version: 1,
        created_ms: 1,
        updated_ms: 1,
    };
    let put = |t: &fleet_cloud::StoredTemplate| {
        let (a, t) = (a.clone(), t.clone());
        async move {
            ProvisioningTemplate::from_stored(&t)?;
            a.put_template(&t).await.unwrap();
            Ok::<(), fleet_cloud::template::TemplateError>(())
        }
    };

    // Not there yet: 404.
    let (outcome, answer, _) = register(&service, "valves", "1").await;
    assert_eq!(
        (outcome.as_str(), &answer["statusCode"]),
        ("rejected", &json!(404)),
        "{answer}"
    );

    // Created on A, served by B: the hook's override (Site = north) names
    // the group and the attribute.
    put(&stored).await.unwrap();
    let (outcome, answer, _) = register(&service, "valves", "1").await;
    assert_eq!(outcome, "accepted", "{answer}");
    assert_eq!(answer["thingName"], "valve-1");
    assert_eq!(
        b.thing("valve-1").await.unwrap().attributes,
        BTreeMap::from([("site".to_string(), "north".to_string())])
    );
    assert_eq!(b.group_members("site-north").await.unwrap(), ["valve-1"]);
    assert_eq!(hook.seen.lock().unwrap().len(), 1);
    assert_eq!(hook.seen.lock().unwrap()[0]["templateName"], "valves");
    // The hook's refusal stores nothing.
    let (outcome, answer, created) = register(&service, "valves", "13").await;
    assert_eq!(
        (outcome.as_str(), &answer["statusCode"]),
        ("rejected", &json!(403)),
        "{answer}"
    );
    assert!(b.thing("valve-13").await.is_err());
    assert!(
        b.certificate(created["certificateId"].as_str().unwrap())
            .await
            .unwrap()
            .is_none()
    );

    // Replaced on A: B's next registration uses the new document.
    b.create_group("valves-v2", None).await.unwrap();
    stored.document = document("valves-v2");
    stored.version = 2;
    put(&stored).await.unwrap();
    let (outcome, answer, _) = register(&service, "valves", "2").await;
    assert_eq!(outcome, "accepted", "{answer}");
    assert_eq!(b.group_members("valves-v2").await.unwrap(), ["valve-2"]);

    // A document that does not hold is refused with where, and the kept
    // one stays.
    let mut bad = stored.clone();
    bad.document["Resources"]["thing"]["Properties"]["ThingName"] = json!({"Fn::Base64": "x"});
    let e = put(&bad).await.unwrap_err();
    assert_eq!(
        e.path, "Resources.thing.Properties.ThingName.Fn::Base64",
        "{e}"
    );
    let mut insecure = stored.clone();
    insecure.hook.as_mut().unwrap().url = "http://localhost/hook".into();
    let e = put(&insecure).await.unwrap_err();
    assert_eq!(e.path, "preProvisioningHook.url", "{e}");
    assert_eq!(
        b.stored_template("valves").await.unwrap(),
        Some(stored.clone())
    );

    // Disabled: refused, nothing stored, the hook not asked.
    stored.enabled = false;
    put(&stored).await.unwrap();
    let asked = hook.seen.lock().unwrap().len();
    let (outcome, answer, created) = register(&service, "valves", "3").await;
    assert_eq!(
        (outcome.as_str(), &answer["statusCode"]),
        ("rejected", &json!(403)),
        "{answer}"
    );
    assert!(b.thing("valve-3").await.is_err());
    assert!(
        b.certificate(created["certificateId"].as_str().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(hook.seen.lock().unwrap().len(), asked);

    // Deleted on A: B refuses it; the things it made stay.
    a.delete_template("valves").await.unwrap();
    let (outcome, answer, _) = register(&service, "valves", "4").await;
    assert_eq!(
        (outcome.as_str(), &answer["statusCode"]),
        ("rejected", &json!(404)),
        "{answer}"
    );
    assert!(b.thing("valve-1").await.is_ok());
    assert!(matches!(
        a.delete_template("valves").await,
        Err(fleet_cloud::RegistryError::NotFound(_))
    ));
}

/// Issue 26: a template given as data, in AWS's template shape (parameters
/// with a default, `Fn::Join`, `Fn::Sub`, the certificate resource), and
/// its pre-provisioning webhook: the device is registered with the
/// attributes and groups the template makes from its parameters and the
/// hook's overrides; the hook's refusal, or a hook that cannot be reached
/// or trusted, refuses the registration and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_document_and_its_webhook_decide_the_registration() {
    let hook = hook().await;
    let document = json!({
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Site": {"Type": "String", "Default": "unknown"}
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": {"Fn::Join": ["", ["pump-", {"Ref": "SerialNumber"}]]},
                    "AttributePayload": {"serial": {"Ref": "SerialNumber"}, "site": {"Ref": "Site"}},
                    "ThingGroups": [{"Fn::Sub": "site-${Site}"}]
                }
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}
            },
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "pumps"}}
        }
    });
    let mut template = ProvisioningTemplate::from_document("factory", &document).unwrap();
    template.webhook = Some(fleet_cloud::Webhook {
        url: hook.url.clone(),
        ca_pem: Some(hook.ca_pem.clone()),
        timeout: Duration::from_secs(5),
    });
    // The same template, its hook behind a certificate it cannot trust.
    let mut untrusted = ProvisioningTemplate::from_document("untrusted", &document).unwrap();
    untrusted.webhook = Some(fleet_cloud::Webhook {
        url: hook.url.clone(),
        ca_pem: Some(Pki::new("another CA").unwrap().ca_pem()),
        timeout: Duration::from_secs(5),
    });
    let registry = Registry::in_memory().unwrap();
    registry.create_group("site-north", None).await.unwrap();
    let mut service = ProvisioningService::new(
        Pki::new("fleet CA").unwrap(),
        registry.clone(),
        vec![template, untrusted],
    );
    service.subject_names_thing = false;
    let register =
        |template: &'static str, serial: &'static str| register(&service, template, serial);

    let (outcome, answer, created) = register("factory", "7").await;
    assert_eq!(outcome, "accepted", "{answer}");
    assert_eq!(answer["thingName"], "pump-7");
    let thing = registry.thing("pump-7").await.unwrap();
    assert_eq!(
        thing.attributes,
        BTreeMap::from([
            ("serial".to_string(), "7".to_string()),
            ("site".to_string(), "north".to_string()),
        ])
    );
    assert_eq!(
        registry.group_members("site-north").await.unwrap(),
        ["pump-7"]
    );
    let certs = registry.certificates("pump-7").await.unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].id, created["certificateId"].as_str().unwrap());
    {
        let seen = hook.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["templateName"], "factory");
        assert_eq!(seen[0]["certificateId"], created["certificateId"]);
        assert_eq!(seen[0]["parameters"], json!({"SerialNumber": "7"}));
    }

    // Refused by the hook: nothing stored, the hook asked once more.
    let (outcome, answer, created) = register("factory", "13").await;
    assert_eq!(outcome, "rejected", "{answer}");
    assert_eq!(answer["statusCode"], 403, "{answer}");
    assert_eq!(answer["errorCode"], "AccessDenied", "{answer}");
    assert!(registry.thing("pump-13").await.is_err());
    assert!(
        registry
            .certificate(created["certificateId"].as_str().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(hook.seen.lock().unwrap().len(), 2);

    // A hook whose certificate is not trusted refuses (it was never asked).
    let (outcome, answer, _) = register("untrusted", "8").await;
    assert_eq!(outcome, "rejected", "{answer}");
    assert_eq!(answer["statusCode"], 403, "{answer}");
    assert!(registry.thing("pump-8").await.is_err());
    assert_eq!(hook.seen.lock().unwrap().len(), 2);
}
