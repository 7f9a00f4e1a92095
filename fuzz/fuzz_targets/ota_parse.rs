//! Every OTA parser on any bytes: no panic, and a manifest that parses
//! survives a rebuild unchanged.
#![no_main]

use ed25519_dalek::SigningKey;
use fleet_core::ota::{
    DeviceProfile, Envelope, InstallReceipt, Manifest, ManifestBuilder, OtaConfig, OtaUpdate,
    RECORD_LEN, Role, Slot, TrustRoot, TrustRootBuilder,
};
use fleet_core::time::Instant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[1; 32]);
    let root = TrustRoot::parse(
        &TrustRootBuilder::new(1)
            .key(&key.verifying_key(), &[Role::Root, Role::Targets])
            .build(),
    )
    .expect("valid root");
    let _ = Envelope::parse(data);
    let _ = TrustRoot::parse(data);
    let _ = root.rotate(data, Some(0));
    let device = DeviceProfile {
        hardware_id: "hw",
        installed_sequence: 0,
        max_image_size: u64::MAX,
        now: Some(0),
    };
    let _ = root.verify_manifest(data, &device);
    let _ = InstallReceipt::verify(data, &key.verifying_key());
    if data.len() >= RECORD_LEN {
        let mut record = [0u8; RECORD_LEN];
        record.copy_from_slice(&data[..RECORD_LEN]);
        let _ = OtaUpdate::resume(&record, Slot::A, Instant::ZERO, OtaConfig::default());
    }
    if let Ok(m) = Manifest::parse(data) {
        let mut b = ManifestBuilder::new(m.component, m.version, m.sequence, m.size, m.digest);
        for h in m.hardware_ids() {
            b = b.hardware_id(h);
        }
        for l in m.locations() {
            b = b.location(l);
        }
        if let Some(s) = m.min_installed_sequence {
            b = b.min_installed_sequence(s);
        }
        if let Some(e) = m.expires {
            b = b.expires(e);
        }
        let rebuilt = b.build();
        assert_eq!(Manifest::parse(&rebuilt).expect("rebuilt parses"), m);
    }
});
