//! Why an OTA artefact was refused.

use core::fmt;

/// What is malformed about an envelope, manifest, trust root, receipt or
/// progress record.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// The magic bytes are missing or wrong.
    BadMagic,
    /// The input ends inside a field.
    Truncated,
    /// Bytes follow the last field.
    TrailingBytes,
    /// A field has the wrong length for its kind.
    FieldLength {
        /// The field's tag.
        tag: u8,
    },
    /// A text field is not UTF-8, empty, or too long.
    BadText {
        /// The field's tag.
        tag: u8,
    },
    /// A field that may appear once appears twice, or a list is too long.
    Repeated {
        /// The field's tag.
        tag: u8,
    },
    /// A required field is missing.
    Missing {
        /// The field's tag.
        tag: u8,
    },
    /// An unknown field that is not marked ignorable (tags below 0x80).
    UnknownField {
        /// The field's tag.
        tag: u8,
    },
    /// The input is larger than the format allows.
    TooLarge,
    /// A signature count of 0, or more than allowed.
    SignatureCount,
    /// A public key is not a valid Ed25519 point.
    BadKey,
    /// A trust root's thresholds cannot be met by its own keys, or are 0.
    BadThreshold,
    /// The checksum of a progress record does not match.
    Checksum,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("missing or wrong magic bytes"),
            Self::Truncated => f.write_str("input ends inside a field"),
            Self::TrailingBytes => f.write_str("bytes after the last field"),
            Self::FieldLength { tag } => write!(f, "field {tag} has the wrong length"),
            Self::BadText { tag } => {
                write!(f, "field {tag} is not UTF-8 text of the allowed length")
            }
            Self::Repeated { tag } => write!(f, "field {tag} appears too often"),
            Self::Missing { tag } => write!(f, "required field {tag} is missing"),
            Self::UnknownField { tag } => write!(f, "unknown required field {tag}"),
            Self::TooLarge => f.write_str("larger than the format allows"),
            Self::SignatureCount => f.write_str("no signatures, or too many"),
            Self::BadKey => f.write_str("not a valid Ed25519 public key"),
            Self::BadThreshold => f.write_str("a threshold is 0 or cannot be met by the keys"),
            Self::Checksum => f.write_str("checksum mismatch"),
        }
    }
}

impl core::error::Error for Malformed {}

/// Why an update was refused. Every failure has its own variant, so that a
/// device can report exactly what it rejected.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtaError {
    /// The input could not be decoded.
    Malformed(Malformed),
    /// The envelope carries another kind of payload than expected.
    WrongPayloadType,
    /// A signature by a trusted key does not verify: the payload or the
    /// signature was altered.
    BadSignature,
    /// The valid signatures fall short of the threshold, and some came from
    /// keys the trust root does not know.
    UnknownKey,
    /// Fewer distinct trusted keys of the needed role signed than the
    /// threshold asks (a key that signs twice counts once).
    BelowThreshold {
        /// Distinct valid signatures by keys of the role.
        have: u8,
        /// The threshold.
        need: u8,
    },
    /// The manifest's sequence is not greater than the installed one.
    Rollback {
        /// Sequence installed now.
        installed: u64,
        /// Sequence offered.
        offered: u64,
    },
    /// The device's installed sequence is below the manifest's minimum.
    BaseTooOld {
        /// Sequence installed now.
        installed: u64,
        /// Minimum the manifest asks for.
        required: u64,
    },
    /// The manifest (or trust root) expired.
    Expired,
    /// The manifest is not for this device's hardware.
    WrongHardware,
    /// The image is larger than the device can hold.
    ImageTooLarge,
    /// More image bytes arrived than the manifest declared.
    ImageTooLong,
    /// Fewer image bytes arrived than the manifest declared.
    ImageTooShort,
    /// The image's SHA-256 is not the manifest's.
    DigestMismatch,
    /// A new trust root's version is not exactly one more than the current.
    RootVersion {
        /// Current version.
        current: u64,
        /// Offered version.
        offered: u64,
    },
    /// The state machine was given an input that does not fit its state.
    UnexpectedInput,
}

impl From<Malformed> for OtaError {
    fn from(m: Malformed) -> Self {
        Self::Malformed(m)
    }
}

impl fmt::Display for OtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(m) => write!(f, "malformed input: {m}"),
            Self::WrongPayloadType => f.write_str("envelope carries another kind of payload"),
            Self::BadSignature => f.write_str("a signature by a trusted key does not verify"),
            Self::UnknownKey => f.write_str("signed by keys the trust root does not know"),
            Self::BelowThreshold { have, need } => {
                write!(f, "{have} valid signature(s) of {need} required")
            }
            Self::Rollback { installed, offered } => write!(
                f,
                "sequence {offered} is not newer than the installed {installed}"
            ),
            Self::BaseTooOld {
                installed,
                required,
            } => write!(
                f,
                "needs at least sequence {required} installed, have {installed}"
            ),
            Self::Expired => f.write_str("expired"),
            Self::WrongHardware => f.write_str("not for this hardware"),
            Self::ImageTooLarge => f.write_str("image larger than the device can hold"),
            Self::ImageTooLong => f.write_str("more image bytes than declared"),
            Self::ImageTooShort => f.write_str("fewer image bytes than declared"),
            Self::DigestMismatch => f.write_str("image digest does not match the manifest"),
            Self::RootVersion { current, offered } => write!(
                f,
                "trust root version {offered} does not follow the current {current}"
            ),
            Self::UnexpectedInput => f.write_str("input does not fit the update's state"),
        }
    }
}

impl core::error::Error for OtaError {}
