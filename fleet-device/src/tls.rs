//! Every rustls configuration of the device agent, built from PEM here and
//! nowhere else: the device's own session (a PEM key, or a key held
//! elsewhere behind [`DeviceKey`](crate::DeviceKey)) and the claim session
//! of provisioning.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::agent::{AgentError, KeySource};
use crate::key::Resolver;

/// TLS for a client with a PEM identity (the claim session uses it).
pub(crate) fn client_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, AgentError> {
    tls_config(ca_pem, cert_pem, &KeySource::Pem(key_pem.into()))
}

pub(crate) fn tls_config(
    ca_pem: &str,
    cert_pem: &str,
    key: &KeySource,
) -> Result<rustls::ClientConfig, AgentError> {
    let bad = |e: &dyn fmt::Display| AgentError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(AgentError::Tls("no trust anchor in the CA PEM".into()));
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if chain.is_empty() {
        return Err(AgentError::Tls(
            "no certificate in the certificate PEM".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots);
    match key {
        KeySource::Pem(pem) => {
            let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(&e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(&e))
        }
        KeySource::Custom(key) => {
            Ok(builder.with_client_cert_resolver(Arc::new(Resolver::new(chain, key.clone()))))
        }
    }
}
