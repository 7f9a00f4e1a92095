//! Why the shadow service rejects a request, with AWS's codes and messages.

use core::fmt;

/// Why a shadow request was rejected. Each maps to the HTTP-style `code`
/// and the `message` that AWS IoT puts in a `/rejected` reply.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowError {
    /// 400: the payload is not JSON, or not a JSON object.
    InvalidJson,
    /// 400: an update has no `state` node.
    MissingState,
    /// 400: `state` is neither an object nor `null`.
    StateNotObject,
    /// 400: `state.desired` is neither an object nor `null`.
    DesiredNotObject,
    /// 400: `state.reported` is neither an object nor `null`.
    ReportedNotObject,
    /// 400: `version` is not a non-negative integer.
    InvalidVersion,
    /// 400: `clientToken` is not a string of at most 64 bytes.
    InvalidClientToken,
    /// 400: `desired` or `reported` nests deeper than allowed.
    TooDeep {
        /// The deepest nesting allowed.
        max: usize,
    },
    /// 400: an array in the state contains `null`.
    NullInArray,
    /// 400: `state` has a node other than `desired` and `reported`
    /// ([`Rejection::subject`](super::Rejection::subject) names it).
    InvalidNode,
    /// 404: the shadow does not exist
    /// ([`Rejection::subject`](super::Rejection::subject) names it).
    NotFound,
    /// 409: the request's `version` is not the shadow's current version.
    VersionConflict,
    /// 413: the request, or `desired` plus `reported` after it, is too large.
    PayloadTooLarge,
    /// 415: the payload is not UTF-8.
    UnsupportedEncoding,
    /// 429: too many requests in flight.
    Throttled,
    /// 500: the service failed (a store error, say); the request may be retried.
    Internal,
}

impl ShadowError {
    /// The HTTP-style status code of the `/rejected` reply.
    pub fn code(&self) -> u16 {
        match self {
            Self::InvalidJson
            | Self::MissingState
            | Self::StateNotObject
            | Self::DesiredNotObject
            | Self::ReportedNotObject
            | Self::InvalidVersion
            | Self::InvalidClientToken
            | Self::TooDeep { .. }
            | Self::NullInArray
            | Self::InvalidNode => 400,
            Self::NotFound => 404,
            Self::VersionConflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedEncoding => 415,
            Self::Throttled => 429,
            Self::Internal => 500,
        }
    }

    /// The `message` of the `/rejected` reply, worded as AWS IoT words it,
    /// without the name of what it is about:
    /// [`Rejection::message`](super::Rejection::message) adds that.
    pub fn message(&self) -> &'static str {
        match self {
            Self::InvalidJson => "Invalid JSON",
            Self::MissingState => "Missing required node: state",
            Self::StateNotObject => "State node must be an object",
            Self::DesiredNotObject => "Desired node must be an object",
            Self::ReportedNotObject => "Reported node must be an object",
            Self::InvalidVersion => "Invalid version",
            Self::InvalidClientToken => "Invalid clientToken",
            Self::TooDeep { .. } => "JSON contains too many levels of nesting",
            Self::NullInArray => "State contains an invalid node: arrays may not contain null",
            Self::InvalidNode => "State contains an invalid node",
            Self::NotFound => "No shadow exists",
            Self::VersionConflict => "Version conflict",
            Self::PayloadTooLarge => "The payload exceeds the maximum size allowed",
            Self::UnsupportedEncoding => {
                "Unsupported documented encoding; supported encoding is UTF-8"
            }
            Self::Throttled => "Too many requests",
            Self::Internal => "Internal service failure",
        }
    }

    /// The error a `/rejected` reply with this `code` stands for, as far as a
    /// client needs to know (several 400s share a code).
    pub fn from_code(code: u16) -> Self {
        match code {
            404 => Self::NotFound,
            409 => Self::VersionConflict,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedEncoding,
            429 => Self::Throttled,
            400..=499 => Self::InvalidJson,
            _ => Self::Internal,
        }
    }

    /// Whether sending the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled | Self::Internal)
    }
}

impl fmt::Display for ShadowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooDeep { max } => {
                write!(f, "{} {}; maximum is {max}", self.code(), self.message())
            }
            _ => write!(f, "{} {}", self.code(), self.message()),
        }
    }
}

impl core::error::Error for ShadowError {}
