//! Every rustls configuration of the backend, built from PEM here and
//! nowhere else: the embedded broker's and the API's servers, and the
//! clients of the broker, of PostgreSQL and of the API (the `fleet`
//! command).
//!
//! All use rustls with the ring provider and its safe default protocol
//! versions (TLS 1.2 and 1.3). A CA that holds no certificate, a chain
//! without a certificate or a key that does not parse is an error, never a
//! configuration that trusts nothing or everything.
//!
//! Not a stable API: public for the `fleet` binary and the test kit.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS configuration that could not be built: what was wrong, and why.
#[derive(Debug)]
pub struct TlsError {
    what: &'static str,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TlsError {
    fn new(what: &'static str) -> Self {
        Self { what, source: None }
    }

    fn caused(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            what,
            source: Some(Box::new(e)),
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(e) => write!(f, "{}: {e}", self.what),
            None => f.write_str(self.what),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of `ca_pem` as trust anchors (at least one).
fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::caused("the CA PEM", e))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::caused("a CA certificate", e))?;
    }
    if roots.is_empty() {
        return Err(TlsError::new("the CA PEM holds no certificate"));
    }
    Ok(roots)
}

/// A certificate chain (at least one) and its private key.
fn identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::caused("the certificate PEM", e))?;
    if chain.is_empty() {
        return Err(TlsError::new("the certificate PEM holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::caused("the private key PEM", e))?;
    Ok((chain, key))
}

/// A client that trusts `ca_pem`, and presents `identity` (certificate
/// chain and key, PEM) when given one.
pub fn client_config(
    ca_pem: &str,
    identity_pem: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::caused("protocol versions", e))?
        .with_root_certificates(roots(ca_pem)?);
    match identity_pem {
        Some((cert, key)) => {
            let (chain, key) = identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::caused("the client certificate", e))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A client trusting the Web PKI's roots (Mozilla's, as `webpki-roots`
/// ships them): for an operator's HTTPS endpoint under a public CA (a
/// pre-provisioning webhook).
pub fn web_pki_client_config() -> Result<rustls::ClientConfig, TlsError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::caused("protocol versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A server presenting `cert_pem` and `key_pem`; with `client_ca_pem`,
/// every client must present a certificate that CA signed (mutual TLS).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let (chain, key) = identity(cert_pem, key_pem)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::caused("protocol versions", e))?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider,
            )
            .build()
            .map_err(|e| TlsError::caused("the client verifier", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::caused("the server certificate", e))
}

/// Why a TLS handshake failed, as a metrics label: the certificate's
/// fault (`unknown_issuer`, `expired`, `not_yet_valid`, `revoked`,
/// `bad_certificate`, `no_client_certificate`), the peer's (`incompatible`,
/// `alert_received`, `protocol`), or the connection's (`closed`, `io`).
pub(crate) fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            _ => "bad_certificate",
        },
        Some(Error::NoCertificatesPresented) => "no_client_certificate",
        Some(Error::PeerIncompatible(_)) => "incompatible",
        Some(Error::AlertReceived(_)) => "alert_received",
        Some(
            Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. }
            | Error::InvalidMessage(_)
            | Error::PeerMisbehaved(_),
        ) => "protocol",
        Some(_) => "other",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed",
        None => "io",
    }
}

/// Counts a failed TLS handshake on `listener` by its reason.
pub(crate) fn count_handshake_failure(listener: &'static str, e: &std::io::Error) {
    metrics::counter!(
        "fleet_tls_handshake_failures_total",
        "listener" => listener,
        "reason" => handshake_failure_reason(e)
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Pki;

    #[test]
    fn configurations_build_and_refuse_what_is_missing() {
        let pki = Pki::new("tls test CA").unwrap();
        let server = pki.server_identity().unwrap();
        let client = pki.client_identity("dev-a").unwrap();
        let ca = pki.ca_pem();
        assert!(server_config(&server.cert_pem, &server.key_pem, Some(&ca)).is_ok());
        assert!(server_config(&server.cert_pem, &server.key_pem, None).is_ok());
        assert!(client_config(&ca, Some((&client.cert_pem, &client.key_pem))).is_ok());
        assert!(client_config(&ca, None).is_ok());

        let e = client_config("", None).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = server_config("", &server.key_pem, None).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = server_config(&server.cert_pem, "not a key", None).unwrap_err();
        assert!(e.to_string().contains("private key"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
        // A key that is not the certificate's.
        assert!(server_config(&server.cert_pem, &client.key_pem, None).is_err());
    }
}
