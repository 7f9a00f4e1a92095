//! Provisioning by claim: a device that holds only a claim certificate
//! (shared by a production batch) gets an identity of its own.
//!
//! The device generates its key pair and a certificate signing request
//! locally (the private key never leaves it), asks the fleet's
//! `create-from-csr` for a certificate, registers through a provisioning
//! template (`RegisterThing`), and stores the certificate and key in its
//! state directory. Replies come on the MQTT 5 response topic of each
//! request, in the claimant's own `$aws/clients/{client id}/` namespace, so
//! no other claimant can read them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_core::TemplateName;
use fleet_core::topic::{
    Format, ProvisioningTopic, Role, Topic, TopicPrefix, client_namespace, client_topic,
    response_reply,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{Value, json};

use crate::AgentBuilder;

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
}

impl fmt::Debug for ClaimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("template", &self.template)
            .field("thing_name", &self.thing_name)
            .field("state_dir", &self.state_dir)
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
    /// The device private key (PEM), generated on the device.
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
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| ProvisionError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, config.thing_name.as_str());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ProvisionError::Key(e.to_string()))?;

    let mut session = Session::connect(config).await?;
    let created = session
        .request(
            &Topic::Provisioning(ProvisioningTopic::CreateCertificateFromCsr(
                Format::Json,
                Role::Request,
            ))
            .to_string_under(&TopicPrefix::AWS),
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
            &Topic::Provisioning(ProvisioningTopic::RegisterThing(
                template,
                Format::Json,
                Role::Request,
            ))
            .to_string_under(&TopicPrefix::AWS),
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
        key_pem: key.serialize_pem(),
    };
    provisioned.store(&config.state_dir)?;
    Ok(provisioned)
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
        // A client id of its own: claimants share a certificate, not a
        // session, and the reply namespace is per client id.
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| ProvisionError::Key(e.to_string()))?;
        let client_id = format!(
            "claim-{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
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
        let v: Value = serde_json::from_slice(&payload)
            .map_err(|e| ProvisionError::InvalidReply(e.to_string()))?;
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

    async fn close(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(300), self.events.poll()).await;
    }
}
