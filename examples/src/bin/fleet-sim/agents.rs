//! The fleet run: each simulated device is a `fleet_device::Agent` (mutual
//! TLS, MQTT 5, its own reconnection backoff with jitter, in-memory outbox).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleet_cloud::pki::Identity;
use fleet_core::jobs::JobStatus;
use fleet_device::{Agent, AgentBuilder, AgentEvent, Qos};
use serde_json::{Map, Value, json};

use crate::BoxError;
use crate::raw::ANSWER_TIMEOUT;
use crate::stats::epoch_micros;

/// Disconnections (refused or failed connections) seen by the agents.
pub(crate) static RETRIES: AtomicUsize = AtomicUsize::new(0);

/// Starts an agent for `identity`'s thing.
pub(crate) fn start(port: u16, ca_pem: &str, identity: &Identity) -> Result<Agent, BoxError> {
    Ok(AgentBuilder::new(
        "localhost",
        port,
        &identity.common_name,
        &identity.cert_pem,
        &identity.key_pem,
        ca_pem,
    )
    .keep_alive(Duration::from_secs(60))
    .start()?)
}

/// Waits until the agent is connected; returns how long it took from
/// `started`.
pub(crate) async fn connected(agent: &mut Agent, started: Instant) -> Result<Duration, BoxError> {
    let wait = async {
        while let Some(event) = agent.next_event().await {
            match event {
                AgentEvent::Connected => return Ok(started.elapsed()),
                AgentEvent::Disconnected { .. } => {
                    RETRIES.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        Err::<Duration, BoxError>("agent stopped".into())
    };
    tokio::time::timeout(Duration::from_secs(600), wait)
        .await
        .map_err(|_| "not connected after 10 minutes")?
}

/// One shadow report, waiting for the service's acceptance.
pub(crate) async fn shadow_update(agent: &Agent, seq: u64, pad: &str) -> Result<(), BoxError> {
    let mut reported = Map::new();
    reported.insert("seq".into(), json!(seq));
    reported.insert("pad".into(), Value::String(pad.into()));
    tokio::time::timeout(ANSWER_TIMEOUT, agent.report(None, reported))
        .await
        .map_err(|_| "report not accepted in time")??;
    Ok(())
}

/// Waits for the job, reports it SUCCEEDED and waits for the service's
/// acceptance.
pub(crate) async fn job(agent: &mut Agent, job_id: &str) -> Result<(), BoxError> {
    let wait = async {
        while let Some(event) = agent.next_event().await {
            if let AgentEvent::Job { job_id: j, .. } = event
                && j == job_id
            {
                return Ok(());
            }
        }
        Err::<(), BoxError>("agent stopped".into())
    };
    tokio::time::timeout(ANSWER_TIMEOUT, wait)
        .await
        .map_err(|_| "no job")??;
    tokio::time::timeout(ANSWER_TIMEOUT, agent.update_job(JobStatus::Succeeded, None))
        .await
        .map_err(|_| "job update not accepted in time")??;
    Ok(())
}

/// One telemetry message at QoS 1, waiting for the broker's acknowledgement.
pub(crate) async fn telemetry(agent: &Agent, pad: &str) -> Result<(), BoxError> {
    let payload = format!(r#"{{"t":{},"pad":"{pad}"}}"#, epoch_micros());
    let delivery = agent
        .publish("telemetry", payload, Qos::AtLeastOnce)
        .await?;
    tokio::time::timeout(ANSWER_TIMEOUT, delivery.acknowledged())
        .await
        .map_err(|_| "no acknowledgement in time")??;
    Ok(())
}
