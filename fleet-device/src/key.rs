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

/// A signing failure in the key's own terms (a locked token, a busy TPM),
/// with the key's own error as its [`source`](std::error::Error::source).
#[derive(Debug, Clone)]
pub struct KeyError {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl KeyError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A failure caused by `source` (its message is shown).
    pub fn from_source(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            message: source.to_string(),
            source: Some(Arc::new(source)),
        }
    }

    /// What failed, for people.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device key: {}", self.message)
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

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
///         Err(KeyError::new("not wired to a TPM in this example"))
///     }
/// }
/// ```
///
/// With the `pkcs11` feature (on by default), a key in any PKCS#11 token
/// ([`fleet_pkcs11::Pkcs11Key`], addressed by a `pkcs11:` URI) is a
/// `DeviceKey`.
pub trait DeviceKey: fmt::Debug + Send + Sync + 'static {
    /// The key's algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// Signs `message` (hashing it as the algorithm says).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// The raw public key: the uncompressed P-256 point (65 bytes) or the
    /// Ed25519 key (32 bytes). Provisioning by claim needs it for the
    /// certificate request; the TLS handshake does not.
    fn public_key(&self) -> Result<Vec<u8>, KeyError> {
        Err(KeyError::new(
            "this key does not give its public key, which a certificate request needs",
        ))
    }
}

#[cfg(feature = "pkcs11")]
impl DeviceKey for fleet_pkcs11::Pkcs11Key {
    fn algorithm(&self) -> KeyAlgorithm {
        match fleet_pkcs11::Pkcs11Key::algorithm(self) {
            fleet_pkcs11::Algorithm::Ed25519 => KeyAlgorithm::Ed25519,
            _ => KeyAlgorithm::EcdsaP256Sha256,
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        fleet_pkcs11::Pkcs11Key::sign(self, message).map_err(KeyError::from_source)
    }

    fn public_key(&self) -> Result<Vec<u8>, KeyError> {
        Ok(fleet_pkcs11::Pkcs11Key::public_key(self).to_vec())
    }
}

/// A [`DeviceKey`] as rcgen's signer, so a certificate request is signed
/// by the key wherever it lives.
pub(crate) struct CsrSigner {
    key: Arc<dyn DeviceKey>,
    public: Vec<u8>,
    error: std::sync::Mutex<Option<KeyError>>,
}

impl CsrSigner {
    pub(crate) fn new(key: Arc<dyn DeviceKey>) -> Result<Self, KeyError> {
        let public = key.public_key()?;
        Ok(Self {
            key,
            public,
            error: std::sync::Mutex::new(None),
        })
    }

    /// The key's own failure behind rcgen's `RemoteKeyError`.
    pub(crate) fn take_error(&self) -> Option<KeyError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl rcgen::PublicKeyData for CsrSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.key.algorithm() {
            KeyAlgorithm::EcdsaP256Sha256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

impl rcgen::SigningKey for CsrSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign(msg).map_err(|e| {
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
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
