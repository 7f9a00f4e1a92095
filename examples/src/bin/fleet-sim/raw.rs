//! The raw broker ceiling: plain MQTT 5 clients with mutual TLS (the same
//! certificates, topics and message pattern as the fleet run) and an echo
//! responder that answers each request with its own payload, doing no work.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_cloud::pki::Identity;
use fleet_device::Backoff;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::BoxError;
use crate::stats::{Latencies, epoch_micros};

/// How long a request may wait for its answer before the run counts it
/// as failed.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One plain MQTT connection.
pub(crate) struct RawClient {
    pub(crate) thing: String,
    pub(crate) client: AsyncClient,
    pub(crate) incoming: mpsc::UnboundedReceiver<(String, Bytes)>,
    pub(crate) acks: mpsc::UnboundedReceiver<()>,
    task: JoinHandle<()>,
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connection attempts refused or failed, across all clients.
pub(crate) static RETRIES: AtomicUsize = AtomicUsize::new(0);

/// Starts a client; the receiver fires on its first CONNACK. A failed
/// connection is retried after a full-jitter backoff (the device agent's).
pub(crate) fn connect(
    port: u16,
    ca_pem: &str,
    identity: &Identity,
    client_id: &str,
) -> Result<(RawClient, oneshot::Receiver<()>), BoxError> {
    let tls = fleet_testkit::client_tls_config(identity, ca_pem)?;
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(Some(256 * 1024))
        .set_clean_start(true)
        .set_network_options({
            let mut n = rumqttc::NetworkOptions::new();
            n.set_tcp_nodelay(true);
            n.set_connection_timeout(30);
            n
        })
        .set_connection_timeout(30)
        // As the device agent: rumqttc allocates a slot per packet id it
        // may have in flight (u16::MAX by default, about 8 MiB).
        .set_outgoing_inflight_upper_limit(100)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (connected_tx, connected) = oneshot::channel();
    let (incoming_tx, incoming) = mpsc::unbounded_channel();
    let (acks_tx, acks) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        let backoff = Backoff::default();
        let mut attempt = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    attempt = 0;
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let _ = incoming_tx.send((topic, p.payload));
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = acks_tx.send(());
                }
                Ok(_) => {}
                Err(_) => {
                    RETRIES.fetch_add(1, Ordering::Relaxed);
                    let random = getrandom::u64().unwrap_or(0);
                    tokio::time::sleep(backoff.delay(attempt, random)).await;
                    attempt += 1;
                }
            }
        }
    });
    Ok((
        RawClient {
            thing: identity.common_name.clone(),
            client,
            incoming,
            acks,
            task,
        },
        connected,
    ))
}

impl RawClient {
    /// Waits for a message on a topic ending with `suffix`.
    pub(crate) async fn wait_for(&mut self, suffix: &str) -> Result<Bytes, BoxError> {
        let wait = async {
            while let Some((topic, payload)) = self.incoming.recv().await {
                if topic.ends_with(suffix) {
                    return Ok(payload);
                }
            }
            Err::<Bytes, BoxError>("connection task ended".into())
        };
        tokio::time::timeout(ANSWER_TIMEOUT, wait)
            .await
            .map_err(|_| format!("{}: no {suffix} in {ANSWER_TIMEOUT:?}", self.thing))?
    }

    /// Subscribes to the device's answer topics.
    pub(crate) async fn subscribe_answers(&self) -> Result<(), BoxError> {
        let base = format!("$aws/things/{}", self.thing);
        for f in [
            format!("{base}/shadow/update/accepted"),
            format!("{base}/jobs/notify-next"),
            format!("{base}/jobs/start-next/accepted"),
            format!("{base}/jobs/+/update/accepted"),
        ] {
            self.client.subscribe(f, QoS::AtLeastOnce).await?;
        }
        Ok(())
    }

    /// One shadow update and its answer.
    pub(crate) async fn shadow_update(&mut self, seq: u64, pad: &str) -> Result<(), BoxError> {
        let payload = format!(
            r#"{{"state":{{"reported":{{"seq":{seq},"pad":"{pad}"}}}},"clientToken":"{}-{seq}"}}"#,
            self.thing
        );
        let topic = format!("$aws/things/{}/shadow/update", self.thing);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        self.wait_for("/shadow/update/accepted").await?;
        Ok(())
    }

    /// A job as the AWS device flow runs it: the notification, `start-next`,
    /// then the final status update.
    pub(crate) async fn job(&mut self) -> Result<(), BoxError> {
        self.wait_for("/jobs/notify-next").await?;
        let base = format!("$aws/things/{}/jobs", self.thing);
        self.client
            .publish(
                format!("{base}/start-next"),
                QoS::AtLeastOnce,
                false,
                r#"{"clientToken":"s"}"#,
            )
            .await?;
        self.wait_for("/jobs/start-next/accepted").await?;
        self.client
            .publish(
                format!("{base}/job-1/update"),
                QoS::AtLeastOnce,
                false,
                r#"{"status":"SUCCEEDED","clientToken":"u"}"#,
            )
            .await?;
        self.wait_for("/update/accepted").await?;
        Ok(())
    }

    /// Forgets acknowledgements of earlier publishes.
    pub(crate) fn forget_acks(&mut self) {
        while self.acks.try_recv().is_ok() {}
    }

    /// One telemetry message, waiting for the broker's acknowledgement
    /// (call [`forget_acks`](Self::forget_acks) first).
    pub(crate) async fn telemetry(&mut self, pad: &str) -> Result<(), BoxError> {
        let payload = format!(r#"{{"t":{},"pad":"{pad}"}}"#, epoch_micros());
        self.client
            .publish(
                format!("dt/{}/telemetry", self.thing),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await?;
        tokio::time::timeout(ANSWER_TIMEOUT, self.acks.recv())
            .await
            .map_err(|_| "no PUBACK")?
            .ok_or("connection task ended")?;
        Ok(())
    }
}

/// The echo responder: answers every shadow update, `start-next` and job
/// update with its own payload on `{topic}/accepted`, and publishes job
/// notifications when asked.
pub(crate) struct Echo {
    pub(crate) client: RawClient,
    worker: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

impl Echo {
    pub(crate) async fn start(
        port: u16,
        ca_pem: &str,
        backend: &Identity,
    ) -> Result<Self, BoxError> {
        let (mut client, connected) = connect(port, ca_pem, backend, "fleet-echo")?;
        connected.await?;
        for f in [
            "$aws/things/+/shadow/update",
            "$aws/things/+/jobs/start-next",
            "$aws/things/+/jobs/+/update",
        ] {
            client.client.subscribe(f, QoS::AtLeastOnce).await?;
        }
        let mut incoming = std::mem::replace(&mut client.incoming, mpsc::unbounded_channel().1);
        let publisher = client.client.clone();
        let worker = tokio::spawn(async move {
            while let Some((topic, payload)) = incoming.recv().await {
                let _ = publisher
                    .publish(
                        format!("{topic}/accepted"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await;
            }
        });
        // Let the subscriptions settle before anyone relies on them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Self { client, worker })
    }

    /// Publishes a job notification to each thing.
    pub(crate) async fn notify(&self, things: &[String]) -> Result<(), BoxError> {
        for t in things {
            self.client
                .client
                .publish(
                    format!("$aws/things/{t}/jobs/notify-next"),
                    QoS::AtLeastOnce,
                    false,
                    r#"{"execution":{"jobId":"job-1","status":"QUEUED","executionNumber":1,"versionNumber":1}}"#,
                )
                .await?;
        }
        Ok(())
    }
}

/// The raw telemetry consumer: counts what arrives on `dt/+/telemetry` and
/// its latency.
pub(crate) struct Consumer {
    seen: Arc<std::sync::Mutex<Latencies>>,
    worker: JoinHandle<()>,
    _client: RawClient,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

impl Consumer {
    pub(crate) async fn start(
        port: u16,
        ca_pem: &str,
        backend: &Identity,
    ) -> Result<Self, BoxError> {
        let (mut client, connected) = connect(port, ca_pem, backend, "fleet-consumer")?;
        connected.await?;
        client
            .client
            .subscribe("dt/+/telemetry", QoS::AtLeastOnce)
            .await?;
        let mut incoming = std::mem::replace(&mut client.incoming, mpsc::unbounded_channel().1);
        let seen = Arc::new(std::sync::Mutex::new(Latencies::default()));
        let s = seen.clone();
        let worker = tokio::spawn(async move {
            while let Some((_, payload)) = incoming.recv().await {
                let sent = serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|v| v.get("t").and_then(serde_json::Value::as_u64));
                if let (Some(sent), Ok(mut seen)) = (sent, s.lock()) {
                    seen.push(Duration::from_micros(epoch_micros().saturating_sub(sent)));
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Self {
            seen,
            worker,
            _client: client,
        })
    }

    /// What arrived since the last call.
    pub(crate) fn take(&self) -> Latencies {
        self.seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }
}

/// Waits for `connected`, returning how long it took from `started`.
pub(crate) async fn connected_after(
    connected: oneshot::Receiver<()>,
    started: Instant,
) -> Result<Duration, BoxError> {
    tokio::time::timeout(Duration::from_secs(600), connected)
        .await
        .map_err(|_| "not connected after 10 minutes")??;
    Ok(started.elapsed())
}
