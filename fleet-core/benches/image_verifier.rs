//! `ImageVerifier` over 16 MiB in 4 KiB chunks, beside plain `sha2` hashing
//! of the same bytes in the same chunks, in the same run.
//!
//! `cargo bench -p fleet-core --bench image_verifier`

// A benchmark panics on a broken fixture, like a test.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleet_core::ota::ImageVerifier;
use sha2::{Digest, Sha256};

const SIZE: usize = 16 << 20;
const CHUNK: usize = 4096;

fn bench(c: &mut Criterion) {
    let image: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
    let digest: [u8; 32] = Sha256::digest(&image).into();
    let mut group = c.benchmark_group("image_16MiB");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(20);
    group.bench_function("sha2_plain", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for chunk in black_box(&image).chunks(CHUNK) {
                h.update(chunk);
            }
            black_box(h.finalize())
        })
    });
    group.bench_function("image_verifier", |b| {
        b.iter(|| {
            let mut v = ImageVerifier::new(SIZE as u64, digest);
            for chunk in black_box(&image).chunks(CHUNK) {
                v.update(chunk).unwrap();
            }
            v.finish().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
