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
