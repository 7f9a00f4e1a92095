//! The signed envelope: a typed payload and signatures over its
//! pre-authentication encoding (DSSE's PAE), so no canonical JSON is needed.

use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

use super::error::Malformed;

/// Magic bytes of an envelope.
pub const ENVELOPE_MAGIC: &[u8; 4] = b"FLE1";
/// Most signatures in one envelope.
pub const MAX_SIGNATURES: usize = 8;
/// Largest payload type, bytes.
pub const MAX_PAYLOAD_TYPE_LEN: usize = 64;
/// Largest payload, bytes.
pub const MAX_PAYLOAD_LEN: usize = 1024;
const SIGNATURE_LEN: usize = 8 + 64;
/// Room for `DSSEv1 <len> <type> <len> <body>` at the largest sizes.
const PAE_MAX: usize = 7 + 4 + MAX_PAYLOAD_TYPE_LEN + 1 + 5 + MAX_PAYLOAD_LEN;

/// Names a key: the first 8 bytes of the SHA-256 of its public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self(id)
    }
}

/// A decoded envelope, borrowing from its bytes.
///
/// # Format
/// `FLE1`, payload type length (u8) and payload type (UTF-8, at most 64
/// bytes), payload length (u16 LE) and payload (at most 1024 bytes),
/// signature count (u8, 1–8), then per signature the signer's [`KeyId`]
/// (8 bytes) and the Ed25519 signature (64 bytes) over
/// `PAE(type, payload) = "DSSEv1" SP len(type) SP type SP len(payload) SP payload`
/// (lengths in ASCII decimal), as DSSE defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// What the payload is (a manifest, a trust root).
    pub payload_type: &'a str,
    /// The signed bytes.
    pub payload: &'a [u8],
    signatures: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Decodes an envelope; checks nothing about its signatures.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let rest = bytes
            .strip_prefix(ENVELOPE_MAGIC)
            .ok_or(Malformed::BadMagic)?;
        let (&type_len, rest) = rest.split_first().ok_or(Malformed::Truncated)?;
        let type_len = usize::from(type_len);
        if type_len > MAX_PAYLOAD_TYPE_LEN {
            return Err(Malformed::TooLarge);
        }
        let (payload_type, rest) = rest
            .split_at_checked(type_len)
            .ok_or(Malformed::Truncated)?;
        let payload_type =
            core::str::from_utf8(payload_type).map_err(|_| Malformed::BadText { tag: 0 })?;
        let (len, rest) = rest.split_first_chunk::<2>().ok_or(Malformed::Truncated)?;
        let len = usize::from(u16::from_le_bytes(*len));
        if len > MAX_PAYLOAD_LEN {
            return Err(Malformed::TooLarge);
        }
        let (payload, rest) = rest.split_at_checked(len).ok_or(Malformed::Truncated)?;
        let (&count, signatures) = rest.split_first().ok_or(Malformed::Truncated)?;
        let count = usize::from(count);
        if count == 0 || count > MAX_SIGNATURES {
            return Err(Malformed::SignatureCount);
        }
        match signatures.len().cmp(&(count * SIGNATURE_LEN)) {
            core::cmp::Ordering::Less => return Err(Malformed::Truncated),
            core::cmp::Ordering::Greater => return Err(Malformed::TrailingBytes),
            core::cmp::Ordering::Equal => {}
        }
        Ok(Self {
            payload_type,
            payload,
            signatures,
        })
    }

    /// The signatures: signer id and Ed25519 signature bytes.
    pub fn signatures(&self) -> impl Iterator<Item = (KeyId, [u8; 64])> + 'a {
        self.signatures.chunks_exact(SIGNATURE_LEN).map(|c| {
            let mut id = [0u8; 8];
            id.copy_from_slice(&c[..8]);
            let mut sig = [0u8; 64];
            sig.copy_from_slice(&c[8..]);
            (KeyId(id), sig)
        })
    }

    /// Calls `f` with the PAE bytes, built on the stack.
    pub(crate) fn with_pae<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let mut buf = [0u8; PAE_MAX];
        let len = pae(self.payload_type, self.payload, &mut buf);
        f(&buf[..len])
    }
}

/// Writes `PAE(type, body)` into `out` and returns its length. `out` is
/// large enough for the limits of [`Envelope::parse`].
fn pae(payload_type: &str, body: &[u8], out: &mut [u8; PAE_MAX]) -> usize {
    struct Cursor<'b> {
        buf: &'b mut [u8],
        at: usize,
    }
    impl Cursor<'_> {
        fn put(&mut self, bytes: &[u8]) {
            let end = (self.at + bytes.len()).min(self.buf.len());
            let n = end - self.at;
            self.buf[self.at..end].copy_from_slice(&bytes[..n]);
            self.at = end;
        }
        fn put_len(&mut self, mut n: usize) {
            let mut digits = [0u8; 20];
            let mut i = digits.len();
            loop {
                i -= 1;
                digits[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            self.put(&digits[i..]);
        }
    }
    let mut c = Cursor { buf: out, at: 0 };
    c.put(b"DSSEv1 ");
    c.put_len(payload_type.len());
    c.put(b" ");
    c.put(payload_type.as_bytes());
    c.put(b" ");
    c.put_len(body.len());
    c.put(b" ");
    c.put(body);
    c.at
}

/// Signs `payload` as `payload_type` with every key in `keys` and returns
/// the envelope bytes (tooling side).
///
/// # Panics
/// If the payload type or payload is over its limit, or there are no or
/// more than 8 keys: envelopes are built by tools from bounded inputs.
#[cfg(feature = "alloc")]
pub fn sign_envelope(
    payload_type: &str,
    payload: &[u8],
    keys: &[&ed25519_dalek::SigningKey],
) -> alloc::vec::Vec<u8> {
    match sign_envelope_with(payload_type, payload, keys) {
        Ok(envelope) => envelope,
        Err(e) => match e {},
    }
}

/// As [`sign_envelope`], with signers that may live elsewhere (a release
/// key in an HSM, [`Ed25519Signer`](super::Ed25519Signer)); the first
/// signer's failure is returned and no envelope is made.
///
/// # Panics
/// As [`sign_envelope`].
#[cfg(feature = "alloc")]
pub fn sign_envelope_with<S: super::Ed25519Signer + ?Sized>(
    payload_type: &str,
    payload: &[u8],
    keys: &[&S],
) -> Result<alloc::vec::Vec<u8>, S::Error> {
    assert!(
        payload_type.len() <= MAX_PAYLOAD_TYPE_LEN,
        "payload type too long"
    );
    assert!(payload.len() <= MAX_PAYLOAD_LEN, "payload too long");
    assert!(
        !keys.is_empty() && keys.len() <= MAX_SIGNATURES,
        "1 to 8 signing keys"
    );
    let mut buf = [0u8; PAE_MAX];
    let len = pae(payload_type, payload, &mut buf);
    let mut out = ENVELOPE_MAGIC.to_vec();
    out.push(payload_type.len() as u8);
    out.extend_from_slice(payload_type.as_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
    out.push(keys.len() as u8);
    for key in keys {
        out.extend_from_slice(&KeyId::of(&key.public_key()?).0);
        out.extend_from_slice(&key.sign_ed25519(&buf[..len])?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_definition() {
        let mut buf = [0u8; PAE_MAX];
        let n = pae("http://example.com/HelloWorld", b"hello world", &mut buf);
        assert_eq!(
            &buf[..n],
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }
}
