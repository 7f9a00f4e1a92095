//! A private key that signs without leaving its hardware.

use std::fmt;
use std::sync::Arc;

use crate::FleetError;

/// The signature algorithm of a [`DeviceKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256, signature ASN.1 DER encoded.
    EcdsaP256Sha256,
    /// Ed25519, 64-byte signature.
    Ed25519,
}

/// A key in a TPM, HSM or secure element, implemented by the application:
/// the TLS handshake asks it to sign once per connection.
#[uniffi::export(with_foreign)]
pub trait DeviceKey: Send + Sync {
    /// Its algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// Signs `message` (hashing it as the algorithm says).
    fn sign(&self, message: Vec<u8>) -> Result<Vec<u8>, FleetError>;
}

/// The foreign key as `fleet_device`'s.
pub(crate) struct KeyAdapter(pub(crate) Arc<dyn DeviceKey>);

impl fmt::Debug for KeyAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("algorithm", &self.0.algorithm())
            .finish()
    }
}

impl fleet_device::DeviceKey for KeyAdapter {
    fn algorithm(&self) -> fleet_device::KeyAlgorithm {
        match self.0.algorithm() {
            KeyAlgorithm::EcdsaP256Sha256 => fleet_device::KeyAlgorithm::EcdsaP256Sha256,
            KeyAlgorithm::Ed25519 => fleet_device::KeyAlgorithm::Ed25519,
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, fleet_device::KeyError> {
        self.0
            .sign(message.to_vec())
            .map_err(fleet_device::KeyError::from_source)
    }
}

/// Opens the key a `pkcs11:` URI names.
pub(crate) fn open_pkcs11(uri: &str) -> Result<Arc<fleet_device::pkcs11::Pkcs11Key>, FleetError> {
    let uri: fleet_device::pkcs11::Pkcs11Uri = uri.parse().map_err(FleetError::invalid)?;
    Ok(Arc::new(fleet_device::pkcs11::Pkcs11Key::open(&uri)?))
}

/// Generates a key pair inside the PKCS#11 token a `pkcs11:` URI names
/// (under its `object=` label; the private key is not extractable) and
/// returns its raw public key: the uncompressed P-256 point (65 bytes) or
/// the Ed25519 key (32 bytes, what the fleet registers as `receiptKey`).
/// Refused if the token already holds a key by that label.
#[uniffi::export]
pub fn pkcs11_generate_key(uri: String, algorithm: KeyAlgorithm) -> Result<Vec<u8>, FleetError> {
    let uri: fleet_device::pkcs11::Pkcs11Uri = uri.parse().map_err(FleetError::invalid)?;
    let algorithm = match algorithm {
        KeyAlgorithm::EcdsaP256Sha256 => fleet_device::pkcs11::Algorithm::EcdsaP256Sha256,
        KeyAlgorithm::Ed25519 => fleet_device::pkcs11::Algorithm::Ed25519,
    };
    let key = fleet_device::pkcs11::Pkcs11Key::generate(&uri, algorithm)?;
    Ok(key.public_key().to_vec())
}

/// The raw public key of the key a `pkcs11:` URI names.
#[uniffi::export]
pub fn pkcs11_public_key(uri: String) -> Result<Vec<u8>, FleetError> {
    Ok(open_pkcs11(&uri)?.public_key().to_vec())
}
