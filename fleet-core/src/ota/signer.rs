//! Ed25519 signers: a key in memory, or one that signs elsewhere (an HSM
//! holding a release key, a device's secure element holding its receipt
//! key) and never hands itself out.

use ed25519_dalek::VerifyingKey;

/// Makes Ed25519 signatures for envelopes ([`sign_envelope_with`]) and
/// install receipts ([`InstallReceipt::sign_with`]).
///
/// [`sign_envelope_with`]: super::sign_envelope_with
/// [`InstallReceipt::sign_with`]: super::InstallReceipt::sign_with
///
/// ```
/// use fleet_core::ota::Ed25519Signer;
/// use ed25519_dalek::SigningKey;
///
/// let key = SigningKey::from_bytes(&[7; 32]);
/// let sig = key.sign_ed25519(b"message").unwrap();
/// key.verifying_key().verify_strict(b"message", &sig.into()).unwrap();
/// ```
pub trait Ed25519Signer {
    /// Why a signature could not be made (a token that went away).
    type Error;
    /// The public half (its [`KeyId`](super::KeyId) names signatures).
    fn public_key(&self) -> Result<VerifyingKey, Self::Error>;
    /// Signs `message` (pure Ed25519, no pre-hash).
    fn sign_ed25519(&self, message: &[u8]) -> Result<[u8; 64], Self::Error>;
}

impl Ed25519Signer for ed25519_dalek::SigningKey {
    type Error = core::convert::Infallible;

    fn public_key(&self) -> Result<VerifyingKey, Self::Error> {
        Ok(self.verifying_key())
    }

    fn sign_ed25519(&self, message: &[u8]) -> Result<[u8; 64], Self::Error> {
        use ed25519_dalek::Signer;
        Ok(self.sign(message).to_bytes())
    }
}

/// A receipt or envelope that could not be signed: it was invalid, or the
/// signer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError<E> {
    /// What was to be signed is invalid.
    Invalid(super::OtaError),
    /// The signer failed.
    Signer(E),
}

impl<E: core::fmt::Display> core::fmt::Display for SignError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "{e}"),
            Self::Signer(e) => write!(f, "signing: {e}"),
        }
    }
}
