//! OTA campaigns: a signed release rolled out as a job whose document
//! carries the manifest, the image served over the MQTT file stream, and
//! each device's signed install receipt checked against its registered key.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fleet_core::jobs::{
    ImageSource, JobStatus, OtaJob, RolloutPolicy, RolloutStatus, TargetStatus, TimeoutConfig,
};
use fleet_core::ota::{InstallOutcome, InstallReceipt};
use tokio::sync::mpsc;

use crate::Outgoing;
use crate::jobs::{JobsError, JobsService};
use crate::model::{JobSpec, TargetSelection};
use crate::registry::Registry;
use crate::streams::StreamService;

/// The registry attribute holding a thing's receipt key: its Ed25519
/// public key, base64 (32 bytes).
pub const RECEIPT_KEY_ATTRIBUTE: &str = "receiptKey";

/// A campaign to start.
#[derive(Debug, Clone)]
pub struct CampaignSpec {
    /// The campaign's id (also its job's).
    pub campaign_id: String,
    /// The release to install ([`JobsService::register_release`]).
    pub release_id: String,
    /// Things targeted, in release order.
    pub things: Vec<String>,
    /// Groups targeted (their members after the things).
    pub groups: Vec<String>,
    /// How the release proceeds.
    pub policy: RolloutPolicy,
    /// The executions' in-progress timeout.
    pub timeouts: TimeoutConfig,
}

/// The description of a release's stream (file 0 the image, file 1 the
/// signed manifest envelope).
pub(crate) const RELEASE_DESCRIPTION: &str = "OTA release";

/// Where a campaign stands: a count per outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CampaignStatus {
    /// Not released yet.
    pub pending: usize,
    /// Released, not started.
    pub queued: usize,
    /// Devices working on it.
    pub in_progress: usize,
    /// Committed, with a receipt that verifies.
    pub succeeded: usize,
    /// Failed without a rollback receipt (download or verification failed,
    /// refused).
    pub failed: usize,
    /// Back on the previous image, with a receipt that verifies.
    pub rolled_back: usize,
    /// Timed out.
    pub timed_out: usize,
    /// Canceled (an abort, an operator).
    pub canceled: usize,
    /// Ended with a receipt that does not verify against the device's
    /// registered key, the campaign's nonce or its manifest.
    pub unverified_receipt: usize,
    /// The rollout's status.
    pub rollout: Option<RolloutStatus>,
}

impl CampaignStatus {
    /// Whether nothing more will change.
    pub fn is_final(&self) -> bool {
        matches!(
            self.rollout,
            Some(RolloutStatus::Completed | RolloutStatus::Aborted(_))
        ) && self.queued == 0
            && self.in_progress == 0
    }
}

fn random_nonce() -> Result<[u8; 16], JobsError> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|e| JobsError::Invalid(e.to_string()))?;
    Ok(n)
}

impl JobsService {
    /// Registers a release: a signed manifest envelope and the image it
    /// describes (size and SHA-256 checked), kept as stream `release_id`
    /// (file 0 the image devices fetch, file 1 the envelope), in whatever
    /// backs `streams` (with PostgreSQL, every instance serves it).
    pub async fn register_release(
        &self,
        release_id: &str,
        envelope: &[u8],
        image: Vec<u8>,
        streams: &StreamService,
    ) -> Result<(), JobsError> {
        fleet_core::identity::StreamId::new(release_id)
            .map_err(|e| JobsError::Invalid(format!("release id: {e}")))?;
        let env = fleet_core::ota::Envelope::parse(envelope)
            .map_err(|e| JobsError::Invalid(format!("manifest envelope: {e}")))?;
        let manifest = fleet_core::ota::Manifest::parse(env.payload)
            .map_err(|e| JobsError::Invalid(format!("manifest: {e}")))?;
        // Hashing a large image is CPU work: off the runtime's threads.
        let (image, digest) = tokio::task::spawn_blocking(move || {
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(&image).into();
            (image, digest)
        })
        .await
        .map_err(|e| JobsError::Invalid(e.to_string()))?;
        if manifest.size != image.len() as u64 || manifest.digest != digest {
            return Err(JobsError::Invalid(
                "the image is not the one the manifest describes (size or SHA-256)".into(),
            ));
        }
        streams
            .save(
                release_id,
                RELEASE_DESCRIPTION,
                vec![image, envelope.to_vec()],
            )
            .await
            .map_err(|e| JobsError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// Starts a campaign of a registered release: a rollout job whose
    /// document carries the release's manifest and a fresh nonce the
    /// receipts must echo; devices fetch the image from the release's
    /// stream.
    pub async fn start_campaign(
        &self,
        spec: CampaignSpec,
        streams: &StreamService,
        registry: &Registry,
        now: u64,
    ) -> Result<Vec<Outgoing>, JobsError> {
        streams
            .refresh(&spec.release_id)
            .await
            .map_err(|e| JobsError::Invalid(e.to_string()))?;
        let envelope = streams
            .file(&spec.release_id, 1)
            .ok_or_else(|| JobsError::NotFound(format!("release {}", spec.release_id)))?;
        let nonce = random_nonce()?;
        let document = serde_json::to_value(OtaJob::new(
            &envelope,
            ImageSource::Stream(spec.release_id.clone()),
            &nonce,
        ))
        .map_err(|e| JobsError::Invalid(e.to_string()))?;
        self.create_job(
            JobSpec {
                job_id: spec.campaign_id,
                document,
                things: spec.things,
                groups: spec.groups,
                selection: TargetSelection::Snapshot,
                timeouts: spec.timeouts,
                max_retries: 0,
                rollout: Some(spec.policy),
            },
            registry,
            now,
        )
        .await
    }

    /// Counts a campaign's targets by outcome, checking every receipt.
    pub async fn campaign_status(
        &self,
        campaign_id: &str,
        registry: &Registry,
    ) -> Result<CampaignStatus, JobsError> {
        let job = self.job(campaign_id).await?;
        let ota = OtaJob::deserialize_from(&job.spec.document)?;
        let envelope = ota
            .manifest_bytes()
            .map_err(|e| JobsError::Invalid(e.to_string()))?;
        let nonce = ota
            .nonce_bytes()
            .map_err(|e| JobsError::Invalid(e.to_string()))?;
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&envelope).into()
        };
        let executions: BTreeMap<String, _> = self
            .executions(campaign_id)
            .await?
            .into_iter()
            .map(|e| (e.thing, e.execution))
            .collect();
        let mut s = CampaignStatus::default();
        let Some(rollout) = job.rollout else {
            return Err(JobsError::Invalid(format!(
                "{campaign_id} is not a campaign"
            )));
        };
        s.rollout = rollout.status;
        for (thing, target) in rollout.order.iter().zip(&rollout.targets) {
            let Some(e) = executions.get(thing) else {
                match target.status {
                    TargetStatus::Canceled => s.canceled += 1,
                    TargetStatus::Pending => s.pending += 1,
                    _ => s.queued += 1,
                }
                continue;
            };
            let receipt = e.status_details.get("receipt");
            match (e.status, receipt) {
                (JobStatus::Queued, _) => s.queued += 1,
                (JobStatus::InProgress, _) => s.in_progress += 1,
                (JobStatus::TimedOut, _) => s.timed_out += 1,
                (JobStatus::Canceled | JobStatus::Removed, _) => s.canceled += 1,
                (JobStatus::Succeeded | JobStatus::Failed, Some(r)) => {
                    match verify_receipt(registry, thing, r, &digest, &nonce).await {
                        Some(InstallOutcome::Committed) if e.status == JobStatus::Succeeded => {
                            s.succeeded += 1;
                        }
                        Some(InstallOutcome::RolledBack) if e.status == JobStatus::Failed => {
                            s.rolled_back += 1;
                        }
                        _ => s.unverified_receipt += 1,
                    }
                }
                (JobStatus::Succeeded, None) => s.unverified_receipt += 1,
                (JobStatus::Failed | JobStatus::Rejected, _) => s.failed += 1,
            }
        }
        // The campaign's progress as last read (by a watcher, the API).
        for (state, n) in [
            ("pending", s.pending),
            ("queued", s.queued),
            ("in_progress", s.in_progress),
            ("succeeded", s.succeeded),
            ("failed", s.failed),
            ("rolled_back", s.rolled_back),
            ("timed_out", s.timed_out),
            ("canceled", s.canceled),
            ("unverified_receipt", s.unverified_receipt),
        ] {
            metrics::gauge!(
                "fleet_campaign_devices",
                "campaign" => campaign_id.to_string(),
                "state" => state
            )
            .set(n as f64);
        }
        Ok(s)
    }

    /// The campaign's status every `every`, sent when it changed, until it
    /// is final (the last snapshot is sent, then the channel closes).
    pub fn watch_campaign(
        &self,
        campaign_id: &str,
        registry: Registry,
        every: Duration,
    ) -> mpsc::Receiver<Result<CampaignStatus, JobsError>> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let id = campaign_id.to_string();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let status = this.campaign_status(&id, &registry).await;
                let stop = match &status {
                    Ok(s) => s.is_final(),
                    Err(_) => true,
                };
                let changed = match (&status, &last) {
                    (Ok(s), Some(l)) => s != l,
                    _ => true,
                };
                if changed {
                    if let Ok(s) = &status {
                        last = Some(s.clone());
                    }
                    if tx.send(status).await.is_err() {
                        return;
                    }
                }
                if stop {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        rx
    }
}

trait FromDocument: Sized {
    fn deserialize_from(v: &serde_json::Value) -> Result<Self, JobsError>;
}

impl FromDocument for OtaJob {
    fn deserialize_from(v: &serde_json::Value) -> Result<Self, JobsError> {
        serde_json::from_value(v.clone())
            .map_err(|_| JobsError::Invalid("not an OTA campaign's document".into()))
    }
}

impl JobsService {
    /// A device reported an execution of `job_id` SUCCEEDED with a
    /// receipt: when the job is an OTA campaign's and the receipt verifies
    /// against the thing's key as a committed install of its manifest, the
    /// fleet index gets what it attests, `inventory.verified.{component}`
    /// (the manifest's version), `inventory.verified.sequence` and
    /// `inventory.verified.job` (the thing's other components kept). Only
    /// with a registry that keeps an index; failures are logged (the
    /// update itself stands).
    pub(crate) async fn note_verified_install(&self, thing: &str, job_id: &str, receipt: &str) {
        let Some(registry) = &self.registry else {
            return;
        };
        let Some(index) = registry.index() else {
            return;
        };
        let Ok(job) = self.job(job_id).await else {
            return;
        };
        let Ok(ota) = OtaJob::deserialize_from(&job.spec.document) else {
            return;
        };
        let (Ok(envelope), Ok(nonce)) = (ota.manifest_bytes(), ota.nonce_bytes()) else {
            return;
        };
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&envelope).into()
        };
        if verify_receipt(registry, thing, receipt, &digest, &nonce).await
            != Some(InstallOutcome::Committed)
        {
            tracing::warn!(thing, job_id, "an install receipt that does not verify");
            return;
        }
        let Some(manifest) = fleet_core::ota::Envelope::parse(&envelope)
            .ok()
            .and_then(|e| fleet_core::ota::Manifest::parse(e.payload).ok())
        else {
            return;
        };
        use crate::query::{Entry, FieldValue};
        let field = format!("inventory.verified.{}", manifest.component);
        let mut entries: Vec<Entry> = match index.entries(thing).await {
            Ok(e) => e
                .into_iter()
                .filter(|e| {
                    e.field.starts_with("inventory.verified.")
                        && e.field != field
                        && e.field != "inventory.verified.sequence"
                        && e.field != "inventory.verified.job"
                })
                .collect(),
            Err(e) => {
                tracing::warn!(thing, "cannot read the index: {e}");
                return;
            }
        };
        entries.push(Entry::new(
            field,
            FieldValue::Text(manifest.version.to_string()),
        ));
        entries.push(Entry::new(
            "inventory.verified.sequence",
            FieldValue::Number(manifest.sequence as f64),
        ));
        entries.push(Entry::new(
            "inventory.verified.job",
            FieldValue::Text(job_id.to_string()),
        ));
        if let Err(e) = index
            .index_rows(thing, crate::store::index::RECEIPTS, entries)
            .await
        {
            tracing::warn!(thing, "cannot index a verified install: {e}");
        }
    }
}

/// Checks a base64 receipt against the thing's registered key, the
/// campaign's manifest digest and nonce; returns its outcome.
async fn verify_receipt(
    registry: &Registry,
    thing: &str,
    receipt_b64: &str,
    digest: &[u8; 32],
    nonce: &[u8],
) -> Option<InstallOutcome> {
    let key = registry
        .thing(thing)
        .await
        .ok()?
        .attributes
        .get(RECEIPT_KEY_ATTRIBUTE)?
        .clone();
    let key: [u8; 32] = BASE64.decode(key).ok()?.try_into().ok()?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).ok()?;
    let signed = BASE64.decode(receipt_b64).ok()?;
    let receipt = InstallReceipt::verify(&signed, &key).ok()?;
    (receipt.manifest_digest == *digest && receipt.nonce == nonce).then_some(receipt.outcome)
}
