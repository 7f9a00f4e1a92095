//! The verification path a bootloader or a firmware update task runs:
//! parse the trust root, verify a signed manifest (Ed25519, k-of-n), then
//! stream the image through `ImageVerifier`. Inputs are read from flash
//! addresses so that nothing is constant-folded and no test data is counted.
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
use fleet_core::ota::{DeviceProfile, ImageVerifier, TrustRoot};

/// Bytes at a flash address (where the update task stored them).
fn flash(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: a fixed, readable flash region on the target part; this
    // binary is only built to be measured.
    unsafe { core::slice::from_raw_parts(black_box(addr) as *const u8, black_box(len)) }
}

#[entry]
fn main() -> ! {
    let result = (|| {
        let root = TrustRoot::parse(flash(0x0804_0000, 512)).ok()?;
        let envelope = flash(0x0804_0200, 1200);
        let device = DeviceProfile {
            hardware_id: "board-c",
            installed_sequence: black_box(5),
            max_image_size: 256 * 1024,
            now: None,
        };
        let manifest = root.verify_manifest(envelope, &device).ok()?;
        let mut verifier = ImageVerifier::new(manifest.size, manifest.digest);
        let image = flash(0x0800_8000, manifest.size as usize);
        for chunk in image.chunks(256) {
            verifier.update(chunk).ok()?;
        }
        verifier.finish().ok()
    })();
    black_box(result.is_some());
    loop {
        cortex_m_rt::heap_start();
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
