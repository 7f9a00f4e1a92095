//! The manifest: what is being installed.

use super::error::Malformed;
use super::wire::{self, Fields};

/// Magic bytes of a manifest payload.
pub const MANIFEST_MAGIC: &[u8; 4] = b"FLM1";
/// Envelope payload type of a manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.fleet.manifest.v1";
/// Largest manifest payload, in bytes.
pub const MAX_MANIFEST_LEN: usize = 1024;
/// Most hardware ids in one manifest.
pub const MAX_HARDWARE_IDS: usize = 8;
/// Most location hints in one manifest.
pub const MAX_LOCATIONS: usize = 4;

pub(crate) mod tag {
    pub(crate) const COMPONENT: u8 = 1;
    pub(crate) const VERSION: u8 = 2;
    pub(crate) const SEQUENCE: u8 = 3;
    pub(crate) const SIZE: u8 = 4;
    pub(crate) const DIGEST: u8 = 5;
    pub(crate) const HARDWARE: u8 = 6;
    pub(crate) const MIN_SEQUENCE: u8 = 7;
    pub(crate) const EXPIRES: u8 = 8;
    pub(crate) const LOCATION: u8 = 9;
}

/// A decoded manifest, borrowing its text from the payload bytes. Parsing
/// needs no allocator.
///
/// # Format (version 1)
/// `FLM1` followed by fields, each `tag: u8, length: u16 LE, value`:
///
/// | tag | field | value | |
/// |---|---|---|---|
/// | 1 | component | UTF-8, 1–64 bytes | required |
/// | 2 | version | UTF-8, 1–32 bytes (display only) | required |
/// | 3 | sequence | u64 LE; anti-rollback, must grow | required |
/// | 4 | image size | u64 LE, bytes | required |
/// | 5 | image digest | SHA-256, 32 bytes | required |
/// | 6 | hardware id | UTF-8, 1–64 bytes; 1–8 of them | required |
/// | 7 | minimum installed sequence | u64 LE | optional |
/// | 8 | expires | u64 LE, epoch seconds | optional |
/// | 9 | location hint | UTF-8, 1–512 bytes (URL or stream id); up to 4 | optional |
///
/// Tags 0x80–0xFF are ignorable extensions; other unknown tags are refused.
/// A payload is at most 1024 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest<'a> {
    /// What is installed (`"firmware"`, `"modem"`, an app name).
    pub component: &'a str,
    /// Human-readable version.
    pub version: &'a str,
    /// Anti-rollback sequence number.
    pub sequence: u64,
    /// Image size in bytes.
    pub size: u64,
    /// SHA-256 of the image.
    pub digest: [u8; 32],
    /// Smallest sequence that must already be installed.
    pub min_installed_sequence: Option<u64>,
    /// Epoch seconds after which the manifest is refused.
    pub expires: Option<u64>,
    hardware: [&'a str; MAX_HARDWARE_IDS],
    hardware_len: usize,
    locations: [&'a str; MAX_LOCATIONS],
    locations_len: usize,
}

impl<'a> Manifest<'a> {
    /// Decodes a manifest payload (not an envelope: see
    /// [`TrustRoot::verify_manifest`](super::TrustRoot::verify_manifest)).
    pub fn parse(payload: &'a [u8]) -> Result<Self, Malformed> {
        if payload.len() > MAX_MANIFEST_LEN {
            return Err(Malformed::TooLarge);
        }
        let (mut component, mut version, mut sequence, mut size, mut digest) =
            (None, None, None, None, None);
        let (mut min, mut expires) = (None, None);
        let mut hardware = [""; MAX_HARDWARE_IDS];
        let mut hardware_len = 0;
        let mut locations = [""; MAX_LOCATIONS];
        let mut locations_len = 0;
        for field in Fields::new(payload, MANIFEST_MAGIC)? {
            let f = field?;
            match f.tag {
                tag::COMPONENT => wire::once(&mut component, wire::text_field(&f, 64)?, f.tag)?,
                tag::VERSION => wire::once(&mut version, wire::text_field(&f, 32)?, f.tag)?,
                tag::SEQUENCE => wire::once(&mut sequence, wire::u64_field(&f)?, f.tag)?,
                tag::SIZE => wire::once(&mut size, wire::u64_field(&f)?, f.tag)?,
                tag::DIGEST => wire::once(&mut digest, wire::array_field::<32>(&f)?, f.tag)?,
                tag::MIN_SEQUENCE => wire::once(&mut min, wire::u64_field(&f)?, f.tag)?,
                tag::EXPIRES => wire::once(&mut expires, wire::u64_field(&f)?, f.tag)?,
                tag::HARDWARE => {
                    let id = wire::text_field(&f, 64)?;
                    *hardware
                        .get_mut(hardware_len)
                        .ok_or(Malformed::Repeated { tag: f.tag })? = id;
                    hardware_len += 1;
                }
                tag::LOCATION => {
                    let hint = wire::text_field(&f, 512)?;
                    *locations
                        .get_mut(locations_len)
                        .ok_or(Malformed::Repeated { tag: f.tag })? = hint;
                    locations_len += 1;
                }
                other => wire::unknown(other)?,
            }
        }
        let missing = |tag| Malformed::Missing { tag };
        if hardware_len == 0 {
            return Err(missing(tag::HARDWARE));
        }
        Ok(Self {
            component: component.ok_or(missing(tag::COMPONENT))?,
            version: version.ok_or(missing(tag::VERSION))?,
            sequence: sequence.ok_or(missing(tag::SEQUENCE))?,
            size: size.ok_or(missing(tag::SIZE))?,
            digest: digest.ok_or(missing(tag::DIGEST))?,
            min_installed_sequence: min,
            expires,
            hardware,
            hardware_len,
            locations,
            locations_len,
        })
    }

    /// The hardware ids the image is built for.
    pub fn hardware_ids(&self) -> &[&'a str] {
        &self.hardware[..self.hardware_len]
    }

    /// Where the image may be fetched (URLs, stream ids), in order of
    /// preference.
    pub fn locations(&self) -> &[&'a str] {
        &self.locations[..self.locations_len]
    }
}

/// Builds a manifest payload (tooling side).
///
/// ```
/// use fleet_core::ota::{Manifest, ManifestBuilder};
///
/// let payload = ManifestBuilder::new("firmware", "2.4.1", 42, 1024, [7; 32])
///     .hardware_id("board-rev-c")
///     .expires(1_900_000_000)
///     .build();
/// let m = Manifest::parse(&payload).unwrap();
/// assert_eq!((m.component, m.sequence), ("firmware", 42));
/// assert_eq!(m.hardware_ids(), ["board-rev-c"]);
/// ```
#[cfg(feature = "alloc")]
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    component: alloc::string::String,
    version: alloc::string::String,
    sequence: u64,
    size: u64,
    digest: [u8; 32],
    hardware: alloc::vec::Vec<alloc::string::String>,
    locations: alloc::vec::Vec<alloc::string::String>,
    min: Option<u64>,
    expires: Option<u64>,
}

#[cfg(feature = "alloc")]
impl ManifestBuilder {
    /// The required fields.
    pub fn new(component: &str, version: &str, sequence: u64, size: u64, digest: [u8; 32]) -> Self {
        Self {
            component: component.into(),
            version: version.into(),
            sequence,
            size,
            digest,
            hardware: alloc::vec::Vec::new(),
            locations: alloc::vec::Vec::new(),
            min: None,
            expires: None,
        }
    }

    /// Adds a compatible hardware id (at least one is required).
    pub fn hardware_id(mut self, id: &str) -> Self {
        self.hardware.push(id.into());
        self
    }

    /// Adds a location hint.
    pub fn location(mut self, hint: &str) -> Self {
        self.locations.push(hint.into());
        self
    }

    /// Sets the minimum installed sequence.
    pub fn min_installed_sequence(mut self, sequence: u64) -> Self {
        self.min = Some(sequence);
        self
    }

    /// Sets the expiry (epoch seconds).
    pub fn expires(mut self, epoch_seconds: u64) -> Self {
        self.expires = Some(epoch_seconds);
        self
    }

    /// The payload bytes. [`Manifest::parse`] refuses them if a field is
    /// out of its limits.
    pub fn build(&self) -> alloc::vec::Vec<u8> {
        let mut w = wire::Writer::new(MANIFEST_MAGIC);
        w.field(tag::COMPONENT, self.component.as_bytes())
            .field(tag::VERSION, self.version.as_bytes())
            .field(tag::SEQUENCE, &self.sequence.to_le_bytes())
            .field(tag::SIZE, &self.size.to_le_bytes())
            .field(tag::DIGEST, &self.digest);
        for h in &self.hardware {
            w.field(tag::HARDWARE, h.as_bytes());
        }
        for l in &self.locations {
            w.field(tag::LOCATION, l.as_bytes());
        }
        if let Some(m) = self.min {
            w.field(tag::MIN_SEQUENCE, &m.to_le_bytes());
        }
        if let Some(e) = self.expires {
            w.field(tag::EXPIRES, &e.to_le_bytes());
        }
        w.0
    }
}
