//! The fleet workspace's test harness: a throwaway PKI and a real Mosquitto
//! with mutual TLS and ACLs, started on a free loopback port for each test.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fleet_testkit::HarnessError> {
//! use std::time::Duration;
//! use fleet_testkit::{Broker, TestClient};
//!
//! let broker = Broker::start()?; // fails, saying how to install Mosquitto, if it is missing
//! let device = broker.device_identity("pump-7")?;
//! let mut client = TestClient::connect(&broker, &device, "pump-7").await?;
//! assert!(client.subscribe("$aws/things/pump-7/shadow/update/accepted").await?);
//! # Ok(()) }
//! ```
//!
//! Nothing here skips: when `mosquitto` cannot be found, [`Broker::start`]
//! returns [`HarnessError::MosquittoNotFound`], whose message says how to
//! install it, and the test fails.

#![forbid(unsafe_code)]

mod broker;
mod client;
mod postgres;
mod proxy;
mod softhsm;

pub use broker::{
    BACKEND_IDENTITY, Broker, BrokerKind, BrokerOptions, mosquitto_binary, mosquitto_plugin,
};
pub use client::{Message, TestClient, client_tls_config};
pub use fleet_cloud::BrokerPolicy;
pub use fleet_cloud::pki::{Identity, Pki};
pub use postgres::{Postgres, PostgresTls};
pub use proxy::Proxy;
pub use softhsm::{SO_PIN, SoftHsmToken, softhsm_module};

/// Why the harness could not do what a test asked.
#[derive(Debug)]
#[non_exhaustive]
pub enum HarnessError {
    /// `mosquitto` is not installed (or `$MOSQUITTO` does not name a file).
    MosquittoNotFound,
    /// Mosquitto exited while starting.
    BrokerExited {
        /// How it exited.
        status: String,
        /// What it logged.
        log: String,
    },
    /// Mosquitto did not accept connections in time.
    StartTimeout {
        /// What it logged.
        log: String,
    },
    /// A file or process operation failed.
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Making a certificate failed.
    Certificate(fleet_cloud::pki::PkiError),
    /// Loading TLS material failed.
    Tls(String),
    /// The MQTT client failed (connect refused, no reply, ...).
    Mqtt(String),
    /// The broker policy cannot be written.
    Policy(String),
    /// PostgreSQL's server programs (`initdb`, `pg_ctl`) are not installed.
    PostgresNotFound,
    /// PostgreSQL did not start.
    PostgresFailed {
        /// What failed.
        what: String,
        /// What it printed and logged.
        log: String,
    },
    /// SoftHSM2's PKCS#11 module is not installed.
    SoftHsmNotFound,
    /// `$SOFTHSM2_CONF` is not set (the workspace's `.cargo/config.toml`
    /// sets it for `cargo test`).
    SoftHsmNotConfigured,
    /// SoftHSM2 refused to make a token.
    SoftHsm(String),
}

impl HarnessError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<fleet_cloud::pki::PkiError> for HarnessError {
    fn from(e: fleet_cloud::pki::PkiError) -> Self {
        Self::Certificate(e)
    }
}

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MosquittoNotFound => f.write_str(
                "mosquitto is not installed, and the broker tests need a real one. \
                 Install it with `sudo apt-get install mosquitto` (Debian, Ubuntu), \
                 `sudo dnf install mosquitto` (Fedora) or `brew install mosquitto` (macOS), \
                 or set MOSQUITTO=/path/to/mosquitto. `scripts/test` installs it when run as root.",
            ),
            Self::BrokerExited { status, log } => {
                write!(
                    f,
                    "mosquitto exited while starting ({status}); its log:\n{log}"
                )
            }
            Self::StartTimeout { log } => {
                write!(
                    f,
                    "mosquitto did not accept connections in time; its log:\n{log}"
                )
            }
            Self::Io { context, source } => write!(f, "could not {context}: {source}"),
            Self::Certificate(e) => write!(f, "could not make a test certificate: {e}"),
            Self::Tls(e) => write!(f, "could not load TLS material: {e}"),
            Self::Mqtt(e) => write!(f, "MQTT client error: {e}"),
            Self::Policy(e) => write!(f, "broker policy: {e}"),
            Self::SoftHsmNotFound => f.write_str(
                "SoftHSM2 is not installed, and the PKCS#11 tests need a real token. \
                 Install it with `sudo apt-get install softhsm2` (Debian, Ubuntu), \
                 or set FLEET_SOFTHSM_MODULE=/path/to/libsofthsm2.so. \
                 `scripts/test` installs it when run as root.",
            ),
            Self::SoftHsmNotConfigured => f.write_str(
                "SOFTHSM2_CONF is not set: run the tests with cargo from the workspace \
                 (its .cargo/config.toml sets it), or set it to a file the harness may write",
            ),
            Self::SoftHsm(e) => write!(f, "SoftHSM2: {e}"),
            Self::PostgresNotFound => f.write_str(
                "PostgreSQL is not installed, and the store tests need a real one. \
                 Install it with `sudo apt-get install postgresql` (Debian, Ubuntu) or \
                 `brew install postgresql` (macOS), or set FLEET_PG_BIN to the directory \
                 holding initdb and pg_ctl. `scripts/test` installs it when run as root.",
            ),
            Self::PostgresFailed { what, log } => {
                write!(f, "PostgreSQL: {what}; its output:\n{log}")
            }
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Certificate(e) => Some(e),
            _ => None,
        }
    }
}

/// Turns scenario functions `async fn name(kind: BrokerKind)` into two tests
/// each, `name::mosquitto` and `name::embedded`, so that one suite checks
/// both brokers.
#[macro_export]
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                super::$name($crate::BrokerKind::Mosquitto).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::BrokerKind::Embedded).await
            }
        }
    )*};
}
