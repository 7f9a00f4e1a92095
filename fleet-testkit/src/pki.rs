//! A throwaway certificate authority and the identities a test needs.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::HarnessError;

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Identity {
    /// The common name of the certificate (for a device, its thing name).
    pub common_name: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

/// A certificate authority made for one test run (ECDSA P-256 keys).
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// Makes a new CA whose subject is `name`.
    pub fn new(name: &str) -> Result<Self, HarnessError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "fleet test harness");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let ca = CertifiedIssuer::self_signed(params, key)?;
        Ok(Self { ca })
    }

    /// The CA certificate, PEM: the trust anchor of servers and clients.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn server_identity(&self) -> Result<Identity, HarnessError> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, "localhost")
    }

    /// A client certificate whose common name is `common_name` (a thing
    /// name for a device; any name for a backend or claim identity).
    pub fn client_identity(&self, common_name: &str) -> Result<Identity, HarnessError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, common_name)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        common_name: &str,
    ) -> Result<Identity, HarnessError> {
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(Identity {
            common_name: common_name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
