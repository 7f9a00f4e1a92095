//! Signed over-the-air updates: manifests, trust roots, streaming image
//! verification, the A/B update state machine and install receipts.
//!
//! The threats are those TUF, Uptane and IETF SUIT (RFC 9019, RFC 9124)
//! defend against: a forged or altered manifest or image, an old manifest
//! replayed to roll a device back, a compromised single key (k-of-n
//! thresholds and root rotation), an image for other hardware, a stale
//! manifest (expiry), and bricking by power loss (A/B slots, persisted
//! progress, trial boot with automatic rollback).
//!
//! Verification of a manifest and of an image needs no allocator, and the
//! formats are simple length-prefixed binary that a firmware team can read
//! by hand (see [`Manifest`], [`Envelope`], [`TrustRoot`]).
//!
//! ```
//! use fleet_core::ota::{DeviceProfile, ImageVerifier, ManifestBuilder, Role, TrustRoot,
//!                       TrustRootBuilder, sign_envelope, MANIFEST_PAYLOAD_TYPE};
//! use ed25519_dalek::SigningKey;
//! use sha2::{Digest, Sha256};
//!
//! // Release engineering: one key for roots and manifests (use more in production).
//! let key = SigningKey::from_bytes(&[1; 32]);
//! let root = TrustRoot::parse(&TrustRootBuilder::new(1)
//!     .key(&key.verifying_key(), &[Role::Root, Role::Targets]).build())?;
//! let image = b"new firmware";
//! let manifest = ManifestBuilder::new("fw", "2.0", 7, image.len() as u64, Sha256::digest(image).into())
//!     .hardware_id("board-c").build();
//! let envelope = sign_envelope(MANIFEST_PAYLOAD_TYPE, &manifest, &[&key]);
//!
//! // On the device: check the manifest, then the image as it streams in.
//! let device = DeviceProfile { hardware_id: "board-c", installed_sequence: 6,
//!                              max_image_size: 1 << 20, now: None };
//! let m = root.verify_manifest(&envelope, &device)?;
//! let mut v = ImageVerifier::new(m.size, m.digest);
//! v.update(image)?;
//! v.finish()?;
//! # Ok::<(), fleet_core::ota::OtaError>(())
//! ```

#[cfg(feature = "alloc")]
mod download;
mod envelope;
mod error;
mod image;
mod manifest;
mod receipt;
mod root;
mod signer;
#[cfg(test)]
mod tests;
#[cfg(feature = "std")]
pub mod tools;
mod update;
mod wire;

#[cfg(feature = "alloc")]
pub use download::{BlockDownload, DownloadConfig, DownloadError, DownloadEvent};
pub use envelope::{
    ENVELOPE_MAGIC, Envelope, KeyId, MAX_PAYLOAD_LEN, MAX_PAYLOAD_TYPE_LEN, MAX_SIGNATURES,
};
#[cfg(feature = "alloc")]
pub use envelope::{sign_envelope, sign_envelope_with};
pub use error::{Malformed, OtaError};
pub use image::ImageVerifier;
#[cfg(feature = "alloc")]
pub use manifest::ManifestBuilder;
pub use manifest::{
    MANIFEST_MAGIC, MANIFEST_PAYLOAD_TYPE, MAX_HARDWARE_IDS, MAX_LOCATIONS, MAX_MANIFEST_LEN,
    Manifest,
};
pub use receipt::{InstallOutcome, InstallReceipt, MAX_NONCE_LEN, MAX_RECEIPT_LEN, RECEIPT_MAGIC};
#[cfg(feature = "alloc")]
pub use root::TrustRootBuilder;
pub use root::{DeviceProfile, MAX_KEYS, ROOT_MAGIC, ROOT_PAYLOAD_TYPE, Role, TrustRoot};
pub use signer::{Ed25519Signer, SignError};
pub use update::{
    OtaAction, OtaConfig, OtaEvent, OtaPhase, OtaUpdate, ProgressRecord, RECORD_LEN, Slot,
};
