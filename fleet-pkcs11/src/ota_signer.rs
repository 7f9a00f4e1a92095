//! [`Pkcs11Key`] as fleet-core's Ed25519 signer: release manifests and
//! install receipts signed inside the token.

use crate::error::Pkcs11Error;
use crate::key::{Algorithm, Pkcs11Key};

impl Pkcs11Key {
    fn not_ed25519(&self) -> Pkcs11Error {
        Pkcs11Error::UnsupportedKey {
            object: self.uri().object_description(),
            key_type: "an ECDSA P-256 key where Ed25519 is needed".into(),
        }
    }
}

impl fleet_core::ota::Ed25519Signer for Pkcs11Key {
    type Error = Pkcs11Error;

    fn public_key(&self) -> Result<ed25519_dalek::VerifyingKey, Pkcs11Error> {
        if self.algorithm() != Algorithm::Ed25519 {
            return Err(self.not_ed25519());
        }
        let raw: [u8; 32] = Pkcs11Key::public_key(self)
            .try_into()
            .map_err(|_| self.not_ed25519())?;
        ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|_| self.not_ed25519())
    }

    fn sign_ed25519(&self, message: &[u8]) -> Result<[u8; 64], Pkcs11Error> {
        if self.algorithm() != Algorithm::Ed25519 {
            return Err(self.not_ed25519());
        }
        self.sign(message)?
            .try_into()
            .map_err(|_| self.not_ed25519())
    }
}
