//! Any topic string: parsing never panics, and whatever parses prints back
//! to exactly the same text.
#![no_main]

use fleet_core::topic::{Topic, TopicPrefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for prefix in [
        TopicPrefix::AWS,
        TopicPrefix::new("a/b").expect("valid prefix"),
    ] {
        if let Ok(topic) = Topic::parse(&prefix, text) {
            assert_eq!(topic.display(&prefix).to_string(), text);
            assert_eq!(topic.len(&prefix), text.len());
        }
    }
});
