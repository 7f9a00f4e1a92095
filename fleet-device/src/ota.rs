//! Firmware slots for over-the-air updates: the trait the agent writes
//! images through, and a file-backed A/B implementation for Linux.

use crate::key::{DeviceKey, KeyError};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use fleet_core::ota::{RECORD_LEN, Slot};

/// Two firmware slots (A/B), a one-shot trial boot, and a small durable
/// record of an update's progress. The agent drives it; the running slot
/// is never written.
///
/// Each method must be durable when it returns (written and flushed), so
/// that a power cut after it leaves what it did in place, and a cut during
/// it leaves what was there before.
pub trait FirmwareSlots: Send + 'static {
    /// The slot the device booted from.
    fn booted(&self) -> Slot;
    /// The sequence number of the image in the booted slot (anti-rollback).
    fn installed_sequence(&self) -> u64;
    /// The largest image a slot holds.
    fn capacity(&self) -> u64;
    /// Writes `data` at `offset` of `slot` (never the booted one).
    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Boots `slot` once, at the next boot only.
    fn set_trial_boot(&mut self, slot: Slot) -> io::Result<()>;
    /// Makes `slot` the permanent boot slot, holding image `sequence`.
    fn confirm(&mut self, slot: Slot, sequence: u64) -> io::Result<()>;
    /// Reboots (or asks the application to; the agent then reports
    /// [`AgentEvent::RebootRequired`](crate::AgentEvent::RebootRequired)).
    fn reboot(&mut self) -> io::Result<()>;
    /// The stored progress record, if any.
    fn load_record(&self) -> io::Result<Option<[u8; RECORD_LEN]>>;
    /// Stores the progress record, replacing the previous one atomically.
    fn save_record(&mut self, record: &[u8; RECORD_LEN]) -> io::Result<()>;
    /// Removes the progress record (the update is over).
    fn clear_record(&mut self) -> io::Result<()>;
}

/// A/B slots as files, for Linux gateways and for tests: `slot-a.img`,
/// `slot-b.img`, `boot` (which slot boots, a pending one-shot trial, each
/// slot's sequence) and `ota.record`, in one directory.
///
/// [`FileSlots::boot`] plays the bootloader: it reads `boot`, takes a
/// pending trial (once: the boot after it returns to the active slot unless
/// the trial was confirmed) and says which slot runs. Small files are
/// replaced atomically (write a copy, flush, rename, flush the directory);
/// images are written only into the slot that is not running, so a crash at
/// any point leaves a bootable slot.
#[derive(Debug)]
pub struct FileSlots {
    dir: PathBuf,
    booted: Slot,
    state: BootState,
    capacity: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BootState {
    active: Slot,
    trial: Option<Slot>,
    sequence: [u64; 2],
}

fn idx(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

fn slot_char(slot: Slot) -> char {
    match slot {
        Slot::A => 'A',
        Slot::B => 'B',
    }
}

fn parse_slot(s: &str) -> Option<Slot> {
    match s {
        "A" => Some(Slot::A),
        "B" => Some(Slot::B),
        _ => None,
    }
}

impl BootState {
    fn encode(&self) -> String {
        format!(
            "active={}\ntrial={}\nsequence_a={}\nsequence_b={}\n",
            slot_char(self.active),
            self.trial.map_or('-', slot_char),
            self.sequence[0],
            self.sequence[1]
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut state = Self {
            active: Slot::A,
            trial: None,
            sequence: [0, 0],
        };
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "active" => state.active = parse_slot(v)?,
                "trial" => state.trial = if v == "-" { None } else { Some(parse_slot(v)?) },
                "sequence_a" => state.sequence[0] = v.parse().ok()?,
                "sequence_b" => state.sequence[1] = v.parse().ok()?,
                _ => return None,
            }
        }
        Some(state)
    }
}

/// Replaces `path` with `bytes` atomically and durably.
fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Makes the rename durable on Linux.
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

impl FileSlots {
    /// Boots from the slots in `dir` (created with slot A active, sequence
    /// `initial_sequence`, if new). Call once per process start: it takes a
    /// pending trial boot.
    pub fn boot(dir: &Path, capacity: u64, initial_sequence: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let boot = dir.join("boot");
        let mut state = match std::fs::read_to_string(&boot) {
            Ok(text) => BootState::decode(&text).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "the boot file is corrupt")
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let s = BootState {
                    active: Slot::A,
                    trial: None,
                    sequence: [initial_sequence, 0],
                };
                replace(&boot, s.encode().as_bytes())?;
                s
            }
            Err(e) => return Err(e),
        };
        let booted = match state.trial.take() {
            Some(trial) => {
                // One shot: the next boot returns to the active slot.
                replace(&boot, state.encode().as_bytes())?;
                trial
            }
            None => state.active,
        };
        Ok(Self {
            dir: dir.into(),
            booted,
            state,
            capacity,
        })
    }

    /// The image file of `slot`.
    pub fn image_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(match slot {
            Slot::A => "slot-a.img",
            Slot::B => "slot-b.img",
        })
    }

    /// The slot that boots when no trial is pending.
    pub fn active(&self) -> Slot {
        self.state.active
    }

    fn save_state(&self) -> io::Result<()> {
        replace(&self.dir.join("boot"), self.state.encode().as_bytes())
    }
}

impl FirmwareSlots for FileSlots {
    fn booted(&self) -> Slot {
        self.booted
    }

    fn installed_sequence(&self) -> u64 {
        self.state.sequence[idx(self.booted)]
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn write(&mut self, slot: Slot, offset: u64, data: &[u8]) -> io::Result<()> {
        if slot == self.booted {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the running slot is never written",
            ));
        }
        if offset + data.len() as u64 > self.capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond the slot",
            ));
        }
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.image_path(slot))?;
        if offset == 0 {
            // A new image: nothing of an older one beyond it.
            f.set_len(0)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            f.write_all_at(data, offset)?;
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut f = &f;
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(data)?;
        }
        f.sync_data()
    }

    fn set_trial_boot(&mut self, slot: Slot) -> io::Result<()> {
        self.state.trial = Some(slot);
        self.save_state()
    }

    fn confirm(&mut self, slot: Slot, sequence: u64) -> io::Result<()> {
        self.state.active = slot;
        self.state.trial = None;
        self.state.sequence[idx(slot)] = sequence;
        self.save_state()
    }

    fn reboot(&mut self) -> io::Result<()> {
        // A process cannot reboot the machine for a test; the application
        // restarts the agent (and calls `FileSlots::boot` again).
        Ok(())
    }

    fn load_record(&self) -> io::Result<Option<[u8; RECORD_LEN]>> {
        match std::fs::read(self.dir.join("ota.record")) {
            Ok(bytes) => Ok(<[u8; RECORD_LEN]>::try_from(bytes.as_slice()).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save_record(&mut self, record: &[u8; RECORD_LEN]) -> io::Result<()> {
        replace(&self.dir.join("ota.record"), record)
    }

    fn clear_record(&mut self) -> io::Result<()> {
        match std::fs::remove_file(self.dir.join("ota.record")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The Ed25519 key that signs a device's install receipts.
#[derive(Clone)]
pub enum ReceiptKey {
    /// A 32-byte seed held by the agent.
    Seed([u8; 32]),
    /// A key that signs elsewhere (a PKCS#11 token, a secure element); its
    /// [`algorithm`](DeviceKey::algorithm) must be Ed25519.
    Device(Arc<dyn DeviceKey>),
}

impl From<[u8; 32]> for ReceiptKey {
    fn from(seed: [u8; 32]) -> Self {
        Self::Seed(seed)
    }
}

impl fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Seed(_) => f.write_str("ReceiptKey::Seed(..)"),
            Self::Device(k) => f.debug_tuple("ReceiptKey::Device").field(k).finish(),
        }
    }
}

impl fleet_core::ota::Ed25519Signer for ReceiptKey {
    type Error = KeyError;

    fn public_key(&self) -> Result<ed25519_dalek::VerifyingKey, KeyError> {
        match self {
            Self::Seed(seed) => Ok(ed25519_dalek::SigningKey::from_bytes(seed).verifying_key()),
            Self::Device(key) => {
                let raw: [u8; 32] = key
                    .public_key()?
                    .try_into()
                    .map_err(|_| KeyError::new("the receipt key is not an Ed25519 key"))?;
                ed25519_dalek::VerifyingKey::from_bytes(&raw)
                    .map_err(|_| KeyError::new("the receipt key's public key is invalid"))
            }
        }
    }

    fn sign_ed25519(&self, message: &[u8]) -> Result<[u8; 64], KeyError> {
        match self {
            Self::Seed(seed) => {
                use ed25519_dalek::Signer;
                Ok(ed25519_dalek::SigningKey::from_bytes(seed)
                    .sign(message)
                    .to_bytes())
            }
            Self::Device(key) => key
                .sign(message)?
                .try_into()
                .map_err(|_| KeyError::new("the receipt key did not make an Ed25519 signature")),
        }
    }
}

/// What the agent needs to install signed releases.
#[derive(Clone)]
pub struct OtaSettings {
    /// The trust root (`FLR1` payload) manifests are checked against.
    pub trust_root: Vec<u8>,
    /// This device's hardware id; a manifest must list it.
    pub hardware_id: String,
    /// The slots.
    pub slots: Arc<std::sync::Mutex<dyn FirmwareSlots>>,
    /// Runs after a trial boot into a new image: `true` keeps it.
    pub self_test: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The device's Ed25519 key that signs install receipts (its public
    /// key is registered with the fleet as the thing's `receiptKey`): a
    /// seed in memory, or a key in a token (`[u8; 32]` converts).
    pub receipt_key: ReceiptKey,
    /// Bytes per downloaded block (256..=131072; default 4096).
    pub block_size: u32,
}

impl fmt::Debug for OtaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtaSettings")
            .field("hardware_id", &self.hardware_id)
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_boot_is_one_shot_and_a_confirm_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSlots::boot(dir.path(), 1 << 20, 5).unwrap();
        assert_eq!((s.booted(), s.installed_sequence()), (Slot::A, 5));
        assert!(s.write(Slot::A, 0, b"x").is_err(), "never the running slot");
        s.write(Slot::B, 0, b"new image").unwrap();
        s.set_trial_boot(Slot::B).unwrap();
        // The trial boot, then (unconfirmed) back to A.
        let s = FileSlots::boot(dir.path(), 1 << 20, 5).unwrap();
        assert_eq!(s.booted(), Slot::B);
        let mut s = FileSlots::boot(dir.path(), 1 << 20, 5).unwrap();
        assert_eq!(s.booted(), Slot::A);
        s.set_trial_boot(Slot::B).unwrap();
        let mut s = FileSlots::boot(dir.path(), 1 << 20, 5).unwrap();
        s.confirm(Slot::B, 6).unwrap();
        let s = FileSlots::boot(dir.path(), 1 << 20, 5).unwrap();
        assert_eq!((s.booted(), s.installed_sequence()), (Slot::B, 6));
        assert_eq!(std::fs::read(s.image_path(Slot::B)).unwrap(), b"new image");
    }

    #[test]
    fn records_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSlots::boot(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(s.load_record().unwrap(), None);
        s.save_record(&[7; RECORD_LEN]).unwrap();
        s.save_record(&[9; RECORD_LEN]).unwrap();
        assert_eq!(s.load_record().unwrap(), Some([9; RECORD_LEN]));
        // A torn copy left by a crash is not the record.
        std::fs::write(dir.path().join("ota.tmp"), [1, 2, 3]).unwrap();
        assert_eq!(s.load_record().unwrap(), Some([9; RECORD_LEN]));
        s.clear_record().unwrap();
        s.clear_record().unwrap();
        assert_eq!(s.load_record().unwrap(), None);
        std::fs::write(dir.path().join("boot"), "active=C\n").unwrap();
        assert!(FileSlots::boot(dir.path(), 1 << 20, 0).is_err());
    }
}
