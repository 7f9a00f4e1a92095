//! Downloading a file of an MQTT stream block by block, without I/O.
//!
//! [`BlockDownload`] is the device's side of AWS IoT's MQTT file delivery
//! for one file: asked for a block ([`fetch`](BlockDownload::fetch), what
//! [`OtaUpdate`](super::OtaUpdate)'s `Fetch` action says), it publishes a
//! `get` for it, waits for the `data` that carries it, asks again when the
//! answer does not come in time or the connection came back, gives up
//! after a bounded number of tries, and hands back the block once it has
//! checked that it is the one asked for. It is shaped like `ShadowSync`
//! and `JobRunner`: `handle_*` in, `poll_*` out, the time passed in, one
//! table of timers.
//!
//! See [`BlockDownload`] for an example.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use crate::identity::{StreamId, ThingName};
use crate::stream::{DataBlock, Format, GetRequest, StreamError, StreamRejected};
use crate::time::Instant;
use crate::topic::{StreamTopic, StreamTopicKind, Topic, TopicPrefix};
use crate::transmit::{QoS, Transmit};

/// How a [`BlockDownload`] asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadConfig {
    /// Bytes per block (256 B to 128 KiB, AWS's limits); a block's offset
    /// is a multiple of it.
    pub block_size: u32,
    /// How long a block may take before it is asked for again.
    pub block_timeout: Duration,
    /// How many times one block is asked for, at most, while connected;
    /// past it the download gives up ([`DownloadEvent::GaveUp`]).
    pub max_attempts: u32,
    /// The encoding asked for.
    pub format: Format,
    /// The file of the stream.
    pub file_id: u32,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            block_size: 1024,
            block_timeout: Duration::from_secs(5),
            max_attempts: 12,
            format: Format::Json,
            file_id: 0,
        }
    }
}

/// What a [`BlockDownload`] tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadEvent {
    /// The block asked for arrived: its offset in the file and its bytes
    /// (exactly the length asked for).
    Block {
        /// Where it goes in the file.
        offset: u64,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// The stream refused (no such stream or file, a block past the end):
    /// the download cannot go on.
    Rejected {
        /// AWS's error code (`ResourceNotFound`, ...).
        code: String,
        /// Its message.
        message: String,
    },
    /// No answer after [`DownloadConfig::max_attempts`] tries.
    GaveUp {
        /// The block's offset.
        offset: u64,
        /// How many times it was asked for.
        attempts: u32,
    },
}

/// A call the download cannot follow; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownloadError {
    /// A block is already being fetched.
    Busy,
    /// The offset is not a multiple of the block size, or the length is 0
    /// or more than a block.
    InvalidBlock {
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u32,
    },
    /// A message of this download's stream that cannot be decoded.
    Malformed(StreamError),
    /// The block asked for arrived with another length than asked: the
    /// stream does not hold the file the manifest describes.
    WrongLength {
        /// The block.
        block: u32,
        /// Bytes asked for.
        expected: u32,
        /// Bytes received.
        received: usize,
    },
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Busy => f.write_str("a block is already being fetched"),
            Self::InvalidBlock { offset, len } => {
                write!(f, "not a block: {len} bytes at offset {offset}")
            }
            Self::Malformed(e) => write!(f, "stream message: {e}"),
            Self::WrongLength {
                block,
                expected,
                received,
            } => write!(f, "block {block} has {received} bytes, not {expected}"),
        }
    }
}

impl core::error::Error for DownloadError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Malformed(e) => Some(e),
            _ => None,
        }
    }
}

/// The block being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    offset: u64,
    len: u32,
    block: u32,
    attempts: u32,
}

/// The timers, one slot each.
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// The pending block's answer is due.
    Block = 0,
}

const TIMERS: usize = 1;

/// The device's side of one file's download over an MQTT stream: asked
/// for a block ([`fetch`](Self::fetch)), it publishes a `get`, takes only
/// the `data` that carries that block with its token and length, asks
/// again after [`DownloadConfig::block_timeout`] or a reconnection, and
/// gives up after [`DownloadConfig::max_attempts`] tries.
///
/// ```
/// use fleet_core::ota::{BlockDownload, DownloadConfig, DownloadEvent};
/// use fleet_core::stream::{DataBlock, Format};
/// use fleet_core::time::Instant;
/// use fleet_core::transmit::Transmit;
/// use fleet_core::{StreamId, ThingName, TopicPrefix};
///
/// let mut download = BlockDownload::new(
///     &TopicPrefix::AWS,
///     ThingName::from_static("pump-7"),
///     StreamId::new("fw-1-2")?.into_owned(),
///     "job-1",
///     DownloadConfig::default(),
/// );
/// let now = Instant::ZERO;
/// download.handle_connection(now, true);
/// download.fetch(now, 1024, 1024)?;
/// let Some(Transmit::Publish { topic, .. }) = download.poll_transmit() else { panic!() };
/// assert_eq!(topic, "$aws/things/pump-7/streams/fw-1-2/get/json");
///
/// // The stream answers with block 1 (bytes 1024..2048).
/// let block = DataBlock { client_token: Some("job-1".into()), file_id: 0,
///     block_size: 1024, block_id: 1, payload: vec![7; 1024] };
/// download.handle_message(now, "$aws/things/pump-7/streams/fw-1-2/data/json",
///     &block.encode(Format::Json))?;
/// assert_eq!(download.poll_event(), Some(DownloadEvent::Block { offset: 1024, data: vec![7; 1024] }));
/// assert_eq!(download.pending(), None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlockDownload {
    prefix: String,
    thing: ThingName<'static>,
    stream: StreamId<'static>,
    client_token: String,
    config: DownloadConfig,
    pending: Option<Pending>,
    connected: bool,
    timers: [Option<Instant>; TIMERS],
    transmits: VecDeque<Transmit>,
    events: VecDeque<DownloadEvent>,
}

impl BlockDownload {
    /// A download of `stream` for `thing` under `prefix`; its requests
    /// carry `client_token` (the job's id, say), and only answers that
    /// echo it are taken. Starts disconnected.
    pub fn new(
        prefix: &TopicPrefix<'_>,
        thing: ThingName<'static>,
        stream: StreamId<'static>,
        client_token: &str,
        config: DownloadConfig,
    ) -> Self {
        Self {
            prefix: prefix.as_str().into(),
            thing,
            stream,
            client_token: client_token.into(),
            config,
            pending: None,
            connected: false,
            timers: [None; TIMERS],
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The filters of the answers (`data` and `rejected` of every stream
    /// of `thing`, in `format`): what the device subscribes to.
    pub fn subscriptions(
        prefix: &TopicPrefix<'_>,
        thing: &ThingName<'_>,
        format: Format,
    ) -> Vec<String> {
        [StreamTopicKind::Data, StreamTopicKind::Rejected]
            .into_iter()
            .map(|kind| {
                // The stream level is a wildcard: a valid id stands in for it.
                let topic = Topic::Stream(StreamTopic {
                    thing: thing.borrow(),
                    stream: StreamId::from_static("x"),
                    kind,
                    format,
                })
                .to_string_under(prefix);
                let (head, tail) = topic.rsplit_once("/x/").unwrap_or((topic.as_str(), ""));
                alloc::format!("{head}/+/{tail}")
            })
            .collect()
    }

    /// The stream.
    pub fn stream(&self) -> &StreamId<'static> {
        &self.stream
    }

    /// The block being fetched: its offset and length.
    pub fn pending(&self) -> Option<(u64, u32)> {
        self.pending.map(|p| (p.offset, p.len))
    }

    /// The connection came up (`up`) or went down at `now`. When it comes
    /// up, the pending block is asked for again (its answer may have been
    /// lost with the connection); while it is down, nothing is sent and
    /// no try is counted.
    pub fn handle_connection(&mut self, now: Instant, up: bool) {
        self.connected = up;
        if up {
            if self.pending.is_some() {
                self.ask(now);
            }
        } else {
            self.timers[Timer::Block as usize] = None;
        }
    }

    /// Asks for the `len` bytes at `offset` (one block: `offset` a
    /// multiple of the block size, `len` at most one block).
    pub fn fetch(&mut self, now: Instant, offset: u64, len: u32) -> Result<(), DownloadError> {
        if self.pending.is_some() {
            return Err(DownloadError::Busy);
        }
        let size = u64::from(self.config.block_size.max(1));
        let block = u32::try_from(offset / size).ok();
        let (Some(block), true) = (
            block,
            offset.is_multiple_of(size) && len > 0 && u64::from(len) <= size,
        ) else {
            return Err(DownloadError::InvalidBlock { offset, len });
        };
        self.pending = Some(Pending {
            offset,
            len,
            block,
            attempts: 0,
        });
        if self.connected {
            self.ask(now);
        }
        Ok(())
    }

    /// Stops fetching (the update was cancelled); late answers are
    /// ignored.
    pub fn cancel(&mut self) {
        self.pending = None;
        self.timers = [None; TIMERS];
    }

    /// A message arrived on `topic`. `Ok(false)`: not an answer of this
    /// download (another stream, another topic); `Ok(true)`: taken (a late
    /// duplicate or another request's answer is taken and dropped).
    pub fn handle_message(
        &mut self,
        _now: Instant,
        topic: &str,
        payload: &[u8],
    ) -> Result<bool, DownloadError> {
        let Ok(prefix) = TopicPrefix::new(&self.prefix) else {
            return Ok(false);
        };
        let Ok(Topic::Stream(t)) = Topic::parse(&prefix, topic) else {
            return Ok(false);
        };
        if t.thing != self.thing || t.stream != self.stream {
            return Ok(false);
        }
        let ours = |token: &Option<String>| token.as_deref() == Some(self.client_token.as_str());
        match t.kind {
            StreamTopicKind::Data => {
                let block =
                    DataBlock::decode(payload, t.format).map_err(DownloadError::Malformed)?;
                let Some(p) = self.pending else {
                    return Ok(true);
                };
                if !ours(&block.client_token)
                    || block.block_id != p.block
                    || block.file_id != self.config.file_id
                {
                    return Ok(true);
                }
                if block.payload.len() != p.len as usize {
                    return Err(DownloadError::WrongLength {
                        block: p.block,
                        expected: p.len,
                        received: block.payload.len(),
                    });
                }
                self.cancel();
                self.events.push_back(DownloadEvent::Block {
                    offset: p.offset,
                    data: block.payload,
                });
                Ok(true)
            }
            StreamTopicKind::Rejected => {
                let r =
                    StreamRejected::decode(payload, t.format).map_err(DownloadError::Malformed)?;
                if ours(&r.client_token) && self.pending.is_some() {
                    self.cancel();
                    self.events.push_back(DownloadEvent::Rejected {
                        code: r.code,
                        message: r.message,
                    });
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The time from [`poll_timeout`](Self::poll_timeout) has come: a
    /// block not answered is asked for again, or given up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = self.timers[Timer::Block as usize].is_some_and(|t| t <= now);
        if !due {
            return;
        }
        self.timers[Timer::Block as usize] = None;
        let Some(p) = self.pending else { return };
        if !self.connected {
            return;
        }
        if p.attempts >= self.config.max_attempts {
            self.cancel();
            self.events.push_back(DownloadEvent::GaveUp {
                offset: p.offset,
                attempts: p.attempts,
            });
            return;
        }
        self.ask(now);
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DownloadEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.iter().flatten().min().copied()
    }

    /// Publishes the `get` of the pending block and arms its timer.
    fn ask(&mut self, now: Instant) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        p.attempts = p.attempts.saturating_add(1);
        let request = GetRequest {
            client_token: Some(self.client_token.clone()),
            version: None,
            file_id: self.config.file_id,
            block_size: self.config.block_size,
            offset: p.block,
            count: 1,
            bitmap: None,
        };
        let Ok(prefix) = TopicPrefix::new(&self.prefix) else {
            return;
        };
        let topic = Topic::Stream(StreamTopic {
            thing: self.thing.borrow(),
            stream: self.stream.borrow(),
            kind: StreamTopicKind::Get,
            format: self.config.format,
        })
        .to_string_under(&prefix);
        self.transmits.push_back(Transmit::Publish {
            topic,
            payload: request.encode(self.config.format),
            qos: QoS::AtLeastOnce,
        });
        self.timers[Timer::Block as usize] = Some(now + self.config.block_timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn download(config: DownloadConfig) -> BlockDownload {
        BlockDownload::new(
            &TopicPrefix::AWS,
            ThingName::from_static("dev-1"),
            StreamId::from_static("fw"),
            "job-1",
            config,
        )
    }

    const DATA: &str = "$aws/things/dev-1/streams/fw/data/json";

    fn block(id: u32, token: &str, payload: Vec<u8>) -> Vec<u8> {
        DataBlock {
            client_token: Some(token.to_string()),
            file_id: 0,
            block_size: 1024,
            block_id: id,
            payload,
        }
        .encode(Format::Json)
    }

    fn asked(d: &mut BlockDownload) -> Vec<u32> {
        let mut blocks = Vec::new();
        while let Some(t) = d.poll_transmit() {
            let Transmit::Publish { topic, payload, .. } = t else {
                panic!("only publishes")
            };
            assert_eq!(topic, "$aws/things/dev-1/streams/fw/get/json");
            blocks.push(GetRequest::decode(&payload, Format::Json).unwrap().offset);
        }
        blocks
    }

    #[test]
    fn asks_again_after_a_timeout_and_gives_up_after_the_last_try() {
        let mut d = download(DownloadConfig {
            max_attempts: 3,
            ..DownloadConfig::default()
        });
        let mut now = Instant::ZERO;
        d.handle_connection(now, true);
        d.fetch(now, 2048, 1024).unwrap();
        assert_eq!(d.fetch(now, 0, 1024), Err(DownloadError::Busy));
        assert_eq!(asked(&mut d), [2]);
        for _ in 0..2 {
            now = d.poll_timeout().unwrap();
            d.handle_timeout(now);
            assert_eq!(asked(&mut d), [2]);
        }
        now = d.poll_timeout().unwrap();
        d.handle_timeout(now);
        assert_eq!(
            d.poll_event(),
            Some(DownloadEvent::GaveUp {
                offset: 2048,
                attempts: 3
            })
        );
        assert_eq!((d.pending(), d.poll_timeout()), (None, None));
    }

    #[test]
    fn a_reconnection_asks_again_without_counting_the_time_away() {
        let mut d = download(DownloadConfig::default());
        let now = Instant::ZERO;
        d.fetch(now, 0, 10).unwrap();
        assert!(asked(&mut d).is_empty(), "nothing is sent while offline");
        d.handle_connection(now, true);
        assert_eq!(asked(&mut d), [0]);
        d.handle_connection(now, false);
        assert_eq!(d.poll_timeout(), None);
        d.handle_connection(now, true);
        assert_eq!(asked(&mut d), [0]);
    }

    #[test]
    fn only_the_block_asked_for_with_our_token_is_taken() {
        let mut d = download(DownloadConfig::default());
        let now = Instant::ZERO;
        d.handle_connection(now, true);
        d.fetch(now, 1024, 1024).unwrap();
        // Another token, another block: taken and dropped.
        assert_eq!(
            d.handle_message(now, DATA, &block(1, "other", vec![0; 1024])),
            Ok(true)
        );
        assert_eq!(
            d.handle_message(now, DATA, &block(2, "job-1", vec![0; 1024])),
            Ok(true)
        );
        // Another stream, another thing: not ours.
        let other = "$aws/things/dev-1/streams/fw2/data/json";
        assert_eq!(
            d.handle_message(now, other, &block(1, "job-1", vec![0; 1024])),
            Ok(false)
        );
        assert_eq!(d.poll_event(), None);
        // The wrong length is an error and changes nothing.
        assert!(matches!(
            d.handle_message(now, DATA, &block(1, "job-1", vec![0; 10])),
            Err(DownloadError::WrongLength {
                block: 1,
                expected: 1024,
                received: 10
            })
        ));
        assert!(matches!(
            d.handle_message(now, DATA, b"{not json"),
            Err(DownloadError::Malformed(_))
        ));
        assert_eq!(d.pending(), Some((1024, 1024)));
        assert_eq!(
            d.handle_message(now, DATA, &block(1, "job-1", vec![5; 1024])),
            Ok(true)
        );
        assert_eq!(
            d.poll_event(),
            Some(DownloadEvent::Block {
                offset: 1024,
                data: vec![5; 1024]
            })
        );
        // A late duplicate is dropped.
        assert_eq!(
            d.handle_message(now, DATA, &block(1, "job-1", vec![5; 1024])),
            Ok(true)
        );
        assert_eq!(d.poll_event(), None);
    }

    #[test]
    fn a_rejection_ends_the_download() {
        let mut d = download(DownloadConfig::default());
        d.handle_connection(Instant::ZERO, true);
        d.fetch(Instant::ZERO, 0, 1024).unwrap();
        let rejected = StreamRejected {
            client_token: Some("job-1".into()),
            code: "ResourceNotFound".into(),
            message: "no stream fw".into(),
        };
        let topic = "$aws/things/dev-1/streams/fw/rejected/json";
        d.handle_message(Instant::ZERO, topic, &rejected.encode(Format::Json))
            .unwrap();
        assert!(
            matches!(d.poll_event(), Some(DownloadEvent::Rejected { code, .. }) if code == "ResourceNotFound")
        );
        assert_eq!(d.pending(), None);
    }

    #[test]
    fn bad_blocks_are_refused() {
        let mut d = download(DownloadConfig::default());
        for (offset, len) in [(1, 10), (0, 0), (0, 1025), (u64::MAX - 1023, 10)] {
            assert_eq!(
                d.fetch(Instant::ZERO, offset, len),
                Err(DownloadError::InvalidBlock { offset, len })
            );
        }
        assert_eq!(
            BlockDownload::subscriptions(
                &TopicPrefix::AWS,
                &ThingName::from_static("dev-1"),
                Format::Json
            ),
            [
                "$aws/things/dev-1/streams/+/data/json",
                "$aws/things/dev-1/streams/+/rejected/json"
            ]
        );
    }

    /// What the network does with one message.
    #[derive(Debug, Clone, Copy)]
    enum Fate {
        Deliver,
        Drop,
        Duplicate,
        Disconnect,
    }

    fn fate() -> impl Strategy<Value = Fate> {
        prop_oneof![
            6 => Just(Fate::Deliver),
            2 => Just(Fate::Drop),
            1 => Just(Fate::Duplicate),
            1 => Just(Fate::Disconnect),
        ]
    }

    proptest! {
        /// Over a network that drops, duplicates and cuts, a file is
        /// downloaded whole and in order, each block handed back once.
        #[test]
        fn a_lossy_network_still_yields_the_whole_file(
            size in 1usize..6000,
            fates in proptest::collection::vec(fate(), 1..400),
        ) {
            let file: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let config = DownloadConfig { block_size: 256, max_attempts: u32::MAX, ..DownloadConfig::default() };
            let mut d = download(config);
            let mut now = Instant::ZERO;
            d.handle_connection(now, true);
            let mut got = Vec::new();
            // However much the network loses, some message gets through.
            let mut fates = fates;
            fates.push(Fate::Deliver);
            let mut fates = fates.into_iter().cycle();
            let mut steps = 0;
            while got.len() < file.len() {
                steps += 1;
                prop_assert!(steps < 100_000, "stuck at {}", got.len());
                if d.pending().is_none() {
                    let len = (file.len() - got.len()).min(256) as u32;
                    d.fetch(now, got.len() as u64, len).unwrap();
                }
                let mut requests = Vec::new();
                while let Some(Transmit::Publish { payload, .. }) = d.poll_transmit() {
                    requests.push(GetRequest::decode(&payload, Format::Json).unwrap());
                }
                for r in requests {
                    let start = r.offset as usize * 256;
                    let answer = block(r.offset, "job-1", file[start..(start + 256).min(file.len())].to_vec());
                    match fates.next().unwrap_or(Fate::Deliver) {
                        Fate::Deliver => { d.handle_message(now, DATA, &answer).unwrap(); }
                        Fate::Duplicate => {
                            d.handle_message(now, DATA, &answer).unwrap();
                            d.handle_message(now, DATA, &answer).unwrap();
                        }
                        Fate::Drop => {}
                        Fate::Disconnect => {
                            d.handle_connection(now, false);
                            d.handle_connection(now, true);
                        }
                    }
                }
                while let Some(e) = d.poll_event() {
                    let DownloadEvent::Block { offset, data } = e else {
                        return Err(TestCaseError::fail(alloc::format!("unexpected {e:?}")));
                    };
                    prop_assert_eq!(offset as usize, got.len(), "in order, once");
                    got.extend(data);
                }
                if let Some(t) = d.poll_timeout() {
                    now = t;
                    d.handle_timeout(now);
                }
            }
            prop_assert_eq!(got, file);
        }
    }
}
