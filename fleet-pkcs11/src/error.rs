//! What can go wrong with a token, each case saying what to fix.

use std::fmt;
use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

use crate::uri::UriError;

/// Why a token refuses its user until an administrator acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockReason {
    /// Too many wrong PINs (`CKR_PIN_LOCKED`).
    PinLocked,
    /// The PIN has expired (`CKR_PIN_EXPIRED`).
    PinExpired,
    /// The token's user PIN was never set (`CKR_USER_PIN_NOT_INITIALIZED`).
    PinNotInitialized,
}

/// A PKCS#11 failure, typed by what the operator must do about it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Pkcs11Error {
    /// The URI is malformed.
    Uri(UriError),
    /// The URI names no `module-path` and none was configured.
    NoModule,
    /// The module could not be loaded (missing file, not a PKCS#11 library).
    ModuleLoad {
        /// The module's path.
        path: PathBuf,
        /// The loader's or module's error.
        source: CkError,
    },
    /// No token matches the URI.
    TokenNotFound {
        /// What the URI asked for.
        wanted: String,
        /// The labels of the tokens the module has.
        available: Vec<String>,
    },
    /// The PIN could not be read from where the URI says.
    PinUnreadable {
        /// Where it was looked for.
        source_description: String,
        /// The I/O error, if any.
        source: Option<std::io::Error>,
    },
    /// The token refused the PIN.
    WrongPin {
        /// The token.
        token: String,
    },
    /// The token refuses its user until a security officer acts.
    TokenLocked {
        /// The token.
        token: String,
        /// Why.
        reason: LockReason,
    },
    /// No key object matches the URI.
    ObjectNotFound {
        /// The token.
        token: String,
        /// What the URI asked for.
        object: String,
    },
    /// A key with that label or id already exists (refused by `generate`).
    ObjectExists {
        /// The token.
        token: String,
        /// The object.
        object: String,
    },
    /// The key is of a type fleet does not sign with.
    UnsupportedKey {
        /// The object.
        object: String,
        /// Its type, as the token reports it.
        key_type: String,
    },
    /// The token went away (removed, or its sessions were closed); the key
    /// works again once the token is back.
    TokenRemoved {
        /// The token.
        token: String,
        /// The module's error.
        source: CkError,
    },
    /// Another failure of the module on `operation`.
    Module {
        /// What was being done.
        operation: &'static str,
        /// The module's error.
        source: CkError,
    },
}

impl fmt::Display for Pkcs11Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uri(e) => e.fmt(f),
            Self::NoModule => f.write_str(
                "no PKCS#11 module: add module-path=/path/to/module.so to the pkcs11: URI",
            ),
            Self::ModuleLoad { path, source } => write!(
                f,
                "PKCS#11 module {} could not be loaded ({source}): check the path and that it is the token's PKCS#11 library",
                path.display()
            ),
            Self::TokenNotFound { wanted, available } => write!(
                f,
                "no {wanted} in the PKCS#11 module (it has: {}): check the token= of the URI and that the token is inserted",
                if available.is_empty() {
                    "no initialized token".to_string()
                } else {
                    available.join(", ")
                }
            ),
            Self::PinUnreadable {
                source_description,
                source,
            } => {
                write!(
                    f,
                    "the token's PIN could not be read from {source_description}"
                )?;
                if let Some(e) = source {
                    write!(f, " ({e})")?;
                }
                Ok(())
            }
            Self::WrongPin { token } => write!(
                f,
                "{token} refused the PIN: check the file or variable of the URI's pin-source"
            ),
            Self::TokenLocked { token, reason } => match reason {
                LockReason::PinLocked => write!(
                    f,
                    "{token} is locked after too many wrong PINs: its security officer must unlock it"
                ),
                LockReason::PinExpired => {
                    write!(f, "{token}'s PIN has expired: set a new one (C_SetPIN)")
                }
                LockReason::PinNotInitialized => write!(
                    f,
                    "{token} has no user PIN yet: its security officer must set one (C_InitPIN)"
                ),
            },
            Self::ObjectNotFound { token, object } => write!(
                f,
                "{token} holds no key with {object}: check object= or id= of the URI, or generate the key"
            ),
            Self::ObjectExists { token, object } => write!(
                f,
                "{token} already holds a key with {object}: use it, or choose another label"
            ),
            Self::UnsupportedKey { object, key_type } => write!(
                f,
                "the key with {object} is {key_type}: fleet signs with ECDSA P-256 or Ed25519 keys"
            ),
            Self::TokenRemoved { token, source } => write!(
                f,
                "{token} is not available ({source}): reinsert it; the key is used again once it is back"
            ),
            Self::Module { operation, source } => {
                write!(f, "PKCS#11 {operation} failed: {source}")
            }
        }
    }
}

impl std::error::Error for Pkcs11Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Uri(e) => Some(e),
            Self::ModuleLoad { source, .. }
            | Self::TokenRemoved { source, .. }
            | Self::Module { source, .. } => Some(source),
            Self::PinUnreadable {
                source: Some(e), ..
            } => Some(e),
            _ => None,
        }
    }
}

impl From<UriError> for Pkcs11Error {
    fn from(e: UriError) -> Self {
        Self::Uri(e)
    }
}

impl Pkcs11Error {
    /// Whether the token may come back (a removal), so a caller retries
    /// later rather than giving up.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::TokenRemoved { .. } | Self::TokenNotFound { .. })
    }

    /// Classifies a module error on `token` during `operation`.
    pub(crate) fn classify(token: &str, operation: &'static str, e: CkError) -> Self {
        let rv = match &e {
            CkError::Pkcs11(rv, _) => *rv,
            _ => {
                return Self::Module {
                    operation,
                    source: e,
                };
            }
        };
        let token = token.to_string();
        match rv {
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange => {
                Self::WrongPin { token }
            }
            RvError::PinLocked => Self::TokenLocked {
                token,
                reason: LockReason::PinLocked,
            },
            RvError::PinExpired => Self::TokenLocked {
                token,
                reason: LockReason::PinExpired,
            },
            RvError::UserPinNotInitialized => Self::TokenLocked {
                token,
                reason: LockReason::PinNotInitialized,
            },
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceError
            | RvError::SlotIdInvalid
            // The key vanished under an open session: SoftHSM2 (and
            // tokens whose objects live in files) report a token taken
            // away this way.
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            // The module was started again under a session (after a
            // removal): the next attempt opens a fresh one.
            | RvError::CryptokiNotInitialized => Self::TokenRemoved { token, source: e },
            _ => Self::Module {
                operation,
                source: e,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn module_codes_become_what_to_fix() {
        let e = |rv| CkError::Pkcs11(rv, Function::Login);
        assert!(matches!(
            Pkcs11Error::classify("t", "login", e(RvError::PinIncorrect)),
            Pkcs11Error::WrongPin { .. }
        ));
        // SoftHSM2 has no retry counter, so a real lock-out is shown here.
        let locked = Pkcs11Error::classify("token \"t\"", "login", e(RvError::PinLocked));
        assert!(matches!(
            locked,
            Pkcs11Error::TokenLocked {
                reason: LockReason::PinLocked,
                ..
            }
        ));
        assert!(locked.to_string().contains("security officer must unlock"));
        let gone = Pkcs11Error::classify("t", "sign", e(RvError::DeviceRemoved));
        assert!(gone.is_transient() && matches!(gone, Pkcs11Error::TokenRemoved { .. }));
        assert!(matches!(
            Pkcs11Error::classify("t", "sign", e(RvError::MechanismInvalid)),
            Pkcs11Error::Module { .. }
        ));
    }
}
