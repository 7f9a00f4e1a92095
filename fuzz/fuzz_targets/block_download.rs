//! `BlockDownload` under any sequence of inputs: no panic; it asks only for
//! its own stream's blocks, one block at a time; a block it hands back is
//! the one asked for, with the length asked for; it never waits without a
//! timer while a block is pending and the connection is up.
#![no_main]

use core::time::Duration;

use fleet_core::ota::{BlockDownload, DownloadConfig, DownloadEvent};
use fleet_core::stream::{DataBlock, Format, GetRequest, StreamRejected};
use fleet_core::time::Instant;
use fleet_core::transmit::Transmit;
use fleet_core::{StreamId, ThingName, TopicPrefix};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Disconnect,
    Advance(u16),
    Fetch {
        block: u8,
        len: u16,
    },
    Cancel,
    Data {
        block: u8,
        len: u16,
        ours: bool,
        cbor: bool,
        stream: u8,
    },
    Rejected {
        ours: bool,
    },
    Raw {
        topic: u8,
        payload: Vec<u8>,
    },
}

const TOPICS: [&str; 5] = [
    "$aws/things/dev-1/streams/fw/data/json",
    "$aws/things/dev-1/streams/fw/data/cbor",
    "$aws/things/dev-1/streams/fw/rejected/json",
    "$aws/things/dev-2/streams/fw/data/json",
    "$aws/things/dev-1/shadow/update/delta",
];

fuzz_target!(|ops: Vec<Op>| {
    let config = DownloadConfig {
        block_size: 256,
        max_attempts: 4,
        ..DownloadConfig::default()
    };
    let mut d = BlockDownload::new(
        &TopicPrefix::AWS,
        ThingName::from_static("dev-1"),
        StreamId::from_static("fw"),
        "job-1",
        config,
    );
    let mut now = Instant::ZERO;
    let mut connected = false;
    for op in ops.into_iter().take(300) {
        let asked = d.pending();
        match op {
            Op::Connect => {
                connected = true;
                d.handle_connection(now, true);
            }
            Op::Disconnect => {
                connected = false;
                d.handle_connection(now, false);
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                if d.poll_timeout().is_some_and(|t| t <= now) {
                    d.handle_timeout(now);
                }
            }
            Op::Fetch { block, len } => {
                let accepted = d.fetch(now, u64::from(block) * 256, u32::from(len)).is_ok();
                assert_eq!(
                    accepted,
                    asked.is_none() && (1..=256).contains(&len),
                    "fetch accepted exactly when idle and a block"
                );
            }
            Op::Cancel => d.cancel(),
            Op::Data {
                block,
                len,
                ours,
                cbor,
                stream,
            } => {
                let format = if cbor { Format::Cbor } else { Format::Json };
                let payload = DataBlock {
                    client_token: Some(if ours { "job-1" } else { "job-2" }.into()),
                    file_id: 0,
                    block_size: 256,
                    block_id: u32::from(block),
                    payload: vec![block; usize::from(len % 300)],
                }
                .encode(format);
                let topic = match (stream % 2, cbor) {
                    (0, false) => TOPICS[0],
                    (0, true) => TOPICS[1],
                    _ => TOPICS[3],
                };
                let _ = d.handle_message(now, topic, &payload);
            }
            Op::Rejected { ours } => {
                let payload = StreamRejected {
                    client_token: Some(if ours { "job-1" } else { "x" }.into()),
                    code: "ResourceNotFound".into(),
                    message: "gone".into(),
                }
                .encode(Format::Json);
                let _ = d.handle_message(now, TOPICS[2], &payload);
            }
            Op::Raw { topic, payload } => {
                let _ = d.handle_message(now, TOPICS[usize::from(topic) % TOPICS.len()], &payload);
            }
        }
        while let Some(t) = d.poll_transmit() {
            let Transmit::Publish { topic, payload, .. } = t else {
                panic!("only publishes");
            };
            assert_eq!(topic, "$aws/things/dev-1/streams/fw/get/json");
            let request = GetRequest::decode(&payload, Format::Json).expect("a valid get");
            let (offset, _) = d.pending().expect("asks only for a pending block");
            assert_eq!(u64::from(request.offset) * 256, offset);
            assert_eq!(request.count, 1);
        }
        while let Some(e) = d.poll_event() {
            if let DownloadEvent::Block { offset, data } = e {
                let (o, len) = asked.expect("a block only when one was asked for");
                assert_eq!((offset, data.len()), (o, len as usize));
            }
        }
        if connected && d.pending().is_some() {
            assert!(d.poll_timeout().is_some(), "a pending block has a timer");
        }
    }
});
