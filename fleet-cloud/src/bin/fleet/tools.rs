//! Offline tools: signing keys and signed manifests (fleet-core's OTA
//! tooling).

use std::path::PathBuf;

use base64::Engine as _;
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use fleet_core::ota::{
    DeviceProfile, ImageVerifier, ManifestBuilder, Role, TrustRoot, TrustRootBuilder,
};

use crate::Failure;

/// `fleet manifest ...`
#[derive(Subcommand)]
pub(crate) enum ManifestCommand {
    /// Signs a manifest for an image: writes the envelope devices verify.
    Sign {
        /// The image.
        #[arg(long)]
        image: PathBuf,
        /// The signing key (`fleet keygen` wrote it).
        #[arg(long)]
        key: PathBuf,
        /// The component (firmware name).
        #[arg(long)]
        component: String,
        /// Its version, for people.
        #[arg(long)]
        version: String,
        /// Its sequence: devices install only a higher one.
        #[arg(long)]
        sequence: u64,
        /// A hardware id it is for; repeatable.
        #[arg(long = "hardware-id", required = true)]
        hardware_ids: Vec<String>,
        /// Where to write the envelope.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verifies an envelope against a public key (and the image against it).
    Verify {
        /// The envelope.
        #[arg(long)]
        envelope: PathBuf,
        /// The signer's public key (base64, as `fleet keygen` printed it).
        #[arg(long)]
        public_key: String,
        /// The hardware id of the device that would install it.
        #[arg(long)]
        hardware_id: String,
        /// The image, to check its size and SHA-256.
        #[arg(long)]
        image: Option<PathBuf>,
    },
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `fleet keygen --out FILE`: a new Ed25519 signing key (its 32-byte seed,
/// base64, in a file only its owner may read); prints the public key.
pub(crate) fn keygen(out: &PathBuf) -> Result<(), Failure> {
    if out.exists() {
        return Err(Failure::usage(format!(
            "{} exists; not overwriting a key",
            out.display()
        )));
    }
    let key = fleet_core::ota::tools::generate_key().map_err(|e| Failure::other(e.to_string()))?;
    std::fs::write(out, b64().encode(key.to_bytes()) + "\n")
        .map_err(|e| Failure::other(format!("cannot write {}: {e}", out.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Failure::other(e.to_string()))?;
    }
    println!("{}", b64().encode(key.verifying_key().to_bytes()));
    Ok(())
}

fn signing_key(path: &PathBuf) -> Result<SigningKey, Failure> {
    let text =
        String::from_utf8(read(path)?).map_err(|_| Failure::usage("the key file is not text"))?;
    let bytes: [u8; 32] = b64()
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            Failure::usage(format!(
                "{}: not a key written by `fleet keygen`",
                path.display()
            ))
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

pub(crate) fn manifest(cmd: ManifestCommand) -> Result<(), Failure> {
    match cmd {
        ManifestCommand::Sign {
            image,
            key,
            component,
            version,
            sequence,
            hardware_ids,
            out,
        } => {
            let key = signing_key(&key)?;
            let (size, digest) = fleet_core::ota::tools::hash_file(&image)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", image.display())))?;
            let mut m = ManifestBuilder::new(&component, &version, sequence, size, digest);
            for h in &hardware_ids {
                m = m.hardware_id(h);
            }
            let envelope = fleet_core::ota::tools::sign_manifest(&m, &[&key]);
            std::fs::write(&out, &envelope)
                .map_err(|e| Failure::other(format!("cannot write {}: {e}", out.display())))?;
            println!(
                "signed {component} {version} (sequence {sequence}, {size} bytes) into {}",
                out.display()
            );
            Ok(())
        }
        ManifestCommand::Verify {
            envelope,
            public_key,
            hardware_id,
            image,
        } => {
            let bytes: [u8; 32] = b64()
                .decode(public_key.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Failure::usage("--public-key: 32 bytes, base64"))?;
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|e| Failure::usage(format!("--public-key: {e}")))?;
            let root = TrustRoot::parse(
                &TrustRootBuilder::new(1)
                    .key(&vk, &[Role::Root, Role::Targets])
                    .build(),
            )
            .map_err(|e| Failure::other(format!("{e:?}")))?;
            let envelope = read(&envelope)?;
            let manifest = root
                .verify_manifest(
                    &envelope,
                    &DeviceProfile {
                        hardware_id: &hardware_id,
                        installed_sequence: 0,
                        max_image_size: u64::MAX,
                        now: None,
                    },
                )
                .map_err(|e| {
                    Failure::unsuccessful(format!("the manifest does not verify: {e:?}"))
                })?;
            if let Some(path) = image {
                let data = read(&path)?;
                let mut v = ImageVerifier::new(manifest.size, manifest.digest);
                v.update(&data).map_err(|e| {
                    Failure::unsuccessful(format!("the image does not match: {e:?}"))
                })?;
                v.finish().map_err(|e| {
                    Failure::unsuccessful(format!("the image does not match: {e:?}"))
                })?;
            }
            println!(
                "ok: {} {} (sequence {}, {} bytes)",
                manifest.component, manifest.version, manifest.sequence, manifest.size
            );
            Ok(())
        }
    }
}
