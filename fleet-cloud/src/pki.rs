//! A development certificate authority: the CA, a server certificate for
//! the broker, and client certificates for devices, backends and claims.
//! For development and tests; production fleets issue device certificates
//! through provisioning from a CA whose key is kept offline or in an HSM.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use std::fmt;

/// A certificate could not be made.
#[derive(Debug)]
pub struct PkiError(rcgen::Error);

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate generation failed: {}", self.0)
    }
}

impl std::error::Error for PkiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        Self(e)
    }
}

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

/// A development certificate authority (ECDSA P-256 keys), made fresh.
pub struct Pki {
    ca: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    /// Makes a new CA whose subject is `name`.
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "fleet development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            ca: Issuer::new(params, key),
            ca_pem,
        })
    }

    /// A CA from its certificate and private key (PEM).
    pub fn from_pem(ca_pem: &str, ca_key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(ca_key_pem)?;
        Ok(Self {
            ca: Issuer::from_ca_cert_pem(ca_pem, key)?,
            ca_pem: ca_pem.into(),
        })
    }

    /// Signs a device's certificate signing request (after checking its
    /// signature: the device holds the key) for `days` days, as a client
    /// certificate: the operator's own issuing (a key made in a secure
    /// element, say). Returns the certificate (PEM) and its common name.
    pub fn sign_csr(&self, csr_pem: &str, days: u32) -> Result<(String, String), PkiError> {
        self.sign(csr_pem, days, false)
    }

    /// [`sign_csr`](Self::sign_csr) for provisioning by claim: the
    /// certificate's subject is the CSR's common name and the
    /// organizational unit [`PROVISIONED_UNIT`](crate::PROVISIONED_UNIT),
    /// whatever else the CSR asked for. The embedded broker treats such a
    /// certificate only as a device, and only once the registry binds it
    /// to that thing.
    pub fn sign_claimed_csr(&self, csr_pem: &str, days: u32) -> Result<(String, String), PkiError> {
        self.sign(csr_pem, days, true)
    }

    fn sign(&self, csr_pem: &str, days: u32, claimed: bool) -> Result<(String, String), PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let common_name = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(DnValue::Utf8String(s)) => s.clone(),
            Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
            Some(DnValue::Ia5String(s)) => s.as_str().to_string(),
            _ => String::new(),
        };
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now;
        csr.params.not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.subject_alt_names.clear();
        csr.params.custom_extensions.clear();
        if claimed {
            // Whatever else the claimant asked for, the subject is its
            // name and the mark.
            let mut dn = DistinguishedName::new();
            if !common_name.is_empty() {
                dn.push(DnType::CommonName, common_name.as_str());
            }
            dn.push(DnType::OrganizationalUnitName, crate::PROVISIONED_UNIT);
            csr.params.distinguished_name = dn;
        }
        let cert = csr.signed_by(&self.ca)?;
        Ok((cert.pem(), common_name))
    }

    /// The CA's private key, PEM (keep it out of version control).
    pub fn ca_key_pem(&self) -> String {
        self.ca.key().serialize_pem()
    }

    /// The CA certificate, PEM: the trust anchor of servers and clients.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn server_identity(&self) -> Result<Identity, PkiError> {
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
    pub fn client_identity(&self, common_name: &str) -> Result<Identity, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, common_name)
    }

    /// A client certificate and key made for provisioning by claim
    /// (`CreateKeysAndCertificate`), marked as
    /// [`sign_claimed_csr`](Self::sign_claimed_csr) marks its certificates.
    pub fn claimed_identity(&self, common_name: &str) -> Result<Identity, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, crate::PROVISIONED_UNIT);
        self.issue(params, common_name)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        common_name: &str,
    ) -> Result<Identity, PkiError> {
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
