//! Provisioning by claim from the device: with only a claim certificate it
//! makes its key, gets a certificate, registers, stores its identity and
//! connects with it; a refusal stores nothing; a second start reuses the
//! stored identity.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_cloud::pki::Pki;
use fleet_cloud::{
    BrokerPolicy, MemoryStore, PreProvisioningHook, ProvisioningService, ProvisioningTemplate,
    Registry, RunningService, ShadowService, serve,
};
use fleet_device::{AgentEvent, ClaimConfig, ProvisionError, provision_by_claim};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions};
use serde_json::json;

fleet_testkit::on_both_brokers!(
    a_claimed_device_provisions_itself_and_connects,
    mqtt_3_claimants_provision_and_read_only_their_own_replies
);

struct DenySerial13;
impl PreProvisioningHook for DenySerial13 {
    fn check(&self, _: &str, p: &BTreeMap<String, String>) -> Result<(), String> {
        match p.get("SerialNumber").map(String::as_str) {
            Some("13") => Err("serial 13 is on the deny list".into()),
            _ => Ok(()),
        }
    }
}

fn cloud(broker: &Broker, registry: &Registry) -> RunningService {
    let ca = Pki::from_pem(&broker.pki().ca_pem(), &broker.pki().ca_key_pem().unwrap()).unwrap();
    let mut provisioning = ProvisioningService::new(
        ca,
        registry.clone(),
        vec![ProvisioningTemplate {
            allow_replace: false,
            name: "factory".into(),
            thing_name_prefix: "pump-".into(),
            name_parameter: "SerialNumber".into(),
            required_parameters: Vec::new(),
            attributes: BTreeMap::new(),
            groups: Vec::new(),
            body: None,
            webhook: None,
        }],
    )
    .with_hook(DenySerial13);
    // The claim identity the service answers under `claims/...` (the
    // broker admits `other@factory` too; the service does not).
    provisioning.claim_identities = vec!["claim@factory".into()];
    serve(
        broker.backend_config("cloud").unwrap(),
        fleet_cloud::Services::new()
            .with(ShadowService::new(MemoryStore::new()))
            .with(provisioning),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap()
}

fn claim(broker: &Broker, serial: &str, dir: &std::path::Path) -> ClaimConfig {
    let id = broker.claim_identity("claim@factory").unwrap();
    ClaimConfig {
        host: "localhost".into(),
        port: broker.port(),
        claim_cert_pem: id.cert_pem,
        claim_key_pem: id.key_pem,
        ca_pem: broker.pki().ca_pem(),
        template: "factory".into(),
        parameters: BTreeMap::from([("SerialNumber".to_string(), serial.to_string())]),
        thing_name: format!("pump-{serial}"),
        state_dir: dir.into(),
        timeout: Duration::from_secs(10),
        protocol: Default::default(),
    }
}

/// The service subscribes after it connects: try until it answers.
async fn provision(config: &ClaimConfig) -> Result<fleet_device::Provisioned, ProvisionError> {
    let mut last = None;
    for _ in 0..20 {
        let mut quick = config.clone();
        quick.timeout = Duration::from_millis(800);
        match provision_by_claim(&quick).await {
            Err(ProvisionError::Network(e)) => last = Some(e),
            other => return other,
        }
    }
    panic!("no answer: {last:?}");
}

async fn a_claimed_device_provisions_itself_and_connects(kind: BrokerKind) {
    let registry = Registry::in_memory().unwrap();
    let broker = Broker::start_with(BrokerOptions {
        kind,
        policy: BrokerPolicy {
            claim_identities: vec!["claim@factory".into()],
            ..BrokerPolicy::default()
        },
        registry: Some(registry.clone()),
        ..BrokerOptions::default()
    })
    .unwrap();
    let _cloud = cloud(&broker, &registry);
    let state = tempfile::tempdir().unwrap();

    // Refused by the pre-provisioning hook: nothing stored.
    let refused = provision(&claim(&broker, "13", state.path())).await;
    assert!(
        matches!(&refused, Err(ProvisionError::Rejected { status: 403, .. })),
        "{refused:?}"
    );
    assert!(!state.path().join("device.pem").exists());

    let me = provision(&claim(&broker, "42", state.path()))
        .await
        .unwrap();
    assert_eq!(me.thing_name, "pump-42");
    assert_eq!(registry.certificates("pump-42").await.unwrap().len(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path().join("device.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
    }
    // A restart reuses the stored identity without asking again (the
    // broker address is wrong on purpose: no connection is made).
    let mut again = claim(&broker, "42", state.path());
    again.port = 1;
    assert_eq!(provision_by_claim(&again).await.unwrap(), me);

    // It connects as itself and is served.
    let agent = me
        .agent("localhost", broker.port(), &broker.pki().ca_pem())
        .start()
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(15), agent.next_event())
        .await
        .unwrap();
    assert_eq!(first, Some(AgentEvent::Connected));
    let version = tokio::time::timeout(
        Duration::from_secs(15),
        agent.report(None, json!({"serial": "42"}).as_object().unwrap().clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(version, 1);
    agent.shutdown().await;
}

/// Issue 21: MQTT 3.1.1 has no response topic, so a device provisioning
/// through Mosquitto could not get its replies alone on AWS's fixed reply
/// topics. The agent over MQTT 3.1.1 asks under its own
/// `$aws/claims/{claim identity}/{client id}/` instead: two devices
/// provisioning at once each get their own identity; another claimant
/// cannot subscribe to anyone else's claim topics; and a claim identity
/// the service does not serve is refused (403) in its own namespace.
async fn mqtt_3_claimants_provision_and_read_only_their_own_replies(kind: BrokerKind) {
    let registry = Registry::in_memory().unwrap();
    let broker = Broker::start_with(BrokerOptions {
        kind,
        policy: BrokerPolicy {
            claim_identities: vec!["claim@factory".into(), "other@factory".into()],
            ..BrokerPolicy::default()
        },
        registry: Some(registry.clone()),
        ..BrokerOptions::default()
    })
    .unwrap();
    let _cloud = cloud(&broker, &registry);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v3 = |serial: &str, dir: &std::path::Path| ClaimConfig {
        protocol: fleet_device::Protocol::V311,
        ..claim(&broker, serial, dir)
    };
    // Another claimant listens on every claim topic it can name: the
    // embedded broker refuses those subscriptions, Mosquitto grants them
    // but delivers it nothing of anyone else's (the ACL's `%u`/`%c`).
    let id = broker.claim_identity("claim@factory").unwrap();
    let tls = fleet_testkit::client_tls_config(&id, &broker.pki().ca_pem()).unwrap();
    let mut o = rumqttc::MqttOptions::new("snoop", "localhost", broker.port());
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    let (c, mut ev) = rumqttc::AsyncClient::new(o, 16);
    let mut granted = Vec::new();
    for filter in [
        "$aws/claims/#",
        "$aws/claims/claim@factory/+/#",
        "$aws/claims/claim@factory/snoop/#",
    ] {
        c.subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        let ok = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) = ev.poll().await {
                    return a
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                }
            }
        })
        .await
        .unwrap();
        granted.push(ok);
    }
    assert!(granted[2], "its own claim topics: {granted:?}");
    if kind == BrokerKind::Embedded {
        assert_eq!(granted, [false, false, true]);
    }
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let snoop = {
        let heard = heard.clone();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        heard.lock().unwrap().push(p.topic)
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    };

    // Two devices at once, each its own identity.
    let (ca, cb) = (v3("50", a.path()), v3("51", b.path()));
    let (one, two) = tokio::join!(provision(&ca), provision(&cb));
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!(
        (one.thing_name.as_str(), two.thing_name.as_str()),
        ("pump-50", "pump-51")
    );
    assert_ne!(one.cert_pem, two.cert_pem);
    assert_eq!(registry.certificates("pump-50").await.unwrap().len(), 1);
    assert_eq!(registry.certificates("pump-51").await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    snoop.abort();
    assert!(
        heard.lock().unwrap().is_empty(),
        "{kind:?} leaked: {:?}",
        heard.lock().unwrap()
    );

    // A claim identity the service does not serve: refused, nothing issued.
    let state = tempfile::tempdir().unwrap();
    let other = broker.claim_identity("other@factory").unwrap();
    let refused = provision(&ClaimConfig {
        claim_cert_pem: other.cert_pem,
        claim_key_pem: other.key_pem,
        ..v3("52", state.path())
    })
    .await;
    assert!(
        matches!(&refused, Err(ProvisionError::Rejected { status: 403, .. })),
        "{refused:?}"
    );
    assert!(
        registry
            .certificates("pump-52")
            .await
            .map_or(true, |c| c.is_empty())
    );
}
