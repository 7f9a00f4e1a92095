//! Fleet provisioning by claim: a device that holds only a shared claim
//! certificate makes its own key, sends a certificate signing request
//! (`create-from-csr`), and registers itself from a template
//! (`RegisterThing`), AWS IoT's JSON shapes.
//!
//! The fleet CA signs the CSR (the private key never leaves the device) and
//! returns a certificate ownership token that expires (one hour by default)
//! and is good for one registration. `RegisterThing` binds the certificate
//! to the thing its template names, in the registry.
//!
//! What the certificate's subject may be depends on the broker
//! ([`ProvisioningService::subject_names_thing`]): the embedded broker knows a
//! device by the registry's binding of its certificate, so, as with AWS IoT,
//! the CSR may name anything (a serial number, nothing at all); a broker
//! that knows devices only by their certificate's common name (Mosquitto)
//! needs the common name to be the thing name the template will produce.
//!
//! Replies carry secrets (the ownership token), so they go only to the
//! requester: to its MQTT 5 response topic, which must lie under
//! `{prefix}/clients/` (the broker policy lets a client read only its own
//! `{prefix}/clients/{client id}/...`). A request without a response topic
//! is answered on AWS's reply topics, which the fleet policy lets no claim
//! identity read; AWS IoT Core delivers those to the requesting connection
//! only, Mosquitto cannot.

use crate::Outgoing;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use fleet_core::topic::{Format, ProvisioningTopic, Role, Service, Topic, TopicPrefix};

use crate::model::{CertificateStatus, PendingCertificate, Spent};
use crate::pki::Pki;
use crate::registry::{Registry, RegistryError};
use crate::service::{Handler, HandlerError, Request};
use crate::template::{Certificate, TemplateBody, TemplateError};

/// A provisioning template: how a thing is named and what it gets.
///
/// Either the simple form (a name prefix and a naming parameter, fixed
/// attributes and groups) or, with [`body`](Self::body), an AWS IoT fleet
/// provisioning template document ([`TemplateBody`]), which then decides
/// the thing's name, attributes and groups.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisioningTemplate {
    /// The template's name (in the topic).
    pub name: String,
    /// The thing name is this prefix followed by the value of
    /// `name_parameter` (`pump-` + `SerialNumber`, say).
    pub thing_name_prefix: String,
    /// The parameter that names the thing.
    pub name_parameter: String,
    /// Parameters that must be present (besides `name_parameter`); each
    /// value is 1–128 bytes of `[A-Za-z0-9:_.-]`.
    pub required_parameters: Vec<String>,
    /// Attributes every thing from this template gets; the parameters are
    /// added as attributes too.
    pub attributes: BTreeMap<String, String>,
    /// Static groups the thing joins.
    pub groups: Vec<String>,
    /// Whether a claimant may provision onto a thing that exists already
    /// (a device whose storage was wiped, say): its new certificate is
    /// bound and the thing's other certificates are revoked. Off by
    /// default: a claimant can never take an existing thing over. Even when
    /// on, the pre-provisioning hook must approve, and a disabled thing, or
    /// one with a revoked certificate, is never re-provisioned.
    pub allow_replace: bool,
    /// An AWS-shaped template document; when set, the fields of the simple
    /// form (prefix, naming parameter, attributes, groups) are not used.
    pub body: Option<TemplateBody>,
    /// The pre-provisioning hook of this template: an HTTPS webhook asked
    /// before each registration, as AWS's pre-provisioning Lambda is.
    pub webhook: Option<Webhook>,
}

impl ProvisioningTemplate {
    /// A template from an AWS IoT fleet provisioning template document.
    pub fn from_document(name: &str, document: &Value) -> Result<Self, TemplateError> {
        let body = TemplateBody::parse(document)?;
        Ok(Self {
            name: name.to_string(),
            thing_name_prefix: String::new(),
            name_parameter: String::new(),
            required_parameters: body.required_parameters(),
            attributes: BTreeMap::new(),
            groups: Vec::new(),
            allow_replace: false,
            body: Some(body),
            webhook: None,
        })
    }

    /// A template created through the API, checked: its document, and its
    /// hook's URL (`https://`) and CA (PEM certificates). A disabled
    /// template is read all the same (the service refuses registrations
    /// by it).
    pub fn from_stored(stored: &crate::model::StoredTemplate) -> Result<Self, TemplateError> {
        let mut t = Self::from_document(&stored.name, &stored.document)?;
        t.allow_replace = stored.allow_replace;
        if let Some(h) = &stored.hook {
            if !h.url.starts_with("https://") || h.url.len() <= "https://".len() {
                return Err(TemplateError::new(
                    "preProvisioningHook.url",
                    format!("{:?} is not an https:// URL", h.url),
                ));
            }
            if let Some(ca) = &h.ca_pem {
                crate::tls::client_config(ca, None).map_err(|e| {
                    TemplateError::new(
                        "preProvisioningHook.caPem",
                        format!("not a PEM CA certificate: {e}"),
                    )
                })?;
            }
            if h.timeout_ms == 0 || h.timeout_ms > MAX_HOOK_TIMEOUT_MS {
                return Err(TemplateError::new(
                    "preProvisioningHook.timeoutMs",
                    format!("must be 1 to {MAX_HOOK_TIMEOUT_MS} ms"),
                ));
            }
            t.webhook = Some(Webhook {
                url: h.url.clone(),
                ca_pem: h.ca_pem.clone(),
                timeout: Duration::from_millis(h.timeout_ms),
            });
        }
        Ok(t)
    }
}

/// The longest a pre-provisioning hook may be given (a device waits for it
/// while its claim connection is open).
pub const MAX_HOOK_TIMEOUT_MS: u64 = 30_000;

/// A pre-provisioning hook over HTTPS, as AWS IoT's pre-provisioning
/// Lambda: it is POSTed `{"templateName", "certificateId",
/// "certificatePem", "parameters"}` and answers `{"allowProvisioning":
/// bool, "parameterOverrides": {...}}`. A refusal, an error status, a
/// malformed answer or no answer within `timeout` refuses the registration
/// (403), and nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// `https://...`.
    pub url: String,
    /// The CA that signed the hook's server certificate (PEM); `None`: the
    /// Web PKI's roots (Mozilla's, as `webpki-roots` ships them).
    pub ca_pem: Option<String>,
    /// How long the hook may take (AWS: 5 s).
    pub timeout: Duration,
}

/// What a webhook answers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HookAnswer {
    allow_provisioning: bool,
    #[serde(default)]
    parameter_overrides: BTreeMap<String, String>,
}

impl Webhook {
    /// Asks the hook about a registration: the parameters to use (the
    /// device's, with the hook's overrides), or why not.
    async fn decide(
        &self,
        template: &str,
        certificate_id: &str,
        certificate_pem: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, String> {
        if !self.url.starts_with("https://") {
            return Err(format!("{}: the hook must be https://", self.url));
        }
        let tls = match &self.ca_pem {
            Some(ca) => crate::tls::client_config(ca, None).map_err(|e| e.to_string())?,
            None => crate::tls::web_pki_client_config().map_err(|e| e.to_string())?,
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(self.timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let body = json!({
            "templateName": template,
            "certificateId": certificate_id,
            "certificatePem": certificate_pem,
            "parameters": parameters,
        });
        let response = client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| crate::broker::error_chain(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the hook answered HTTP {status}"));
        }
        let answer: HookAnswer = response.json().await.map_err(|e| {
            format!("the hook's answer is not {{allowProvisioning, parameterOverrides}}: {e}")
        })?;
        if !answer.allow_provisioning {
            return Err("the pre-provisioning hook refused".into());
        }
        let mut parameters = parameters.clone();
        parameters.extend(answer.parameter_overrides);
        Ok(parameters)
    }
}

/// A check the operator runs before a device is registered (an allow list,
/// a call to a manufacturing database): `Err(reason)` refuses it.
pub trait PreProvisioningHook: Send + Sync + 'static {
    /// Decides on a registration.
    fn check(&self, template: &str, parameters: &BTreeMap<String, String>) -> Result<(), String>;
}

/// The provisioning service.
#[derive(Clone)]
pub struct ProvisioningService {
    ca: Arc<Pki>,
    registry: Registry,
    templates: Arc<HashMap<String, Arc<ProvisioningTemplate>>>,
    hook: Option<Arc<dyn PreProvisioningHook>>,
    on_registered: Option<crate::api::ThingHook>,
    /// How long an ownership token is good for.
    pub token_lifetime: Duration,
    /// How long issued certificates are valid.
    pub certificate_days: u32,
    /// Ownership tokens held at most (issued, not yet used or expired, kept
    /// in the registry, so that with PostgreSQL any instance can take the
    /// registration): more `create-from-csr` requests are refused with 429
    /// `ThrottlingException` until some are used or expire.
    pub max_outstanding_tokens: usize,
    /// Serve `CreateKeysAndCertificate`: the cloud generates the device's
    /// private key and sends it over MQTT. Off by default (`create-from-csr`
    /// keeps the key on the device); when off, requests are rejected with
    /// 403. A certificate from it has the common name `device-{12 hex}`, and
    /// `RegisterThing` names the thing so (the template's naming parameter
    /// becomes an attribute like the others): the common name is the
    /// identity the broker's policy confines.
    pub allow_create_keys: bool,
    /// The broker knows a device by its certificate's common name
    /// (Mosquitto, with `use_identity_as_username`), so a CSR's common name
    /// must be the thing name the template produces, and `RegisterThing`
    /// refuses a certificate named otherwise. `false` where the broker
    /// authorizes by the registry's binding of a certificate to its thing
    /// (the embedded broker with registry admission): the CSR's subject is
    /// then free, as with AWS IoT. `true` by default.
    pub subject_names_thing: bool,
    /// The claim identities (certificate common names) whose requests
    /// under `claims/{identity}/{client}/` are answered
    /// ([`ClaimTopic`](fleet_core::topic::ClaimTopic)); anyone else's are
    /// refused with 403, in its own namespace.
    pub claim_identities: Vec<String>,
    prefix: String,
}

impl fmt::Debug for ProvisioningService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningService")
            .field("templates", &self.templates.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The AWS error reply: `{"statusCode", "errorCode", "errorMessage"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningError {
    /// HTTP-style status.
    pub status_code: u16,
    /// Machine-readable code.
    pub error_code: &'static str,
    /// For people.
    pub message: String,
}

impl ProvisioningError {
    fn new(status_code: u16, error_code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status_code,
            error_code,
            message: message.into(),
        }
    }

    fn payload(&self) -> Vec<u8> {
        json!({"statusCode": self.status_code, "errorCode": self.error_code, "errorMessage": self.message})
            .to_string()
            .into_bytes()
    }
}

impl fmt::Display for ProvisioningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status_code, self.error_code, self.message
        )
    }
}

impl std::error::Error for ProvisioningError {}

#[async_trait::async_trait]
impl Handler for ProvisioningService {
    fn service(&self) -> Service {
        Service::Provisioning
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, HandlerError> {
        Ok(ProvisioningService::handle(self, request).await)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CsrRequest {
    certificate_signing_request: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterRequest {
    certificate_ownership_token: String,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

fn valid_parameter(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-'))
}

impl ProvisioningService {
    /// A service signing with `ca`, registering into `registry`.
    pub fn new(ca: Pki, registry: Registry, templates: Vec<ProvisioningTemplate>) -> Self {
        Self {
            ca: Arc::new(ca),
            registry,
            templates: Arc::new(
                templates
                    .into_iter()
                    .map(|t| (t.name.clone(), Arc::new(t)))
                    .collect(),
            ),
            hook: None,
            on_registered: None,
            token_lifetime: Duration::from_secs(3600),
            certificate_days: 365,
            max_outstanding_tokens: 10_000,
            allow_create_keys: false,
            subject_names_thing: true,
            claim_identities: Vec::new(),
            prefix: "$aws".into(),
        }
    }

    /// Adds a pre-provisioning hook.
    pub fn with_hook(mut self, hook: impl PreProvisioningHook) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Called after `RegisterThing` bound a certificate to a thing (and
    /// revoked the ones it replaced), and awaited before the device is
    /// answered: a broker that admits by a copy of the registry (Mosquitto's
    /// plugin and its roster) knows the certificate before the device
    /// connects with it.
    pub fn with_on_registered(mut self, hook: crate::api::ThingHook) -> Self {
        self.on_registered = Some(hook);
        self
    }

    /// The same service under another topic prefix (`$aws` by default).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, fleet_core::TopicError> {
        TopicPrefix::new(prefix)?;
        self.prefix = prefix.into();
        Ok(self)
    }

    /// Answers a provisioning request, on its `/accepted` or `/rejected`
    /// topic. (Over MQTT 5 the front-end sends it to the request's response
    /// topic instead, where it gave one.) Nothing for a topic that is not a
    /// provisioning request.
    ///
    /// Signing and key generation run on blocking threads.
    pub async fn handle(&self, request: &Request<'_>) -> Vec<Outgoing> {
        let (topic, claimant) = match &request.topic {
            Topic::Provisioning(topic) => (topic, true),
            // Through a broker without response topics: the request names
            // its claim identity (the broker holds it to its user name).
            Topic::Claim(c) => (
                &c.request,
                self.claim_identities
                    .iter()
                    .any(|i| c.identity.as_str() == i.as_str()),
            ),
            _ => return Vec::new(),
        };
        let (payload, now) = (request.payload, request.received_at);
        let result = match topic {
            _ if !claimant => Err(ProvisioningError::new(
                403,
                "AccessDenied",
                "only a claim identity may provision",
            )),
            ProvisioningTopic::CreateCertificateFromCsr(Format::Json, _) => {
                self.create_from_csr(payload, now).await
            }
            ProvisioningTopic::CreateKeysAndCertificate(Format::Json, _) => {
                self.create_keys(now).await
            }
            ProvisioningTopic::RegisterThing(template, Format::Json, _) => {
                self.register_thing(template.as_str(), payload, now).await
            }
            _ => Err(ProvisioningError::new(
                400,
                "InvalidPayload",
                "this fleet answers provisioning requests in JSON only",
            )),
        };
        let operation = match topic {
            ProvisioningTopic::CreateCertificateFromCsr(..) => "create_certificate_from_csr",
            ProvisioningTopic::CreateKeysAndCertificate(..) => "create_keys_and_certificate",
            ProvisioningTopic::RegisterThing(..) => "register_thing",
        };
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(e) => e.error_code,
        };
        metrics::counter!(
            "fleet_provisioning_total",
            "operation" => operation,
            "outcome" => outcome
        )
        .increment(1);
        let (role, body) = match result {
            Ok(v) => (Role::Accepted, v.to_string().into_bytes()),
            Err(e) => (Role::Rejected, e.payload()),
        };
        let (Some(reply), Ok(prefix)) = (request.topic.reply(role), TopicPrefix::new(&self.prefix))
        else {
            return Vec::new();
        };
        vec![Outgoing {
            topic: reply.to_string_under(&prefix),
            payload: body,
        }]
    }

    async fn create_from_csr(&self, payload: &[u8], now: u64) -> Result<Value, ProvisioningError> {
        let request: CsrRequest = serde_json::from_slice(payload).map_err(|_| {
            ProvisioningError::new(
                400,
                "InvalidPayload",
                "expected {\"certificateSigningRequest\": PEM}",
            )
        })?;
        let (ca, days) = (self.ca.clone(), self.certificate_days);
        let (certificate_pem, common_name) = off_runtime(move || {
            ca.sign_claimed_csr(&request.certificate_signing_request, days)
                .map_err(|e| ProvisioningError::new(400, "InvalidCSR", e.to_string()))
        })
        .await?;
        if self.subject_names_thing {
            fleet_core::ThingName::new(&common_name).map_err(|e| {
                ProvisioningError::new(
                    400,
                    "InvalidCSR",
                    format!("the CSR's common name must be the thing name: {e}"),
                )
            })?;
            if self.registry.is_reserved(&common_name) {
                return Err(ProvisioningError::new(
                    400,
                    "InvalidCSR",
                    format!("{common_name} is a privileged identity, not a thing name"),
                ));
            }
            // A certificate for an existing thing only where a template may
            // replace it (a broker that knows devices by common name alone,
            // such as Mosquitto, would otherwise take it for that thing).
            let may_replace = self.templates.values().any(|t| t.allow_replace)
                || self
                    .registry
                    .stored_templates()
                    .await
                    .map_err(|e| ProvisioningError::new(500, "InternalFailure", e.to_string()))?
                    .iter()
                    .any(|t| t.enabled && t.allow_replace);
            self.check_replaceable(&common_name, may_replace).await?;
        }
        // Otherwise the subject names nothing: the certificate (marked as
        // provisioned, so never more than a device) grants nothing until
        // RegisterThing binds it to the thing its template names.
        let (token, certificate_id) = self
            .issue_token(&certificate_pem, common_name, false, now)
            .await?;
        Ok(json!({
            "certificateOwnershipToken": token,
            "certificateId": certificate_id,
            "certificatePem": certificate_pem,
        }))
    }

    async fn create_keys(&self, now: u64) -> Result<Value, ProvisioningError> {
        if !self.allow_create_keys {
            return Err(ProvisioningError::new(
                403,
                "AccessDenied",
                "CreateKeysAndCertificate is disabled on this fleet: send a CSR to create-from-csr",
            ));
        }
        let mut r = [0u8; 6];
        getrandom::fill(&mut r)
            .map_err(|e| ProvisioningError::new(500, "InternalFailure", e.to_string()))?;
        let name = format!(
            "device-{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let (ca, cn) = (self.ca.clone(), name.clone());
        let identity = off_runtime(move || {
            ca.claimed_identity(&cn)
                .map_err(|e| ProvisioningError::new(500, "InternalFailure", e.to_string()))
        })
        .await?;
        let (token, certificate_id) = self
            .issue_token(&identity.cert_pem, name, true, now)
            .await?;
        Ok(json!({
            "certificateOwnershipToken": token,
            "certificateId": certificate_id,
            "certificatePem": identity.cert_pem,
            "privateKey": identity.key_pem,
        }))
    }

    /// Refuses provisioning onto `thing` if it exists and may not be
    /// replaced: never when it is disabled or has a revoked certificate,
    /// otherwise unless `may_replace`. Whether it exists.
    async fn check_replaceable(
        &self,
        thing: &str,
        may_replace: bool,
    ) -> Result<bool, ProvisioningError> {
        let existing = match self.registry.thing(thing).await {
            Ok(t) => t,
            Err(RegistryError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(internal(e)),
        };
        let revoked = self
            .registry
            .certificates(thing)
            .await
            .map_err(internal)?
            .iter()
            .any(|c| c.status != CertificateStatus::Active);
        if !existing.enabled || revoked {
            return Err(ProvisioningError::new(
                403,
                "AccessDenied",
                format!("{thing} is disabled or revoked and cannot be provisioned by claim"),
            ));
        }
        if !may_replace {
            return Err(ProvisioningError::new(
                403,
                "AccessDenied",
                format!("{thing} exists and its template does not allow replacing it"),
            ));
        }
        Ok(true)
    }

    /// Records a certificate awaiting registration; returns its token and id.
    async fn issue_token(
        &self,
        certificate_pem: &str,
        common_name: String,
        named_by_certificate: bool,
        now: u64,
    ) -> Result<(String, String), ProvisioningError> {
        let certificate_id = fingerprint(certificate_pem);
        let token =
            random_token().map_err(|e| ProvisioningError::new(500, "InternalFailure", e))?;
        let pending = PendingCertificate {
            certificate_id: certificate_id.clone(),
            certificate_pem: certificate_pem.into(),
            common_name,
            named_by_certificate,
            expires_at: now + self.token_lifetime.as_secs(),
        };
        let added = self
            .registry
            .add_pending(&token, &pending, now, self.max_outstanding_tokens)
            .await
            .map_err(internal)?;
        if !added {
            return Err(ProvisioningError::new(
                429,
                "ThrottlingException",
                "too many certificates await registration; try again later",
            ));
        }
        tracing::info!(
            "provisioning: issued a certificate for {} ({certificate_id})",
            pending.common_name
        );
        Ok((token, certificate_id))
    }

    /// The template devices name: one from the configuration, else one
    /// created through the API (read at each registration, so every
    /// instance sharing the store serves the same).
    async fn template(&self, name: &str) -> Result<Arc<ProvisioningTemplate>, ProvisioningError> {
        if let Some(t) = self.templates.get(name) {
            return Ok(Arc::clone(t));
        }
        let not_found = || ProvisioningError::new(404, "NotFound", format!("no template {name}"));
        let stored = self
            .registry
            .stored_template(name)
            .await
            .map_err(|e| ProvisioningError::new(500, "InternalFailure", e.to_string()))?
            .ok_or_else(not_found)?;
        if !stored.enabled {
            return Err(ProvisioningError::new(
                403,
                "Forbidden",
                format!("template {name} is disabled"),
            ));
        }
        let t = ProvisioningTemplate::from_stored(&stored).map_err(|e| {
            tracing::error!("provisioning: stored template {name}: {e}");
            ProvisioningError::new(
                500,
                "InternalFailure",
                format!("template {name} is unusable"),
            )
        })?;
        Ok(Arc::new(t))
    }

    async fn register_thing(
        &self,
        template: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<Value, ProvisioningError> {
        let t = self.template(template).await?;
        let t = &*t;
        let request: RegisterRequest = serde_json::from_slice(payload).map_err(|_| {
            ProvisioningError::new(
                400,
                "InvalidPayload",
                "expected certificateOwnershipToken and parameters",
            )
        })?;
        let invalid = |p: &str| {
            ProvisioningError::new(
                400,
                "InvalidParameters",
                format!("parameter {p} is missing or invalid"),
            )
        };
        let required: Vec<&String> = match &t.body {
            Some(_) => t.required_parameters.iter().collect(),
            None => std::iter::once(&t.name_parameter)
                .chain(&t.required_parameters)
                .collect(),
        };
        for p in required {
            match request.parameters.get(p) {
                Some(v) if valid_parameter(v) => {}
                _ => return Err(invalid(p)),
            }
        }
        if let Some((p, _)) = request.parameters.iter().find(|(_, v)| !valid_parameter(v)) {
            return Err(invalid(p));
        }
        // Check the token without spending it: a refused registration
        // leaves it usable until it expires.
        let token = self
            .registry
            .pending(&request.certificate_ownership_token, now)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                ProvisioningError::new(
                    400,
                    "InvalidToken",
                    "the ownership token is unknown, used or expired",
                )
            })?;
        let (certificate_id, certificate_pem) =
            (token.certificate_id.clone(), token.certificate_pem.clone());
        // The template's hook first: it may override parameters.
        let parameters = match &t.webhook {
            None => request.parameters.clone(),
            Some(hook) => hook
                .decide(
                    template,
                    &certificate_id,
                    &certificate_pem,
                    &request.parameters,
                )
                .await
                .map_err(|reason| {
                    tracing::info!(template, "provisioning refused by the hook: {reason}");
                    ProvisioningError::new(403, "AccessDenied", reason)
                })?,
        };
        let (mut thing, attributes, groups) = match &t.body {
            Some(body) => {
                let r = body
                    .render(
                        &parameters,
                        &Certificate {
                            id: certificate_id.clone(),
                            common_name: token.common_name.clone(),
                        },
                    )
                    .map_err(|e| ProvisioningError::new(400, "InvalidParameters", e.to_string()))?;
                (r.thing_name, r.attributes, r.groups)
            }
            None => {
                let name = parameters
                    .get(&t.name_parameter)
                    .ok_or_else(|| invalid(&t.name_parameter))?;
                let mut attributes = t.attributes.clone();
                attributes.extend(parameters.clone());
                (
                    format!("{}{name}", t.thing_name_prefix),
                    attributes,
                    t.groups.clone(),
                )
            }
        };
        if token.named_by_certificate {
            thing.clone_from(&token.common_name);
        } else if self.subject_names_thing && token.common_name != thing {
            return Err(ProvisioningError::new(
                400,
                "InvalidParameters",
                format!(
                    "the template names the thing {thing}, the certificate is for {}",
                    token.common_name
                ),
            ));
        }
        let replacing = self.check_replaceable(&thing, t.allow_replace).await?;
        if let Some(hook) = &self.hook {
            // A hook may ask another system: off the runtime's threads.
            let (hook, template, parameters) =
                (hook.clone(), template.to_owned(), parameters.clone());
            off_runtime(move || {
                hook.check(&template, &parameters)
                    .map_err(|reason| ProvisioningError::new(403, "AccessDenied", reason))
            })
            .await?;
        }
        match self
            .registry
            .spend_pending(&request.certificate_ownership_token, now)
            .await
            .map_err(internal)?
        {
            Spent::Now => {}
            Spent::Before => {
                return Err(ProvisioningError::new(
                    400,
                    "InvalidToken",
                    "the ownership token was used",
                ));
            }
            Spent::Unknown => {
                return Err(ProvisioningError::new(
                    400,
                    "InvalidToken",
                    "the ownership token is unknown, used or expired",
                ));
            }
        }
        let previous = if replacing {
            self.registry
                .set_attributes(&thing, &attributes)
                .await
                .map_err(internal)?;
            self.registry.certificates(&thing).await.map_err(internal)?
        } else {
            match self.registry.create_thing(&thing, attributes).await {
                Ok(_) => Vec::new(),
                // Registered by someone else since the check.
                Err(RegistryError::AlreadyExists(_)) => {
                    return Err(ProvisioningError::new(
                        403,
                        "AccessDenied",
                        format!("{thing} exists and its template does not allow replacing it"),
                    ));
                }
                Err(RegistryError::InvalidName(e)) => {
                    return Err(ProvisioningError::new(400, "InvalidParameters", e));
                }
                Err(e) => return Err(internal(e)),
            }
        };
        self.registry
            .add_certificate(&certificate_id, &thing, &certificate_pem)
            .await
            .map_err(internal)?;
        for old in previous {
            self.registry
                .revoke_certificate(&old.id)
                .await
                .map_err(internal)?;
        }
        for g in &groups {
            self.registry
                .add_to_group(g, &thing)
                .await
                .map_err(internal)?;
        }
        if let Some(hook) = &self.on_registered {
            hook(&thing, true).await;
        }
        tracing::info!("provisioning: registered {thing} (certificate {certificate_id})");
        Ok(json!({"thingName": thing, "deviceConfiguration": {}}))
    }
}

fn internal(e: RegistryError) -> ProvisioningError {
    ProvisioningError::new(500, "InternalFailure", e.to_string())
}

/// Runs `f` on a blocking thread.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProvisioningError> + Send + 'static,
) -> Result<T, ProvisioningError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ProvisioningError::new(
            500,
            "InternalFailure",
            e.to_string(),
        ))
    })
}

/// The certificate's id: the SHA-256 of its DER bytes, hex (as AWS IoT's
/// certificate ids, and what the embedded broker revokes by).
fn fingerprint(pem: &str) -> String {
    crate::certificate_fingerprint(pem).unwrap_or_default()
}

fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(common_name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    /// The reply to a request: its last topic level and its body.
    async fn call(s: &ProvisioningService, topic: &str, body: &str, now: u64) -> (String, Value) {
        let request = Request::from_broker(&TopicPrefix::AWS, topic, body.as_bytes(), now).unwrap();
        let reply = s.handle(&request).await.pop().unwrap();
        let v: Value = serde_json::from_slice(&reply.payload).unwrap();
        (reply.topic.rsplit('/').next().unwrap().to_string(), v)
    }

    #[tokio::test]
    async fn outstanding_tokens_are_bounded() {
        let mut service = ProvisioningService::new(
            Pki::new("test CA").unwrap(),
            Registry::in_memory().unwrap(),
            Vec::new(),
        );
        service.max_outstanding_tokens = 2;
        let topic = "$aws/certificates/create-from-csr/json";
        let body = json!({"certificateSigningRequest": csr("pump-1")}).to_string();
        for _ in 0..2 {
            let (t, v) = call(&service, topic, &body, 1_000).await;
            assert_eq!(t, "accepted", "{v}");
            // The certificate id is the SHA-256 of the DER certificate.
            assert_eq!(
                v["certificateId"].as_str(),
                crate::certificate_fingerprint(v["certificatePem"].as_str().unwrap()).as_deref()
            );
        }
        let (t, v) = call(&service, topic, &body, 1_000).await;
        assert_eq!(t, "rejected");
        assert_eq!(v["statusCode"], 429);
        assert_eq!(v["errorCode"], "ThrottlingException");
        // Expired tokens make room again.
        let (t, _) = call(&service, topic, &body, 1_000 + 3_601).await;
        assert_eq!(t, "accepted");
    }

    #[tokio::test]
    async fn create_keys_and_certificate_is_opt_in() {
        let template = ProvisioningTemplate {
            allow_replace: false,
            name: "factory".into(),
            thing_name_prefix: "pump-".into(),
            name_parameter: "SerialNumber".into(),
            required_parameters: Vec::new(),
            attributes: BTreeMap::new(),
            groups: Vec::new(),
            body: None,
            webhook: None,
        };
        let registry = Registry::in_memory().unwrap();
        let mut service = ProvisioningService::new(
            Pki::new("test CA").unwrap(),
            registry.clone(),
            vec![template],
        );
        let create = "$aws/certificates/create/json";
        let (outcome, v) = call(&service, create, "{}", 1_000).await;
        assert_eq!(
            (outcome.as_str(), v["statusCode"].as_u64()),
            ("rejected", Some(403))
        );

        service.allow_create_keys = true;
        let (outcome, v) = call(&service, create, "{}", 1_000).await;
        assert_eq!(outcome, "accepted");
        assert!(v["privateKey"].as_str().unwrap().contains("PRIVATE KEY"));
        let body = json!({
            "certificateOwnershipToken": v["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "77"},
        })
        .to_string();
        let (outcome, r) = call(
            &service,
            "$aws/provisioning-templates/factory/provision/json",
            &body,
            1_000,
        )
        .await;
        assert_eq!(outcome, "accepted", "{r}");
        let thing = r["thingName"].as_str().unwrap();
        assert!(thing.starts_with("device-"), "{thing}");
        assert_eq!(
            registry.thing(thing).await.unwrap().attributes["SerialNumber"],
            "77"
        );
        assert_eq!(registry.certificates(thing).await.unwrap().len(), 1);
    }
}
