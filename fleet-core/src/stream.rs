//! MQTT file streams (AWS IoT's MQTT-based file delivery): the messages of
//! `describe`, `get`, `description`, `data` and `rejected`, in JSON or CBOR.
//!
//! Field names are AWS's short keys: `c` client token, `s` stream version,
//! `f` file id, `l` block size, `o` block offset, `n` number of blocks, `b`
//! bitmap of blocks wanted, `i` block id, `p` payload (base64 in JSON,
//! bytes in CBOR), `r` files, `z` file size, `e` error code, `m` message.
//!
//! ```
//! use fleet_core::stream::{Format, GetRequest, DataBlock};
//! let get = GetRequest { client_token: Some("t1".into()), version: None, file_id: 0,
//!                        block_size: 1024, offset: 3, count: 1, bitmap: None };
//! for format in [Format::Json, Format::Cbor] {
//!     let bytes = get.encode(format);
//!     assert_eq!(GetRequest::decode(&bytes, format).unwrap(), get);
//! }
//! let block = DataBlock { client_token: None, file_id: 0, block_size: 1024, block_id: 3, payload: vec![1, 2, 3] };
//! assert_eq!(DataBlock::decode(&block.encode(Format::Cbor), Format::Cbor).unwrap(), block);
//! ```

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

/// Smallest block a device may ask for (AWS's limit).
pub const MIN_BLOCK_SIZE: u32 = 256;
/// Largest block a device may ask for (AWS's limit, 128 KiB).
pub const MAX_BLOCK_SIZE: u32 = 128 * 1024;
/// Most blocks one `get` may ask for.
pub const MAX_BLOCKS_PER_GET: u32 = 64;

/// The encoding named by the topic's last level (the topics' own type).
pub use crate::topic::Format;

/// A stream message that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// Not JSON/CBOR of a map.
    Malformed,
    /// A field is missing or has the wrong type.
    MissingField(&'static str),
    /// A value is out of range (block size, block count, ...).
    OutOfRange(&'static str),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("not a stream message"),
            Self::MissingField(k) => write!(f, "field {k:?} is missing or of the wrong type"),
            Self::OutOfRange(k) => write!(f, "field {k:?} is out of range"),
        }
    }
}

impl core::error::Error for StreamError {}

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Uint(u64),
    Text(String),
    Bytes(Vec<u8>),
    Files(Vec<FileInfo>),
}

type Fields = BTreeMap<String, Field>;

fn encode(fields: &Fields, format: Format) -> Vec<u8> {
    match format {
        Format::Json => {
            let mut map = serde_json::Map::new();
            for (k, v) in fields {
                let v = match v {
                    Field::Uint(n) => Value::from(*n),
                    Field::Text(t) => Value::from(t.as_str()),
                    Field::Bytes(b) => Value::from(BASE64.encode(b)),
                    Field::Files(files) => Value::Array(
                        files
                            .iter()
                            .map(|f| serde_json::json!({"f": f.file_id, "z": f.size}))
                            .collect(),
                    ),
                };
                map.insert(k.clone(), v);
            }
            serde_json::to_vec(&Value::Object(map)).unwrap_or_default()
        }
        Format::Cbor => {
            let mut e = minicbor::Encoder::new(Vec::new());
            // Writing to a Vec cannot fail.
            let _ = e.map(fields.len() as u64);
            for (k, v) in fields {
                let _ = e.str(k);
                let _ = match v {
                    Field::Uint(n) => e.u64(*n),
                    Field::Text(t) => e.str(t),
                    Field::Bytes(b) => e.bytes(b),
                    Field::Files(files) => {
                        let _ = e.array(files.len() as u64);
                        for f in files {
                            let _ = e
                                .map(2)
                                .and_then(|e| e.str("f"))
                                .and_then(|e| e.u32(f.file_id));
                            let _ = e.str("z").and_then(|e| e.u64(f.size));
                        }
                        Ok(&mut e)
                    }
                };
            }
            e.into_writer()
        }
    }
}

fn decode(bytes: &[u8], format: Format) -> Result<Fields, StreamError> {
    let mut out = Fields::new();
    match format {
        Format::Json => {
            let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(bytes) else {
                return Err(StreamError::Malformed);
            };
            for (k, v) in map {
                let f = match (k.as_str(), v) {
                    ("p", Value::String(s)) => {
                        Field::Bytes(BASE64.decode(s).map_err(|_| StreamError::Malformed)?)
                    }
                    ("r", Value::Array(items)) => {
                        let mut files = Vec::new();
                        for item in items {
                            let (Some(f), Some(z)) = (
                                item.get("f").and_then(Value::as_u64),
                                item.get("z").and_then(Value::as_u64),
                            ) else {
                                return Err(StreamError::MissingField("r"));
                            };
                            files.push(FileInfo {
                                file_id: u32::try_from(f)
                                    .map_err(|_| StreamError::OutOfRange("f"))?,
                                size: z,
                            });
                        }
                        Field::Files(files)
                    }
                    (_, Value::Number(n)) => {
                        Field::Uint(n.as_u64().ok_or(StreamError::OutOfRange("number"))?)
                    }
                    (_, Value::String(s)) => Field::Text(s),
                    _ => continue,
                };
                out.insert(k, f);
            }
        }
        Format::Cbor => {
            use minicbor::data::Type;
            let mut d = minicbor::Decoder::new(bytes);
            let n = d
                .map()
                .map_err(|_| StreamError::Malformed)?
                .ok_or(StreamError::Malformed)?;
            for _ in 0..n {
                let k = d.str().map_err(|_| StreamError::Malformed)?.to_string();
                let ty = d.datatype().map_err(|_| StreamError::Malformed)?;
                let f = match ty {
                    Type::U8 | Type::U16 | Type::U32 | Type::U64 => {
                        Field::Uint(d.u64().map_err(|_| StreamError::Malformed)?)
                    }
                    Type::String => {
                        Field::Text(d.str().map_err(|_| StreamError::Malformed)?.into())
                    }
                    Type::Bytes => {
                        Field::Bytes(d.bytes().map_err(|_| StreamError::Malformed)?.into())
                    }
                    Type::Array if k == "r" => {
                        let len = d
                            .array()
                            .map_err(|_| StreamError::Malformed)?
                            .ok_or(StreamError::Malformed)?;
                        let mut files = Vec::new();
                        for _ in 0..len {
                            let mut file_id = None;
                            let mut size = None;
                            let m = d
                                .map()
                                .map_err(|_| StreamError::Malformed)?
                                .ok_or(StreamError::Malformed)?;
                            for _ in 0..m {
                                match d.str().map_err(|_| StreamError::Malformed)? {
                                    "f" => {
                                        file_id = Some(d.u32().map_err(|_| StreamError::Malformed)?)
                                    }
                                    "z" => {
                                        size = Some(d.u64().map_err(|_| StreamError::Malformed)?)
                                    }
                                    _ => d.skip().map_err(|_| StreamError::Malformed)?,
                                }
                            }
                            let (Some(file_id), Some(size)) = (file_id, size) else {
                                return Err(StreamError::MissingField("r"));
                            };
                            files.push(FileInfo { file_id, size });
                        }
                        Field::Files(files)
                    }
                    _ => {
                        d.skip().map_err(|_| StreamError::Malformed)?;
                        continue;
                    }
                };
                out.insert(k, f);
            }
        }
    }
    Ok(out)
}

fn uint(f: &Fields, k: &'static str) -> Result<u64, StreamError> {
    match f.get(k) {
        Some(Field::Uint(n)) => Ok(*n),
        _ => Err(StreamError::MissingField(k)),
    }
}

fn u32_field(f: &Fields, k: &'static str) -> Result<u32, StreamError> {
    u32::try_from(uint(f, k)?).map_err(|_| StreamError::OutOfRange(k))
}

fn opt_text(f: &Fields, k: &str) -> Option<String> {
    match f.get(k) {
        Some(Field::Text(t)) => Some(t.clone()),
        _ => None,
    }
}

fn put_text(f: &mut Fields, k: &str, v: &Option<String>) {
    if let Some(v) = v {
        f.insert(k.into(), Field::Text(v.clone()));
    }
}

/// `describe`: what files does the stream hold?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeRequest {
    /// Echoed in the reply.
    pub client_token: Option<String>,
}

/// One file of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Its id in the stream.
    pub file_id: u32,
    /// Bytes.
    pub size: u64,
}

/// `description`: the stream's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDescription {
    /// The request's token.
    pub client_token: Option<String>,
    /// The stream's version.
    pub version: u32,
    /// A description, for people.
    pub description: Option<String>,
    /// The files.
    pub files: Vec<FileInfo>,
}

/// `get`: blocks of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    /// Echoed in each block.
    pub client_token: Option<String>,
    /// The stream version the device expects (refused if it changed).
    pub version: Option<u32>,
    /// Which file.
    pub file_id: u32,
    /// Bytes per block ([`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`]).
    pub block_size: u32,
    /// The first block.
    pub offset: u32,
    /// How many blocks from `offset` (1..=[`MAX_BLOCKS_PER_GET`]).
    pub count: u32,
    /// Blocks wanted, relative to `offset`, base64 of a bitmap (bit `k` of
    /// byte `k / 8`, least significant first): instead of all `count`.
    pub bitmap: Option<String>,
}

/// `data`: one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataBlock {
    /// The request's token.
    pub client_token: Option<String>,
    /// Which file.
    pub file_id: u32,
    /// The block size asked for (the last block may be shorter).
    pub block_size: u32,
    /// Which block.
    pub block_id: u32,
    /// Its bytes.
    pub payload: Vec<u8>,
}

/// `rejected`: why a describe or get was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRejected {
    /// The request's token.
    pub client_token: Option<String>,
    /// AWS's code: `ResourceNotFound`, `InvalidRequest`, `VersionMismatch`, ...
    pub code: String,
    /// For people.
    pub message: String,
}

impl DescribeRequest {
    /// Encodes it.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let mut f = Fields::new();
        put_text(&mut f, "c", &self.client_token);
        encode(&f, format)
    }

    /// Decodes one (an empty payload is a request without a token).
    pub fn decode(bytes: &[u8], format: Format) -> Result<Self, StreamError> {
        if bytes.is_empty() {
            return Ok(Self { client_token: None });
        }
        let f = decode(bytes, format)?;
        Ok(Self {
            client_token: opt_text(&f, "c"),
        })
    }
}

impl StreamDescription {
    /// Encodes it.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let mut f = Fields::new();
        put_text(&mut f, "c", &self.client_token);
        put_text(&mut f, "d", &self.description);
        f.insert("s".into(), Field::Uint(u64::from(self.version)));
        f.insert("r".into(), Field::Files(self.files.clone()));
        encode(&f, format)
    }

    /// Decodes one.
    pub fn decode(bytes: &[u8], format: Format) -> Result<Self, StreamError> {
        let f = decode(bytes, format)?;
        Ok(Self {
            client_token: opt_text(&f, "c"),
            version: u32_field(&f, "s")?,
            description: opt_text(&f, "d"),
            files: match f.get("r") {
                Some(Field::Files(files)) => files.clone(),
                _ => return Err(StreamError::MissingField("r")),
            },
        })
    }
}

impl GetRequest {
    /// Encodes it.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let mut f = Fields::new();
        put_text(&mut f, "c", &self.client_token);
        put_text(&mut f, "b", &self.bitmap);
        if let Some(v) = self.version {
            f.insert("s".into(), Field::Uint(u64::from(v)));
        }
        f.insert("f".into(), Field::Uint(u64::from(self.file_id)));
        f.insert("l".into(), Field::Uint(u64::from(self.block_size)));
        f.insert("o".into(), Field::Uint(u64::from(self.offset)));
        f.insert("n".into(), Field::Uint(u64::from(self.count)));
        encode(&f, format)
    }

    /// Decodes one and checks its ranges.
    pub fn decode(bytes: &[u8], format: Format) -> Result<Self, StreamError> {
        let f = decode(bytes, format)?;
        let r = Self {
            client_token: opt_text(&f, "c"),
            version: match f.get("s") {
                Some(_) => Some(u32_field(&f, "s")?),
                None => None,
            },
            file_id: u32_field(&f, "f")?,
            block_size: u32_field(&f, "l")?,
            offset: match f.get("o") {
                Some(_) => u32_field(&f, "o")?,
                None => 0,
            },
            count: match f.get("n") {
                Some(_) => u32_field(&f, "n")?,
                None => 1,
            },
            bitmap: opt_text(&f, "b"),
        };
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&r.block_size) {
            return Err(StreamError::OutOfRange("l"));
        }
        if !(1..=MAX_BLOCKS_PER_GET).contains(&r.count) {
            return Err(StreamError::OutOfRange("n"));
        }
        Ok(r)
    }

    /// The blocks asked for, in order.
    pub fn blocks(&self) -> Result<Vec<u32>, StreamError> {
        let Some(bitmap) = &self.bitmap else {
            return Ok((self.offset..self.offset.saturating_add(self.count)).collect());
        };
        let bits = BASE64
            .decode(bitmap)
            .map_err(|_| StreamError::MissingField("b"))?;
        let mut out = Vec::new();
        for (i, byte) in bits.iter().enumerate() {
            for bit in 0..8 {
                let k = u32::try_from(i * 8 + bit).map_err(|_| StreamError::OutOfRange("b"))?;
                if byte & (1 << bit) != 0 && k < self.count {
                    out.push(self.offset.saturating_add(k));
                }
            }
        }
        Ok(out)
    }
}

impl DataBlock {
    /// Encodes it.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let mut f = Fields::new();
        put_text(&mut f, "c", &self.client_token);
        f.insert("f".into(), Field::Uint(u64::from(self.file_id)));
        f.insert("l".into(), Field::Uint(u64::from(self.block_size)));
        f.insert("i".into(), Field::Uint(u64::from(self.block_id)));
        f.insert("p".into(), Field::Bytes(self.payload.clone()));
        encode(&f, format)
    }

    /// Decodes one.
    pub fn decode(bytes: &[u8], format: Format) -> Result<Self, StreamError> {
        let f = decode(bytes, format)?;
        Ok(Self {
            client_token: opt_text(&f, "c"),
            file_id: u32_field(&f, "f")?,
            block_size: u32_field(&f, "l")?,
            block_id: u32_field(&f, "i")?,
            payload: match f.get("p") {
                Some(Field::Bytes(b)) => b.clone(),
                _ => return Err(StreamError::MissingField("p")),
            },
        })
    }
}

impl StreamRejected {
    /// Encodes it.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        let mut f = Fields::new();
        put_text(&mut f, "c", &self.client_token);
        f.insert("e".into(), Field::Text(self.code.clone()));
        f.insert("m".into(), Field::Text(self.message.clone()));
        encode(&f, format)
    }

    /// Decodes one.
    pub fn decode(bytes: &[u8], format: Format) -> Result<Self, StreamError> {
        let f = decode(bytes, format)?;
        Ok(Self {
            client_token: opt_text(&f, "c"),
            code: opt_text(&f, "e").ok_or(StreamError::MissingField("e"))?,
            message: opt_text(&f, "m").unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_message_round_trips_in_both_formats() {
        let d = StreamDescription {
            client_token: Some("t".into()),
            version: 3,
            description: Some("fw 1.2".into()),
            files: alloc::vec![
                FileInfo {
                    file_id: 0,
                    size: 70_000
                },
                FileInfo {
                    file_id: 1,
                    size: 5
                }
            ],
        };
        let r = StreamRejected {
            client_token: None,
            code: "ResourceNotFound".into(),
            message: "no such stream".into(),
        };
        for fmt in [Format::Json, Format::Cbor] {
            assert_eq!(
                StreamDescription::decode(&d.encode(fmt), fmt),
                Ok(d.clone())
            );
            assert_eq!(StreamRejected::decode(&r.encode(fmt), fmt), Ok(r.clone()));
            let desc = DescribeRequest {
                client_token: Some("x".into()),
            };
            assert_eq!(DescribeRequest::decode(&desc.encode(fmt), fmt), Ok(desc));
        }
        // AWS's JSON, by hand.
        let get = br#"{"c":"a","f":0,"l":4096,"o":2,"n":3}"#;
        let g = GetRequest::decode(get, Format::Json).unwrap();
        assert_eq!(g.blocks().unwrap(), [2, 3, 4]);
        let data = br#"{"c":"a","f":0,"l":4096,"i":2,"p":"AQID"}"#;
        assert_eq!(
            DataBlock::decode(data, Format::Json).unwrap().payload,
            [1, 2, 3]
        );
    }

    #[test]
    fn requests_out_of_range_are_refused() {
        for bad in [
            &br#"{"f":0,"l":100,"o":0,"n":1}"#[..],
            br#"{"f":0,"l":4096,"o":0,"n":0}"#,
            br#"{"f":0,"l":4096,"o":0,"n":65}"#,
            br#"{"l":4096}"#,
            br#"{"f":-1,"l":4096}"#,
            br#"[1,2]"#,
            b"\xff\x00",
        ] {
            assert!(GetRequest::decode(bad, Format::Json).is_err(), "{bad:?}");
            assert!(GetRequest::decode(bad, Format::Cbor).is_err(), "{bad:?}");
        }
        let bitmap = GetRequest {
            client_token: None,
            version: None,
            file_id: 0,
            block_size: 256,
            offset: 8,
            count: 10,
            bitmap: Some(BASE64.encode([0b0000_0101, 0b0000_0011])),
        };
        assert_eq!(bitmap.blocks().unwrap(), [8, 10, 16, 17]);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            for fmt in [Format::Json, Format::Cbor] {
                let _ = GetRequest::decode(&bytes, fmt);
                let _ = DataBlock::decode(&bytes, fmt);
                let _ = StreamDescription::decode(&bytes, fmt);
                let _ = StreamRejected::decode(&bytes, fmt);
            }
        }

        #[test]
        fn blocks_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..600), id in any::<u32>()) {
            let b = DataBlock { client_token: Some("c".into()), file_id: 1, block_size: 512, block_id: id, payload };
            for fmt in [Format::Json, Format::Cbor] {
                prop_assert_eq!(DataBlock::decode(&b.encode(fmt), fmt), Ok(b.clone()));
            }
        }
    }
}
