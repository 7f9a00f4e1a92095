//! The device's private key, wherever it lives: in a PEM file, or in a
//! secure element, TPM or HSM that signs but never hands the key out.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

/// The signature algorithm of a [`DeviceKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256; the signature is ASN.1 DER encoded (as
    /// PKCS#11 `CKM_ECDSA_SHA256` output converted to DER, or a TPM's).
    EcdsaP256Sha256,
    /// Ed25519 (64-byte signature).
    Ed25519,
}

/// A signing failure in the key's own terms (a locked token, a busy TPM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device key: {}", self.0)
    }
}

impl std::error::Error for KeyError {}

/// A private key that signs on request: the TLS handshake asks it to sign
/// its transcript once per connection. Implement it over PKCS#11, a TPM or
/// a secure element; the private key never needs to leave it.
///
/// ```
/// use fleet_device::{DeviceKey, KeyAlgorithm, KeyError};
///
/// #[derive(Debug)]
/// struct Tpm { /* a handle to the TPM key */ }
///
/// impl DeviceKey for Tpm {
///     fn algorithm(&self) -> KeyAlgorithm {
///         KeyAlgorithm::EcdsaP256Sha256
///     }
///     fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
///         // hash `message` with SHA-256 and ask the TPM to sign it
///         # let _ = message;
///         Err(KeyError("not wired to a TPM in this example".into()))
///     }
/// }
/// ```
pub trait DeviceKey: fmt::Debug + Send + Sync + 'static {
    /// The key's algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// Signs `message` (hashing it as the algorithm says).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError>;
}

#[derive(Debug)]
struct KeyAdapter(Arc<dyn DeviceKey>);

impl KeyAdapter {
    fn scheme(&self) -> SignatureScheme {
        match self.0.algorithm() {
            KeyAlgorithm::EcdsaP256Sha256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            KeyAlgorithm::Ed25519 => SignatureScheme::ED25519,
        }
    }
}

impl SigningKey for KeyAdapter {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.scheme();
        offered.contains(&scheme).then(|| {
            Box::new(SignerAdapter {
                key: self.0.clone(),
                scheme,
            }) as Box<dyn Signer>
        })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.0.algorithm() {
            KeyAlgorithm::EcdsaP256Sha256 => SignatureAlgorithm::ECDSA,
            KeyAlgorithm::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

#[derive(Debug)]
struct SignerAdapter {
    key: Arc<dyn DeviceKey>,
    scheme: SignatureScheme,
}

impl Signer for SignerAdapter {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .sign(message)
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Always offers the one certificate and its key.
#[derive(Debug)]
pub(crate) struct Resolver(Arc<CertifiedKey>);

impl Resolver {
    pub(crate) fn new(chain: Vec<CertificateDer<'static>>, key: Arc<dyn DeviceKey>) -> Self {
        Self(Arc::new(CertifiedKey::new(
            chain,
            Arc::new(KeyAdapter(key)),
        )))
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Offer the certificate only if the server accepts our scheme.
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
