//! The attack table, round trips, and the power-loss simulation.

use std::vec::Vec;

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::*;
use crate::time::Instant;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Root keys r1..r3 (2 of 3), targets keys t1, t2 (2 of 2).
struct Keys {
    r: [SigningKey; 3],
    t: [SigningKey; 2],
}

fn keys() -> Keys {
    Keys {
        r: [key(1), key(2), key(3)],
        t: [key(11), key(12)],
    }
}

fn root_v1(k: &Keys) -> TrustRootBuilder {
    TrustRootBuilder::new(1)
        .key(&k.r[0].verifying_key(), &[Role::Root])
        .key(&k.r[1].verifying_key(), &[Role::Root])
        .key(&k.r[2].verifying_key(), &[Role::Root])
        .key(&k.t[0].verifying_key(), &[Role::Targets])
        .key(&k.t[1].verifying_key(), &[Role::Targets])
        .threshold(Role::Root, 2)
        .threshold(Role::Targets, 2)
}

const IMAGE: &[u8] = b"firmware image version two, with enough bytes to span blocks";

fn manifest(sequence: u64, image: &[u8]) -> ManifestBuilder {
    ManifestBuilder::new(
        "firmware",
        "2.0.0",
        sequence,
        image.len() as u64,
        Sha256::digest(image).into(),
    )
    .hardware_id("board-a")
    .hardware_id("board-b")
    .location("https://updates.example/fw-2.0.0.bin")
}

fn device(now: Option<u64>) -> DeviceProfile<'static> {
    DeviceProfile {
        hardware_id: "board-b",
        installed_sequence: 5,
        max_image_size: 1 << 20,
        now,
    }
}

fn signed(m: &ManifestBuilder, keys: &[&SigningKey]) -> Vec<u8> {
    sign_envelope(MANIFEST_PAYLOAD_TYPE, &m.build(), keys)
}

fn root(k: &Keys) -> TrustRoot {
    TrustRoot::parse(&root_v1(k).build()).unwrap()
}

fn check_image(m: &Manifest<'_>, image: &[u8]) -> Result<(), OtaError> {
    let mut v = ImageVerifier::new(m.size, m.digest);
    for chunk in image.chunks(7) {
        v.update(chunk)?;
    }
    v.finish()
}

#[test]
fn a_good_manifest_and_image_pass() {
    let k = keys();
    let env = signed(&manifest(6, IMAGE), &[&k.t[0], &k.t[1]]);
    let m = root(&k).verify_manifest(&env, &device(Some(1000))).unwrap();
    assert_eq!(
        (m.component, m.version, m.sequence),
        ("firmware", "2.0.0", 6)
    );
    assert_eq!(m.hardware_ids(), ["board-a", "board-b"]);
    assert_eq!(m.locations(), ["https://updates.example/fw-2.0.0.bin"]);
    check_image(&m, IMAGE).unwrap();
}

/// Every attack of the threat model, each refused with its own error.
#[test]
fn attack_table() {
    let k = keys();
    let root = root(&k);
    let both = [&k.t[0], &k.t[1]];
    let dev = device(Some(2_000_000_000));

    // Tampered image: the manifest is fine, the bytes are not.
    let env = signed(&manifest(6, IMAGE), &both);
    let m = root.verify_manifest(&env, &dev).unwrap();
    let mut tampered = IMAGE.to_vec();
    tampered[3] ^= 1;
    assert_eq!(check_image(&m, &tampered), Err(OtaError::DigestMismatch));

    // Tampered manifest: one payload byte changed after signing.
    let mut env2 = env.clone();
    let at = env2.len() - 2 * 72 - 10; // inside the payload
    env2[at] ^= 0x40;
    assert_eq!(
        root.verify_manifest(&env2, &dev),
        Err(OtaError::BadSignature)
    );

    // Signed by keys the root does not know.
    let strangers = signed(&manifest(6, IMAGE), &[&key(90), &key(91)]);
    assert_eq!(
        root.verify_manifest(&strangers, &dev),
        Err(OtaError::UnknownKey)
    );

    // Below the threshold.
    let one = signed(&manifest(6, IMAGE), &[&k.t[0]]);
    assert_eq!(
        root.verify_manifest(&one, &dev),
        Err(OtaError::BelowThreshold { have: 1, need: 2 })
    );

    // The same key signing twice counts once.
    let twice = signed(&manifest(6, IMAGE), &[&k.t[0], &k.t[0]]);
    assert_eq!(
        root.verify_manifest(&twice, &dev),
        Err(OtaError::BelowThreshold { have: 1, need: 2 })
    );

    // Root keys cannot sign manifests (roles are separate).
    let by_root = signed(&manifest(6, IMAGE), &[&k.r[0], &k.r[1]]);
    assert_eq!(
        root.verify_manifest(&by_root, &dev),
        Err(OtaError::BelowThreshold { have: 0, need: 2 })
    );

    // A replayed older manifest (rollback), and the same sequence again.
    for old in [4, 5] {
        let replay = signed(&manifest(old, IMAGE), &both);
        assert_eq!(
            root.verify_manifest(&replay, &dev),
            Err(OtaError::Rollback {
                installed: 5,
                offered: old
            })
        );
    }

    // Expired.
    let expired = signed(&manifest(6, IMAGE).expires(1_999_999_999), &both);
    assert_eq!(root.verify_manifest(&expired, &dev), Err(OtaError::Expired));
    // Without a trusted clock, expiry cannot be checked and is not.
    assert!(root.verify_manifest(&expired, &device(None)).is_ok());

    // Wrong hardware.
    let other_hw = signed(
        &ManifestBuilder::new("firmware", "2", 6, 10, [0; 32]).hardware_id("board-z"),
        &both,
    );
    assert_eq!(
        root.verify_manifest(&other_hw, &dev),
        Err(OtaError::WrongHardware)
    );

    // Too large for the slot.
    let huge = signed(
        &ManifestBuilder::new("firmware", "2", 6, 2 << 20, [0; 32]).hardware_id("board-b"),
        &both,
    );
    assert_eq!(
        root.verify_manifest(&huge, &dev),
        Err(OtaError::ImageTooLarge)
    );

    // Needs a newer base than installed.
    let needs_base = signed(&manifest(6, IMAGE).min_installed_sequence(6), &both);
    assert_eq!(
        root.verify_manifest(&needs_base, &dev),
        Err(OtaError::BaseTooOld {
            installed: 5,
            required: 6
        })
    );

    // An image longer than declared is refused as soon as it overflows.
    let mut v = ImageVerifier::new(m.size, m.digest);
    v.update(IMAGE).unwrap();
    assert_eq!(v.update(b"x"), Err(OtaError::ImageTooLong));
    // And a short one at the end.
    let mut v = ImageVerifier::new(m.size, m.digest);
    v.update(&IMAGE[..10]).unwrap();
    assert_eq!(v.finish(), Err(OtaError::ImageTooShort));

    // An old (validly signed) manifest mixed with a new image.
    let mut old_image = IMAGE.to_vec();
    old_image[0] = b'F'; // same length, other bytes
    let old_env = signed(&manifest(6, &old_image), &both);
    let old_m = root.verify_manifest(&old_env, &dev).unwrap();
    assert_eq!(check_image(&old_m, IMAGE), Err(OtaError::DigestMismatch));

    // A trust root offered where a manifest is expected.
    let root_env = tools::sign_root(&root_v1(&k), &[&k.r[0], &k.r[1]]);
    assert_eq!(
        root.verify_manifest(&root_env, &dev),
        Err(OtaError::WrongPayloadType)
    );
}

#[test]
fn rotation_needs_old_and_new_thresholds_and_moves_forward_only() {
    let k = keys();
    let v1 = root(&k);
    let new_root_keys = [key(21), key(22)];
    let new_target = key(31);
    let v2_builder = TrustRootBuilder::new(2)
        .key(&new_root_keys[0].verifying_key(), &[Role::Root])
        .key(&new_root_keys[1].verifying_key(), &[Role::Root])
        .key(&k.t[0].verifying_key(), &[Role::Targets])
        .key(&new_target.verifying_key(), &[Role::Targets])
        .threshold(Role::Root, 2)
        .threshold(Role::Targets, 2);

    // Signed only by the new keys: the current root does not know them.
    let only_new = tools::sign_root(&v2_builder, &[&new_root_keys[0], &new_root_keys[1]]);
    assert_eq!(v1.rotate(&only_new, None), Err(OtaError::UnknownKey));

    // Signed only by the old keys: the new root's own threshold is unmet.
    let only_old = tools::sign_root(&v2_builder, &[&k.r[0], &k.r[1]]);
    assert_eq!(v1.rotate(&only_old, None), Err(OtaError::UnknownKey));

    // One old key and both new ones: below the old threshold.
    let weak = tools::sign_root(
        &v2_builder,
        &[&k.r[0], &new_root_keys[0], &new_root_keys[1]],
    );
    assert_eq!(v1.rotate(&weak, None), Err(OtaError::UnknownKey));

    // Both thresholds: accepted.
    let all = [&k.r[0], &k.r[2], &new_root_keys[0], &new_root_keys[1]];
    let good = tools::sign_root(&v2_builder, &all);
    let v2 = v1.rotate(&good, None).unwrap();
    assert_eq!(v2.version(), 2);

    // It never goes backwards, sideways or skips.
    assert_eq!(
        v2.rotate(&good, None),
        Err(OtaError::RootVersion {
            current: 2,
            offered: 2
        })
    );
    let back = tools::sign_root(&root_v1(&k), &[&k.r[0], &k.r[1]]);
    assert_eq!(
        v2.rotate(&back, None),
        Err(OtaError::RootVersion {
            current: 2,
            offered: 1
        })
    );
    let v3 = v2_builder.clone();
    let skip = tools::sign_root(
        &TrustRootBuilder::new(4)
            .key(&new_root_keys[0].verifying_key(), &[Role::Root])
            .key(&new_target.verifying_key(), &[Role::Targets]),
        &[&new_root_keys[0]],
    );
    let _ = v3;
    assert_eq!(
        v2.rotate(&skip, None),
        Err(OtaError::RootVersion {
            current: 2,
            offered: 4
        })
    );

    // Revocation falls out of rotation: t2 is gone, so t1 + t2 no longer
    // suffices, while t1 + the new target key does.
    let old_pair = signed(&manifest(6, IMAGE), &[&k.t[0], &k.t[1]]);
    assert_eq!(
        v2.verify_manifest(&old_pair, &device(None)),
        Err(OtaError::UnknownKey)
    );
    let new_pair = signed(&manifest(6, IMAGE), &[&k.t[0], &new_target]);
    assert!(v2.verify_manifest(&new_pair, &device(None)).is_ok());

    // An expired new root is refused.
    let expiring = v2_builder.clone().expires(100);
    let expired = tools::sign_root(&expiring, &all);
    assert_eq!(v1.rotate(&expired, Some(101)), Err(OtaError::Expired));
}

#[test]
fn self_signed_roots_and_bad_roots() {
    let k = keys();
    let env = tools::sign_root(&root_v1(&k), &[&k.r[0], &k.r[1]]);
    assert_eq!(TrustRoot::from_self_signed(&env).unwrap(), root(&k));
    let weak = tools::sign_root(&root_v1(&k), &[&k.r[0]]);
    assert_eq!(
        TrustRoot::from_self_signed(&weak),
        Err(OtaError::BelowThreshold { have: 1, need: 2 })
    );
    // A threshold its own keys cannot meet.
    let impossible = TrustRootBuilder::new(1)
        .key(&k.r[0].verifying_key(), &[Role::Root, Role::Targets])
        .threshold(Role::Root, 2)
        .build();
    assert_eq!(TrustRoot::parse(&impossible), Err(Malformed::BadThreshold));
    // The same key twice.
    let dup = TrustRootBuilder::new(1)
        .key(&k.r[0].verifying_key(), &[Role::Root, Role::Targets])
        .key(&k.r[0].verifying_key(), &[Role::Root])
        .build();
    assert_eq!(TrustRoot::parse(&dup), Err(Malformed::Repeated { tag: 2 }));
}

#[test]
fn malformed_inputs_get_typed_errors() {
    assert_eq!(Manifest::parse(b"XXXX"), Err(Malformed::BadMagic));
    assert_eq!(
        Manifest::parse(b"FLM1\x01\x05\x00ab"),
        Err(Malformed::Truncated)
    );
    let mut unknown = manifest(6, IMAGE).build();
    unknown.extend_from_slice(&[0x42, 1, 0, 0]);
    assert_eq!(
        Manifest::parse(&unknown),
        Err(Malformed::UnknownField { tag: 0x42 })
    );
    let mut ignorable = manifest(6, IMAGE).build();
    ignorable.extend_from_slice(&[0xC2, 1, 0, 0]);
    assert!(Manifest::parse(&ignorable).is_ok());
    let mut twice = manifest(6, IMAGE).build();
    twice.extend_from_slice(&[3, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(Manifest::parse(&twice), Err(Malformed::Repeated { tag: 3 }));
    let no_hw = ManifestBuilder::new("a", "b", 1, 1, [0; 32]).build();
    assert_eq!(Manifest::parse(&no_hw), Err(Malformed::Missing { tag: 6 }));
    let k = keys();
    let mut env = signed(&manifest(6, IMAGE), &[&k.t[0]]);
    env.push(0);
    assert_eq!(Envelope::parse(&env), Err(Malformed::TrailingBytes));
    env.truncate(env.len() - 2);
    assert_eq!(Envelope::parse(&env), Err(Malformed::Truncated));
}

#[test]
fn receipts_are_signed_by_the_device() {
    let device_key = key(50);
    let receipt = InstallReceipt {
        manifest_digest: [9; 32],
        outcome: InstallOutcome::Committed,
        installed_sequence: 6,
        nonce: b"job-77-nonce",
    };
    let mut buf = [0u8; MAX_RECEIPT_LEN];
    let n = receipt.sign(&device_key, &mut buf).unwrap();
    let back = InstallReceipt::verify(&buf[..n], &device_key.verifying_key()).unwrap();
    assert_eq!(back, receipt);
    assert_eq!(
        InstallReceipt::verify(&buf[..n], &key(51).verifying_key()),
        Err(OtaError::BadSignature)
    );
    let mut forged = buf;
    forged[36] = 2; // claim a rollback instead
    assert_eq!(
        InstallReceipt::verify(&forged[..n], &device_key.verifying_key()),
        Err(OtaError::BadSignature)
    );
    let too_long = InstallReceipt {
        nonce: &[0; 33],
        ..receipt
    };
    assert!(too_long.sign(&device_key, &mut buf).is_err());
}

#[test]
fn tools_sign_a_manifest_for_a_file() {
    let dir = std::env::temp_dir().join(format!("fleet-ota-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("image.bin");
    std::fs::write(&path, IMAGE).unwrap();
    let k = keys();
    let m = tools::manifest_for_file(&path, "firmware", "2.0.0", 6)
        .unwrap()
        .hardware_id("board-b");
    let env = tools::sign_manifest(&m, &[&k.t[0], &k.t[1]]);
    let parsed = root(&k).verify_manifest(&env, &device(None)).unwrap();
    check_image(&parsed, IMAGE).unwrap();
    let fresh = tools::generate_key().unwrap();
    assert_ne!(fresh.to_bytes(), tools::generate_key().unwrap().to_bytes());
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #[test]
    fn sign_then_verify_round_trips(
        component in "[a-z]{1,64}",
        version in "[0-9.]{1,32}",
        sequence in 6u64..u64::MAX,
        size in 0u64..(1 << 20),
        digest in any::<[u8; 32]>(),
        hw in proptest::collection::vec("[a-z0-9-]{1,64}", 1..8),
        expires in proptest::option::of(any::<u64>()),
    ) {
        let mut b = ManifestBuilder::new(&component, &version, sequence, size, digest);
        for h in &hw {
            b = b.hardware_id(h);
        }
        if let Some(e) = expires {
            b = b.expires(e);
        }
        let k = keys();
        let env = signed(&b, &[&k.t[1], &k.t[0]]);
        let profile = DeviceProfile { hardware_id: &hw[0], installed_sequence: 5, max_image_size: 1 << 20, now: None };
        let m = root(&k).verify_manifest(&env, &profile).unwrap();
        prop_assert_eq!(m.component, component.as_str());
        prop_assert_eq!(m.version, version.as_str());
        prop_assert_eq!((m.sequence, m.size, m.digest, m.expires), (sequence, size, digest, expires));
        prop_assert_eq!(m.hardware_ids().len(), hw.len());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200), prefix in 0usize..4) {
        let magic: [&[u8]; 4] = [b"FLE1", b"FLM1", b"FLR1", b"FLI1"];
        let mut input = magic[prefix].to_vec();
        input.extend_from_slice(&bytes);
        let k = keys();
        let root = root(&k);
        let _ = Envelope::parse(&input);
        let _ = Manifest::parse(&input);
        let _ = TrustRoot::parse(&input);
        let _ = root.verify_manifest(&input, &device(Some(1)));
        let _ = root.rotate(&input, Some(1));
        let _ = InstallReceipt::verify(&input, &k.t[0].verifying_key());
        let mut record = [0u8; RECORD_LEN];
        let n = input.len().min(RECORD_LEN);
        record[..n].copy_from_slice(&input[..n]);
        let _ = OtaUpdate::resume(&record, Slot::A, Instant::ZERO, OtaConfig::default());
    }

    #[test]
    fn verifier_is_independent_of_chunking_and_saves(
        image in proptest::collection::vec(any::<u8>(), 0..5000),
        cuts in proptest::collection::vec(0usize..5000, 0..6),
    ) {
        let digest: [u8; 32] = Sha256::digest(&image).into();
        let mut v = ImageVerifier::new(image.len() as u64, digest);
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(image.len())).collect();
        points.sort_unstable();
        let mut at = 0;
        for p in points {
            v.update(&image[at..p]).unwrap();
            at = p;
            v = ImageVerifier::restore(&v.save()).unwrap();
        }
        v.update(&image[at..]).unwrap();
        prop_assert_eq!(v.finish(), Ok(()));
    }
}

// ---- power-loss simulation -------------------------------------------------

mod power_loss {
    use super::*;
    use core::time::Duration;

    const OLD: &[u8] = b"old image, running and confirmed";

    fn new_image() -> Vec<u8> {
        (0..1000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A simulated board: two slots, a one-shot trial flag, and the record.
    struct Board {
        slots: [Vec<u8>; 2],
        active: Slot,
        trial: Option<Slot>,
        record: Option<[u8; RECORD_LEN]>,
        booted: Slot,
    }

    fn idx(s: Slot) -> usize {
        match s {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    impl Board {
        fn boot(&mut self) -> Slot {
            self.booted = self.trial.take().unwrap_or(self.active);
            let image = &self.slots[idx(self.booted)];
            assert!(
                image == OLD || *image == new_image(),
                "booted slot {:?} holds an unverified image",
                self.booted
            );
            self.booted
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        phase: OtaPhase,
        active: Slot,
        fetched: u64,
        actions: usize,
    }

    fn config() -> OtaConfig {
        OtaConfig {
            block_size: 128,
            trial_timeout: Duration::from_secs(30),
            ..OtaConfig::default()
        }
    }

    /// Runs an update, cutting power after each action whose 1-based index
    /// is in `cuts`. `self_test`: the new image's verdict (None: never
    /// answers). `served`: the bytes the server hands out.
    fn run(cuts: &[usize], self_test: Option<bool>, served: &[u8], boots: bool) -> Outcome {
        let image = new_image();
        let payload = manifest(6, &image).build();
        let m = Manifest::parse(&payload).unwrap();
        let mut board = Board {
            slots: [OLD.to_vec(), Vec::new()],
            active: Slot::A,
            trial: None,
            record: None,
            booted: Slot::A,
        };
        let mut now = Instant::ZERO;
        let mut ota = OtaUpdate::start(&m, [1; 32], 5, Slot::B, config());
        let mut done = 0usize;
        let mut fetched = 0u64;
        let mut block: Vec<u8> = Vec::new();
        let mut guard = 0;
        loop {
            guard += 1;
            assert!(guard < 10_000, "the update does not finish");
            let Some(action) = ota.poll_action() else {
                if let Some(deadline) = ota.poll_timeout() {
                    now = deadline;
                    ota.handle_timeout(now);
                    continue;
                }
                break;
            };
            let mut power_cycle = false;
            match action {
                OtaAction::Fetch { offset, len } => {
                    let (o, l) = (offset as usize, len as usize);
                    block = served[o..(o + l).min(served.len())].to_vec();
                    fetched += block.len() as u64;
                    if ota.handle_block(now, offset, &block).is_err() {
                        continue;
                    }
                }
                OtaAction::Write { slot, offset, len } => {
                    assert_ne!(slot, board.booted, "never write the running slot");
                    let s = &mut board.slots[idx(slot)];
                    let end = offset as usize + len as usize;
                    if s.len() < end {
                        s.resize(end, 0);
                    }
                    s[offset as usize..end].copy_from_slice(&block);
                    ota.handle_done(now).unwrap();
                }
                OtaAction::Persist(record) => {
                    board.record = Some(record.encode());
                    ota.handle_done(now).unwrap();
                }
                OtaAction::SetTrialBoot { slot } => {
                    board.trial = Some(slot);
                    ota.handle_done(now).unwrap();
                }
                OtaAction::Reboot => power_cycle = true,
                OtaAction::RunSelfTest => match self_test {
                    Some(passed) => ota.handle_self_test(now, passed).unwrap(),
                    None => continue,
                },
                OtaAction::Confirm { slot } => {
                    board.active = slot;
                    ota.handle_done(now).unwrap();
                }
            }
            done += 1;
            if power_cycle || cuts.contains(&done) {
                // RAM is lost; the board boots and the update resumes.
                loop {
                    let booted = board.boot();
                    if booted == Slot::B && !boots {
                        continue; // the new image dies before the app runs
                    }
                    break;
                }
                now += Duration::from_secs(1);
                let record = board.record.expect("the first action persists a record");
                ota = OtaUpdate::resume(&record, board.booted, now, config()).unwrap();
            }
        }
        let final_record = ProgressRecord::decode(&board.record.unwrap()).unwrap();
        assert_eq!(final_record.phase(), ota.phase());
        Outcome {
            phase: ota.phase(),
            active: board.active,
            fetched,
            actions: done,
        }
    }

    fn uncut_action_count(self_test: Option<bool>) -> usize {
        run(&[], self_test, &new_image(), true).actions
    }

    #[test]
    fn uninterrupted_update_commits() {
        let image = new_image();
        let o = run(&[], Some(true), &image, true);
        assert_eq!(o.phase, OtaPhase::Committed);
        assert_eq!(o.active, Slot::B);
        assert_eq!(o.fetched, image.len() as u64);
    }

    #[test]
    fn a_cut_after_every_single_action_still_ends_verified() {
        let image = new_image();
        let total = uncut_action_count(Some(true));
        for k in 1..=total {
            let o = run(&[k], Some(true), &image, true);
            assert_eq!(o.phase, OtaPhase::Committed, "cut after action {k}");
            assert_eq!(o.active, Slot::B, "cut after action {k}");
            // Resumed from the persisted offset: at most one block again.
            assert!(
                o.fetched <= image.len() as u64 + 128,
                "cut after action {k} fetched {}",
                o.fetched
            );
        }
        // And two cuts anywhere.
        for k in 1..=total {
            for j in (k + 1..=total).step_by(3) {
                let o = run(&[k, j], Some(true), &image, true);
                assert!(
                    o.phase == OtaPhase::Committed || o.phase == OtaPhase::RolledBack,
                    "cuts after {k} and {j}: {:?}",
                    o.phase
                );
                // Whatever happened, the active slot holds a verified image
                // (Board::boot asserts it at every boot), and a commit means B.
                if o.phase == OtaPhase::Committed {
                    assert_eq!(o.active, Slot::B);
                } else {
                    assert_eq!(o.active, Slot::A);
                }
            }
        }
    }

    #[test]
    fn a_failed_self_test_rolls_back_even_with_cuts() {
        let image = new_image();
        let total = uncut_action_count(Some(false));
        for k in 0..=total {
            let o = run(&[k], Some(false), &image, true);
            assert_eq!(o.phase, OtaPhase::RolledBack, "cut after action {k}");
            assert_eq!(o.active, Slot::A, "cut after action {k}");
        }
    }

    #[test]
    fn an_unconfirmed_trial_times_out_and_rolls_back() {
        let o = run(&[], None, &new_image(), true);
        assert_eq!((o.phase, o.active), (OtaPhase::RolledBack, Slot::A));
    }

    #[test]
    fn an_image_that_never_boots_is_given_up() {
        let o = run(&[], Some(true), &new_image(), false);
        assert_eq!((o.phase, o.active), (OtaPhase::RolledBack, Slot::A));
    }

    #[test]
    fn a_corrupt_download_fails_and_changes_nothing() {
        let mut served = new_image();
        served[500] ^= 0xff;
        let o = run(&[], Some(true), &served, true);
        assert_eq!((o.phase, o.active), (OtaPhase::Failed, Slot::A));
    }

    #[test]
    fn the_record_is_fixed_size_and_checked() {
        let image = new_image();
        let payload = manifest(6, &image).build();
        let m = Manifest::parse(&payload).unwrap();
        let mut ota = OtaUpdate::start(&m, [1; 32], 5, Slot::B, config());
        let Some(OtaAction::Persist(record)) = ota.poll_action() else {
            panic!("starts by persisting")
        };
        let mut bytes = record.encode();
        assert_eq!(bytes.len(), RECORD_LEN);
        const { assert!(RECORD_LEN <= 256) };
        bytes[60] ^= 1;
        assert_eq!(
            ProgressRecord::decode(&bytes),
            Err(OtaError::Malformed(Malformed::Checksum))
        );
    }
}
