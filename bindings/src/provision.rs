//! Provisioning by claim: the device makes its key, the fleet issues its
//! certificate and registers it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::{FleetError, runtime};

/// What provisioning by claim needs.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ClaimConfig {
    /// The broker.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The claim certificate (PEM), shared by a batch of devices.
    pub claim_cert_pem: String,
    /// The claim private key (PEM).
    pub claim_key_pem: String,
    /// Trust anchors of the broker's certificate (PEM).
    pub ca_pem: String,
    /// The provisioning template's name.
    pub template: String,
    /// The template's parameters (`SerialNumber`, ...).
    pub parameters: HashMap<String, String>,
    /// The thing name the template gives this device.
    pub thing_name: String,
    /// Where the certificate and key are stored.
    pub state_dir: String,
    /// How long to wait for each answer, milliseconds.
    #[uniffi(default = 10000)]
    pub timeout_ms: u64,
    /// Keep the device's key in a PKCS#11 token: the `pkcs11:` URI of an
    /// ECDSA P-256 key (generated there if the token holds none by that
    /// label). The certificate request is signed in the token and no key
    /// is stored (the returned `key_pem` is empty: give the same URI to
    /// `AgentConfig.pkcs11_uri`).
    #[uniffi(default = None)]
    pub pkcs11_uri: Option<String>,
}

/// A device's own identity, issued by the fleet.
#[derive(Clone, PartialEq, Eq, uniffi::Record)]
pub struct Provisioned {
    /// The registered thing name.
    pub thing_name: String,
    /// The device certificate (PEM).
    pub cert_pem: String,
    /// The device private key (PEM), made on the device; empty when it is
    /// in a PKCS#11 token.
    pub key_pem: String,
}

impl std::fmt::Debug for Provisioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioned")
            .field("thing_name", &self.thing_name)
            .finish_non_exhaustive()
    }
}

impl From<fleet_device::provision::Provisioned> for Provisioned {
    fn from(p: fleet_device::provision::Provisioned) -> Self {
        Self {
            thing_name: p.thing_name,
            cert_pem: p.cert_pem,
            key_pem: p.key_pem,
        }
    }
}

/// Provisions the device by claim, unless its state directory already
/// holds an identity (then returns that one without connecting).
#[uniffi::export]
pub async fn provision_by_claim(config: ClaimConfig) -> Result<Provisioned, FleetError> {
    let key = match &config.pkcs11_uri {
        Some(uri) => {
            let uri: fleet_device::pkcs11::Pkcs11Uri = uri.parse().map_err(FleetError::invalid)?;
            let key = fleet_device::pkcs11::Pkcs11Key::open_or_generate(
                &uri,
                fleet_device::pkcs11::Algorithm::EcdsaP256Sha256,
            )?;
            Some(std::sync::Arc::new(key) as std::sync::Arc<dyn fleet_device::DeviceKey>)
        }
        None => None,
    };
    let config = fleet_device::ClaimConfig {
        host: config.host,
        port: config.port,
        claim_cert_pem: config.claim_cert_pem,
        claim_key_pem: config.claim_key_pem,
        ca_pem: config.ca_pem,
        template: config.template,
        parameters: config.parameters.into_iter().collect(),
        thing_name: config.thing_name,
        state_dir: config.state_dir.into(),
        timeout: Duration::from_millis(config.timeout_ms),
        protocol: Default::default(),
    };
    let p = runtime::run(async move {
        match key {
            Some(key) => fleet_device::provision_by_claim_with_key(&config, key).await,
            None => fleet_device::provision_by_claim(&config).await,
        }
    })
    .await??;
    Ok(p.into())
}

/// The identity stored in `state_dir` by an earlier provisioning, if any
/// (with an empty `key_pem` when the key is in a PKCS#11 token).
#[uniffi::export]
pub fn load_provisioned(state_dir: String) -> Result<Option<Provisioned>, FleetError> {
    let dir = Path::new(&state_dir);
    let stored = match fleet_device::provision::Provisioned::load(dir)? {
        Some(p) => Some(p),
        None => fleet_device::provision::Provisioned::load_certificate(dir)?,
    };
    Ok(stored.map(Into::into))
}
