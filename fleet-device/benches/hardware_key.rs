//! The cost of a key in a token against a key in a file, side by side:
//! a mutual-TLS handshake (TLS 1.3, ECDSA P-256 client key, in memory, so
//! only the cryptography is measured) and a provisioning by claim against
//! the embedded broker (certificate request signed by the key, then
//! `create-from-csr` and `RegisterThing`). The token is SoftHSM2.
//!
//! `cargo bench -p fleet-device --bench hardware_key`

// A benchmark fails loudly on a broken fixture.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fleet_cloud::{ProvisioningService, ProvisioningTemplate, Registry, serve};
use fleet_device::pkcs11::{Algorithm, Pkcs11Key};
use fleet_device::{ClaimConfig, ProvisionError, provision_by_claim, provision_by_claim_with_key};
use fleet_testkit::{Broker, BrokerKind, BrokerOptions, BrokerPolicy, SoftHsmToken};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

/// The token's key as rustls's (what the agent does inside fleet-device).
#[derive(Debug)]
struct TokenKey(Arc<Pkcs11Key>);

impl SigningKey for TokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TokenSigner(self.0.clone())) as Box<dyn Signer>)
    }
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct TokenSigner(Arc<Pkcs11Key>);

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign(message)
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    let mut c =
        rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().unwrap();
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().unwrap();
    }
}

fn tls(c: &mut Criterion) {
    let pki = fleet_cloud::pki::Pki::new("bench CA").unwrap();
    let server = pki.server_identity().unwrap();
    let server = Arc::new(
        fleet_cloud::tls::server_config(&server.cert_pem, &server.key_pem, Some(&pki.ca_pem()))
            .unwrap(),
    );
    // In a file.
    let device = pki.client_identity("pump-7").unwrap();
    let file = Arc::new(
        fleet_cloud::tls::client_config(&pki.ca_pem(), Some((&device.cert_pem, &device.key_pem)))
            .unwrap(),
    );
    // In the token: the certificate is issued for the token's key.
    let token = SoftHsmToken::new().unwrap();
    let key =
        Arc::new(Pkcs11Key::generate(&token.uri("device"), Algorithm::EcdsaP256Sha256).unwrap());
    let csr = {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pump-8");
        let signer = fleet_pkcs11_csr(key.clone());
        params.serialize_request(&signer).unwrap().pem().unwrap()
    };
    let (cert, _) = pki.sign_csr(&csr, 30).unwrap();
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let in_token = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Resolver(Arc::new(CertifiedKey::new(
            chain,
            Arc::new(TokenKey(key.clone())),
        ))))),
    );
    handshake(&file, &server);
    handshake(&in_token, &server);
    let file_key = rcgen::KeyPair::generate().unwrap();
    let mut g = c.benchmark_group("ecdsa_p256_signature");
    g.bench_function("key_in_file", |b| {
        b.iter(|| rcgen::SigningKey::sign(&file_key, b"a TLS 1.3 transcript hash").unwrap())
    });
    let token_key = TokenSigner(key);
    g.bench_function("key_in_softhsm", |b| {
        b.iter(|| token_key.sign(b"a TLS 1.3 transcript hash").unwrap())
    });
    g.finish();
    // Interleaved rounds, so that the machine's drift falls on both alike.
    let mut ratios = Vec::new();
    let (mut file_total, mut token_total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..15 {
        let t = std::time::Instant::now();
        for _ in 0..100 {
            handshake(&file, &server);
        }
        let f = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..100 {
            handshake(&in_token, &server);
        }
        let k = t.elapsed();
        ratios.push(k.as_secs_f64() / f.as_secs_f64());
        file_total += f;
        token_total += k;
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "interleaved mutual TLS handshakes, 15 rounds of 100 each: key in file {:.0}/s, \
         key in SoftHSM {:.0}/s; SoftHSM/file time ratio median {:.2} (min {:.2}, max {:.2})",
        1500.0 / file_total.as_secs_f64(),
        1500.0 / token_total.as_secs_f64(),
        ratios[7],
        ratios[0],
        ratios[14]
    );
    let mut g = c.benchmark_group("mutual_tls_handshake");
    g.bench_function("key_in_file", |b| b.iter(|| handshake(&file, &server)));
    g.bench_function("key_in_softhsm", |b| {
        b.iter(|| handshake(&in_token, &server))
    });
    g.finish();
}

/// The token's key as rcgen's signer, for the bench's own CSR.
fn fleet_pkcs11_csr(key: Arc<Pkcs11Key>) -> impl rcgen::SigningKey {
    struct K(Arc<Pkcs11Key>);
    impl rcgen::PublicKeyData for K {
        fn der_bytes(&self) -> &[u8] {
            self.0.public_key()
        }
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_ECDSA_P256_SHA256
        }
    }
    impl rcgen::SigningKey for K {
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
            self.0.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
        }
    }
    K(key)
}

fn provisioning(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let registry = Registry::in_memory().unwrap();
    let broker = Broker::start_with(BrokerOptions {
        kind: BrokerKind::Embedded,
        policy: BrokerPolicy {
            claim_identities: vec!["claim@factory".into()],
            ..BrokerPolicy::default()
        },
        registry: Some(registry.clone()),
        ..BrokerOptions::default()
    })
    .unwrap();
    let mut service = ProvisioningService::new(
        broker.pki().clone(),
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
    service.claim_identities = vec!["claim@factory".into()];
    let _cloud = serve(
        broker.backend_config("cloud").unwrap(),
        fleet_cloud::Services::new().with(service),
        fleet_cloud::ServeOptions::default(),
    )
    .unwrap();
    let claim = broker.claim_identity("claim@factory").unwrap();
    let token = SoftHsmToken::new().unwrap();
    let key: Arc<dyn fleet_device::DeviceKey> =
        Arc::new(Pkcs11Key::generate(&token.uri("device"), Algorithm::EcdsaP256Sha256).unwrap());
    let serial = AtomicU64::new(0);
    let dirs = tempfile::tempdir().unwrap();
    let config = || {
        let n = serial.fetch_add(1, Ordering::Relaxed);
        ClaimConfig {
            host: "localhost".into(),
            port: broker.port(),
            claim_cert_pem: claim.cert_pem.clone(),
            claim_key_pem: claim.key_pem.clone(),
            ca_pem: broker.pki().ca_pem(),
            template: "factory".into(),
            parameters: BTreeMap::from([("SerialNumber".to_string(), n.to_string())]),
            thing_name: format!("pump-{n}"),
            state_dir: dirs.path().join(n.to_string()),
            timeout: Duration::from_secs(10),
            protocol: Default::default(),
        }
    };
    // The service is up once a first provisioning is answered.
    rt.block_on(async {
        for _ in 0..50 {
            let mut c = config();
            c.timeout = Duration::from_millis(500);
            match provision_by_claim(&c).await {
                Err(ProvisionError::Network(_)) => continue,
                other => {
                    other.unwrap();
                    break;
                }
            }
        }
    });
    let mut ratios = Vec::new();
    let (mut file_total, mut token_total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..15 {
        let t = std::time::Instant::now();
        for _ in 0..10 {
            rt.block_on(provision_by_claim(&config())).unwrap();
        }
        let f = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..10 {
            rt.block_on(provision_by_claim_with_key(&config(), key.clone()))
                .unwrap();
        }
        let k = t.elapsed();
        ratios.push(k.as_secs_f64() / f.as_secs_f64());
        file_total += f;
        token_total += k;
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "interleaved provisioning by claim, 15 rounds of 10 each: key in file {:.2} ms, \
         key in SoftHSM {:.2} ms each; SoftHSM/file time ratio median {:.2} (min {:.2}, max {:.2})",
        file_total.as_secs_f64() * 1000.0 / 150.0,
        token_total.as_secs_f64() * 1000.0 / 150.0,
        ratios[7],
        ratios[0],
        ratios[14]
    );
    let mut g = c.benchmark_group("provisioning_by_claim");
    g.sample_size(30);
    g.bench_function("key_in_file", |b| {
        b.iter(|| rt.block_on(provision_by_claim(&config())).unwrap())
    });
    g.bench_function("key_in_softhsm", |b| {
        b.iter(|| {
            rt.block_on(provision_by_claim_with_key(&config(), key.clone()))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, tls, provisioning);
criterion_main!(benches);
