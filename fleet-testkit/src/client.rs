//! A plain MQTT 5 client with mutual TLS, for driving a broker from tests
//! (and for playing a scripted peer until the real services exist).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::HarnessError;
use crate::broker::Broker;
use fleet_cloud::pki::Identity;

/// A message received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published to.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
enum Observed {
    Connected,
    Disconnected(String),
    Message(Message),
    SubAck(Vec<bool>),
}

/// An MQTT 5 client connected to a [`Broker`] with a client certificate.
/// Its event loop runs on a tokio task and reconnects after an error.
pub struct TestClient {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Observed>,
    messages: VecDeque<Message>,
    task: JoinHandle<()>,
}

/// How long the client waits for the broker to answer a connect or subscribe.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings of a client holding `identity` and trusting `ca_pem`:
/// rustls with the ring provider, TLS 1.2 or 1.3.
pub fn client_tls_config(
    identity: &Identity,
    ca_pem: &str,
) -> Result<rustls::ClientConfig, HarnessError> {
    fleet_cloud::tls::client_config(ca_pem, Some((&identity.cert_pem, &identity.key_pem)))
        .map_err(|e| HarnessError::Tls(e.to_string()))
}

impl TestClient {
    /// Connects to `broker` as `identity` with client id `client_id`, and
    /// waits for the broker to accept the connection.
    pub async fn connect(
        broker: &Broker,
        identity: &Identity,
        client_id: &str,
    ) -> Result<Self, HarnessError> {
        Self::connect_to(broker.port(), &broker.pki().ca_pem(), identity, client_id).await
    }

    /// Connects to a broker on `localhost:port` whose certificate `ca_pem`
    /// signed (a broker the harness did not start: `fleet serve`'s own).
    pub async fn connect_to(
        port: u16,
        ca_pem: &str,
        identity: &Identity,
        client_id: &str,
    ) -> Result<Self, HarnessError> {
        let tls = client_tls_config(identity, ca_pem)?;
        let mut options = MqttOptions::new(client_id, "localhost", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(Some(256 * 1024))
            .set_clean_start(true)
            .set_outgoing_inflight_upper_limit(100)
            .set_network_options({
                let mut n = rumqttc::NetworkOptions::new();
                n.set_tcp_nodelay(true);
                n
            })
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let observed = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Observed::Connected,
                    Ok(Event::Incoming(Packet::Publish(p))) => Observed::Message(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                    }),
                    Ok(Event::Incoming(Packet::SubAck(ack))) => Observed::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .collect(),
                    ),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Observed::Disconnected(e.to_string()));
                        // rumqttc reconnects on the next poll; do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.send(observed).is_err() {
                    return;
                }
            }
        });
        let mut this = Self {
            client,
            events,
            messages: VecDeque::new(),
            task,
        };
        this.wait_for_connack(REPLY_TIMEOUT, true).await?;
        Ok(this)
    }

    /// Waits until the client is connected again after a broker restart or
    /// a network cut, for at most `timeout`.
    pub async fn wait_connected(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_for_connack(timeout, false).await
    }

    async fn wait_for_connack(
        &mut self,
        timeout: Duration,
        fail_fast: bool,
    ) -> Result<(), HarnessError> {
        let mut last_error = String::from("no answer");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Observed::Connected)) => return Ok(()),
                Ok(Some(Observed::Disconnected(e))) if fail_fast => {
                    return Err(HarnessError::Mqtt(e));
                }
                Ok(Some(Observed::Disconnected(e))) => last_error = e,
                Ok(Some(Observed::Message(m))) => self.messages.push_back(m),
                Ok(Some(Observed::SubAck(_))) => {}
                Ok(None) | Err(_) => return Err(HarnessError::Mqtt(last_error)),
            }
        }
    }

    /// Subscribes to `filter` at QoS 1 and returns whether the broker
    /// granted it.
    pub async fn subscribe(&mut self, filter: &str) -> Result<bool, HarnessError> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| HarnessError::Mqtt(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Observed::SubAck(codes))) => return Ok(codes.iter().all(|&ok| ok)),
                Ok(Some(Observed::Message(m))) => self.messages.push_back(m),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    return Err(HarnessError::Mqtt(format!("no SUBACK for {filter}")));
                }
            }
        }
    }

    /// Publishes `payload` to `topic` at QoS 1.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), HarnessError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .map_err(|e| HarnessError::Mqtt(e.to_string()))
    }

    /// Publishes at QoS 1 with an MQTT 5 response topic.
    pub async fn publish_with_response_topic(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        response_topic: &str,
    ) -> Result<(), HarnessError> {
        let properties = PublishProperties {
            response_topic: Some(response_topic.to_string()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), properties)
            .await
            .map_err(|e| HarnessError::Mqtt(e.to_string()))
    }

    /// The next message, waiting at most `timeout`; `None` if none came.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Message> {
        if let Some(m) = self.messages.pop_front() {
            return Some(m);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Observed::Message(m))) => return Some(m),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Sends DISCONNECT and stops the event loop.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        // Give the DISCONNECT a moment to leave before the task is dropped.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
