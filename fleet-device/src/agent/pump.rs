//! The pump: the one task that owns the MQTT client, the outbox and the
//! state machines, and moves messages between them.

use super::*;

mod ota;

pub(super) use ota::OtaState;

pub(super) fn epoch_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without an OS random source, time is a fallback that still varies
    // between boots; tokens need uniqueness, not secrecy.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t;
    }
    u64::from_le_bytes(b)
}

/// Outbox messages handed to the MQTT client and not yet acknowledged, at
/// most.
const WINDOW: usize = 64;

/// Take-overs in a row before the agent reports a client-id conflict.
const CONFLICT_AFTER: u32 = 3;

/// A connection taken over sooner than this after it was made counts
/// toward a conflict.
const CONFLICT_WINDOW: Duration = Duration::from_secs(60);

/// The connection's history, for the reconnection backoff and the
/// take-over count.
struct Link {
    /// Failed connections in a row.
    failures: u32,
    /// When the last connection was made.
    connected_at: Instant,
}

/// The agent's presence messages ([`fleet_core::presence`]).
pub(super) struct PresenceState {
    /// `fleet/things/{thing}/presence`.
    pub(super) topic: String,
    pub(super) client_id: String,
    /// This run's session identifier (its birth, will and goodbye).
    pub(super) session: String,
}

/// Now, in milliseconds since the Unix epoch.
pub(super) fn epoch_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(super) struct Pump {
    pub(in crate::agent) ota: Option<OtaState>,
    /// Births and goodbyes, when the agent tells its presence.
    pub(in crate::agent) presence: Option<PresenceState>,
    /// What the device runs, reported to the `fleet-inventory` shadow, and
    /// the protocol the agent speaks.
    pub(in crate::agent) inventory: Option<(super::types::Inventory, crate::Protocol)>,
    /// The thing this agent is (topics are under `$aws`).
    pub(in crate::agent) thing: ThingName<'static>,
    pub(in crate::agent) client: Client,
    pub(in crate::agent) sync: ShadowSync,
    pub(in crate::agent) jobs: JobRunner,
    pub(in crate::agent) inbox: CommandInbox,
    /// `{telemetry_prefix}/{thing}`
    pub(in crate::agent) telemetry_base: String,
    pub(in crate::agent) job_waiters: HashMap<UpdateId, oneshot::Sender<Result<(), AgentError>>>,
    /// SUBACKs still expected for this connection's subscriptions.
    pub(in crate::agent) pending_subacks: usize,
    pub(in crate::agent) commands: mpsc::Receiver<Command>,
    pub(in crate::agent) events: mpsc::Sender<AgentEvent>,
    pub(in crate::agent) waiters: HashMap<RequestId, oneshot::Sender<Result<u64, AgentError>>>,
    pub(in crate::agent) epoch: Instant,
    pub(in crate::agent) backoff: Backoff,
    pub(in crate::agent) rng: u64,
    pub(in crate::agent) outbox: Outbox,
    /// Outbox sequence -> the application's handle.
    pub(in crate::agent) handles: HashMap<u64, oneshot::Sender<Result<(), AgentError>>>,
    /// Shadow reports and job updates of this run: the engines deliver them
    /// (with their own retries); the outbox keeps them for a restart.
    pub(in crate::agent) report_seqs: HashMap<RequestId, u64>,
    pub(in crate::agent) job_seqs: HashMap<UpdateId, u64>,
    pub(in crate::agent) engine_owned: HashSet<u64>,
    /// One tag per publish handed to the client, in order: the outbox
    /// sequence, or `None` for the engines' own messages. rumqttc reports
    /// each publish as it writes it, in the same order, with its packet id.
    pub(in crate::agent) sent: VecDeque<Option<u64>>,
    /// Packet id -> outbox sequence, awaiting PUBACK.
    pub(in crate::agent) awaiting: HashMap<u16, u64>,
    /// Outbox sequences below this were handed out on this connection.
    pub(in crate::agent) cursor: u64,
    pub(in crate::agent) inflight: usize,
    pub(in crate::agent) connected: bool,
    pub(in crate::agent) taken_over: u32,
    /// Stopping: events are no longer waited on.
    pub(in crate::agent) stopping: bool,
}

impl Pump {
    /// `$aws/commands/things/{thing}/executions/{id}/response/json`.
    fn command_response_topic(&self, execution: &str) -> Option<String> {
        let execution = JobId::new(execution).ok()?;
        Some(
            Topic::Command(CommandTopic {
                thing: self.thing.borrow(),
                execution,
                kind: CommandTopicKind::Response(Role::Request),
                format: Format::Json,
            })
            .to_string_under(&TopicPrefix::AWS),
        )
    }

    /// `$aws/things/{thing}/jobs/{job}/update`.
    fn job_update_topic(&self, job: &str) -> Option<String> {
        let job = JobId::new(job).ok()?;
        Some(
            Topic::Jobs(JobsTopic {
                thing: self.thing.borrow(),
                kind: JobsTopicKind::Update(job, Role::Request),
            })
            .to_string_under(&TopicPrefix::AWS),
        )
    }

    fn now(&self) -> CoreInstant {
        CoreInstant::from_millis(
            u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    async fn emit(&self, event: AgentEvent) {
        if self.stopping {
            // The application waits for the stop, not for events.
            let _ = self.events.try_send(event);
            return;
        }
        // A slow application back-pressures the pump, it is never dropped.
        let _ = self.events.send(event).await;
    }

    /// Hands an engine's message to the client (never waits).
    fn send_raw(&mut self, topic: &str, qos: u8, payload: Vec<u8>) -> Result<(), String> {
        self.client.try_publish(topic, qos, payload)?;
        self.sent.push_back(None);
        Ok(())
    }

    /// Hands outbox messages to the client, oldest first, up to the window.
    fn pump_outbox(&mut self) {
        if !self.connected {
            return;
        }
        let room = WINDOW.saturating_sub(self.inflight);
        let batch: Vec<(u64, String, Vec<u8>)> = self
            .outbox
            .pending()
            .filter(|e| e.seq >= self.cursor)
            .filter(|e| e.kind != MessageKind::ShadowReport && !self.engine_owned.contains(&e.seq))
            .take(room)
            .map(|e| (e.seq, e.topic.clone(), e.payload.clone()))
            .collect();
        for (seq, topic, payload) in batch {
            if self.client.try_publish(&topic, 1, payload).is_err() {
                return;
            }
            self.sent.push_back(Some(seq));
            self.inflight += 1;
            self.cursor = seq + 1;
        }
    }

    /// The message `seq` is done with: forget it, tell whoever waits.
    fn settle(&mut self, seq: u64, result: Result<(), AgentError>) {
        if let Err(e) = self.outbox.ack(seq) {
            tracing::warn!("outbox: {e}");
        }
        self.engine_owned.remove(&seq);
        if let Some(h) = self.handles.remove(&seq) {
            let _ = h.send(result);
        }
    }

    fn connection_lost(&mut self) {
        if self.connected {
            self.connected = false;
            let now = self.now();
            self.sync.handle_connection(now, false);
            self.jobs.handle_connection(now, false);
            self.ota_connection(now, false);
        }
        // rumqttc starts each connection clean: whatever was not
        // acknowledged goes again from the outbox.
        self.sent.clear();
        self.awaiting.clear();
        self.inflight = 0;
        self.cursor = 0;
    }

    pub(super) async fn run(mut self, mut eventloop: mqtt::EventLoop) {
        let mut link = Link {
            failures: 0,
            connected_at: Instant::now(),
        };
        loop {
            let wake = [
                self.sync.poll_timeout(),
                self.jobs.poll_timeout(),
                self.ota_timeout(),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|t| self.epoch + Duration::from_millis(t.as_millis()));
            tokio::select! {
                polled = eventloop.poll() => self.on_network(polled, &mut link).await,
                command = self.commands.recv() => match command {
                    Some(Command::Stop) | None => {
                        self.flush(&mut eventloop).await;
                        return;
                    }
                    Some(command) => self.on_command(command),
                },
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = self.now();
                    self.sync.handle_timeout(now);
                    self.jobs.handle_timeout(now);
                    self.ota_handle_timeout(now);
                }
            }
            self.drain().await;
            let driven = self.ota_drive();
            self.note_installed();
            for event in driven {
                self.emit(event).await;
            }
        }
    }

    /// What the MQTT connection brought.
    async fn on_network(&mut self, polled: Ev, link: &mut Link) {
        match polled {
            Ev::ConnAck => {
                link.failures = 0;
                link.connected_at = Instant::now();
                self.on_connected().await;
            }
            Ev::SubAck { ok } => self.on_subscribed(ok).await,
            Ev::Publish { topic, payload } => self.on_message(topic, &payload).await,
            Ev::OutgoingPublish(pkid) => {
                if let Some(Some(seq)) = self.sent.pop_front() {
                    self.awaiting.insert(pkid, seq);
                }
            }
            Ev::PubAck { pkid, refused } => {
                if let Some(seq) = self.awaiting.remove(&pkid) {
                    self.inflight = self.inflight.saturating_sub(1);
                    // A refusal is final: sending it again would be
                    // refused again.
                    self.settle(seq, refused.map_or(Ok(()), |r| Err(AgentError::Refused(r))));
                    self.pump_outbox();
                }
            }
            Ev::Other => {}
            Ev::Error { reason, taken_over } => {
                let was_connected = self.connected;
                self.connection_lost();
                if taken_over {
                    // A connection that lasted was taken over once, not in
                    // a fight over the client id.
                    if was_connected && link.connected_at.elapsed() > CONFLICT_WINDOW {
                        self.taken_over = 0;
                    }
                    self.taken_over += 1;
                    if self.taken_over >= CONFLICT_AFTER {
                        self.emit(AgentEvent::ClientIdConflict {
                            times: self.taken_over,
                        })
                        .await;
                    }
                }
                let r = self.random();
                let delay = self.backoff.delay(link.failures, r);
                link.failures = link.failures.saturating_add(1);
                self.emit(AgentEvent::Disconnected {
                    reason,
                    retry_in: delay,
                })
                .await;
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Connected: the engines are told, the agent's own subscriptions
    /// made, the outbox sent again.
    async fn on_connected(&mut self) {
        self.connected = true;
        let now = self.now();
        self.pending_subacks = 0;
        self.sync.handle_connection(now, true);
        self.jobs.handle_connection(now, true);
        let mut filters = Service::Commands.device_filters(&TopicPrefix::AWS, self.thing.as_str());
        if self.ota.is_some() {
            filters.extend(BlockDownload::subscriptions(
                &TopicPrefix::AWS,
                &self.thing,
                Format::Json,
            ));
        }
        match self.client.try_subscribe_many(filters) {
            Ok(()) => self.pending_subacks += 1,
            Err(e) => tracing::warn!("cannot subscribe to commands: {e}"),
        }
        self.pump_outbox();
        self.report_inventory();
        if let Some(p) = &self.presence {
            let birth = fleet_core::presence::PresenceEvent::birth(
                &p.client_id,
                &p.session,
                epoch_millis(),
            );
            match self
                .client
                .try_publish_retained(&p.topic, birth.to_json().into_bytes())
            {
                Ok(()) => self.sent.push_back(None),
                Err(e) => tracing::warn!("cannot publish the presence birth: {e}"),
            }
        }
        self.emit(AgentEvent::Connected).await;
    }

    /// Reports the inventory (if the agent has one) to the named shadow
    /// `fleet-inventory`: the agent's name, version and protocol, the
    /// hardware id, each component's version, the installed OTA sequence.
    fn report_inventory(&mut self) {
        let Some((inventory, protocol)) = &self.inventory else {
            return;
        };
        let mut reported = serde_json::json!({
            "agent": {
                "name": "fleet-device",
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": match protocol {
                    crate::Protocol::V5 => "mqtt5",
                    crate::Protocol::V311 => "mqtt3.1.1",
                },
            },
            "components": inventory.components,
        });
        let hardware = inventory
            .hardware_id
            .clone()
            .or_else(|| self.ota.as_ref().map(|o| o.settings.hardware_id.clone()));
        if let Some(h) = hardware {
            reported["hardwareId"] = h.into();
        }
        if let Some(o) = &self.ota {
            let slots = o.settings.slots.lock().unwrap_or_else(|p| p.into_inner());
            reported["installedSequence"] = slots.installed_sequence().into();
        }
        let topic = format!(
            "$aws/things/{}/shadow/name/{}/update",
            self.thing.as_str(),
            fleet_core::shadow::INVENTORY_SHADOW
        );
        let body = serde_json::json!({"state": {"reported": reported}});
        if let Err(e) = self.send_raw(&topic, 1, body.to_string().into_bytes()) {
            tracing::warn!("cannot report the inventory: {e}");
        }
    }

    /// An update was installed: its component's version goes into the
    /// inventory, reported again.
    fn note_installed(&mut self) {
        let Some((component, version)) = self.ota.as_mut().and_then(|o| o.installed.take()) else {
            return;
        };
        if let Some((inventory, _)) = &mut self.inventory {
            inventory.components.insert(component, version);
            if self.connected {
                self.report_inventory();
            }
        }
    }

    /// A subscription was answered.
    async fn on_subscribed(&mut self, ok: bool) {
        if !ok {
            self.emit(AgentEvent::InvalidInput {
                topic: String::new(),
                reason: "the broker refused a subscription (check the ACL)".into(),
            })
            .await;
            return;
        }
        self.pending_subacks = self.pending_subacks.saturating_sub(1);
        if self.pending_subacks == 0 {
            let now = self.now();
            self.sync.handle_subscribed(now);
            self.jobs.handle_subscribed(now);
            // A block asked for before the connection dropped is asked
            // again, now that its answer can arrive.
            self.ota_connection(now, true);
        }
    }

    /// A message arrived: to the engine its topic names.
    async fn on_message(&mut self, topic: String, payload: &[u8]) {
        let now = self.now();
        let result = match Topic::parse(&TopicPrefix::AWS, &topic) {
            Ok(Topic::Command(c)) => {
                let execution = c.execution.into_owned();
                self.handle_command(&topic, execution, payload).await;
                Ok(())
            }
            Ok(Topic::Stream(_)) => self.ota_handle_stream(now, &topic, payload),
            Ok(Topic::Jobs(_)) => self
                .jobs
                .handle_message(now, &topic, payload)
                .map_err(|e| e.to_string()),
            Ok(Topic::Shadow(_)) => self
                .sync
                .handle_message(now, &topic, payload)
                .map_err(|e| e.to_string()),
            Ok(_) => Err("not a topic this agent subscribes to".into()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = result {
            self.emit(AgentEvent::InvalidInput { topic, reason }).await;
        }
    }

    /// What the application asked (other than to stop).
    fn on_command(&mut self, command: Command) {
        match command {
            Command::PublishBatch {
                channel,
                payloads,
                done,
            } => {
                let result = self.publish_batch(&channel, &payloads);
                let _ = done.send(result);
            }
            Command::GetShadow { shadow, done } => {
                let result = match shadow.map(ShadowName::try_from).transpose() {
                    Ok(name) => {
                        Ok(self
                            .sync
                            .document(name.as_ref())
                            .map(|(d, r, v)| ShadowSnapshot {
                                desired: d.clone(),
                                reported: r.clone(),
                                version: v,
                            }))
                    }
                    Err(e) => Err(AgentError::InvalidName(e.to_string())),
                };
                let _ = done.send(result);
            }
            Command::Publish {
                channel,
                payload,
                qos,
                done,
            } => {
                let result = self.publish(&channel, payload, qos);
                let _ = done.send(result);
            }
            Command::Respond {
                execution_id,
                status,
                payload,
                done,
            } => {
                let result =
                    match self
                        .inbox
                        .respond(epoch_seconds(), &execution_id, status, payload)
                    {
                        Ok(answer) => match self.command_response_topic(&execution_id) {
                            Some(topic) => self
                                .send_raw(&topic, 1, answer)
                                .map_err(AgentError::Command),
                            None => Err(AgentError::Command(format!(
                                "invalid execution id {execution_id:?}"
                            ))),
                        },
                        Err(e) => Err(AgentError::Command(e.to_string())),
                    };
                let _ = done.send(result);
            }
            Command::UpdateJob {
                status,
                details,
                done,
            } => self.update_job(status, details, done),
            Command::Report {
                shadow,
                reported,
                done,
            } => self.report(shadow, reported, done),
            Command::Stop => {}
        }
    }

    /// Telemetry to the outbox, at once.
    fn publish_batch(
        &mut self,
        channel: &str,
        payloads: &[Vec<u8>],
    ) -> Result<Vec<Delivery>, AgentError> {
        let topic = format!("{}/{channel}", self.telemetry_base);
        let messages: Vec<(&str, &[u8])> = payloads
            .iter()
            .map(|p| (topic.as_str(), p.as_slice()))
            .collect();
        let result = match self.outbox.push_many(MessageKind::Telemetry, &messages) {
            Ok(seqs) => Ok(seqs
                .into_iter()
                .map(|seq| {
                    let (tx, rx) = oneshot::channel();
                    self.handles.insert(seq, tx);
                    Delivery { seq, rx }
                })
                .collect()),
            Err(e) => Err(AgentError::Outbox(e)),
        };
        self.pump_outbox();
        result
    }

    /// One telemetry message: QoS 0 straight to the client, QoS 1 through
    /// the outbox.
    fn publish(
        &mut self,
        channel: &str,
        payload: Vec<u8>,
        qos: Qos,
    ) -> Result<Delivery, AgentError> {
        let topic = format!("{}/{channel}", self.telemetry_base);
        let result = match qos {
            Qos::AtMostOnce => {
                let (tx, rx) = oneshot::channel();
                let sent = if self.connected {
                    self.send_raw(&topic, 0, payload)
                        .map_err(|_| AgentError::ClientBusy)
                } else {
                    Err(AgentError::NotConnected)
                };
                let _ = tx.send(sent);
                Ok(Delivery { seq: 0, rx })
            }
            Qos::AtLeastOnce => match self.outbox.push(MessageKind::Telemetry, &topic, &payload) {
                Ok(seq) => {
                    let (tx, rx) = oneshot::channel();
                    self.handles.insert(seq, tx);
                    self.pump_outbox();
                    Ok(Delivery { seq, rx })
                }
                Err(e) => Err(AgentError::Outbox(e)),
            },
        };
        // Telemetry dropped by the overflow policy never arrives: tell its
        // waiters.
        let live: HashSet<u64> = self.outbox.pending().map(|e| e.seq).collect();
        let dropped: Vec<u64> = self
            .handles
            .keys()
            .copied()
            .filter(|s| !live.contains(s))
            .collect();
        for seq in dropped {
            if let Some(h) = self.handles.remove(&seq) {
                let _ = h.send(Err(AgentError::Dropped));
            }
        }
        result
    }

    /// The current job's status, through the jobs engine; kept in the
    /// outbox for a restart (sent then as a plain update).
    fn update_job(
        &mut self,
        status: JobStatus,
        details: Option<BTreeMap<String, String>>,
        done: oneshot::Sender<Result<(), AgentError>>,
    ) {
        let now = self.now();
        let job = self.jobs.current_job().map(String::from);
        match self.jobs.update(now, status, details.clone()) {
            Ok(id) => {
                if let Some(topic) = job.as_deref().and_then(|j| self.job_update_topic(j)) {
                    let body = serde_json::json!({"status": status, "statusDetails": details.unwrap_or_default()});
                    match self.outbox.push(
                        MessageKind::JobUpdate,
                        &topic,
                        body.to_string().as_bytes(),
                    ) {
                        Ok(seq) => {
                            self.engine_owned.insert(seq);
                            self.job_seqs.insert(id, seq);
                        }
                        Err(e) => tracing::warn!("outbox: {e}"),
                    }
                }
                self.job_waiters.insert(id, done);
            }
            Err(_) => {
                let _ = done.send(Err(AgentError::NoCurrentJob));
            }
        }
    }

    /// A shadow report, through the shadow engine; its intent kept in the
    /// outbox for a restart.
    fn report(
        &mut self,
        shadow: Option<String>,
        reported: Map<String, Value>,
        done: oneshot::Sender<Result<u64, AgentError>>,
    ) {
        let now = self.now();
        let name = match shadow.clone().map(ShadowName::try_from).transpose() {
            Ok(n) => n,
            Err(e) => {
                let _ = done.send(Err(AgentError::InvalidName(e.to_string())));
                return;
            }
        };
        let intent = Value::Object(reported.clone()).to_string();
        match self.sync.report(now, name.as_ref(), reported) {
            Ok(id) => {
                match self.outbox.push(
                    MessageKind::ShadowReport,
                    shadow.as_deref().unwrap_or(""),
                    intent.as_bytes(),
                ) {
                    Ok(seq) => {
                        self.engine_owned.insert(seq);
                        self.report_seqs.insert(id, seq);
                    }
                    Err(e) => tracing::warn!("outbox: {e}"),
                }
                self.waiters.insert(id, done);
            }
            Err(_) => {
                let _ = done.send(Err(AgentError::UnknownShadow));
            }
        }
    }

    /// A clean stop: waits (a little) for what is in flight to be
    /// acknowledged, then disconnects. What is not acknowledged stays in
    /// the outbox for the next start.
    async fn flush(&mut self, eventloop: &mut mqtt::EventLoop) {
        self.stopping = true;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        // Outbox messages in flight, and job updates and shadow reports
        // waiting for the service's answer (each answer retires its copy in
        // the outbox; unanswered ones are sent again by the next start).
        while self.connected
            && (self.inflight > 0
                || !self.job_seqs.is_empty()
                || !self.report_seqs.is_empty()
                || self.ota_report_pending())
        {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ev::Publish { topic, payload }) => {
                    let now = self.now();
                    match Topic::parse(&TopicPrefix::AWS, &topic) {
                        Ok(Topic::Jobs(_)) => {
                            let _ = self.jobs.handle_message(now, &topic, &payload);
                        }
                        Ok(Topic::Shadow(_)) => {
                            let _ = self.sync.handle_message(now, &topic, &payload);
                        }
                        _ => {}
                    }
                    self.drain().await;
                    // An update's final report goes once the job is current.
                    let _ = self.ota_drive();
                    self.note_installed();
                    self.drain().await;
                }
                Ok(Ev::OutgoingPublish(pkid)) => {
                    if let Some(Some(seq)) = self.sent.pop_front() {
                        self.awaiting.insert(pkid, seq);
                    }
                }
                Ok(Ev::PubAck { pkid, refused }) => {
                    if let Some(seq) = self.awaiting.remove(&pkid) {
                        self.inflight = self.inflight.saturating_sub(1);
                        self.settle(seq, refused.map_or(Ok(()), |r| Err(AgentError::Refused(r))));
                    }
                }
                Ok(Ev::Error { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // A clean stop says so (the DISCONNECT discards the will), and
        // waits, a little, for it to be written.
        if let (Some(p), true) = (&self.presence, self.connected) {
            let bye = fleet_core::presence::PresenceEvent::goodbye(
                &p.client_id,
                &p.session,
                epoch_millis(),
            );
            if self
                .client
                .try_publish_retained(&p.topic, bye.to_json().into_bytes())
                .is_ok()
            {
                let until = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(e) = tokio::time::timeout_at(until, eventloop.poll()).await {
                    if matches!(e, Ev::OutgoingPublish(_) | Ev::Error { .. }) {
                        break;
                    }
                }
            }
        }
        self.client.try_disconnect();
        // Let the DISCONNECT go out.
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }

    async fn handle_command(&mut self, topic: &str, execution: JobId<'static>, payload: &[u8]) {
        match self.inbox.handle_request(epoch_seconds(), payload) {
            Ok(CommandDelivery::Run(r)) => {
                self.emit(AgentEvent::Command {
                    execution_id: r.execution_id,
                    command: r.command,
                    payload: r.payload,
                    deadline: r.deadline,
                })
                .await;
            }
            Ok(CommandDelivery::Duplicate {
                resend: Some(answer),
            }) => {
                if let Some(response) = self.command_response_topic(execution.as_str()) {
                    let _ = self.send_raw(&response, 1, answer);
                }
            }
            Ok(CommandDelivery::Duplicate { resend: None } | CommandDelivery::Expired) => {}
            Err(e) => {
                self.emit(AgentEvent::InvalidInput {
                    topic: topic.into(),
                    reason: e.to_string(),
                })
                .await;
            }
        }
    }

    /// Sends what the engine asks for and forwards its events.
    async fn drain(&mut self) {
        // Both engines subscribe on every connection; they are told once
        // every SUBACK of the connection has come.
        let mut transmits = Vec::new();
        while let Some(t) = self.sync.poll_transmit() {
            transmits.push(t);
        }
        while let Some(t) = self.jobs.poll_transmit() {
            transmits.push(t);
        }
        for t in transmits {
            let result = match t {
                Transmit::Subscribe { filters } => {
                    self.pending_subacks += 1;
                    self.client.try_subscribe_many(filters)
                }
                Transmit::Publish { topic, payload, .. } => self.send_raw(&topic, 1, payload),
            };
            if let Err(e) = result {
                tracing::warn!("cannot hand a message to the MQTT client: {e}");
            }
        }
        while let Some(event) = self.jobs.poll_event() {
            match event {
                JobEvent::Job {
                    job_id,
                    execution_number,
                    document,
                    status_details,
                } => {
                    if self.ota.is_some()
                        && document.get("operation").and_then(Value::as_str)
                            == Some(fleet_core::jobs::OTA_OPERATION)
                    {
                        if let Some(e) = self.ota_job(&job_id, &document) {
                            self.emit(e).await;
                        }
                        continue;
                    }
                    self.emit(AgentEvent::Job {
                        job_id,
                        execution_number,
                        document,
                        status_details,
                    })
                    .await;
                }
                JobEvent::Canceled { job_id } => {
                    self.emit(AgentEvent::JobCanceled { job_id }).await;
                }
                JobEvent::Updated { id, .. } => {
                    if let Some(seq) = self.job_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
                    if let Some(w) = self.job_waiters.remove(&id) {
                        let _ = w.send(Ok(()));
                    }
                }
                JobEvent::UpdateFailed { id, code, .. } => {
                    if let Some(seq) = self.job_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
                    if let Some(w) = self.job_waiters.remove(&id) {
                        let _ = w.send(Err(match code {
                            Some(c) => AgentError::JobRejected(format!("{c:?}")),
                            None => AgentError::TimedOut,
                        }));
                    }
                }
                _ => {}
            }
        }
        while let Some(event) = self.sync.poll_event() {
            match event {
                ShadowEvent::Delta {
                    shadow,
                    version,
                    delta,
                } => {
                    self.emit(AgentEvent::ShadowDelta {
                        shadow: shadow.map(|s| s.as_str().to_string()),
                        version,
                        delta,
                    })
                    .await;
                }
                ShadowEvent::Accepted { id, version, .. } => {
                    if let Some(seq) = self.report_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
                    if let Some(w) = self.waiters.remove(&id) {
                        let _ = w.send(Ok(version));
                    }
                }
                ShadowEvent::Failed { id, error, .. } => {
                    if let Some(seq) = self.report_seqs.remove(&id) {
                        self.settle(seq, Ok(()));
                    }
                    if let Some(w) = self.waiters.remove(&id) {
                        let _ = w.send(Err(match error {
                            Some(e) => AgentError::Rejected {
                                code: e.code(),
                                message: e.message().into(),
                            },
                            None => AgentError::TimedOut,
                        }));
                    }
                }
                _ => {}
            }
        }
    }
}
