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
#[non_exhaustive]
pub enum PkiError {
    /// The certificate or request is invalid, or the key does not fit.
    Rcgen(rcgen::Error),
    /// The CA's key is in a token that failed (removed, locked, ...).
    Token(fleet_pkcs11::Pkcs11Error),
}

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rcgen(e) => write!(f, "certificate generation failed: {e}"),
            Self::Token(e) => write!(f, "certificate generation failed: the CA key: {e}"),
        }
    }
}

impl std::error::Error for PkiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Rcgen(e) => Some(e),
            Self::Token(e) => Some(e),
        }
    }
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        Self::Rcgen(e)
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

/// The private key of a certificate authority: in memory (read from a
/// PEM file) or in an HSM (a PKCS#11 token, where it signs and never
/// leaves).
#[non_exhaustive]
pub enum CaKey {
    /// A key in memory.
    File(KeyPair),
    /// A key in a PKCS#11 token (ECDSA P-256 or Ed25519).
    Pkcs11(fleet_pkcs11::Pkcs11Key),
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(_) => f.write_str("CaKey::File(..)"),
            Self::Pkcs11(k) => f.debug_tuple("CaKey::Pkcs11").field(k).finish(),
        }
    }
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            Self::File(k) => k.der_bytes(),
            Self::Pkcs11(k) => rcgen::PublicKeyData::der_bytes(k),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::File(k) => rcgen::PublicKeyData::algorithm(k),
            Self::Pkcs11(k) => rcgen::PublicKeyData::algorithm(k),
        }
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            Self::File(k) => rcgen::SigningKey::sign(k, msg),
            Self::Pkcs11(k) => rcgen::SigningKey::sign(k, msg),
        }
    }
}

/// A certificate authority (ECDSA P-256 keys for what it makes): a
/// development CA made fresh, or the fleet's CA from its certificate and
/// key (a PEM file, or a key in an HSM). Cloning shares the key.
#[derive(Clone)]
pub struct Pki {
    ca: std::sync::Arc<Issuer<'static, CaKey>>,
    ca_pem: String,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("key", self.ca.key())
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Makes a new CA whose subject is `name`.
    pub fn new(name: &str) -> Result<Self, PkiError> {
        Self::new_with_key(name, CaKey::File(KeyPair::generate()?))
    }

    /// Makes a new CA whose subject is `name` with `key` (a key in an HSM:
    /// [`CaKey::Pkcs11`]), its certificate self-signed by that key.
    pub fn new_with_key(name: &str, key: CaKey) -> Result<Self, PkiError> {
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
        let ca_pem = match params.self_signed(&key) {
            Ok(cert) => cert.pem(),
            Err(e) => {
                return Err(match (&key, e) {
                    (CaKey::Pkcs11(k), rcgen::Error::RemoteKeyError) => match k.take_error() {
                        Some(cause) => PkiError::Token(cause),
                        None => PkiError::Rcgen(rcgen::Error::RemoteKeyError),
                    },
                    (_, e) => PkiError::Rcgen(e),
                });
            }
        };
        Ok(Self {
            ca: std::sync::Arc::new(Issuer::new(params, key)),
            ca_pem,
        })
    }

    /// A CA from its certificate and private key (PEM).
    pub fn from_pem(ca_pem: &str, ca_key_pem: &str) -> Result<Self, PkiError> {
        Self::from_pem_with_key(ca_pem, CaKey::File(KeyPair::from_pem(ca_key_pem)?))
    }

    /// A CA from its certificate (PEM) and its key wherever it is (an HSM:
    /// [`CaKey::Pkcs11`]). The key must be the certificate's.
    pub fn from_pem_with_key(ca_pem: &str, key: CaKey) -> Result<Self, PkiError> {
        let issuer = Issuer::from_ca_cert_pem(ca_pem, key)?;
        let cert = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
            .ok()
            .and_then(|(_, pem)| {
                x509_parser::parse_x509_certificate(&pem.contents)
                    .ok()
                    .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
            });
        if cert.as_deref() != Some(rcgen::PublicKeyData::der_bytes(issuer.key())) {
            return Err(PkiError::Rcgen(rcgen::Error::PemError(
                "the CA key is not the key of the CA certificate".into(),
            )));
        }
        Ok(Self {
            ca: std::sync::Arc::new(issuer),
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
        let cert = csr.signed_by(&self.ca).map_err(|e| self.key_error(e))?;
        Ok((cert.pem(), common_name))
    }

    /// The CA's private key, PEM (keep it out of version control); `None`
    /// when it is in an HSM, which never gives it out.
    pub fn ca_key_pem(&self) -> Option<String> {
        match self.ca.key() {
            CaKey::File(k) => Some(k.serialize_pem()),
            CaKey::Pkcs11(_) => None,
        }
    }

    /// The CA certificate, PEM: the trust anchor of servers and clients.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// rcgen's `RemoteKeyError` carries nothing: the token's own error, if
    /// there is one, says what to fix.
    fn key_error(&self, e: rcgen::Error) -> PkiError {
        match (self.ca.key(), &e) {
            (CaKey::Pkcs11(k), rcgen::Error::RemoteKeyError) => match k.take_error() {
                Some(cause) => PkiError::Token(cause),
                None => PkiError::Rcgen(e),
            },
            _ => PkiError::Rcgen(e),
        }
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
        let cert = params
            .signed_by(&key, &self.ca)
            .map_err(|e| self.key_error(e))?;
        Ok(Identity {
            common_name: common_name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
