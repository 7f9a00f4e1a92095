//! Job documents: opaque JSON, or a typed OTA operation.

use alloc::string::String;
use alloc::vec::Vec;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ota::{MAX_NONCE_LEN, MAX_PAYLOAD_LEN};

/// The `operation` of an OTA job document.
pub const OTA_OPERATION: &str = "fleet.ota";

/// Where a device fetches an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImageSource {
    /// An MQTT file stream (`$aws/things/{thing}/streams/{id}/...`).
    Stream(String),
    /// An HTTPS URL.
    Url(String),
}

/// A job that installs a signed release:
/// `{"operation": "fleet.ota", "manifest": base64(envelope), "image": {"stream": id} | {"url": u}, "nonce": base64(bytes)}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OtaJob {
    /// Always [`OTA_OPERATION`].
    pub operation: String,
    /// The signed manifest envelope, base64.
    pub manifest: String,
    /// Where the image is.
    pub image: ImageSource,
    /// A nonce the install receipt must carry, base64 (at most 32 bytes).
    pub nonce: String,
}

/// Why a job document was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DocumentError {
    /// An OTA document without the fields it needs.
    InvalidOtaJob,
    /// The manifest or nonce is not base64, or too long.
    BadEncoding,
}

impl core::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::InvalidOtaJob => "an OTA job document lacks a field it needs",
            Self::BadEncoding => "manifest or nonce is not valid base64 of the allowed size",
        })
    }
}

impl core::error::Error for DocumentError {}

impl OtaJob {
    /// An OTA job for a signed manifest envelope.
    pub fn new(envelope: &[u8], image: ImageSource, nonce: &[u8]) -> Self {
        Self {
            operation: OTA_OPERATION.into(),
            manifest: BASE64.encode(envelope),
            image,
            nonce: BASE64.encode(nonce),
        }
    }

    /// The envelope bytes (verify them with a trust root).
    pub fn manifest_bytes(&self) -> Result<Vec<u8>, DocumentError> {
        let bytes = BASE64
            .decode(&self.manifest)
            .map_err(|_| DocumentError::BadEncoding)?;
        if bytes.len() > MAX_PAYLOAD_LEN + 1024 {
            return Err(DocumentError::BadEncoding);
        }
        Ok(bytes)
    }

    /// The nonce bytes.
    pub fn nonce_bytes(&self) -> Result<Vec<u8>, DocumentError> {
        let bytes = BASE64
            .decode(&self.nonce)
            .map_err(|_| DocumentError::BadEncoding)?;
        if bytes.len() > MAX_NONCE_LEN {
            return Err(DocumentError::BadEncoding);
        }
        Ok(bytes)
    }

    /// As a job document.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// A job document as a device sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobDocument {
    /// Install a signed release.
    Ota(OtaJob),
    /// Anything else: the application's own operation.
    Other(Value),
}

impl JobDocument {
    /// Reads a document: `"operation": "fleet.ota"` must be a valid OTA
    /// job; anything else is passed through.
    pub fn parse(document: &Value) -> Result<Self, DocumentError> {
        if document.get("operation").and_then(Value::as_str) == Some(OTA_OPERATION) {
            let job: OtaJob = serde_json::from_value(document.clone())
                .map_err(|_| DocumentError::InvalidOtaJob)?;
            job.manifest_bytes()?;
            job.nonce_bytes()?;
            Ok(Self::Ota(job))
        } else {
            Ok(Self::Other(document.clone()))
        }
    }
}
