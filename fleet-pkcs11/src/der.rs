//! The little DER fleet needs around a token: public key encodings and
//! ECDSA signatures.

use crate::key::Algorithm;

/// The raw key inside `CKA_EC_POINT`: a DER OCTET STRING (what the
/// standard says) or the bare value (what some tokens return).
pub(crate) fn unwrap_octet_string(point: &[u8], len: usize) -> Option<Vec<u8>> {
    if point.len() == len {
        return Some(point.to_vec());
    }
    match point {
        [0x04, l, rest @ ..] if usize::from(*l) == len && rest.len() == len => Some(rest.to_vec()),
        [0x04, 0x81, l, rest @ ..] if usize::from(*l) == len && rest.len() == len => {
            Some(rest.to_vec())
        }
        _ => None,
    }
}

/// `SubjectPublicKeyInfo` for the raw key.
pub(crate) fn spki(algorithm: Algorithm, key: &[u8]) -> Vec<u8> {
    let prefix: &[u8] = match algorithm {
        Algorithm::EcdsaP256Sha256 => &[
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ],
        Algorithm::Ed25519 => &[
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ],
    };
    [prefix, key].concat()
}

fn integer(bytes: &[u8], out: &mut Vec<u8>) {
    let mut b = bytes;
    while b.len() > 1 && b[0] == 0 {
        b = &b[1..];
    }
    let pad = b[0] & 0x80 != 0;
    out.push(0x02);
    out.push((b.len() + usize::from(pad)) as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(b);
}

/// PKCS#11's `r || s` (64 bytes for P-256) as the DER `ECDSA-Sig-Value`
/// X.509 and TLS carry.
pub(crate) fn ecdsa_signature(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != 64 {
        return None;
    }
    let mut body = Vec::with_capacity(72);
    integer(&raw[..32], &mut body);
    integer(&raw[32..], &mut body);
    let mut out = vec![0x30, body.len() as u8];
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_integers_are_minimal_and_positive() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[63] = 0x05; // s is 5 after stripping zeros
        let der = ecdsa_signature(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 38, 0x02, 33, 0x00]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 0x05]);
        assert!(ecdsa_signature(&raw[..63]).is_none());
        assert_eq!(unwrap_octet_string(&[0x04, 2, 7, 8], 2), Some(vec![7, 8]));
        assert_eq!(unwrap_octet_string(&[7, 8], 2), Some(vec![7, 8]));
        assert_eq!(unwrap_octet_string(&[0x04, 3, 7, 8], 2), None);
    }
}
