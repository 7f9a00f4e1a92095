//! A private key that never leaves its "hardware": the TLS handshake asks
//! the application's `DeviceKey` to sign, and the broker accepts the
//! connection; a key that refuses to sign means no connection.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleet_device::{AgentBuilder, AgentEvent, Backoff, DeviceKey, KeyAlgorithm, KeyError, Qos};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions};

/// A software stand-in for a secure element: it holds the key, signs on
/// request and counts how often it was asked.
#[derive(Debug)]
struct SecureElement {
    key: rcgen::KeyPair,
    signatures: AtomicUsize,
    broken: bool,
}

impl DeviceKey for SecureElement {
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::EcdsaP256Sha256
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        if self.broken {
            return Err(KeyError::new("the token is locked"));
        }
        self.signatures.fetch_add(1, Ordering::SeqCst);
        rcgen::SigningKey::sign(&self.key, message).map_err(KeyError::from_source)
    }
}

fn element(broker: &Broker, broken: bool) -> (Arc<SecureElement>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pump-7");
    // The CSR is signed inside the element too; only the public key leaves.
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let (cert, _) = broker.pki().sign_csr(&csr, 30).unwrap();
    (
        Arc::new(SecureElement {
            key,
            signatures: AtomicUsize::new(0),
            broken,
        }),
        cert,
    )
}

fn builder(broker: &Broker, cert: &str, key: Arc<SecureElement>) -> AgentBuilder {
    AgentBuilder::new(
        "localhost",
        broker.port(),
        "pump-7",
        cert,
        "no PEM key: the element holds it",
        &broker.pki().ca_pem(),
    )
    .device_key(key)
    .backoff(Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(500),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_signs_with_the_applications_key() {
    for kind in [BrokerKind::Mosquitto, BrokerKind::Embedded] {
        let broker = Broker::start_with(BrokerOptions {
            kind,
            ..BrokerOptions::default()
        })
        .unwrap();
        let (key, cert) = element(&broker, false);
        let agent = builder(&broker, &cert, key.clone()).start().unwrap();
        let first = tokio::time::timeout(Duration::from_secs(15), agent.next_event())
            .await
            .unwrap();
        assert_eq!(first, Some(AgentEvent::Connected), "{kind:?}");
        let d = agent.publish("t", "hello", Qos::AtLeastOnce).await.unwrap();
        tokio::time::timeout(Duration::from_secs(15), d.acknowledged())
            .await
            .unwrap()
            .unwrap();
        assert!(key.signatures.load(Ordering::SeqCst) >= 1, "{kind:?}");
        agent.shutdown().await;

        // A key that cannot sign: no connection, and the reason says why.
        let (broken, cert) = element(&broker, true);
        let agent = builder(&broker, &cert, broken).start().unwrap();
        let event = tokio::time::timeout(Duration::from_secs(15), agent.next_event())
            .await
            .unwrap();
        match event {
            Some(AgentEvent::Disconnected { reason, .. }) => {
                assert!(reason.contains("token is locked"), "{reason}");
            }
            e => panic!("{kind:?}: {e:?}"),
        }
        agent.shutdown().await;
    }
}

// ---------------------------------------------------------------------
// Keys in a real token (SoftHSM2, a fresh one per test).

mod in_softhsm {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use base64::Engine as _;
    use fleet_cloud::{
        CampaignSpec, JobsService, MemoryStore, ProvisioningService, ProvisioningTemplate,
        RECEIPT_KEY_ATTRIBUTE, Registry, RunningService, ShadowService, StreamService, serve,
    };
    use fleet_core::jobs::{
        GroupAction, RateLimit, RetryPolicy, RolloutGroup, RolloutPolicy, TimeoutConfig,
    };
    use fleet_core::ota::{
        DeviceProfile, ManifestBuilder, Role, TrustRoot, TrustRootBuilder, sign_envelope_with,
    };
    use fleet_device::pkcs11::{Algorithm, Pkcs11Key};
    use fleet_device::{
        AgentEvent, Backoff, ClaimConfig, FileSlots, OtaSettings, ProvisionError, Qos, ReceiptKey,
        provision_by_claim_with_key,
    };
    use fleet_testkit::{Broker, BrokerKind, BrokerOptions, BrokerPolicy, SoftHsmToken};
    use sha2::Digest;

    fleet_testkit::on_both_brokers!(
        a_device_whose_keys_are_in_a_token_provisions_connects_and_signs_receipts
    );

    fn cloud(
        broker: &Broker,
        registry: &Registry,
        jobs: &JobsService,
        streams: &StreamService,
    ) -> RunningService {
        let ca = broker.pki().clone();
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
        );
        provisioning.claim_identities = vec!["claim@factory".into()];
        serve(
            broker.backend_config("cloud").unwrap(),
            fleet_cloud::Services::new()
                .with(ShadowService::new(MemoryStore::new()))
                .with(provisioning)
                .with(jobs.clone())
                .with(streams.clone()),
            fleet_cloud::ServeOptions::default(),
        )
        .unwrap()
    }

    async fn next(agent: &fleet_device::Agent) -> AgentEvent {
        tokio::time::timeout(Duration::from_secs(20), agent.next_event())
            .await
            .expect("an event in time")
            .expect("the agent runs")
    }

    /// Issue 23: the device's TLS key (ECDSA P-256) and receipt key
    /// (Ed25519) are generated inside the token and never leave it; it
    /// provisions by claim with a CSR signed there, connects with mutual
    /// TLS, reports its shadow, installs a release whose manifest was
    /// signed by a release key in the token, and the cloud verifies the
    /// receipt the token signed. When the token is taken away, the agent
    /// says so, keeps its outbox and delivers it once the token is back.
    async fn a_device_whose_keys_are_in_a_token_provisions_connects_and_signs_receipts(
        kind: BrokerKind,
    ) {
        // One at a time: taking a token away starts the module again, which
        // ends every session in this process.
        static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = ONE.lock().await;
        let token = SoftHsmToken::new().unwrap();
        let tls_key = Arc::new(
            Pkcs11Key::generate(&token.uri("device"), Algorithm::EcdsaP256Sha256).unwrap(),
        );
        let receipt_key =
            Arc::new(Pkcs11Key::generate(&token.uri("receipts"), Algorithm::Ed25519).unwrap());
        let release_key = Pkcs11Key::generate(&token.uri("release"), Algorithm::Ed25519).unwrap();
        for key in [&*tls_key, &*receipt_key, &release_key] {
            let p = key.protection().unwrap();
            assert!(!p.extractable && p.sensitive, "{p:?}");
            assert!(!p.value_readable, "the token refuses to export the key");
        }

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
        let jobs = JobsService::new(MemoryStore::new()).with_registry(registry.clone());
        let streams = StreamService::new();
        let _cloud = cloud(&broker, &registry, &jobs, &streams);

        // Provisioning by claim: the CSR is signed in the token.
        let state = tempfile::tempdir().unwrap();
        let claim = broker.claim_identity("claim@factory").unwrap();
        let config = ClaimConfig {
            host: "localhost".into(),
            port: broker.port(),
            claim_cert_pem: claim.cert_pem,
            claim_key_pem: claim.key_pem,
            ca_pem: broker.pki().ca_pem(),
            template: "factory".into(),
            parameters: BTreeMap::from([("SerialNumber".to_string(), "77".to_string())]),
            thing_name: "pump-77".into(),
            state_dir: state.path().into(),
            timeout: Duration::from_millis(800),
            protocol: Default::default(),
        };
        let mut me = None;
        for _ in 0..20 {
            match provision_by_claim_with_key(&config, tls_key.clone()).await {
                Err(ProvisionError::Network(_)) => continue,
                other => {
                    me = Some(other.unwrap());
                    break;
                }
            }
        }
        let me = me.expect("provisioned");
        assert_eq!(me.thing_name, "pump-77");
        assert!(me.key_pem.is_empty());
        assert!(
            !state.path().join("device.key").exists(),
            "no key is written: it is in the token"
        );
        // The certificate is for the token's key.
        let (_, pem) = x509_parser::pem::parse_x509_pem(me.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
        assert_eq!(
            &*cert.public_key().subject_public_key.data,
            tls_key.public_key()
        );

        // The receipt key is registered with the thing.
        let mut attrs = registry.thing("pump-77").await.unwrap().attributes;
        attrs.insert(
            RECEIPT_KEY_ATTRIBUTE.into(),
            base64::engine::general_purpose::STANDARD.encode(receipt_key.public_key()),
        );
        registry.set_attributes("pump-77", &attrs).await.unwrap();

        // A release signed by the release key in the token; the same bytes
        // verify on fleet-core's allocation-free path (what firmware runs).
        let release_public = fleet_core::ota::Ed25519Signer::public_key(&release_key).unwrap();
        let root = TrustRootBuilder::new(1)
            .key(&release_public, &[Role::Root, Role::Targets])
            .build();
        let image: Vec<u8> = (0..8192u32).map(|i| (i * 11 % 251) as u8).collect();
        let manifest = ManifestBuilder::new(
            "fw",
            "2.0",
            2,
            image.len() as u64,
            sha2::Sha256::digest(&image).into(),
        )
        .hardware_id("board-1");
        let envelope = sign_envelope_with(
            fleet_core::ota::MANIFEST_PAYLOAD_TYPE,
            &manifest.build(),
            &[&release_key],
        )
        .unwrap();
        let verified = TrustRoot::parse(&root)
            .unwrap()
            .verify_manifest(
                &envelope,
                &DeviceProfile {
                    hardware_id: "board-1",
                    installed_sequence: 1,
                    max_image_size: 1 << 20,
                    now: None,
                },
            )
            .unwrap();
        assert_eq!(verified.sequence, 2);

        let slots = Arc::new(Mutex::new(
            FileSlots::boot(&state.path().join("slots"), 1 << 20, 1).unwrap(),
        ));
        let agent_with = |slots: Arc<Mutex<FileSlots>>| {
            me.agent("localhost", broker.port(), &broker.pki().ca_pem())
                .device_key(tls_key.clone())
                .state_dir(state.path().join("agent"))
                .backoff(Backoff {
                    initial: Duration::from_millis(100),
                    max: Duration::from_millis(400),
                })
                .ota(OtaSettings {
                    trust_root: root.clone(),
                    hardware_id: "board-1".into(),
                    slots,
                    self_test: Arc::new(|| true),
                    receipt_key: ReceiptKey::Device(receipt_key.clone()),
                    block_size: 4096,
                })
                .start()
                .unwrap()
        };
        let agent = agent_with(slots.clone());
        assert_eq!(next(&agent).await, AgentEvent::Connected, "{kind:?}");
        let version = tokio::time::timeout(
            Duration::from_secs(15),
            agent.report(
                None,
                serde_json::json!({"firmware": "1.0"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(version, 1);

        // The campaign: the device installs, reboots, confirms and reports
        // a receipt signed in the token, which the cloud verifies.
        jobs.register_release("fw-2", &envelope, image, &streams)
            .await
            .unwrap();
        let backend = broker.backend_identity().unwrap();
        let operator = fleet_testkit::TestClient::connect(&broker, &backend, "operator")
            .await
            .unwrap();
        let notices = jobs
            .start_campaign(
                CampaignSpec {
                    campaign_id: "fw-2".into(),
                    release_id: "fw-2".into(),
                    things: vec!["pump-77".into()],
                    groups: Vec::new(),
                    policy: RolloutPolicy {
                        rate: RateLimit::Constant { per_minute: 1000 },
                        groups: vec![RolloutGroup {
                            size: 1,
                            success_percent: 100,
                            on_success: GroupAction::NextGroup,
                            error_threshold: None,
                        }],
                        abort: Vec::new(),
                        retry: RetryPolicy::default(),
                        in_progress_timeout_secs: None,
                    },
                    timeouts: TimeoutConfig::default(),
                },
                &streams,
                &registry,
                jobs.now(),
            )
            .await
            .unwrap();
        for m in notices {
            operator.publish(&m.topic, m.payload).await.unwrap();
        }
        let mut agent = agent;
        let committed = loop {
            match next(&agent).await {
                AgentEvent::RebootRequired { .. } => {
                    agent.shutdown().await;
                    let slots = Arc::new(Mutex::new(
                        FileSlots::boot(&state.path().join("slots"), 1 << 20, 1).unwrap(),
                    ));
                    agent = agent_with(slots);
                }
                AgentEvent::OtaFinished { committed, .. } => break committed,
                _ => {}
            }
        };
        assert!(committed, "{kind:?}");
        let status = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let s = jobs.campaign_status("fw-2", &registry).await.unwrap();
                if s.succeeded + s.unverified_receipt + s.failed > 0 {
                    return s;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), agent.next_event()).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            (status.succeeded, status.unverified_receipt),
            (1, 0),
            "the token's receipt verifies: {status:?}"
        );

        // The token is taken away (its store out of SoftHSM2's reach)
        // while the device is connected: the connection stays, as a TLS
        // session does without its key. A reboot then cannot connect: the
        // agent says why, and what it publishes waits in its outbox.
        let dir = token.directory().unwrap();
        let away = dir
            .parent()
            .and_then(|tokens| tokens.parent())
            .unwrap()
            .join(format!("removed-{}", token.label()));
        std::fs::rename(&dir, &away).unwrap();
        let d = agent
            .publish("status", "sent while the token is away", Qos::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(15), d.acknowledged())
            .await
            .unwrap()
            .unwrap();
        agent.shutdown().await;
        let agent = agent_with(Arc::new(Mutex::new(
            FileSlots::boot(&state.path().join("slots"), 1 << 20, 1).unwrap(),
        )));
        match next(&agent).await {
            AgentEvent::Disconnected { reason, .. } => {
                assert!(
                    reason.contains("reinsert it") || reason.contains("is inserted"),
                    "{kind:?}: {reason}"
                );
            }
            e => panic!("{kind:?}: {e:?}"),
        }
        let delivery = agent
            .publish("status", "kept while the token was away", Qos::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The token is back: the agent connects and delivers.
        std::fs::rename(&away, &dir).unwrap();
        tokio::time::timeout(Duration::from_secs(20), delivery.acknowledged())
            .await
            .expect("delivered once the token is back")
            .unwrap();
        agent.shutdown().await;
    }
}
