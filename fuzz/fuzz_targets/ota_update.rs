//! `OtaUpdate` under any sequence of inputs, in or out of turn, with power
//! cuts: no panic, and the new slot is never made bootable before its image
//! was verified.
#![no_main]

use fleet_core::ota::{Manifest, ManifestBuilder, OtaAction, OtaConfig, OtaUpdate, Slot};
use fleet_core::time::Instant;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Do what the update asked, correctly.
    Obey,
    /// Hand in a block, maybe the wrong one.
    Block {
        offset: u16,
        corrupt: bool,
    },
    Done,
    SelfTest(bool),
    Timeout(u16),
    Activate,
    PowerCut {
        booted_new: bool,
    },
}

fuzz_target!(|ops: Vec<Op>| {
    let image: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
    let payload = ManifestBuilder::new("fw", "1", 2, 700, Sha256::digest(&image).into())
        .hardware_id("hw")
        .build();
    let manifest = Manifest::parse(&payload).expect("valid manifest");
    let config = OtaConfig {
        block_size: 100,
        ..OtaConfig::default()
    };
    let mut ota = OtaUpdate::start(&manifest, [0; 32], 1, Slot::B, config);
    let mut record = None;
    // What the verifier accepted, by offset: the bytes a trial boot runs.
    let mut fed = vec![0u8; 700];
    let mut pending: Option<OtaAction> = None;
    let mut now = Instant::ZERO;
    for op in ops.into_iter().take(500) {
        if pending.is_none() {
            pending = ota.poll_action();
        }
        match op {
            Op::Obey => match pending.take() {
                Some(OtaAction::Fetch { offset, len }) => {
                    let (o, l) = (offset as usize, len as usize);
                    if ota.handle_block(now, offset, &image[o..o + l]).is_ok() {
                        fed[o..o + l].copy_from_slice(&image[o..o + l]);
                    }
                }
                Some(OtaAction::Write { .. }) => {
                    let _ = ota.handle_done(now);
                }
                Some(OtaAction::Persist(r)) => {
                    record = Some(r.encode());
                    let _ = ota.handle_done(now);
                }
                Some(OtaAction::SetTrialBoot { .. }) => {
                    assert_eq!(fed, image, "trial boot of an unverified image");
                    let _ = ota.handle_done(now);
                }
                Some(OtaAction::Confirm { .. }) => {
                    assert_eq!(fed, image, "confirm of an unverified image");
                    let _ = ota.handle_done(now);
                }
                Some(OtaAction::RunSelfTest | OtaAction::Reboot) | None => {}
            },
            Op::Block { offset, corrupt } => {
                let o = usize::from(offset) % 700;
                let mut block = image[o..(o + 100).min(700)].to_vec();
                if corrupt {
                    block[0] ^= 1;
                }
                if ota.handle_block(now, o as u64, &block).is_ok() {
                    fed[o..o + block.len()].copy_from_slice(&block);
                }
            }
            Op::Done => {
                let _ = ota.handle_done(now);
            }
            Op::SelfTest(passed) => {
                let _ = ota.handle_self_test(now, passed);
            }
            Op::Timeout(ms) => {
                now += core::time::Duration::from_millis(u64::from(ms) * 100);
                ota.handle_timeout(now);
            }
            Op::Activate => {
                let _ = ota.activate();
            }
            Op::PowerCut { booted_new } => {
                if let Some(r) = &record {
                    let slot = if booted_new { Slot::B } else { Slot::A };
                    if let Ok(o) = OtaUpdate::resume(r, slot, now, config) {
                        ota = o;
                        pending = None;
                    }
                }
            }
        }
        while ota.poll_event().is_some() {}
    }
});
