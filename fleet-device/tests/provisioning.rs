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

fleet_testkit::on_both_brokers!(a_claimed_device_provisions_itself_and_connects);

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
    let ca = Pki::from_pem(&broker.pki().ca_pem(), &broker.pki().ca_key_pem()).unwrap();
    let provisioning = ProvisioningService::new(
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
        }],
    )
    .with_hook(DenySerial13);
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
