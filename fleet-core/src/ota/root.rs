//! Trust roots: who may sign what, k-of-n, and how a root is replaced.

use ed25519_dalek::{Signature, VerifyingKey};

use super::envelope::{Envelope, KeyId};
use super::error::{Malformed, OtaError};
use super::manifest::{MANIFEST_PAYLOAD_TYPE, Manifest};
use super::wire::{self, Fields};

/// Magic bytes of a trust-root payload.
pub const ROOT_MAGIC: &[u8; 4] = b"FLR1";
/// Envelope payload type of a trust root.
pub const ROOT_PAYLOAD_TYPE: &str = "application/vnd.fleet.root.v1";
/// Most keys in one trust root.
pub const MAX_KEYS: usize = 8;

mod tag {
    pub(super) const VERSION: u8 = 1;
    pub(super) const KEY: u8 = 2;
    pub(super) const THRESHOLD: u8 = 3;
    pub(super) const EXPIRES: u8 = 4;
}

/// What a key may sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Signs trust roots (rotation).
    Root,
    /// Signs manifests.
    Targets,
}

impl Role {
    fn bit(self) -> u8 {
        match self {
            Self::Root => 1,
            Self::Targets => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrustedKey {
    id: KeyId,
    key: VerifyingKey,
    roles: u8,
}

/// What a device knows about itself when it checks a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceProfile<'a> {
    /// This device's hardware id; the manifest must list it.
    pub hardware_id: &'a str,
    /// Sequence of the installed image; the manifest's must be greater.
    pub installed_sequence: u64,
    /// Largest image the device can hold (its slot size).
    pub max_image_size: u64,
    /// Epoch seconds now, if the device has a trustworthy clock; without
    /// one, expiry is not checked.
    pub now: Option<u64>,
}

/// A set of keys, each with roles, and a k-of-n threshold per role.
///
/// A device ships with one root. A new root (version N+1) is accepted only
/// if a threshold of the current root's `Root` keys *and* a threshold of its
/// own `Root` keys signed it, as in TUF; versions never go backwards or
/// skip. Revoking a key is rotating to a root without it.
///
/// # Format (version 1)
/// `FLR1` and fields (`tag: u8, length: u16 LE, value`): 1 version (u64),
/// 2 key (Ed25519 public key, 32 bytes, then a roles byte: 1 root, 2
/// targets; up to 8 keys), 3 threshold (role byte, k byte; one per role),
/// 4 expires (u64 epoch seconds, optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRoot {
    version: u64,
    expires: Option<u64>,
    keys: [Option<TrustedKey>; MAX_KEYS],
    root_threshold: u8,
    targets_threshold: u8,
}

impl TrustRoot {
    /// Decodes a root payload, unsigned: for the root a device is built
    /// with (trusted because it is in the firmware).
    pub fn parse(payload: &[u8]) -> Result<Self, Malformed> {
        let mut version = None;
        let mut expires = None;
        let mut keys = [None; MAX_KEYS];
        let mut n = 0;
        let (mut root_t, mut targets_t) = (None, None);
        for field in Fields::new(payload, ROOT_MAGIC)? {
            let f = field?;
            match f.tag {
                tag::VERSION => wire::once(&mut version, wire::u64_field(&f)?, f.tag)?,
                tag::EXPIRES => wire::once(&mut expires, wire::u64_field(&f)?, f.tag)?,
                tag::KEY => {
                    let raw: [u8; 33] = wire::array_field(&f)?;
                    let mut pk = [0u8; 32];
                    pk.copy_from_slice(&raw[..32]);
                    let key = VerifyingKey::from_bytes(&pk).map_err(|_| Malformed::BadKey)?;
                    let id = KeyId::of(&key);
                    if keys.iter().flatten().any(|k: &TrustedKey| k.id == id) {
                        return Err(Malformed::Repeated { tag: f.tag });
                    }
                    *keys.get_mut(n).ok_or(Malformed::Repeated { tag: f.tag })? =
                        Some(TrustedKey {
                            id,
                            key,
                            roles: raw[32],
                        });
                    n += 1;
                }
                tag::THRESHOLD => {
                    let [role, k]: [u8; 2] = wire::array_field(&f)?;
                    match role {
                        1 => wire::once(&mut root_t, k, f.tag)?,
                        2 => wire::once(&mut targets_t, k, f.tag)?,
                        _ => return Err(Malformed::BadThreshold),
                    }
                }
                other => wire::unknown(other)?,
            }
        }
        let root = Self {
            version: version.ok_or(Malformed::Missing { tag: tag::VERSION })?,
            expires,
            keys,
            root_threshold: root_t.ok_or(Malformed::Missing {
                tag: tag::THRESHOLD,
            })?,
            targets_threshold: targets_t.ok_or(Malformed::Missing {
                tag: tag::THRESHOLD,
            })?,
        };
        for role in [Role::Root, Role::Targets] {
            let k = root.threshold(role);
            let holders = root.keys_with(role).count();
            if k == 0 || usize::from(k) > holders {
                return Err(Malformed::BadThreshold);
            }
        }
        Ok(root)
    }

    /// Decodes a signed root and checks that a threshold of its own root
    /// keys signed it (for a root delivered to a device at provisioning).
    pub fn from_self_signed(envelope: &[u8]) -> Result<Self, OtaError> {
        let env = Envelope::parse(envelope)?;
        if env.payload_type != ROOT_PAYLOAD_TYPE {
            return Err(OtaError::WrongPayloadType);
        }
        let root = Self::parse(env.payload)?;
        root.check_signatures(&env, Role::Root)?;
        Ok(root)
    }

    /// This root's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The threshold of `role`.
    pub fn threshold(&self, role: Role) -> u8 {
        match role {
            Role::Root => self.root_threshold,
            Role::Targets => self.targets_threshold,
        }
    }

    /// The ids of the keys that hold `role`.
    pub fn keys_with(&self, role: Role) -> impl Iterator<Item = KeyId> + '_ {
        self.keys
            .iter()
            .flatten()
            .filter(move |k| k.roles & role.bit() != 0)
            .map(|k| k.id)
    }

    /// Checks a new root and returns it if it may replace this one: its
    /// version is exactly one more, a threshold of this root's root keys
    /// and a threshold of its own root keys signed it, and it has not
    /// expired (when `now` is known).
    pub fn rotate(&self, envelope: &[u8], now: Option<u64>) -> Result<TrustRoot, OtaError> {
        let env = Envelope::parse(envelope)?;
        if env.payload_type != ROOT_PAYLOAD_TYPE {
            return Err(OtaError::WrongPayloadType);
        }
        let next = Self::parse(env.payload)?;
        if Some(next.version) != self.version.checked_add(1) {
            return Err(OtaError::RootVersion {
                current: self.version,
                offered: next.version,
            });
        }
        self.check_signatures(&env, Role::Root)?;
        next.check_signatures(&env, Role::Root)?;
        if let (Some(now), Some(expires)) = (now, next.expires)
            && now > expires
        {
            return Err(OtaError::Expired);
        }
        Ok(next)
    }

    /// Checks a signed manifest against this root and the device, and
    /// returns it. Needs no allocator.
    pub fn verify_manifest<'a>(
        &self,
        envelope: &'a [u8],
        device: &DeviceProfile<'_>,
    ) -> Result<Manifest<'a>, OtaError> {
        let env = Envelope::parse(envelope)?;
        if env.payload_type != MANIFEST_PAYLOAD_TYPE {
            return Err(OtaError::WrongPayloadType);
        }
        self.check_signatures(&env, Role::Targets)?;
        if let (Some(now), Some(expires)) = (device.now, self.expires)
            && now > expires
        {
            return Err(OtaError::Expired);
        }
        let m = Manifest::parse(env.payload)?;
        if let (Some(now), Some(expires)) = (device.now, m.expires)
            && now > expires
        {
            return Err(OtaError::Expired);
        }
        if m.sequence <= device.installed_sequence {
            return Err(OtaError::Rollback {
                installed: device.installed_sequence,
                offered: m.sequence,
            });
        }
        if let Some(required) = m.min_installed_sequence
            && device.installed_sequence < required
        {
            return Err(OtaError::BaseTooOld {
                installed: device.installed_sequence,
                required,
            });
        }
        if !m.hardware_ids().contains(&device.hardware_id) {
            return Err(OtaError::WrongHardware);
        }
        if m.size > device.max_image_size {
            return Err(OtaError::ImageTooLarge);
        }
        Ok(m)
    }

    /// Counts distinct valid signatures by keys holding `role`. A signature
    /// by a trusted key that does not verify is an error (the payload or
    /// the signature was altered); a key that signs twice counts once.
    fn check_signatures(&self, env: &Envelope<'_>, role: Role) -> Result<(), OtaError> {
        let need = self.threshold(role);
        env.with_pae(|pae| {
            let mut counted = 0u8; // bit i: key i counted
            let mut unknown = false;
            for (id, sig) in env.signatures() {
                let Some((i, key)) = self
                    .keys
                    .iter()
                    .enumerate()
                    .find_map(|(i, k)| k.as_ref().filter(|k| k.id == id).map(|k| (i, k)))
                else {
                    unknown = true;
                    continue;
                };
                if key.roles & role.bit() == 0 || counted & (1 << i) != 0 {
                    continue;
                }
                key.key
                    .verify_strict(pae, &Signature::from_bytes(&sig))
                    .map_err(|_| OtaError::BadSignature)?;
                counted |= 1 << i;
            }
            let have = counted.count_ones() as u8;
            if have >= need {
                Ok(())
            } else if unknown {
                Err(OtaError::UnknownKey)
            } else {
                Err(OtaError::BelowThreshold { have, need })
            }
        })
    }
}

/// Builds a trust-root payload (tooling side); sign it with
/// [`sign_envelope`](super::sign_envelope) and [`ROOT_PAYLOAD_TYPE`].
#[cfg(feature = "alloc")]
#[derive(Debug, Clone)]
pub struct TrustRootBuilder {
    version: u64,
    keys: alloc::vec::Vec<([u8; 32], u8)>,
    root_threshold: u8,
    targets_threshold: u8,
    expires: Option<u64>,
}

#[cfg(feature = "alloc")]
impl TrustRootBuilder {
    /// A root of `version` with no keys and thresholds of 1.
    pub fn new(version: u64) -> Self {
        Self {
            version,
            keys: alloc::vec::Vec::new(),
            root_threshold: 1,
            targets_threshold: 1,
            expires: None,
        }
    }

    /// Adds a key with roles.
    pub fn key(mut self, key: &VerifyingKey, roles: &[Role]) -> Self {
        let bits = roles.iter().fold(0, |b, r| b | r.bit());
        self.keys.push((key.to_bytes(), bits));
        self
    }

    /// Sets the threshold of `role`.
    pub fn threshold(mut self, role: Role, k: u8) -> Self {
        match role {
            Role::Root => self.root_threshold = k,
            Role::Targets => self.targets_threshold = k,
        }
        self
    }

    /// Sets the expiry (epoch seconds).
    pub fn expires(mut self, epoch_seconds: u64) -> Self {
        self.expires = Some(epoch_seconds);
        self
    }

    /// The payload bytes.
    pub fn build(&self) -> alloc::vec::Vec<u8> {
        let mut w = wire::Writer::new(ROOT_MAGIC);
        w.field(tag::VERSION, &self.version.to_le_bytes());
        for (key, roles) in &self.keys {
            let mut raw = [0u8; 33];
            raw[..32].copy_from_slice(key);
            raw[32] = *roles;
            w.field(tag::KEY, &raw);
        }
        w.field(tag::THRESHOLD, &[1, self.root_threshold]);
        w.field(tag::THRESHOLD, &[2, self.targets_threshold]);
        if let Some(e) = self.expires {
            w.field(tag::EXPIRES, &e.to_le_bytes());
        }
        w.0
    }
}
