//! `OtaUpdate`: the device side of an update, A/B with trial boot, sans-I/O.

use core::time::Duration;

use super::error::{Malformed, OtaError};
use super::image::ImageVerifier;
use super::manifest::Manifest;
use super::receipt::InstallOutcome;
use super::wire::crc32;
use crate::time::Instant;

/// One of the two firmware slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// Settings of an [`OtaUpdate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtaConfig {
    /// Bytes per fetched block.
    pub block_size: u32,
    /// Persist progress after this many written blocks (1: after each).
    pub persist_every: u32,
    /// How long the new image has, after it boots, to pass its self-test.
    pub trial_timeout: Duration,
    /// How many times the new slot is tried before giving up on it (a boot
    /// that never reaches the application counts).
    pub max_boot_attempts: u8,
    /// Reboot into the new image as soon as it is verified; otherwise wait
    /// for [`OtaUpdate::activate`].
    pub auto_activate: bool,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            block_size: 4096,
            persist_every: 1,
            trial_timeout: Duration::from_secs(300),
            max_boot_attempts: 2,
            auto_activate: true,
        }
    }
}

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtaPhase {
    /// Fetching and writing blocks.
    Downloading,
    /// Checking the whole image.
    Verifying,
    /// Verified, waiting to reboot into it.
    Staged,
    /// About to reboot into the new slot.
    Rebooting,
    /// Running the new image on trial.
    TrialBoot,
    /// Going back to the previous slot.
    RollingBack,
    /// Done: the new image is confirmed.
    Committed,
    /// Done: the previous image runs again.
    RolledBack,
    /// Done: the download did not verify; nothing changed.
    Failed,
}

impl OtaPhase {
    fn code(self) -> u8 {
        match self {
            Self::Downloading | Self::Verifying => 1,
            Self::Staged => 2,
            Self::Rebooting => 3,
            Self::TrialBoot => 4,
            Self::RollingBack => 5,
            Self::Committed => 6,
            Self::RolledBack => 7,
            Self::Failed => 8,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::Downloading,
            2 => Self::Staged,
            3 => Self::Rebooting,
            4 => Self::TrialBoot,
            5 => Self::RollingBack,
            6 => Self::Committed,
            7 => Self::RolledBack,
            8 => Self::Failed,
            _ => return None,
        })
    }
}

/// What the update needs done; the caller does it and reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtaAction {
    /// Fetch image bytes `[offset, offset + len)`, then call
    /// [`OtaUpdate::handle_block`].
    Fetch {
        /// First byte.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the block just handed in at `offset` of `slot`, then call
    /// [`OtaUpdate::handle_done`].
    Write {
        /// The slot being filled (never the running one).
        slot: Slot,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u32,
    },
    /// Store this record durably (atomically: keep the previous copy until
    /// the new one is written), then call [`OtaUpdate::handle_done`].
    Persist(ProgressRecord),
    /// Make the bootloader boot `slot` once, at the next boot only (a
    /// one-shot trial: if the image is not confirmed, the boot after that
    /// returns to the current slot). Then call [`OtaUpdate::handle_done`].
    SetTrialBoot {
        /// The new slot.
        slot: Slot,
    },
    /// Reboot. After the reboot, load the record and call
    /// [`OtaUpdate::resume`] with the slot that booted.
    Reboot,
    /// Run the application's self-test, then call
    /// [`OtaUpdate::handle_self_test`].
    RunSelfTest,
    /// Make `slot` the permanent boot slot, then call
    /// [`OtaUpdate::handle_done`].
    Confirm {
        /// The new slot.
        slot: Slot,
    },
}

/// What the update tells the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaEvent {
    /// Download progress.
    Progress {
        /// Bytes written.
        received: u64,
        /// Image size.
        total: u64,
    },
    /// The image is verified and staged.
    Staged,
    /// The update ended; sign an install receipt with this.
    Finished {
        /// How.
        outcome: InstallOutcome,
        /// The sequence installed now.
        installed_sequence: u64,
        /// SHA-256 of the manifest envelope.
        manifest_digest: [u8; 32],
    },
    /// The download failed verification; the running image is untouched.
    Failed(OtaError),
}

/// Bytes of an encoded [`ProgressRecord`].
pub const RECORD_LEN: usize = 4 + 1 + 1 + 1 + 8 + 8 + 32 + ImageVerifier::SAVED_LEN + 4;
const RECORD_MAGIC: &[u8; 4] = b"FLP1";

/// Everything an update must remember across a power cut: small and
/// fixed-size ([`RECORD_LEN`] bytes encoded, with a CRC-32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressRecord {
    phase: OtaPhase,
    target: Slot,
    attempts: u8,
    sequence: u64,
    previous_sequence: u64,
    manifest_digest: [u8; 32],
    image: [u8; ImageVerifier::SAVED_LEN],
}

impl ProgressRecord {
    /// The phase this record was written in.
    pub fn phase(&self) -> OtaPhase {
        self.phase
    }

    /// The encoded form.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[..4].copy_from_slice(RECORD_MAGIC);
        out[4] = self.phase.code();
        out[5] = match self.target {
            Slot::A => 0,
            Slot::B => 1,
        };
        out[6] = self.attempts;
        out[7..15].copy_from_slice(&self.sequence.to_le_bytes());
        out[15..23].copy_from_slice(&self.previous_sequence.to_le_bytes());
        out[23..55].copy_from_slice(&self.manifest_digest);
        out[55..55 + ImageVerifier::SAVED_LEN].copy_from_slice(&self.image);
        let crc = crc32(&out[..RECORD_LEN - 4]);
        out[RECORD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a record; a torn or foreign record is refused.
    pub fn decode(bytes: &[u8; RECORD_LEN]) -> Result<Self, OtaError> {
        if &bytes[..4] != RECORD_MAGIC {
            return Err(Malformed::BadMagic.into());
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[RECORD_LEN - 4..]);
        if crc32(&bytes[..RECORD_LEN - 4]) != u32::from_le_bytes(crc) {
            return Err(Malformed::Checksum.into());
        }
        let phase = OtaPhase::from_code(bytes[4]).ok_or(Malformed::Checksum)?;
        let target = match bytes[5] {
            0 => Slot::A,
            1 => Slot::B,
            _ => return Err(Malformed::Checksum.into()),
        };
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut manifest_digest = [0u8; 32];
        manifest_digest.copy_from_slice(&bytes[23..55]);
        let mut image = [0u8; ImageVerifier::SAVED_LEN];
        image.copy_from_slice(&bytes[55..55 + ImageVerifier::SAVED_LEN]);
        ImageVerifier::restore(&image)?;
        Ok(Self {
            phase,
            target,
            attempts: bytes[6],
            sequence: u64_at(7),
            previous_sequence: u64_at(15),
            manifest_digest,
            image,
        })
    }
}

/// Which kind of action a `handle_done` completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Write,
    Persist,
    TrialBoot,
    Confirm,
}

/// What completion the update waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Block { offset: u64, len: u32 },
    Done,
    SelfTest,
    Reboot,
}

/// The device side of one update: download into the inactive slot with
/// resumable progress, verify, reboot into the new image on trial, confirm
/// after a self-test or roll back.
///
/// It touches neither flash nor network: it asks for [`OtaAction`]s one at
/// a time ([`poll_action`](Self::poll_action)) and is told when each is done
/// (`handle_block`, `handle_done`, `handle_self_test`). Every state change
/// that must survive a power cut is persisted (as an action) before the
/// action that depends on it, so a cut after any action resumes safely from
/// the last record ([`resume`](Self::resume)); the new slot is only ever
/// booted after its image was verified. No allocator needed.
///
/// ```
/// use fleet_core::ota::{OtaAction, OtaConfig, OtaUpdate, ManifestBuilder, Manifest, Slot};
/// use fleet_core::time::Instant;
/// use sha2::{Digest, Sha256};
///
/// let image = [7u8; 100];
/// let payload = ManifestBuilder::new("fw", "1.1", 2, 100, Sha256::digest(image).into())
///     .hardware_id("board").build();
/// let manifest = Manifest::parse(&payload).unwrap();
/// let mut ota = OtaUpdate::start(&manifest, [0; 32], 1, Slot::B, OtaConfig::default());
/// assert!(matches!(ota.poll_action(), Some(OtaAction::Persist(_))));
/// ota.handle_done(Instant::ZERO).unwrap();
/// assert_eq!(ota.poll_action(), Some(OtaAction::Fetch { offset: 0, len: 100 }));
/// ```
#[derive(Debug, Clone)]
pub struct OtaUpdate {
    config: OtaConfig,
    phase: OtaPhase,
    record: ProgressRecord,
    verifier: ImageVerifier,
    next: Option<OtaAction>,
    waiting: Waiting,
    last_done: Done,
    deadline: Option<Instant>,
    events: [Option<OtaEvent>; 4],
    unpersisted_blocks: u32,
}

impl OtaUpdate {
    /// Starts installing `manifest` (already verified against the trust
    /// root) into `target`, the slot that is not running.
    /// `manifest_digest` is the SHA-256 of the manifest envelope, for the
    /// receipt; `installed_sequence` the running image's sequence.
    pub fn start(
        manifest: &Manifest<'_>,
        manifest_digest: [u8; 32],
        installed_sequence: u64,
        target: Slot,
        config: OtaConfig,
    ) -> Self {
        let verifier = ImageVerifier::new(manifest.size, manifest.digest);
        let record = ProgressRecord {
            phase: OtaPhase::Downloading,
            target,
            attempts: 0,
            sequence: manifest.sequence,
            previous_sequence: installed_sequence,
            manifest_digest,
            image: verifier.save(),
        };
        let mut this = Self::with(config, record, verifier);
        this.persist();
        this
    }

    /// Continues after a reboot or power cut, from the last persisted record
    /// and the slot that booted.
    pub fn resume(
        record: &[u8; RECORD_LEN],
        booted: Slot,
        now: Instant,
        config: OtaConfig,
    ) -> Result<Self, OtaError> {
        let record = ProgressRecord::decode(record)?;
        let verifier = ImageVerifier::restore(&record.image)?;
        let mut this = Self::with(config, record, verifier);
        let on_new = booted == this.record.target;
        match this.record.phase {
            OtaPhase::Downloading | OtaPhase::Verifying => this.next_block_or_verify(),
            OtaPhase::Staged => {
                if config.auto_activate {
                    this.activate()?;
                }
            }
            OtaPhase::Rebooting if on_new => this.enter_trial(),
            // Booted the new slot with a trial record: the confirm took
            // effect but its record did not. Confirming again is harmless.
            OtaPhase::TrialBoot if on_new => this.request(OtaAction::Confirm {
                slot: this.record.target,
            }),
            // The new slot did not come up, or its trial was cut short (by
            // a crash, a watchdog or a power cut) before a confirm, and the
            // one-shot trial boot went back to the old slot: try again, a
            // bounded number of times.
            OtaPhase::Rebooting | OtaPhase::TrialBoot => {
                if this.record.attempts < config.max_boot_attempts {
                    this.record.attempts += 1;
                    this.set_phase(OtaPhase::Rebooting);
                    this.persist();
                } else {
                    this.finish_rolled_back();
                }
            }
            OtaPhase::RollingBack if !on_new => this.finish_rolled_back(),
            OtaPhase::RollingBack => this.request(OtaAction::Reboot),
            OtaPhase::Committed | OtaPhase::RolledBack | OtaPhase::Failed => {}
        }
        let _ = now;
        Ok(this)
    }

    fn with(config: OtaConfig, record: ProgressRecord, verifier: ImageVerifier) -> Self {
        Self {
            config,
            phase: record.phase,
            record,
            verifier,
            next: None,
            waiting: Waiting::Nothing,
            last_done: Done::Persist,
            deadline: None,
            events: [None; 4],
            unpersisted_blocks: 0,
        }
    }

    /// Where the update is.
    pub fn phase(&self) -> OtaPhase {
        self.phase
    }

    /// The next action to carry out; one at a time, each reported back.
    pub fn poll_action(&mut self) -> Option<OtaAction> {
        self.next.take()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<OtaEvent> {
        let first = self.events.iter_mut().find(|e| e.is_some())?;
        let event = first.take();
        self.events.rotate_left(1);
        event
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called (the
    /// trial deadline).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// The block for the last [`OtaAction::Fetch`].
    pub fn handle_block(&mut self, now: Instant, offset: u64, data: &[u8]) -> Result<(), OtaError> {
        let _ = now;
        let Waiting::Block { offset: want, len } = self.waiting else {
            return Err(OtaError::UnexpectedInput);
        };
        if offset != want || data.len() != len as usize {
            return Err(OtaError::UnexpectedInput);
        }
        if let Err(e) = self.verifier.update(data) {
            self.fail(e);
            return Err(e);
        }
        self.request(OtaAction::Write {
            slot: self.record.target,
            offset,
            len,
        });
        Ok(())
    }

    /// The last action (write, persist, trial boot, confirm) is done.
    pub fn handle_done(&mut self, now: Instant) -> Result<(), OtaError> {
        if self.waiting != Waiting::Done {
            return Err(OtaError::UnexpectedInput);
        }
        self.waiting = Waiting::Nothing;
        match self.last_done {
            Done::Write => {
                self.unpersisted_blocks += 1;
                self.push_event(OtaEvent::Progress {
                    received: self.verifier.received(),
                    total: self.verifier.received() + self.verifier.remaining(),
                });
                if self.unpersisted_blocks >= self.config.persist_every
                    || self.verifier.remaining() == 0
                {
                    self.record.image = self.verifier.save();
                    self.persist();
                } else {
                    self.next_block_or_verify();
                }
            }
            Done::Persist => match self.record.phase {
                OtaPhase::Downloading | OtaPhase::Verifying => {
                    self.unpersisted_blocks = 0;
                    self.next_block_or_verify();
                }
                OtaPhase::Staged => {
                    self.push_event(OtaEvent::Staged);
                    if self.config.auto_activate {
                        self.activate()?;
                    }
                }
                OtaPhase::Rebooting => self.request(OtaAction::SetTrialBoot {
                    slot: self.record.target,
                }),
                OtaPhase::TrialBoot => {
                    self.deadline = Some(now + self.config.trial_timeout);
                    self.request(OtaAction::RunSelfTest);
                }
                OtaPhase::RollingBack => self.request(OtaAction::Reboot),
                OtaPhase::Committed => self.finished(InstallOutcome::Committed),
                OtaPhase::RolledBack => self.finished(InstallOutcome::RolledBack),
                OtaPhase::Failed => {}
            },
            Done::TrialBoot => self.request(OtaAction::Reboot),
            Done::Confirm => {
                self.set_phase(OtaPhase::Committed);
                self.persist();
            }
        }
        Ok(())
    }

    /// The self-test's verdict.
    pub fn handle_self_test(&mut self, now: Instant, passed: bool) -> Result<(), OtaError> {
        let _ = now;
        if self.waiting != Waiting::SelfTest {
            return Err(OtaError::UnexpectedInput);
        }
        self.waiting = Waiting::Nothing;
        self.deadline = None;
        if passed {
            self.request(OtaAction::Confirm {
                slot: self.record.target,
            });
        } else {
            self.roll_back();
        }
        Ok(())
    }

    /// The trial deadline passed without a verdict: roll back.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == OtaPhase::TrialBoot && self.deadline.is_some_and(|d| d <= now) {
            self.deadline = None;
            self.waiting = Waiting::Nothing;
            self.next = None;
            self.roll_back();
        }
    }

    /// Reboots into a staged image (when `auto_activate` is off).
    pub fn activate(&mut self) -> Result<(), OtaError> {
        if self.phase != OtaPhase::Staged {
            return Err(OtaError::UnexpectedInput);
        }
        self.record.attempts = 1;
        self.set_phase(OtaPhase::Rebooting);
        self.persist();
        Ok(())
    }

    fn next_block_or_verify(&mut self) {
        let remaining = self.verifier.remaining();
        if remaining > 0 {
            let offset = self.verifier.received();
            let len = remaining.min(u64::from(self.config.block_size)) as u32;
            self.phase = OtaPhase::Downloading;
            self.request(OtaAction::Fetch { offset, len });
            return;
        }
        self.phase = OtaPhase::Verifying;
        match self.verifier.clone().finish() {
            Ok(()) => {
                self.set_phase(OtaPhase::Staged);
                self.persist();
            }
            Err(e) => self.fail(e),
        }
    }

    fn enter_trial(&mut self) {
        self.set_phase(OtaPhase::TrialBoot);
        self.persist();
    }

    fn roll_back(&mut self) {
        self.set_phase(OtaPhase::RollingBack);
        self.persist();
    }

    fn finish_rolled_back(&mut self) {
        self.set_phase(OtaPhase::RolledBack);
        self.persist();
    }

    fn fail(&mut self, e: OtaError) {
        self.push_event(OtaEvent::Failed(e));
        self.set_phase(OtaPhase::Failed);
        self.persist();
    }

    fn finished(&mut self, outcome: InstallOutcome) {
        let installed_sequence = match outcome {
            InstallOutcome::Committed => self.record.sequence,
            InstallOutcome::RolledBack => self.record.previous_sequence,
        };
        self.push_event(OtaEvent::Finished {
            outcome,
            installed_sequence,
            manifest_digest: self.record.manifest_digest,
        });
    }

    fn set_phase(&mut self, phase: OtaPhase) {
        self.phase = phase;
        self.record.phase = phase;
    }

    fn persist(&mut self) {
        self.request(OtaAction::Persist(self.record.clone()));
    }

    fn request(&mut self, action: OtaAction) {
        self.waiting = match action {
            OtaAction::Fetch { offset, len } => Waiting::Block { offset, len },
            OtaAction::RunSelfTest => Waiting::SelfTest,
            OtaAction::Reboot => Waiting::Reboot,
            _ => Waiting::Done,
        };
        self.last_done = match action {
            OtaAction::Write { .. } => Done::Write,
            OtaAction::SetTrialBoot { .. } => Done::TrialBoot,
            OtaAction::Confirm { .. } => Done::Confirm,
            _ => Done::Persist,
        };
        self.next = Some(action);
    }

    fn push_event(&mut self, event: OtaEvent) {
        // Progress events are the only ones that can pile up; a newer one
        // replaces an unread older one.
        if let OtaEvent::Progress { .. } = event
            && let Some(slot) = self
                .events
                .iter_mut()
                .find(|e| matches!(e, Some(OtaEvent::Progress { .. })))
        {
            *slot = Some(event);
            return;
        }
        if let Some(slot) = self.events.iter_mut().find(|e| e.is_none()) {
            *slot = Some(event);
        } else {
            self.events.rotate_left(1);
            self.events[3] = Some(event);
        }
    }
}
