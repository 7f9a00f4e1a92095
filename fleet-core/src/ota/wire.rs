//! The TLV encoding shared by manifests, trust roots and receipts:
//! `tag: u8, length: u16 little-endian, value`. Tags of 0x80 and above may
//! be skipped by a reader that does not know them; unknown tags below 0x80
//! are an error (a field the reader must understand).

use super::error::Malformed;

/// A field read from a TLV sequence.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field<'a> {
    pub(crate) tag: u8,
    pub(crate) value: &'a [u8],
}

/// Iterates the fields after `magic`.
#[derive(Debug, Clone)]
pub(crate) struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub(crate) fn new(input: &'a [u8], magic: &[u8; 4]) -> Result<Self, Malformed> {
        match input.strip_prefix(magic) {
            Some(rest) => Ok(Self { rest }),
            None => Err(Malformed::BadMagic),
        }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((&[tag, lo, hi], rest)) = self.rest.split_first_chunk::<3>() else {
            self.rest = &[];
            return Some(Err(Malformed::Truncated));
        };
        let len = usize::from(u16::from_le_bytes([lo, hi]));
        if rest.len() < len {
            self.rest = &[];
            return Some(Err(Malformed::Truncated));
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Some(Ok(Field { tag, value }))
    }
}

pub(crate) fn u64_field(f: &Field<'_>) -> Result<u64, Malformed> {
    let bytes: [u8; 8] = f
        .value
        .try_into()
        .map_err(|_| Malformed::FieldLength { tag: f.tag })?;
    Ok(u64::from_le_bytes(bytes))
}

pub(crate) fn array_field<const N: usize>(f: &Field<'_>) -> Result<[u8; N], Malformed> {
    f.value
        .try_into()
        .map_err(|_| Malformed::FieldLength { tag: f.tag })
}

pub(crate) fn text_field<'a>(f: &Field<'a>, max: usize) -> Result<&'a str, Malformed> {
    let text = core::str::from_utf8(f.value).map_err(|_| Malformed::BadText { tag: f.tag })?;
    if text.is_empty() || text.len() > max {
        return Err(Malformed::BadText { tag: f.tag });
    }
    Ok(text)
}

/// Sets a field that may appear once.
pub(crate) fn once<T>(slot: &mut Option<T>, value: T, tag: u8) -> Result<(), Malformed> {
    if slot.replace(value).is_some() {
        return Err(Malformed::Repeated { tag });
    }
    Ok(())
}

/// Unknown fields: skipped if ignorable, an error otherwise.
pub(crate) fn unknown(tag: u8) -> Result<(), Malformed> {
    if tag >= 0x80 {
        Ok(())
    } else {
        Err(Malformed::UnknownField { tag })
    }
}

/// A writer of TLV fields (tooling side).
#[cfg(feature = "alloc")]
#[derive(Debug)]
pub(crate) struct Writer(pub(crate) alloc::vec::Vec<u8>);

#[cfg(feature = "alloc")]
impl Writer {
    pub(crate) fn new(magic: &[u8; 4]) -> Self {
        Self(magic.to_vec())
    }

    /// Appends a field. Values over 65535 bytes cannot be encoded; every
    /// caller writes bounded values (names, keys, digests), and the readers
    /// reject what is over their own, smaller limits.
    pub(crate) fn field(&mut self, tag: u8, value: &[u8]) -> &mut Self {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        self.0.push(tag);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&value[..usize::from(len)]);
        self
    }
}

/// CRC-32 (IEEE), bitwise: small code, and records are small.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}
