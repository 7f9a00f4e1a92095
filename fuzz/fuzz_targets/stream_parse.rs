//! Every file-stream message parser on any bytes, JSON and CBOR: no panic,
//! and what parses survives re-encoding unchanged.
#![no_main]

use fleet_core::stream::{
    DataBlock, DescribeRequest, Format, GetRequest, StreamDescription, StreamRejected,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Json, Format::Cbor] {
        if let Ok(g) = GetRequest::decode(data, format) {
            let _ = g.blocks();
            assert_eq!(GetRequest::decode(&g.encode(format), format), Ok(g));
        }
        if let Ok(b) = DataBlock::decode(data, format) {
            assert_eq!(DataBlock::decode(&b.encode(format), format), Ok(b));
        }
        if let Ok(d) = StreamDescription::decode(data, format) {
            assert_eq!(StreamDescription::decode(&d.encode(format), format), Ok(d));
        }
        let _ = StreamRejected::decode(data, format);
        let _ = DescribeRequest::decode(data, format);
    }
});
