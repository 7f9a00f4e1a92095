//! The embedded broker under any sequence of connections and MQTT packets
//! (3.1.1 and 5): connect, subscribe, unsubscribe, publish (retained, with
//! response topics), raw bytes, disconnect, with filters and topics of any
//! depth. No panic, no stack overflow, and the router's bookkeeping holds
//! after every step (`Harness::check`).
#![no_main]

use fleet_cloud::fuzzing::{Harness, Packet};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// A topic or filter: levels from a small alphabet (so that they meet),
/// or a very deep one.
#[derive(Arbitrary, Debug)]
enum Name {
    Levels(Vec<u8>),
    Deep { level: u8, depth: u16 },
    Raw(String),
}

const LEVELS: [&str; 12] = [
    "$aws", "things", "dev-a", "dev-b", "shadow", "update", "+", "#", "dt", "clients", "$share",
    "g",
];

impl Name {
    fn render(&self) -> String {
        match self {
            Name::Levels(l) => l
                .iter()
                .map(|i| LEVELS[usize::from(*i) % LEVELS.len()])
                .collect::<Vec<_>>()
                .join("/"),
            Name::Deep { level, depth } => {
                vec![LEVELS[usize::from(*level) % LEVELS.len()]; usize::from(*depth)].join("/")
            }
            Name::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect {
        who: u8,
        client: u8,
        v5: bool,
    },
    Subscribe {
        slot: u8,
        filters: Vec<(Name, u8)>,
    },
    Unsubscribe {
        slot: u8,
        filters: Vec<Name>,
    },
    Publish {
        slot: u8,
        topic: Name,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        response: Option<Name>,
    },
    Ping {
        slot: u8,
    },
    Raw {
        slot: u8,
        bytes: Vec<u8>,
    },
    Drain {
        slot: u8,
    },
    Disconnect {
        slot: u8,
    },
    Drop {
        slot: u8,
    },
}

const CLIENT_IDS: [&str; 5] = ["", "dev-a", "dev-b", "svc", "c1"];

fuzz_target!(|ops: Vec<Op>| {
    let mut h = Harness::new();
    for op in ops.into_iter().take(64) {
        let slot = |s: u8| usize::from(s) % h.connections().max(1);
        match op {
            Op::Connect { who, client, v5 } => {
                if h.connections() < 8 {
                    h.connect(who, CLIENT_IDS[usize::from(client) % CLIENT_IDS.len()], v5);
                }
            }
            Op::Subscribe { slot: s, filters } => {
                let filters = filters
                    .iter()
                    .take(8)
                    .map(|(f, q)| (f.render(), *q))
                    .collect();
                let s = slot(s);
                h.send(s, Packet::Subscribe(filters));
            }
            Op::Unsubscribe { slot: s, filters } => {
                let filters = filters.iter().take(8).map(Name::render).collect();
                let s = slot(s);
                h.send(s, Packet::Unsubscribe(filters));
            }
            Op::Publish {
                slot: s,
                topic,
                payload,
                qos,
                retain,
                response,
            } => {
                let s = slot(s);
                h.send(
                    s,
                    Packet::Publish {
                        topic: topic.render(),
                        payload,
                        qos,
                        retain,
                        response_topic: response.as_ref().map(Name::render),
                    },
                );
            }
            Op::Ping { slot: s } => {
                let s = slot(s);
                h.send(s, Packet::PingReq);
            }
            Op::Raw { slot: s, bytes } => {
                let s = slot(s);
                h.feed(s, &bytes);
            }
            Op::Drain { slot: s } => {
                let s = slot(s);
                h.drain(s);
            }
            Op::Disconnect { slot: s } => {
                let s = slot(s);
                h.send(s, Packet::Disconnect);
            }
            Op::Drop { slot: s } => {
                let s = slot(s);
                h.drop_connection(s);
            }
        }
        h.check();
    }
});
