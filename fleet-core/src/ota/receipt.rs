//! Signed install receipts: what a device actually installed.

use ed25519_dalek::{Signature, VerifyingKey};

use super::error::{Malformed, OtaError};
use super::signer::{Ed25519Signer, SignError};

/// Magic bytes of a receipt.
pub const RECEIPT_MAGIC: &[u8; 4] = b"FLI1";
/// Largest job nonce in a receipt.
pub const MAX_NONCE_LEN: usize = 32;

/// How an update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstallOutcome {
    /// The new image runs and is confirmed.
    Committed,
    /// The device went back to the previous image.
    RolledBack,
}

/// What a device states about an update, signed with its own identity
/// key so the cloud can check what was actually installed.
///
/// # Format
/// `FLI1`, manifest digest (32), outcome (1: committed, 2: rolled back),
/// installed sequence (u64 LE), nonce length (u8, at most 32) and the job's
/// nonce; the signed receipt appends the Ed25519 signature (64) over all of
/// that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallReceipt<'a> {
    /// SHA-256 of the manifest envelope the device acted on.
    pub manifest_digest: [u8; 32],
    /// How it ended.
    pub outcome: InstallOutcome,
    /// The sequence installed now (the new one, or the old after a rollback).
    pub installed_sequence: u64,
    /// The nonce the job carried, binding the receipt to it.
    pub nonce: &'a [u8],
}

const BODY_FIXED: usize = 4 + 32 + 1 + 8 + 1;

/// Largest signed receipt, bytes.
pub const MAX_RECEIPT_LEN: usize = BODY_FIXED + MAX_NONCE_LEN + 64;

impl<'a> InstallReceipt<'a> {
    fn body(&self, out: &mut [u8; MAX_RECEIPT_LEN]) -> Result<usize, OtaError> {
        if self.nonce.len() > MAX_NONCE_LEN {
            return Err(Malformed::TooLarge.into());
        }
        out[..4].copy_from_slice(RECEIPT_MAGIC);
        out[4..36].copy_from_slice(&self.manifest_digest);
        out[36] = match self.outcome {
            InstallOutcome::Committed => 1,
            InstallOutcome::RolledBack => 2,
        };
        out[37..45].copy_from_slice(&self.installed_sequence.to_le_bytes());
        out[45] = self.nonce.len() as u8;
        out[BODY_FIXED..BODY_FIXED + self.nonce.len()].copy_from_slice(self.nonce);
        Ok(BODY_FIXED + self.nonce.len())
    }

    /// Signs the receipt with the device's key into `out`; returns the
    /// length written.
    pub fn sign(
        &self,
        key: &ed25519_dalek::SigningKey,
        out: &mut [u8; MAX_RECEIPT_LEN],
    ) -> Result<usize, OtaError> {
        self.sign_with(key, out).map_err(|e| match e {
            SignError::Invalid(e) => e,
            SignError::Signer(never) => match never {},
        })
    }

    /// Signs the receipt with a key that may live elsewhere (a secure
    /// element, a PKCS#11 token) into `out`; returns the length written.
    pub fn sign_with<S: Ed25519Signer + ?Sized>(
        &self,
        key: &S,
        out: &mut [u8; MAX_RECEIPT_LEN],
    ) -> Result<usize, SignError<S::Error>> {
        let len = self.body(out).map_err(SignError::Invalid)?;
        let sig = key.sign_ed25519(&out[..len]).map_err(SignError::Signer)?;
        out[len..len + 64].copy_from_slice(&sig);
        Ok(len + 64)
    }

    /// Checks a signed receipt against the device's public key and decodes it.
    pub fn verify(signed: &'a [u8], device_key: &VerifyingKey) -> Result<Self, OtaError> {
        if signed.len() < BODY_FIXED + 64 || signed.len() > MAX_RECEIPT_LEN {
            return Err(Malformed::Truncated.into());
        }
        let (body, sig) = signed.split_at(signed.len() - 64);
        if &body[..4] != RECEIPT_MAGIC {
            return Err(Malformed::BadMagic.into());
        }
        let nonce_len = usize::from(body[45]);
        if body.len() != BODY_FIXED + nonce_len {
            return Err(Malformed::FieldLength { tag: 0 }.into());
        }
        let mut s = [0u8; 64];
        s.copy_from_slice(sig);
        device_key
            .verify_strict(body, &Signature::from_bytes(&s))
            .map_err(|_| OtaError::BadSignature)?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&body[4..36]);
        let outcome = match body[36] {
            1 => InstallOutcome::Committed,
            2 => InstallOutcome::RolledBack,
            _ => return Err(Malformed::FieldLength { tag: 0 }.into()),
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&body[37..45]);
        Ok(Self {
            manifest_digest: digest,
            outcome,
            installed_sequence: u64::from_le_bytes(seq),
            nonce: &body[BODY_FIXED..],
        })
    }
}
