//! Streaming verification of an image against its manifest.

use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::digest::typenum::Unsigned;
use sha2::{Digest, Sha256};

use super::error::{Malformed, OtaError};

const HASH_STATE_LEN: usize =
    <<Sha256 as SerializableState>::SerializedStateSize as Unsigned>::USIZE;

/// Checks an image as it streams in: SHA-256 and length, over chunks of any
/// size, in constant memory and without an allocator.
///
/// Its state can be saved ([`save`](Self::save)) next to the bytes already
/// written and restored after a reboot ([`restore`](Self::restore)), so an
/// interrupted download resumes where it stopped without reading back what
/// was written.
///
/// ```
/// use fleet_core::ota::ImageVerifier;
/// use sha2::{Digest, Sha256};
///
/// let image = vec![0x5a; 10_000];
/// let digest: [u8; 32] = Sha256::digest(&image).into();
/// let mut v = ImageVerifier::new(image.len() as u64, digest);
/// v.update(&image[..4000])?;
/// let saved = v.save(); // ...power is lost here...
/// let mut v = ImageVerifier::restore(&saved)?;
/// assert_eq!(v.received(), 4000);
/// v.update(&image[4000..])?;
/// v.finish()?;
/// # Ok::<(), fleet_core::ota::OtaError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ImageVerifier {
    size: u64,
    digest: [u8; 32],
    received: u64,
    hasher: Sha256,
}

impl ImageVerifier {
    /// Bytes of a saved state.
    pub const SAVED_LEN: usize = 8 + 32 + 8 + HASH_STATE_LEN;

    /// A verifier for an image of `size` bytes whose SHA-256 is `digest`.
    pub fn new(size: u64, digest: [u8; 32]) -> Self {
        Self {
            size,
            digest,
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Feeds the next bytes. More bytes than declared is an error at once,
    /// before they are hashed.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), OtaError> {
        let len = chunk.len() as u64;
        if len > self.size - self.received {
            return Err(OtaError::ImageTooLong);
        }
        self.hasher.update(chunk);
        self.received += len;
        Ok(())
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.size - self.received
    }

    /// Checks the length and the digest.
    pub fn finish(self) -> Result<(), OtaError> {
        if self.received != self.size {
            return Err(OtaError::ImageTooShort);
        }
        let got: [u8; 32] = self.hasher.finalize().into();
        // Not secret: no need for constant time.
        if got != self.digest {
            return Err(OtaError::DigestMismatch);
        }
        Ok(())
    }

    /// The state, to persist with the progress of a download.
    pub fn save(&self) -> [u8; Self::SAVED_LEN] {
        let mut out = [0u8; Self::SAVED_LEN];
        out[..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..40].copy_from_slice(&self.digest);
        out[40..48].copy_from_slice(&self.received.to_le_bytes());
        out[48..].copy_from_slice(self.hasher.serialize().as_slice());
        out
    }

    /// A verifier from a saved state.
    pub fn restore(saved: &[u8; Self::SAVED_LEN]) -> Result<Self, OtaError> {
        let bad = OtaError::Malformed(Malformed::Checksum);
        let mut u = [0u8; 8];
        u.copy_from_slice(&saved[..8]);
        let size = u64::from_le_bytes(u);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&saved[8..40]);
        u.copy_from_slice(&saved[40..48]);
        let received = u64::from_le_bytes(u);
        let state = SerializedState::<Sha256>::try_from(&saved[48..]).map_err(|_| bad)?;
        let hasher = Sha256::deserialize(&state).map_err(|_| bad)?;
        if received > size {
            return Err(bad);
        }
        Ok(Self {
            size,
            digest,
            received,
            hasher,
        })
    }
}
