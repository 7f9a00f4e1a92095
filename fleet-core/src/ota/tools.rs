//! Tooling for release engineers and the `fleet` CLI (std): keys, signed
//! manifests for image files, signed trust roots.

use std::io::Read;
use std::path::Path;
use std::vec::Vec;

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use super::envelope::sign_envelope;
use super::manifest::{MANIFEST_PAYLOAD_TYPE, ManifestBuilder};
use super::root::{ROOT_PAYLOAD_TYPE, TrustRootBuilder};

/// A new Ed25519 signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey, getrandom::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Size and SHA-256 of a file, read in 64 KiB chunks.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize().into()))
}

/// Fills in the size and digest of the image at `path`: start from
/// `ManifestBuilder::new(component, version, sequence, 0, [0; 32])` and let
/// this set the rest.
pub fn manifest_for_file(
    path: &Path,
    component: &str,
    version: &str,
    sequence: u64,
) -> std::io::Result<ManifestBuilder> {
    let (size, digest) = hash_file(path)?;
    Ok(ManifestBuilder::new(
        component, version, sequence, size, digest,
    ))
}

/// Signs a manifest payload into an envelope.
pub fn sign_manifest(manifest: &ManifestBuilder, keys: &[&SigningKey]) -> Vec<u8> {
    sign_envelope(MANIFEST_PAYLOAD_TYPE, &manifest.build(), keys)
}

/// Signs a trust root into an envelope. For a rotation, `keys` must
/// include a threshold of the old root's root keys and of the new one's.
pub fn sign_root(root: &TrustRootBuilder, keys: &[&SigningKey]) -> Vec<u8> {
    sign_envelope(ROOT_PAYLOAD_TYPE, &root.build(), keys)
}
