//! Processing a shadow update on a ~1 KiB shadow, beside a plain serde_json
//! parse-and-serialize of the same document, in the same run.
//!
//! `cargo bench -p fleet-core --bench shadow`

// A benchmark panics on a broken fixture, like a test.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fleet_core::shadow::{Shadow, ShadowLimits};
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000;

/// A shadow whose state (desired + reported) is about 1 KiB of JSON: the
/// kind of configuration-plus-telemetry document fleets keep.
fn sample_shadow() -> Shadow {
    let limits = ShadowLimits::default();
    let desired = json!({
        "config": {
            "sampling_ms": 500, "upload_every_s": 60, "log_level": "info",
            "wifi": {"ssid": "plant-floor-3", "band": "5GHz", "power_save": false},
            "thresholds": {"temp_hi": 78.5, "temp_lo": 12.0, "humidity_hi": 80},
            "schedule": [{"from": "06:00", "to": "18:00", "mode": "active"},
                         {"from": "18:00", "to": "06:00", "mode": "eco"}]
        },
        "firmware": {"channel": "stable", "target": "2.4.1"},
        "led": {"color": "green", "brightness": 40},
        "maintenance": {"window": "sun 02:00-04:00", "allow_reboot": true}
    });
    let reported = json!({
        "config": {
            "sampling_ms": 1000, "upload_every_s": 60, "log_level": "info",
            "wifi": {"ssid": "plant-floor-3", "band": "2.4GHz", "power_save": false,
                     "rssi": -61, "ip": "10.20.3.44"},
            "thresholds": {"temp_hi": 78.5, "temp_lo": 12.0, "humidity_hi": 80},
            "schedule": [{"from": "06:00", "to": "18:00", "mode": "active"}]
        },
        "firmware": {"channel": "stable", "running": "2.4.0", "slot": "B"},
        "led": {"color": "green", "brightness": 40},
        "sensors": {"temp": 21.7, "humidity": 44, "pressure": 1013.2, "uptime_s": 86400},
        "location": {"site": "gdansk-plant-2", "line": 4, "cell": "C7", "rack": 12},
        "power": {"voltage": 3.31, "current_ma": 182, "source": "mains"}
    });
    let s = Shadow::new();
    let s = s
        .update(
            json!({"state": {"desired": desired}})
                .to_string()
                .as_bytes(),
            NOW,
            &limits,
        )
        .expect("accepted")
        .shadow;
    s.update(
        json!({"state": {"reported": reported}})
            .to_string()
            .as_bytes(),
        NOW,
        &limits,
    )
    .expect("accepted")
    .shadow
}

fn bench(c: &mut Criterion) {
    let limits = ShadowLimits::default();
    let shadow = sample_shadow();
    let state = shadow.state().expect("exists");
    let state_len = serde_json::to_vec(state.desired()).unwrap().len()
        + serde_json::to_vec(state.reported()).unwrap().len();
    let stored = shadow.to_stored_json();
    let get_doc = shadow.get(b"", NOW, &limits).unwrap();
    // A typical device report: a few leaves, a client token, the version.
    let request = json!({
        "state": {"reported": {"sensors": {"temp": 22.1, "uptime_s": 86460},
                               "config": {"sampling_ms": 500}}},
        "clientToken": "fleet-1f-42",
        "version": shadow.version()
    })
    .to_string();
    eprintln!(
        "state (desired+reported) {state_len} B; stored document with metadata {} B; \
         get/accepted document {} B; request {} B",
        stored.len(),
        get_doc.len(),
        request.len()
    );

    let mut group = c.benchmark_group("shadow_1KiB");
    group.bench_function("serde_json_roundtrip_stored_document", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(black_box(&stored)).unwrap();
            black_box(serde_json::to_vec(&v).unwrap())
        })
    });
    group.bench_function("serde_json_roundtrip_get_document", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(black_box(&get_doc)).unwrap();
            black_box(serde_json::to_vec(&v).unwrap())
        })
    });
    group.bench_function("process_update", |b| {
        b.iter(|| {
            let u = black_box(&shadow)
                .update(black_box(request.as_bytes()), NOW + 1, &limits)
                .unwrap();
            black_box((u.accepted, u.delta, u.documents))
        })
    });
    group.bench_function("load_process_store", |b| {
        // What a service backed by a JSON column does per request: read the
        // stored form, process, write the stored form.
        b.iter(|| {
            let s = Shadow::from_stored_json(black_box(&stored)).unwrap();
            let u = s
                .update(black_box(request.as_bytes()), NOW + 1, &limits)
                .unwrap();
            black_box((u.shadow.to_stored_json(), u.accepted, u.delta, u.documents))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
