//! Provisioning by claim: a device that holds only a claim certificate
//! (shared by a production batch) gets an identity of its own.
//!
//! The device generates its key pair and a certificate signing request
//! locally (the private key never leaves it), asks the fleet's
//! `create-from-csr` for a certificate, registers through a provisioning
//! template (`RegisterThing`), and stores the certificate and key in its
//! state directory. Over MQTT 5 (the default), replies come on the
//! response topic of each request, in the claimant's own
//! `$aws/clients/{client id}/` namespace. MQTT 3.1.1 has no response
//! topic, so with [`Protocol::V311`] the requests go under
//! `$aws/claims/{claim identity}/{client id}/` and the replies come back
//! there ([`ClaimTopic`]): a broker with the fleet's policy (the embedded
//! broker, or Mosquitto with the generated ACL) lets only this connection
//! write and read there. Either way no other claimant can read them.
//! (AWS's own SDKs, over MQTT 3.1.1, use AWS's fixed reply topics: the
//! embedded broker routes those replies to the requester alone; Mosquitto
//! cannot, and its ACL lets no claimant read them.)

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_core::ClientName;
use fleet_core::TemplateName;
use fleet_core::topic::{
    ClaimTopic, Format, ProvisioningTopic, Role, Topic, TopicPrefix, client_namespace,
    client_topic, response_reply,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{Value, json};

use crate::AgentBuilder;
use crate::key::{CsrSigner, DeviceKey};
use crate::mqtt::{self, Ev, Protocol};

/// Why provisioning failed. Nothing is stored unless it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The claim certificate, key or trust anchors are unusable.
    Tls(String),
    /// The key or the CSR could not be made.
    Key(String),
    /// No connection, or no answer in time.
    Network(String),
    /// The service refused (AWS's status code, error code and message).
    Rejected {
        /// HTTP-style status.
        status: u16,
        /// AWS's error code (`InvalidToken`, `AccessDenied`, ...).
        code: String,
        /// For people.
        message: String,
    },
    /// The service answered something that is not a provisioning reply.
    InvalidReply(String),
    /// The state directory could not be written or read.
    StateDir(String),
    /// A name in the configuration (the template's) is not valid.
    InvalidName(String),
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls(e) => write!(f, "claim TLS configuration: {e}"),
            Self::InvalidName(e) => write!(f, "invalid name: {e}"),
            Self::Key(e) => write!(f, "cannot make the device key: {e}"),
            Self::Network(e) => write!(f, "provisioning: {e}"),
            Self::Rejected {
                status,
                code,
                message,
            } => write!(f, "provisioning refused: {status} {code}: {message}"),
            Self::InvalidReply(e) => write!(f, "provisioning reply: {e}"),
            Self::StateDir(e) => write!(f, "state directory: {e}"),
        }
    }
}

impl std::error::Error for ProvisionError {}

/// What provisioning needs.
#[derive(Clone)]
pub struct ClaimConfig {
    /// The broker.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The claim certificate (PEM).
    pub claim_cert_pem: String,
    /// The claim private key (PEM).
    pub claim_key_pem: String,
    /// Trust anchors of the broker's certificate (PEM).
    pub ca_pem: String,
    /// The provisioning template's name.
    pub template: String,
    /// The template's parameters (`SerialNumber`, ...).
    pub parameters: BTreeMap<String, String>,
    /// The thing name the template gives this device (its certificate's
    /// common name): the template's prefix and naming parameter.
    pub thing_name: String,
    /// Where the certificate and key are stored (`device.pem`,
    /// `device.key`, `thing`).
    pub state_dir: PathBuf,
    /// How long to wait for each answer.
    pub timeout: Duration,
    /// MQTT 5 (the default: replies to each request's response topic) or
    /// MQTT 3.1.1 (requests and replies under the claimant's own
    /// `claims/{identity}/{client id}/` topics).
    pub protocol: Protocol,
}

impl fmt::Debug for ClaimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("template", &self.template)
            .field("thing_name", &self.thing_name)
            .field("state_dir", &self.state_dir)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// A device's own identity, issued by the fleet.
#[derive(Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The thing name the service registered.
    pub thing_name: String,
    /// The device certificate (PEM).
    pub cert_pem: String,
    /// The device private key (PEM), generated on the device; empty when
    /// the key is held in hardware ([`provision_by_claim_with_key`]).
    pub key_pem: String,
}

impl fmt::Debug for Provisioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioned")
            .field("thing_name", &self.thing_name)
            .finish_non_exhaustive()
    }
}

impl Provisioned {
    /// The identity stored in `state_dir` by an earlier provisioning, if
    /// there is one.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, ProvisionError> {
        let read = |name: &str| std::fs::read_to_string(state_dir.join(name));
        match (read("device.pem"), read("device.key"), read("thing")) {
            (Ok(cert_pem), Ok(key_pem), Ok(thing_name)) => Ok(Some(Self {
                thing_name: thing_name.trim().to_string(),
                cert_pem,
                key_pem,
            })),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                Err(ProvisionError::StateDir(e.to_string()))
            }
        }
    }

    /// The certificate and thing name stored in `state_dir` by an earlier
    /// provisioning with a key held elsewhere, if there are both
    /// ([`Provisioned::key_pem`] is then empty).
    pub fn load_certificate(state_dir: &Path) -> Result<Option<Self>, ProvisionError> {
        let read = |name: &str| std::fs::read_to_string(state_dir.join(name));
        match (read("device.pem"), read("thing")) {
            (Ok(cert_pem), Ok(thing_name)) => Ok(Some(Self {
                thing_name: thing_name.trim().to_string(),
                cert_pem,
                key_pem: String::new(),
            })),
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            (Err(e), _) | (_, Err(e)) => Err(ProvisionError::StateDir(e.to_string())),
        }
    }

    /// An agent builder with this identity.
    pub fn agent(&self, host: &str, port: u16, ca_pem: &str) -> AgentBuilder {
        AgentBuilder::new(
            host,
            port,
            &self.thing_name,
            &self.cert_pem,
            &self.key_pem,
            ca_pem,
        )
    }

    fn store(&self, dir: &Path) -> Result<(), ProvisionError> {
        let bad = |e: std::io::Error| ProvisionError::StateDir(e.to_string());
        std::fs::create_dir_all(dir).map_err(bad)?;
        // Each file written whole, then renamed into place; the thing name
        // last, so a crash in between leaves no half identity (`load` needs
        // all three).
        for (name, text, secret) in [
            ("device.key", &self.key_pem, true),
            ("device.pem", &self.cert_pem, false),
            ("thing", &self.thing_name, false),
        ] {
            if text.is_empty() {
                continue; // a key held in hardware is not stored here
            }
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, text).map_err(bad)?;
            #[cfg(unix)]
            if secret {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                    .map_err(bad)?;
            }
            #[cfg(not(unix))]
            let _ = secret;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(bad)?;
            std::fs::rename(&tmp, dir.join(name)).map_err(bad)?;
        }
        Ok(())
    }
}

/// Provisions the device by claim, unless its state directory already
/// holds an identity (then returns that one, without a connection).
pub async fn provision_by_claim(config: &ClaimConfig) -> Result<Provisioned, ProvisionError> {
    if let Some(p) = Provisioned::load(&config.state_dir)? {
        return Ok(p);
    }
    let key = rcgen::KeyPair::generate().map_err(|e| ProvisionError::Key(e.to_string()))?;
    let csr = certificate_request(config, &key).map_err(|e| ProvisionError::Key(e.to_string()))?;
    register(config, csr, key.serialize_pem()).await
}

/// Provisions the device by claim with a key held elsewhere (a PKCS#11
/// token, a TPM, a secure element: [`DeviceKey`]): the certificate request
/// is signed by that key, which never leaves it, and only the certificate
/// and thing name are stored (the returned [`Provisioned::key_pem`] is
/// empty; give the key to [`AgentBuilder::device_key`]). Unless the state
/// directory already holds a certificate: then returns that one, without
/// a connection.
pub async fn provision_by_claim_with_key(
    config: &ClaimConfig,
    key: Arc<dyn DeviceKey>,
) -> Result<Provisioned, ProvisionError> {
    if let Some(p) = Provisioned::load_certificate(&config.state_dir)? {
        return Ok(p);
    }
    let signer = CsrSigner::new(key).map_err(|e| ProvisionError::Key(e.to_string()))?;
    let csr = certificate_request(config, &signer).map_err(|e| {
        ProvisionError::Key(match signer.take_error() {
            Some(key) => key.to_string(),
            None => e.to_string(),
        })
    })?;
    register(config, csr, String::new()).await
}

fn certificate_request(
    config: &ClaimConfig,
    key: &impl rcgen::SigningKey,
) -> Result<String, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, config.thing_name.as_str());
    params.serialize_request(key).and_then(|c| c.pem())
}

/// `create-from-csr`, then `RegisterThing`; stores the identity.
async fn register(
    config: &ClaimConfig,
    csr: String,
    key_pem: String,
) -> Result<Provisioned, ProvisionError> {
    let mut session = Channel::connect(config).await?;
    let created = session
        .request(
            ProvisioningTopic::CreateCertificateFromCsr(Format::Json, Role::Request),
            "create-from-csr",
            &json!({ "certificateSigningRequest": csr }),
        )
        .await?;
    let (Some(cert_pem), Some(token)) = (
        created["certificatePem"].as_str(),
        created["certificateOwnershipToken"].as_str(),
    ) else {
        return Err(ProvisionError::InvalidReply(
            "no certificate or ownership token".into(),
        ));
    };
    let template = TemplateName::new(&config.template)
        .map_err(|e| ProvisionError::InvalidName(e.to_string()))?;
    let registered = session
        .request(
            ProvisioningTopic::RegisterThing(template, Format::Json, Role::Request),
            "register",
            &json!({ "certificateOwnershipToken": token, "parameters": config.parameters }),
        )
        .await?;
    session.close().await;
    let thing_name = registered["thingName"]
        .as_str()
        .ok_or_else(|| ProvisionError::InvalidReply("no thingName".into()))?
        .to_string();
    let provisioned = Provisioned {
        thing_name,
        cert_pem: cert_pem.to_string(),
        key_pem,
    };
    provisioned.store(&config.state_dir)?;
    Ok(provisioned)
}

/// A claimant's connection: MQTT 5 with response topics, or MQTT 3.1.1
/// with its own claim topics.
enum Channel {
    V5(Box<Session>),
    V311(Session311),
}

impl Channel {
    async fn connect(config: &ClaimConfig) -> Result<Self, ProvisionError> {
        match config.protocol {
            Protocol::V311 => Ok(Self::V311(Session311::connect(config).await?)),
            _ => Ok(Self::V5(Box::new(Session::connect(config).await?))),
        }
    }

    /// Asks `request` (answered on its own reply topics) and returns the
    /// accepted reply's body.
    async fn request(
        &mut self,
        request: ProvisioningTopic<'_>,
        what: &str,
        body: &Value,
    ) -> Result<Value, ProvisionError> {
        match self {
            Self::V5(s) => {
                let topic = Topic::Provisioning(request).to_string_under(&TopicPrefix::AWS);
                s.request(&topic, what, body).await
            }
            Self::V311(s) => s.request(request, body).await,
        }
    }

    async fn close(self) {
        match self {
            Self::V5(s) => s.close().await,
            Self::V311(s) => s.close().await,
        }
    }
}

/// The accepted body, or the rejection it carries.
fn accepted_or_rejected(ok: bool, payload: &[u8]) -> Result<Value, ProvisionError> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| ProvisionError::InvalidReply(e.to_string()))?;
    if ok {
        Ok(v)
    } else {
        Err(ProvisionError::Rejected {
            status: v["statusCode"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0),
            code: v["errorCode"].as_str().unwrap_or_default().to_string(),
            message: v["errorMessage"].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// A fresh client id: claimants share a certificate, not a session, and
/// the reply namespace is per client id.
fn claimant_client_id() -> Result<String, ProvisionError> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| ProvisionError::Key(e.to_string()))?;
    Ok(format!(
        "claim-{}",
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// The common name of a certificate (PEM): a claim identity's name.
fn common_name(cert_pem: &str) -> Result<String, ProvisionError> {
    let bad = |e: String| ProvisionError::Tls(format!("claim certificate: {e}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("no common name".into()))?;
    Ok(cn.to_string())
}

/// MQTT 3.1.1: requests under `claims/{identity}/{client id}/`, replies
/// there too.
struct Session311 {
    client: mqtt::Client,
    events: mqtt::EventLoop,
    identity: String,
    client_id: String,
    timeout: Duration,
}

impl Session311 {
    async fn connect(config: &ClaimConfig) -> Result<Self, ProvisionError> {
        let identity = common_name(&config.claim_cert_pem)?;
        let tls = crate::tls::client_tls(
            &config.ca_pem,
            &config.claim_cert_pem,
            &config.claim_key_pem,
        )
        .map_err(|e| ProvisionError::Tls(e.to_string()))?;
        let client_id = claimant_client_id()?;
        let (client, events) = mqtt::connect(
            Protocol::V311,
            mqtt::Options {
                client_id: client_id.clone(),
                host: config.host.clone(),
                port: config.port,
                tls,
                keep_alive: Duration::from_secs(30),
                max_packet: 256 * 1024,
                capacity: 16,
                will: None,
            },
        );
        let mut s = Self {
            client,
            events,
            identity,
            client_id,
            timeout: config.timeout,
        };
        s.until(|e| matches!(e, Ev::ConnAck).then_some(())).await?;
        let (namespace, ..) = s.topic(None)?;
        s.client
            .try_subscribe_many(vec![namespace])
            .map_err(ProvisionError::Network)?;
        s.until(|e| match e {
            Ev::SubAck { ok } => Some(*ok),
            _ => None,
        })
        .await?
        .then_some(())
        .ok_or_else(|| {
            ProvisionError::Network("the broker refused the reply subscription (policy)".into())
        })?;
        Ok(s)
    }

    /// The claim topic of `request` (`None`: the filter of the whole
    /// namespace), and its accepted and rejected replies.
    fn topic(
        &self,
        request: Option<ProvisioningTopic<'_>>,
    ) -> Result<(String, String, String), ProvisionError> {
        let name = |s: &str| {
            ClientName::new(s)
                .map(ClientName::into_owned)
                .map_err(|e| ProvisionError::InvalidName(e.to_string()))
        };
        let (identity, client) = (name(&self.identity)?, name(&self.client_id)?);
        let p = TopicPrefix::AWS;
        Ok(match request {
            Some(request) => {
                let t = Topic::Claim(ClaimTopic {
                    identity,
                    client,
                    request,
                });
                let reply = |role| {
                    t.reply(role)
                        .map(|r| r.to_string_under(&p))
                        .unwrap_or_default()
                };
                (
                    t.to_string_under(&p),
                    reply(Role::Accepted),
                    reply(Role::Rejected),
                )
            }
            None => (
                format!("{}/claims/{identity}/{client}/#", p.as_str()),
                String::new(),
                String::new(),
            ),
        })
    }

    async fn until<T>(
        &mut self,
        mut want: impl FnMut(&Ev) -> Option<T>,
    ) -> Result<T, ProvisionError> {
        tokio::time::timeout(self.timeout, async {
            loop {
                match self.events.poll().await {
                    Ev::Error { reason, .. } => return Err(ProvisionError::Network(reason)),
                    e => {
                        if let Some(t) = want(&e) {
                            return Ok(t);
                        }
                    }
                }
            }
        })
        .await
        .map_err(|_| ProvisionError::Network("no answer in time".into()))?
    }

    async fn request(
        &mut self,
        request: ProvisioningTopic<'_>,
        body: &Value,
    ) -> Result<Value, ProvisionError> {
        let (topic, accepted, rejected) = self.topic(Some(request))?;
        self.client
            .try_publish(&topic, 1, body.to_string().into_bytes())
            .map_err(ProvisionError::Network)?;
        let (ok, payload) = self
            .until(|e| match e {
                Ev::Publish { topic, payload } if *topic == accepted => {
                    Some((true, payload.clone()))
                }
                Ev::Publish { topic, payload } if *topic == rejected => {
                    Some((false, payload.clone()))
                }
                _ => None,
            })
            .await?;
        accepted_or_rejected(ok, &payload)
    }

    async fn close(mut self) {
        self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(300), self.events.poll()).await;
    }
}

struct Session {
    client: AsyncClient,
    events: EventLoop,
    client_id: String,
    timeout: Duration,
}

impl Session {
    async fn connect(config: &ClaimConfig) -> Result<Self, ProvisionError> {
        let tls = crate::tls::client_tls(
            &config.ca_pem,
            &config.claim_cert_pem,
            &config.claim_key_pem,
        )
        .map_err(|e| ProvisionError::Tls(e.to_string()))?;
        let client_id = claimant_client_id()?;
        let mut options = MqttOptions::new(client_id.clone(), config.host.clone(), config.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(256 * 1024))
            .set_clean_start(true)
            .set_network_options(crate::mqtt::network_options())
            .set_connection_timeout(10)
            .set_outgoing_inflight_upper_limit(crate::mqtt::MAX_INFLIGHT)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, events) = AsyncClient::new(options, 16);
        let mut s = Self {
            client,
            events,
            client_id: client_id.clone(),
            timeout: config.timeout,
        };
        s.until(|p| matches!(p, Packet::ConnAck(_)).then_some(()))
            .await?;
        s.client
            .subscribe(
                client_namespace(&TopicPrefix::AWS, &s.client_id),
                QoS::AtLeastOnce,
            )
            .await
            .map_err(|e| ProvisionError::Network(e.to_string()))?;
        s.until(|p| match p {
            Packet::SubAck(a) => Some(a.return_codes.iter().all(|c| {
                matches!(
                    c,
                    rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                )
            })),
            _ => None,
        })
        .await?
        .then_some(())
        .ok_or_else(|| {
            ProvisionError::Network("the broker refused the reply subscription (policy)".into())
        })?;
        Ok(s)
    }

    async fn until<T>(
        &mut self,
        mut want: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, ProvisionError> {
        tokio::time::timeout(self.timeout, async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if let Some(t) = want(&p) {
                            return Ok(t);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(ProvisionError::Network(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| ProvisionError::Network("no answer in time".into()))?
    }

    /// Publishes a request with its response topic, returns the accepted
    /// reply's body.
    async fn request(
        &mut self,
        topic: &str,
        what: &str,
        body: &Value,
    ) -> Result<Value, ProvisionError> {
        let response = client_topic(&TopicPrefix::AWS, &self.client_id, what)
            .ok_or_else(|| ProvisionError::InvalidName(format!("response topic {what:?}")))?;
        let properties = PublishProperties {
            response_topic: Some(response.clone()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_string(), properties)
            .await
            .map_err(|e| ProvisionError::Network(e.to_string()))?;
        let reply = |role| response_reply(&TopicPrefix::AWS, &response, role).unwrap_or_default();
        let (accepted, rejected) = (reply(Role::Accepted), reply(Role::Rejected));
        let (ok, payload) = self
            .until(|p| match p {
                Packet::Publish(m) if m.topic == accepted.as_bytes() => {
                    Some((true, m.payload.clone()))
                }
                Packet::Publish(m) if m.topic == rejected.as_bytes() => {
                    Some((false, m.payload.clone()))
                }
                _ => None,
            })
            .await?;
        accepted_or_rejected(ok, &payload)
    }

    async fn close(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(300), self.events.poll()).await;
    }
}
