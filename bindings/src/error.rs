//! The one error type foreign callers see.

use std::fmt;

use fleet_device::provision::ProvisionError;
use fleet_device::{AgentError, NameError};

/// Why a call failed: one variant per thing the caller can do about it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Error)]
pub enum FleetError {
    /// An argument is wrong (a name, a PEM, JSON that is not an object, a
    /// key of the wrong length): fix it; retrying will not help.
    InvalidArgument { reason: String },
    /// No connection, or no answer in time: try again later.
    Network { reason: String },
    /// The broker or the service refused these credentials or this action:
    /// check the certificate, the claim or the policy.
    Unauthorized { reason: String },
    /// The service (or a signature check) refused the request, with its
    /// code (`409`, `VersionMismatch`, `manifest`, ...): look at the code.
    Rejected { code: String, reason: String },
    /// Local storage failed or is full (the state directory, the outbox,
    /// the firmware slots): free space or fix the directory.
    Storage { reason: String },
    /// The agent has stopped: start a new one.
    Stopped,
    /// Anything else (a bug, a callback that raised something unexpected).
    Other { reason: String },
}

impl FleetError {
    pub(crate) fn invalid(reason: impl fmt::Display) -> Self {
        Self::InvalidArgument {
            reason: reason.to_string(),
        }
    }

    pub(crate) fn rejected(code: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Rejected {
            code: code.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn other(reason: impl fmt::Display) -> Self {
        Self::Other {
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidArgument { reason } => write!(f, "invalid argument: {reason}"),
            Self::Network { reason } => write!(f, "network: {reason}"),
            Self::Unauthorized { reason } => write!(f, "unauthorized: {reason}"),
            Self::Rejected { code, reason } => write!(f, "rejected ({code}): {reason}"),
            Self::Storage { reason } => write!(f, "storage: {reason}"),
            Self::Stopped => f.write_str("the agent has stopped"),
            Self::Other { reason } => f.write_str(reason),
        }
    }
}

impl std::error::Error for FleetError {}

impl From<AgentError> for FleetError {
    fn from(e: AgentError) -> Self {
        let reason = e.to_string();
        match e {
            AgentError::Tls(_)
            | AgentError::InvalidName(_)
            | AgentError::UnknownShadow
            | AgentError::NoCurrentJob => Self::InvalidArgument { reason },
            AgentError::Command(_) => Self::rejected("command", reason),
            AgentError::Rejected { code, message } => Self::rejected(code.to_string(), message),
            AgentError::JobRejected(code) => Self::rejected(code, reason),
            AgentError::TimedOut | AgentError::NotConnected | AgentError::ClientBusy => {
                Self::Network { reason }
            }
            AgentError::Stopped => Self::Stopped,
            AgentError::Outbox(_) | AgentError::Dropped | AgentError::StateDir(_) => {
                Self::Storage { reason }
            }
            AgentError::Refused(_) => Self::Unauthorized { reason },
            _ => Self::Other { reason },
        }
    }
}

impl From<ProvisionError> for FleetError {
    fn from(e: ProvisionError) -> Self {
        let reason = e.to_string();
        match e {
            ProvisionError::Tls(_) => Self::InvalidArgument { reason },
            ProvisionError::Network(_) => Self::Network { reason },
            ProvisionError::Rejected {
                status: 401 | 403, ..
            } => Self::Unauthorized { reason },
            ProvisionError::Rejected { code, message, .. } => Self::rejected(code, message),
            ProvisionError::StateDir(_) => Self::Storage { reason },
            _ => Self::Other { reason },
        }
    }
}

impl From<fleet_device::pkcs11::Pkcs11Error> for FleetError {
    fn from(e: fleet_device::pkcs11::Pkcs11Error) -> Self {
        use fleet_device::pkcs11::Pkcs11Error as E;
        let reason = e.to_string();
        match e {
            E::WrongPin { .. } | E::TokenLocked { .. } => Self::Unauthorized { reason },
            E::TokenRemoved { .. } => Self::Network { reason },
            E::ObjectExists { .. } => Self::rejected("exists", reason),
            E::Module { .. } => Self::Other { reason },
            _ => Self::InvalidArgument { reason },
        }
    }
}

impl From<NameError> for FleetError {
    fn from(e: NameError) -> Self {
        Self::invalid(e)
    }
}

/// A foreign callback raised something that is not a `FleetError`.
impl From<uniffi::UnexpectedUniFFICallbackError> for FleetError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        Self::other(format!("callback failed: {}", e.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_map_to_what_the_caller_can_do() {
        assert_eq!(FleetError::from(AgentError::Stopped), FleetError::Stopped);
        assert!(matches!(
            FleetError::from(AgentError::TimedOut),
            FleetError::Network { .. }
        ));
        assert_eq!(
            FleetError::from(AgentError::Rejected {
                code: 409,
                message: "Version conflict".into()
            }),
            FleetError::rejected("409", "Version conflict")
        );
        assert!(matches!(
            FleetError::from(AgentError::Outbox(fleet_device::OutboxError::Full)),
            FleetError::Storage { .. }
        ));
        assert!(matches!(
            FleetError::from(AgentError::Refused("not authorized".into())),
            FleetError::Unauthorized { .. }
        ));
    }

    #[test]
    fn a_refused_claim_is_unauthorized() {
        let e = ProvisionError::Rejected {
            status: 403,
            code: "AccessDenied".into(),
            message: "no".into(),
        };
        assert!(matches!(
            FleetError::from(e),
            FleetError::Unauthorized { .. }
        ));
        let e = ProvisionError::Rejected {
            status: 400,
            code: "InvalidParameters".into(),
            message: "SerialNumber".into(),
        };
        assert_eq!(
            FleetError::from(e),
            FleetError::rejected("InvalidParameters", "SerialNumber")
        );
    }
}
