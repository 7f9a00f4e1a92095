//! The durable outbox: messages the agent must deliver, kept on disk until
//! the broker acknowledged them.
//!
//! An append-only log of records (`length, CRC-32, kind, sequence, topic,
//! payload`) and an append-only log of acknowledged sequences. `push`
//! returns only after the record is on disk (fsync), so an accepted message
//! survives a crash; on open, both logs are replayed and a torn last record
//! (a crash mid-write) is cut off. When acknowledged records make up most of
//! the log, it is compacted into a new file that replaces the old one
//! atomically (rename).

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What a message is; decides what may be dropped when the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Telemetry: may be dropped (oldest first) under [`Overflow::DropOldestTelemetry`].
    Telemetry,
    /// A shadow report.
    ShadowReport,
    /// A job status update: never dropped.
    JobUpdate,
    /// An install receipt: never dropped.
    Receipt,
}

impl MessageKind {
    fn code(self) -> u8 {
        match self {
            Self::Telemetry => 1,
            Self::ShadowReport => 2,
            Self::JobUpdate => 3,
            Self::Receipt => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::Telemetry,
            2 => Self::ShadowReport,
            3 => Self::JobUpdate,
            4 => Self::Receipt,
            _ => return None,
        })
    }
}

/// What to do when a new message does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the new message ([`OutboxError::Full`]).
    RejectNew,
    /// Drop the oldest telemetry until it fits; if only messages that are
    /// never dropped remain, refuse the new one.
    DropOldestTelemetry,
}

/// An outbox operation failed; nothing was changed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum OutboxError {
    /// The message does not fit under the size limit.
    Full,
    /// The disk failed (the cause is the
    /// [`source`](std::error::Error::source); shared, so that the error can
    /// be handed to every waiter).
    Io(std::sync::Arc<std::io::Error>),
}

/// Equal when of the same kind (two I/O failures of the same
/// [`ErrorKind`](std::io::ErrorKind) compare equal).
impl PartialEq for OutboxError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Full, Self::Full) => true,
            (Self::Io(a), Self::Io(b)) => a.kind() == b.kind(),
            _ => false,
        }
    }
}

impl Eq for OutboxError {}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("the outbox is full"),
            Self::Io(e) => write!(f, "outbox storage: {e}"),
        }
    }
}

impl std::error::Error for OutboxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Full => None,
            Self::Io(e) => Some(&**e),
        }
    }
}

impl From<std::io::Error> for OutboxError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(std::sync::Arc::new(e))
    }
}

/// A message waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number (grows, never reused).
    pub seq: u64,
    /// What it is.
    pub kind: MessageKind,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Entry {
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// The durable, size-bounded queue.
#[derive(Debug)]
pub struct Outbox {
    /// `None`: in memory only.
    dir: Option<PathBuf>,
    log: Option<File>,
    acks: Option<File>,
    entries: VecDeque<Entry>,
    next_seq: u64,
    bytes: usize,
    /// Records in the log file (live and acknowledged), for compaction.
    logged: usize,
    max_bytes: usize,
    overflow: Overflow,
}

const LOG: &str = "outbox.log";
const ACKS: &str = "outbox.acks";

fn crc32(data: &[u8]) -> u32 {
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

fn encode(e: &Entry) -> Vec<u8> {
    let mut body = Vec::with_capacity(11 + e.size());
    body.push(e.kind.code());
    body.extend_from_slice(&e.seq.to_le_bytes());
    body.extend_from_slice(&(e.topic.len() as u16).to_le_bytes());
    body.extend_from_slice(e.topic.as_bytes());
    body.extend_from_slice(&e.payload);
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads records until the end or the first torn/corrupt one; returns them
/// and the length of the good prefix.
fn decode_all(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32(body) != crc || body.len() < 11 {
            break;
        }
        let Some(kind) = MessageKind::from_code(body[0]) else {
            break;
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&body[1..9]);
        let topic_len = usize::from(u16::from_le_bytes([body[9], body[10]]));
        let Some(topic) = body.get(11..11 + topic_len) else {
            break;
        };
        let Ok(topic) = std::str::from_utf8(topic) else {
            break;
        };
        out.push(Entry {
            seq: u64::from_le_bytes(seq),
            kind,
            topic: topic.into(),
            payload: body[11 + topic_len..].to_vec(),
        });
        at += 8 + len;
    }
    (out, at)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // Makes a rename durable on Linux; harmless elsewhere.
    File::open(dir).and_then(|d| d.sync_all()).or(Ok(()))
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, keeping at most `max_bytes`
    /// of topics and payloads. Messages from before a crash come back in
    /// order, without those that were acknowledged.
    pub fn open(dir: &Path, max_bytes: usize, overflow: Overflow) -> Result<Self, OutboxError> {
        std::fs::create_dir_all(dir)?;
        let mut raw = Vec::new();
        if let Ok(mut f) = File::open(dir.join(LOG)) {
            f.read_to_end(&mut raw)?;
        }
        let (records, good) = decode_all(&raw);
        let mut acked = std::collections::HashSet::new();
        if let Ok(mut f) = File::open(dir.join(ACKS)) {
            let mut a = Vec::new();
            f.read_to_end(&mut a)?;
            for chunk in a.chunks_exact(12) {
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&chunk[..8]);
                if crc32(&seq).to_le_bytes() == chunk[8..12] {
                    acked.insert(u64::from_le_bytes(seq));
                }
            }
        }
        let next_seq = records.iter().map(|e| e.seq + 1).max().unwrap_or(1);
        let logged = records.len();
        let entries: VecDeque<Entry> = records
            .into_iter()
            .filter(|e| !acked.contains(&e.seq))
            .collect();
        let bytes = entries.iter().map(Entry::size).sum();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG))?;
        // Cut a torn tail so the next record starts on a boundary.
        log.set_len(good as u64)?;
        let acks = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(ACKS))?;
        let mut outbox = Self {
            dir: Some(dir.into()),
            log: Some(log),
            acks: Some(acks),
            entries,
            next_seq,
            bytes,
            logged,
            max_bytes,
            overflow,
        };
        outbox.compact_if_worth_it()?;
        Ok(outbox)
    }

    /// An outbox in memory: the same bounds and overflow policy, but nothing
    /// survives the process (for an agent without a state directory).
    pub fn in_memory(max_bytes: usize, overflow: Overflow) -> Self {
        Self {
            dir: None,
            log: None,
            acks: None,
            entries: VecDeque::new(),
            next_seq: 1,
            bytes: 0,
            logged: 0,
            max_bytes,
            overflow,
        }
    }

    /// Whether messages survive a restart (the outbox is on disk).
    pub fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    /// Queues several messages with one write to disk (one flush), all or
    /// none; returns their sequence numbers. The overflow policy applies to
    /// the batch as a whole.
    pub fn push_many(
        &mut self,
        kind: MessageKind,
        messages: &[(&str, &[u8])],
    ) -> Result<Vec<u64>, OutboxError> {
        let size: usize = messages.iter().map(|(t, p)| t.len() + p.len()).sum();
        if size > self.max_bytes
            || messages
                .iter()
                .any(|(t, _)| t.len() > usize::from(u16::MAX))
        {
            return Err(OutboxError::Full);
        }
        let drop = self.plan_room(size)?;
        let mut bytes = Vec::new();
        let mut entries = Vec::with_capacity(messages.len());
        for (i, (topic, payload)) in messages.iter().enumerate() {
            let entry = Entry {
                seq: self.next_seq + i as u64,
                kind,
                topic: (*topic).into(),
                payload: (*payload).into(),
            };
            bytes.extend_from_slice(&encode(&entry));
            entries.push(entry);
        }
        if let Some(log) = &mut self.log {
            log.write_all(&bytes)?;
            log.sync_data()?;
        }
        self.next_seq += messages.len() as u64;
        self.logged += messages.len();
        self.bytes += size;
        let seqs = entries.iter().map(|e| e.seq).collect();
        self.entries.extend(entries);
        for s in drop {
            self.ack(s)?;
        }
        Ok(seqs)
    }

    /// What must be dropped (oldest telemetry first) to make room for
    /// `size` more bytes, or `Full` if the policy keeps what is there.
    fn plan_room(&self, size: usize) -> Result<Vec<u64>, OutboxError> {
        let mut drop = Vec::new();
        if self.bytes + size <= self.max_bytes {
            return Ok(drop);
        }
        if self.overflow == Overflow::RejectNew {
            return Err(OutboxError::Full);
        }
        let mut freed = 0;
        for e in self
            .entries
            .iter()
            .filter(|e| e.kind == MessageKind::Telemetry)
        {
            if self.bytes - freed + size <= self.max_bytes {
                break;
            }
            freed += e.size();
            drop.push(e.seq);
        }
        if self.bytes - freed + size > self.max_bytes {
            return Err(OutboxError::Full);
        }
        Ok(drop)
    }

    /// Queues a message durably; returns its sequence number.
    pub fn push(
        &mut self,
        kind: MessageKind,
        topic: &str,
        payload: &[u8],
    ) -> Result<u64, OutboxError> {
        let size = topic.len() + payload.len();
        if size > self.max_bytes || topic.len() > usize::from(u16::MAX) {
            return Err(OutboxError::Full);
        }
        // Decide what to drop before changing anything.
        let drop = self.plan_room(size)?;
        let entry = Entry {
            seq: self.next_seq,
            kind,
            topic: topic.into(),
            payload: payload.into(),
        };
        if let Some(log) = &mut self.log {
            log.write_all(&encode(&entry))?;
            log.sync_data()?;
        }
        self.next_seq += 1;
        self.logged += 1;
        self.bytes += size;
        let seq = entry.seq;
        self.entries.push_back(entry);
        for s in drop {
            self.ack(s)?;
        }
        Ok(seq)
    }

    /// The broker acknowledged `seq` (or it was dropped): forget it for good.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        let Some(i) = self.entries.iter().position(|e| e.seq == seq) else {
            return Ok(());
        };
        if let Some(acks) = &mut self.acks {
            let mut rec = seq.to_le_bytes().to_vec();
            rec.extend_from_slice(&crc32(&seq.to_le_bytes()).to_le_bytes());
            acks.write_all(&rec)?;
            acks.sync_data()?;
        }
        if let Some(e) = self.entries.remove(i) {
            self.bytes -= e.size();
        }
        self.compact_if_worth_it()
    }

    /// The messages waiting, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of topics and payloads waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Rewrites the log with only the live records when at least half of it
    /// (and at least 64 records) is acknowledged.
    fn compact_if_worth_it(&mut self) -> Result<(), OutboxError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let dead = self.logged.saturating_sub(self.entries.len());
        if dead < 64 || dead * 2 < self.logged {
            return Ok(());
        }
        let tmp = dir.join("outbox.log.tmp");
        {
            let mut f = File::create(&tmp)?;
            for e in &self.entries {
                f.write_all(&encode(e))?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(LOG))?;
        sync_dir(&dir)?;
        // The new log holds only live records; older acks are moot.
        let acks = File::create(dir.join(ACKS))?;
        acks.sync_all()?;
        sync_dir(&dir)?;
        self.log = Some(OpenOptions::new().append(true).open(dir.join(LOG))?);
        self.acks = Some(OpenOptions::new().append(true).open(dir.join(ACKS))?);
        self.logged = self.entries.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_storage_failure_keeps_its_cause() {
        use std::error::Error as _;
        let e = OutboxError::from(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "no space left",
        ));
        let agent = crate::AgentError::Outbox(e.clone());
        let cause = agent
            .source()
            .and_then(|s| s.source())
            .map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("no space left"));
        assert_eq!(
            e,
            OutboxError::from(std::io::Error::from(std::io::ErrorKind::StorageFull))
        );
        assert_ne!(e, OutboxError::Full);
    }

    use super::*;

    fn seqs(o: &Outbox) -> Vec<u64> {
        o.pending().map(|e| e.seq).collect()
    }

    #[test]
    fn survives_reopening_without_acknowledged_messages() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        for i in 0..5u8 {
            o.push(MessageKind::Telemetry, "dt/pump-7/t", &[i]).unwrap();
        }
        o.ack(2).unwrap();
        o.ack(4).unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        assert_eq!(seqs(&o), [1, 3, 5]);
        assert_eq!(
            o.push(MessageKind::JobUpdate, "x", b"y").unwrap(),
            6,
            "sequences are never reused"
        );
        assert_eq!(o.pending().nth(1).unwrap().payload, [2]);
    }

    #[test]
    fn a_batch_is_queued_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 40, Overflow::RejectNew).unwrap();
        let seqs = o
            .push_many(MessageKind::Telemetry, &[("t", b"one"), ("t", b"two")])
            .unwrap();
        assert_eq!(seqs, [1, 2]);
        let big = [0u8; 30];
        assert!(matches!(
            o.push_many(MessageKind::Telemetry, &[("t", b"x"), ("t", &big)]),
            Err(OutboxError::Full)
        ));
        assert_eq!(o.len(), 2, "nothing of a refused batch is kept");
        drop(o);
        let o = Outbox::open(dir.path(), 40, Overflow::RejectNew).unwrap();
        assert_eq!(seqs_of(&o), [1, 2]);
    }

    fn seqs_of(o: &Outbox) -> Vec<u64> {
        o.pending().map(|e| e.seq).collect()
    }

    #[test]
    fn a_torn_last_record_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        o.push(MessageKind::Receipt, "a", b"first").unwrap();
        o.push(MessageKind::Receipt, "a", b"second").unwrap();
        drop(o);
        // A crash in the middle of writing a third record.
        let log = dir.path().join(LOG);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        let third = encode(&Entry {
            seq: 3,
            kind: MessageKind::Receipt,
            topic: "a".into(),
            payload: b"third".to_vec(),
        });
        f.write_all(&third[..third.len() - 3]).unwrap();
        drop(f);
        let mut o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        assert_eq!(seqs(&o), [1, 2]);
        o.push(MessageKind::Receipt, "a", b"fourth").unwrap();
        drop(o);
        let o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        let payloads: Vec<_> = o.pending().map(|e| e.payload.clone()).collect();
        assert_eq!(
            payloads,
            [b"first".to_vec(), b"second".to_vec(), b"fourth".to_vec()]
        );
    }

    #[test]
    fn overflow_policies() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 30, Overflow::RejectNew).unwrap();
        o.push(MessageKind::Telemetry, "t", &[0; 14]).unwrap();
        o.push(MessageKind::Telemetry, "t", &[0; 14]).unwrap();
        assert!(matches!(
            o.push(MessageKind::JobUpdate, "j", &[0; 4]),
            Err(OutboxError::Full)
        ));
        assert_eq!(o.len(), 2, "a refused message changes nothing");
        drop(o);

        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 30, Overflow::DropOldestTelemetry).unwrap();
        o.push(MessageKind::JobUpdate, "j", &[1; 9]).unwrap(); // 10
        o.push(MessageKind::Telemetry, "t", &[2; 9]).unwrap(); // 10
        o.push(MessageKind::Telemetry, "t", &[3; 9]).unwrap(); // 10
        // The oldest telemetry goes, the job update stays.
        o.push(MessageKind::Receipt, "r", &[4; 9]).unwrap();
        let kinds: Vec<_> = o.pending().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                MessageKind::JobUpdate,
                MessageKind::Telemetry,
                MessageKind::Receipt
            ]
        );
        o.push(MessageKind::Receipt, "r", &[5; 9]).unwrap();
        // Only never-dropped messages left: a new one is refused.
        assert!(matches!(
            o.push(MessageKind::JobUpdate, "j", &[6; 9]),
            Err(OutboxError::Full)
        ));
        assert_eq!(o.bytes(), 30);
        drop(o);
        let o = Outbox::open(dir.path(), 30, Overflow::DropOldestTelemetry).unwrap();
        assert_eq!(o.len(), 3, "drops are durable too");
    }

    #[test]
    fn compaction_keeps_order_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        for i in 0..200u32 {
            o.push(MessageKind::Telemetry, "t", &i.to_le_bytes())
                .unwrap();
        }
        for s in 1..=150 {
            o.ack(s).unwrap();
        }
        let before = std::fs::metadata(dir.path().join(LOG)).unwrap().len();
        assert!(o.logged < 200, "compacted");
        drop(o);
        let o = Outbox::open(dir.path(), 1 << 20, Overflow::RejectNew).unwrap();
        assert_eq!(seqs(&o), (151..=200).collect::<Vec<_>>());
        assert!(std::fs::metadata(dir.path().join(LOG)).unwrap().len() <= before);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, usize),
        Ack(usize),
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..4, 0usize..40).prop_map(|(k, n)| Op::Push(k, n)),
            3 => (0usize..8).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn behaves_like_a_queue_across_reopens(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let max = 200;
            let mut o = Outbox::open(dir.path(), max, Overflow::DropOldestTelemetry).unwrap();
            let mut model: VecDeque<(u64, MessageKind, usize)> = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push(k, n) => {
                        let kind = MessageKind::from_code(k + 1).unwrap();
                        let size = 1 + n;
                        match o.push(kind, "t", &vec![7; n]) {
                            Ok(seq) => {
                                model.push_back((seq, kind, size));
                                // The model drops the oldest telemetry too.
                                while model.iter().map(|m| m.2).sum::<usize>() > max {
                                    let i = model.iter().position(|m| m.1 == MessageKind::Telemetry).unwrap();
                                    model.remove(i);
                                }
                            }
                            Err(OutboxError::Full) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Op::Ack(i) => {
                        if let Some(&(seq, _, _)) = model.get(i) {
                            o.ack(seq).unwrap();
                            model.remove(i);
                        }
                    }
                    Op::Reopen => {
                        drop(o);
                        o = Outbox::open(dir.path(), max, Overflow::DropOldestTelemetry).unwrap();
                    }
                }
                let got: Vec<u64> = o.pending().map(|e| e.seq).collect();
                let want: Vec<u64> = model.iter().map(|m| m.0).collect();
                proptest::prop_assert_eq!(got, want);
                proptest::prop_assert!(o.bytes() <= max);
            }
        }
    }
}
