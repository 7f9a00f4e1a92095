//! Over-the-air updates in the pump: a `fleet.ota` job verified, its
//! image downloaded block by block (`BlockDownload`) into the other slot
//! by `OtaUpdate`, rebooted into, confirmed or rolled back, and its
//! receipt reported.

use super::*;

/// An update in progress, and what the agent must remember of its job.
pub(crate) struct OtaRun {
    job_id: String,
    nonce: Vec<u8>,
    sequence: u64,
    update: fleet_core::ota::OtaUpdate,
    /// The image's blocks, from its MQTT stream.
    download: BlockDownload,
    /// The last block received, for the update's `Write`.
    last_block: Vec<u8>,
    /// Waiting for the reboot it asked for.
    paused: bool,
    /// The job's final report, sent once the jobs engine holds the job.
    report: Option<(JobStatus, BTreeMap<String, String>)>,
    /// The job's in-progress report is still to be sent.
    started: bool,
    /// The manifest's component and version (empty when resumed from an
    /// older record).
    component: (String, String),
}

pub(crate) struct OtaState {
    pub(in crate::agent) settings: OtaSettings,
    pub(in crate::agent) state_dir: PathBuf,
    pub(in crate::agent) run: Option<OtaRun>,
    /// A component and version just installed, for the inventory.
    pub(in crate::agent) installed: Option<(String, String)>,
}

/// The job an update belongs to, kept beside the slots' progress record so
/// that an update resumed after a restart still knows it.
impl OtaState {
    /// Forgets the slots' record of an update (it ended, or cannot go on).
    fn forget_record(&self) {
        let mut slots = self
            .settings
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Err(e) = slots.clear_record() {
            tracing::warn!("cannot clear the OTA record: {e}");
        }
    }
}

const OTA_JOB_FILE: &str = "ota-job.json";

fn ota_config(settings: &OtaSettings) -> fleet_core::ota::OtaConfig {
    fleet_core::ota::OtaConfig {
        block_size: settings.block_size,
        ..fleet_core::ota::OtaConfig::default()
    }
}

/// The download of an update's image from its stream.
fn download(
    thing: &ThingName<'static>,
    stream: StreamId<'static>,
    job_id: &str,
    settings: &OtaSettings,
) -> BlockDownload {
    BlockDownload::new(
        &TopicPrefix::AWS,
        thing.clone(),
        stream,
        job_id,
        DownloadConfig {
            block_size: settings.block_size,
            ..DownloadConfig::default()
        },
    )
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Pump {
    /// After a start: an update the slots' record says is under way goes on.
    pub(in crate::agent) fn ota_resume(&mut self) {
        use base64::Engine as _;
        let Some(o) = self.ota.as_mut() else { return };
        let (record, booted) = {
            let slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
            (slots.load_record(), slots.booted())
        };
        let record = match record {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("cannot read the OTA record: {e}");
                return;
            }
        };
        let job: Option<Value> = std::fs::read(o.state_dir.join(OTA_JOB_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let fields = job.as_ref().and_then(|j| {
            Some((
                j["jobId"].as_str()?.to_string(),
                j["stream"].as_str()?.to_string(),
                b64().decode(j["nonce"].as_str()?).ok()?,
                j["sequence"].as_u64()?,
            ))
        });
        let component = job
            .as_ref()
            .map(|j| {
                (
                    j["component"].as_str().unwrap_or_default().to_string(),
                    j["version"].as_str().unwrap_or_default().to_string(),
                )
            })
            .unwrap_or_default();
        // An update that ended before the restart, its report not yet
        // handed to the jobs engine: send it now.
        let stored_report: Option<(JobStatus, BTreeMap<String, String>)> = job
            .as_ref()
            .and_then(|j| serde_json::from_value(j.get("report")?.clone()).ok());
        let resumed = fleet_core::ota::OtaUpdate::resume(
            &record,
            booted,
            CoreInstant::from_millis(0),
            ota_config(&o.settings),
        );
        let stream = fields
            .as_ref()
            .and_then(|f| StreamId::try_from(f.1.clone()).ok());
        match (fields, stream, resumed) {
            (Some((job_id, _, nonce, sequence)), Some(stream), Ok(update)) => {
                let download = download(&self.thing, stream, &job_id, &o.settings);
                o.run = Some(OtaRun {
                    job_id,
                    nonce,
                    sequence,
                    update,
                    download,
                    last_block: Vec::new(),
                    paused: false,
                    report: stored_report,
                    started: false,
                    component,
                });
            }
            (_, _, result) => {
                // A record without its job (or a corrupt one): the running
                // image is what it is; forget the update.
                tracing::warn!(
                    "dropping an OTA record that cannot be resumed: {:?}",
                    result.err()
                );
                let mut slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
                let _ = slots.clear_record();
            }
        }
    }

    /// An update ended and its report has not been handed to the jobs
    /// engine yet.
    pub(super) fn ota_report_pending(&self) -> bool {
        self.ota
            .as_ref()
            .and_then(|o| o.run.as_ref())
            .is_some_and(|r| r.report.is_some())
    }

    pub(super) fn ota_timeout(&self) -> Option<CoreInstant> {
        let run = self.ota.as_ref()?.run.as_ref()?;
        [run.download.poll_timeout(), run.update.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    pub(super) fn ota_handle_timeout(&mut self, now: CoreInstant) {
        let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) else {
            return;
        };
        if run.update.poll_timeout().is_some_and(|t| t <= now) {
            run.update.handle_timeout(now);
        }
        if run.download.poll_timeout().is_some_and(|t| t <= now) {
            run.download.handle_timeout(now);
        }
        self.ota_download_output(now);
    }

    /// The connection came up (subscribed) or went down.
    pub(super) fn ota_connection(&mut self, now: CoreInstant, up: bool) {
        if let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) {
            run.download.handle_connection(now, up);
        }
        self.ota_download_output(now);
    }

    /// Sends what the download asks and takes what it hands back: a block
    /// goes to the update; a refusal or giving up ends the job FAILED.
    pub(super) fn ota_download_output(&mut self, now: CoreInstant) {
        let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = run.download.poll_transmit() {
            if let Transmit::Publish { topic, payload, .. } = t {
                sends.push((topic, payload));
            }
        }
        let mut failed = None;
        while let Some(event) = run.download.poll_event() {
            match event {
                DownloadEvent::Block { offset, data } => {
                    match run.update.handle_block(now, offset, &data) {
                        Ok(()) => run.last_block = data,
                        Err(e) => failed = Some(format!("image: {e}")),
                    }
                }
                DownloadEvent::Rejected { code, message } => {
                    failed = Some(format!("stream: {code} {message}"));
                }
                DownloadEvent::GaveUp { offset, attempts } => {
                    failed = Some(format!(
                        "stream: no answer for the block at {offset} after {attempts} tries"
                    ));
                }
            }
        }
        if let Some(reason) = failed {
            run.download.cancel();
            let mut details = BTreeMap::new();
            details.insert("reason".to_string(), reason);
            run.report = Some((JobStatus::Failed, details));
            if let Some(o) = self.ota.as_ref() {
                o.forget_record();
            }
        }
        if self.connected {
            for (topic, payload) in sends {
                if let Err(e) = self.send_raw(&topic, 1, payload) {
                    tracing::warn!("cannot ask for a block: {e}");
                }
            }
        }
    }

    pub(super) fn ota_handle_stream(
        &mut self,
        now: CoreInstant,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let Some(run) = self.ota.as_mut().and_then(|o| o.run.as_mut()) else {
            return Err("no update is running".into());
        };
        let taken = run.download.handle_message(now, topic, payload);
        self.ota_download_output(now);
        match taken {
            Ok(true) => Ok(()),
            Ok(false) => Err("not the stream of the update under way".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A `fleet.ota` job arrived (or arrived again after a restart).
    pub(super) fn ota_job(&mut self, job_id: &str, document: &Value) -> Option<AgentEvent> {
        use base64::Engine as _;
        use fleet_core::jobs::{ImageSource, JobDocument};
        let o = self.ota.as_mut()?;
        if o.run.as_ref().is_some_and(|r| r.job_id == job_id) {
            // Ours already: go on (the report waits for the job to be current).
            return None;
        }
        let refuse = |this: &mut Self, reason: String| {
            let mut details = BTreeMap::new();
            details.insert("reason".to_string(), reason.clone());
            let now = this.now();
            if let Ok(id) = this.jobs.update(now, JobStatus::Rejected, Some(details)) {
                let _ = id;
            }
            Some(AgentEvent::OtaRejected {
                job_id: job_id.into(),
                reason,
            })
        };
        let job = match JobDocument::parse(document) {
            Ok(JobDocument::Ota(job)) => job,
            Ok(JobDocument::Other(_)) => return None,
            Err(e) => return refuse(self, e.to_string()),
        };
        let ImageSource::Stream(stream) = &job.image else {
            return refuse(self, "only MQTT stream images are supported".into());
        };
        let Ok(stream_id) = StreamId::try_from(stream.clone()) else {
            return refuse(self, format!("invalid stream id {stream:?}"));
        };
        let (Ok(envelope), Ok(nonce)) = (job.manifest_bytes(), job.nonce_bytes()) else {
            return refuse(self, "manifest or nonce is not valid base64".into());
        };
        let o = self.ota.as_mut()?;
        let (booted, installed, capacity) = {
            let slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
            (slots.booted(), slots.installed_sequence(), slots.capacity())
        };
        let Ok(root) = fleet_core::ota::TrustRoot::parse(&o.settings.trust_root) else {
            return refuse(self, "the trust root is unusable".into());
        };
        let profile = fleet_core::ota::DeviceProfile {
            hardware_id: &o.settings.hardware_id,
            installed_sequence: installed,
            max_image_size: capacity,
            now: Some(epoch_seconds()),
        };
        let manifest = match root.verify_manifest(&envelope, &profile) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("manifest refused: {e}");
                return refuse(self, reason);
            }
        };
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&envelope).into()
        };
        let sidecar = serde_json::json!({
            "jobId": job_id,
            "stream": stream,
            "nonce": b64().encode(&nonce),
            "sequence": manifest.sequence,
            "component": manifest.component,
            "version": manifest.version,
        });
        if let Err(e) = std::fs::write(o.state_dir.join(OTA_JOB_FILE), sidecar.to_string()) {
            return refuse(self, format!("cannot store the job: {e}"));
        }
        let update = fleet_core::ota::OtaUpdate::start(
            &manifest,
            digest,
            installed,
            booted.other(),
            ota_config(&o.settings),
        );
        let mut download = download(&self.thing, stream_id, job_id, &o.settings);
        if self.connected {
            download.handle_connection(self.now(), true);
        }
        let o = self.ota.as_mut()?;
        o.run = Some(OtaRun {
            job_id: job_id.into(),
            nonce,
            sequence: manifest.sequence,
            update,
            download,
            last_block: Vec::new(),
            paused: false,
            report: None,
            started: true,
            component: (manifest.component.to_string(), manifest.version.to_string()),
        });
        None
    }

    /// Carries out what the update asks, up to the next network round trip,
    /// and reports the job when it is over.
    pub(super) fn ota_drive(&mut self) -> Vec<AgentEvent> {
        use fleet_core::ota::{
            InstallOutcome, InstallReceipt, MAX_RECEIPT_LEN, OtaAction, OtaEvent,
        };
        let mut events = Vec::new();
        let now = self.now();
        {
            let Some(o) = self.ota.as_mut() else {
                return events;
            };
            let Some(run) = o.run.as_mut() else {
                return events;
            };
            let slots = o.settings.slots.clone();
            while !run.paused && run.download.pending().is_none() && run.report.is_none() {
                let Some(action) = run.update.poll_action() else {
                    break;
                };
                let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                let io = match action {
                    OtaAction::Persist(record) => slots.save_record(&record.encode()),
                    OtaAction::Fetch { offset, len } => {
                        match run.download.fetch(now, offset, len) {
                            Ok(()) => break,
                            Err(e) => Err(std::io::Error::other(e)),
                        }
                    }
                    OtaAction::Write { slot, offset, .. } => {
                        slots.write(slot, offset, &run.last_block)
                    }
                    OtaAction::SetTrialBoot { slot } => slots.set_trial_boot(slot),
                    OtaAction::Reboot => {
                        let _ = slots.reboot();
                        run.paused = true;
                        events.push(AgentEvent::RebootRequired {
                            job_id: run.job_id.clone(),
                        });
                        break;
                    }
                    OtaAction::RunSelfTest => {
                        drop(slots);
                        let passed = (o.settings.self_test)();
                        let _ = run.update.handle_self_test(now, passed);
                        continue;
                    }
                    OtaAction::Confirm { slot } => slots.confirm(slot, run.sequence),
                };
                let result = io
                    .map_err(|e| e.to_string())
                    .and_then(|()| run.update.handle_done(now).map_err(|e| e.to_string()));
                if let Err(e) = result {
                    let mut details = BTreeMap::new();
                    details.insert("reason".to_string(), format!("slots: {e}"));
                    run.report = Some((JobStatus::Failed, details));
                    let _ = slots.clear_record();
                }
            }
            while let Some(event) = run.update.poll_event() {
                match event {
                    OtaEvent::Progress { received, total } => {
                        events.push(AgentEvent::OtaProgress {
                            job_id: run.job_id.clone(),
                            received,
                            total,
                        })
                    }
                    OtaEvent::Finished {
                        outcome,
                        installed_sequence,
                        manifest_digest,
                    } => {
                        let receipt = InstallReceipt {
                            manifest_digest,
                            outcome,
                            installed_sequence,
                            nonce: &run.nonce,
                        };
                        let mut buf = [0u8; MAX_RECEIPT_LEN];
                        let mut details = BTreeMap::new();
                        use base64::Engine as _;
                        match receipt.sign_with(&o.settings.receipt_key, &mut buf) {
                            Ok(n) => {
                                details.insert("receipt".to_string(), b64().encode(&buf[..n]));
                            }
                            Err(e) => {
                                details.insert("reason".to_string(), e.to_string());
                            }
                        }
                        let committed = outcome == InstallOutcome::Committed;
                        if committed && !run.component.0.is_empty() {
                            o.installed = Some(run.component.clone());
                        }
                        details.insert(
                            "outcome".to_string(),
                            if committed {
                                "committed"
                            } else {
                                "rolled-back"
                            }
                            .to_string(),
                        );
                        details.insert(
                            "installedSequence".to_string(),
                            installed_sequence.to_string(),
                        );
                        let status = if committed {
                            JobStatus::Succeeded
                        } else {
                            JobStatus::Failed
                        };
                        run.report = Some((status, details));
                        events.push(AgentEvent::OtaFinished {
                            job_id: run.job_id.clone(),
                            committed,
                        });
                    }
                    OtaEvent::Failed(e) => {
                        let mut details = BTreeMap::new();
                        details.insert("reason".to_string(), format!("image: {e}"));
                        run.report = Some((JobStatus::Failed, details));
                        events.push(AgentEvent::OtaFinished {
                            job_id: run.job_id.clone(),
                            committed: false,
                        });
                    }
                    OtaEvent::Staged => {}
                }
            }
        }
        self.ota_download_output(now);
        self.ota_persist_report();
        self.ota_report(now);
        events
    }

    /// Writes an ended update's report beside its job, so that a restart
    /// before the report reached the jobs engine still sends it.
    pub(super) fn ota_persist_report(&mut self) {
        let Some(o) = self.ota.as_ref() else { return };
        let Some(run) = o.run.as_ref() else { return };
        let Some(report) = &run.report else { return };
        let path = o.state_dir.join(OTA_JOB_FILE);
        let Some(mut job) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            return;
        };
        if job.get("report").is_some() {
            return;
        }
        job["report"] = serde_json::json!(report);
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, job.to_string())
            .and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!("cannot keep the update's report: {e}");
        }
    }

    /// Sends the job's reports once the jobs engine holds the job.
    pub(super) fn ota_report(&mut self, now: CoreInstant) {
        let Some(o) = self.ota.as_mut() else { return };
        let Some(run) = o.run.as_mut() else { return };
        if self.jobs.current_job() != Some(run.job_id.as_str()) {
            return;
        }
        let Some(topic) = Topic::Jobs(JobsTopic {
            thing: self.thing.borrow(),
            kind: JobsTopicKind::Update(
                match JobId::new(&run.job_id) {
                    Ok(id) => id,
                    Err(_) => return,
                },
                Role::Request,
            ),
        })
        .to_string_under(&TopicPrefix::AWS)
        .into() else {
            return;
        };
        let mut updates = Vec::new();
        if run.started {
            run.started = false;
            let mut details = BTreeMap::new();
            details.insert("phase".to_string(), "downloading".to_string());
            updates.push((JobStatus::InProgress, details));
        }
        let done = run.report.take();
        if let Some(report) = done.clone() {
            updates.push(report);
        }
        for (status, details) in updates {
            if let Ok(id) = self.jobs.update(now, status, Some(details.clone())) {
                let body = serde_json::json!({"status": status, "statusDetails": details});
                // Kept for a restart: the receipt must reach the service.
                let kind = if done.is_some() {
                    MessageKind::Receipt
                } else {
                    MessageKind::JobUpdate
                };
                if let Ok(seq) = self.outbox.push(kind, &topic, body.to_string().as_bytes()) {
                    self.engine_owned.insert(seq);
                    self.job_seqs.insert(id, seq);
                }
            }
        }
        if done.is_some() {
            let o = self.ota.as_mut();
            if let Some(o) = o {
                o.forget_record();
                let _ = std::fs::remove_file(o.state_dir.join(OTA_JOB_FILE));
                o.run = None;
            }
        }
    }
}
