//! Over-the-air updates into slots the application implements.

use std::io;
use std::sync::{Arc, Mutex};

use fleet_device::ota::RECORD_LEN;

use crate::FleetError;

/// A firmware slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

/// Two firmware slots (A/B), a one-shot trial boot and a small durable
/// progress record, implemented by the application (flash partitions, a
/// bootloader's environment, files). Each method must be durable when it
/// returns. The agent never writes the booted slot.
#[uniffi::export(with_foreign)]
pub trait FirmwareSlots: Send + Sync {
    /// The slot the device booted from.
    fn booted(&self) -> Slot;
    /// The sequence number of the booted image (anti-rollback).
    fn installed_sequence(&self) -> u64;
    /// The largest image a slot holds, bytes.
    fn capacity(&self) -> u64;
    /// Writes `data` at `offset` of `slot`.
    fn write(&self, slot: Slot, offset: u64, data: Vec<u8>) -> Result<(), FleetError>;
    /// Boots `slot` once, at the next boot only.
    fn set_trial_boot(&self, slot: Slot) -> Result<(), FleetError>;
    /// Makes `slot` the permanent boot slot, holding image `sequence`.
    fn confirm(&self, slot: Slot, sequence: u64) -> Result<(), FleetError>;
    /// Reboots, or returns and lets the app restart on `RebootRequired`.
    fn reboot(&self) -> Result<(), FleetError>;
    /// The stored progress record, if any.
    fn load_record(&self) -> Result<Option<Vec<u8>>, FleetError>;
    /// Stores the progress record (replacing the previous one atomically).
    fn save_record(&self, record: Vec<u8>) -> Result<(), FleetError>;
    /// Removes the progress record.
    fn clear_record(&self) -> Result<(), FleetError>;
}

/// Runs after a trial boot into a new image: `true` keeps it.
#[uniffi::export(with_foreign)]
pub trait SelfTest: Send + Sync {
    /// Checks the new image.
    fn run(&self) -> bool;
}

/// What the agent needs to install signed releases.
#[derive(Clone, uniffi::Record)]
pub struct OtaConfig {
    /// The trust root manifests are checked against (see
    /// `trust_root_for_key`).
    pub trust_root: Vec<u8>,
    /// This device's hardware id; a manifest must list it.
    pub hardware_id: String,
    /// The Ed25519 secret key (32 bytes) that signs install receipts; its
    /// public key is registered with the fleet (`receiptKey`). Empty with
    /// `receipt_key_pkcs11_uri`.
    pub receipt_key: Vec<u8>,
    /// The slots.
    pub slots: Arc<dyn FirmwareSlots>,
    /// The self-test after a trial boot.
    pub self_test: Arc<dyn SelfTest>,
    /// Bytes per downloaded block (256..=131072).
    #[uniffi(default = 4096)]
    pub block_size: u32,
    /// Sign install receipts with an Ed25519 key in a PKCS#11 token (its
    /// `pkcs11:` URI) instead of `receipt_key`.
    #[uniffi(default = None)]
    pub receipt_key_pkcs11_uri: Option<String>,
}

impl OtaConfig {
    pub(crate) fn settings(self) -> Result<fleet_device::OtaSettings, FleetError> {
        let receipt_key = match &self.receipt_key_pkcs11_uri {
            Some(uri) => fleet_device::ReceiptKey::Device(crate::key::open_pkcs11(uri)?),
            None => {
                let seed: [u8; 32] = self
                    .receipt_key
                    .try_into()
                    .map_err(|_| FleetError::invalid("receipt_key must be 32 bytes"))?;
                seed.into()
            }
        };
        if !(256..=131_072).contains(&self.block_size) {
            return Err(FleetError::invalid("block_size must be 256..=131072"));
        }
        let test = self.self_test;
        Ok(fleet_device::OtaSettings {
            trust_root: self.trust_root,
            hardware_id: self.hardware_id,
            slots: Arc::new(Mutex::new(SlotsAdapter(self.slots))),
            self_test: Arc::new(move || test.run()),
            receipt_key,
            block_size: self.block_size,
        })
    }
}

impl From<Slot> for fleet_device::Slot {
    fn from(s: Slot) -> Self {
        match s {
            Slot::A => Self::A,
            Slot::B => Self::B,
        }
    }
}

impl From<fleet_device::Slot> for Slot {
    fn from(s: fleet_device::Slot) -> Self {
        match s {
            fleet_device::Slot::A => Self::A,
            fleet_device::Slot::B => Self::B,
        }
    }
}

/// The foreign slots as `fleet_device`'s.
struct SlotsAdapter(Arc<dyn FirmwareSlots>);

fn io(e: FleetError) -> io::Error {
    io::Error::other(e.to_string())
}

impl fleet_device::FirmwareSlots for SlotsAdapter {
    fn booted(&self) -> fleet_device::Slot {
        self.0.booted().into()
    }

    fn installed_sequence(&self) -> u64 {
        self.0.installed_sequence()
    }

    fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    fn write(&mut self, slot: fleet_device::Slot, offset: u64, data: &[u8]) -> io::Result<()> {
        if Slot::from(slot) == self.0.booted() {
            return Err(io::Error::other("the booted slot is never written"));
        }
        self.0.write(slot.into(), offset, data.to_vec()).map_err(io)
    }

    fn set_trial_boot(&mut self, slot: fleet_device::Slot) -> io::Result<()> {
        self.0.set_trial_boot(slot.into()).map_err(io)
    }

    fn confirm(&mut self, slot: fleet_device::Slot, sequence: u64) -> io::Result<()> {
        self.0.confirm(slot.into(), sequence).map_err(io)
    }

    fn reboot(&mut self) -> io::Result<()> {
        self.0.reboot().map_err(io)
    }

    fn load_record(&self) -> io::Result<Option<[u8; RECORD_LEN]>> {
        match self.0.load_record().map_err(io)? {
            None => Ok(None),
            Some(r) => r.try_into().map(Some).map_err(|r: Vec<u8>| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a progress record is {RECORD_LEN} bytes, not {}", r.len()),
                )
            }),
        }
    }

    fn save_record(&mut self, record: &[u8; RECORD_LEN]) -> io::Result<()> {
        self.0.save_record(record.to_vec()).map_err(io)
    }

    fn clear_record(&mut self) -> io::Result<()> {
        self.0.clear_record().map_err(io)
    }
}
