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
        /// The signing key: a file `fleet keygen` wrote, or a `pkcs11:`
        /// URI of an Ed25519 key in an HSM (the PIN from the URI's
        /// `pin-source`, never the command line). Repeat for a manifest
        /// that needs several signatures (k-of-n).
        #[arg(long = "key", required = true)]
        keys: Vec<String>,
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

/// A release key: in a file, or in an HSM.
enum ReleaseKey {
    File(SigningKey),
    Token(fleet_pkcs11::Pkcs11Key),
}

impl fleet_core::ota::Ed25519Signer for ReleaseKey {
    type Error = fleet_pkcs11::Pkcs11Error;

    fn public_key(&self) -> Result<ed25519_dalek::VerifyingKey, Self::Error> {
        match self {
            Self::File(k) => Ok(k.verifying_key()),
            Self::Token(k) => fleet_core::ota::Ed25519Signer::public_key(k),
        }
    }

    fn sign_ed25519(&self, message: &[u8]) -> Result<[u8; 64], Self::Error> {
        match self {
            Self::File(k) => match k.sign_ed25519(message) {
                Ok(sig) => Ok(sig),
                Err(never) => match never {},
            },
            Self::Token(k) => k.sign_ed25519(message),
        }
    }
}

fn token_failure(e: fleet_pkcs11::Pkcs11Error) -> Failure {
    match e {
        fleet_pkcs11::Pkcs11Error::Uri(_)
        | fleet_pkcs11::Pkcs11Error::NoModule
        | fleet_pkcs11::Pkcs11Error::PinUnreadable { .. } => Failure::usage(e.to_string()),
        fleet_pkcs11::Pkcs11Error::ObjectNotFound { .. }
        | fleet_pkcs11::Pkcs11Error::TokenNotFound { .. } => {
            Failure::api("not_found", e.to_string())
        }
        fleet_pkcs11::Pkcs11Error::WrongPin { .. }
        | fleet_pkcs11::Pkcs11Error::TokenLocked { .. } => Failure::api("forbidden", e.to_string()),
        fleet_pkcs11::Pkcs11Error::ObjectExists { .. }
        | fleet_pkcs11::Pkcs11Error::UnsupportedKey { .. } => {
            Failure::api("conflict", e.to_string())
        }
        _ => Failure::other(e.to_string()),
    }
}

fn release_key(text: &str) -> Result<ReleaseKey, Failure> {
    if fleet_pkcs11::Pkcs11Uri::is_pkcs11(text) {
        let uri: fleet_pkcs11::Pkcs11Uri = text
            .parse()
            .map_err(|e: fleet_pkcs11::UriError| Failure::usage(format!("--key: {e}")))?;
        let key = fleet_pkcs11::Pkcs11Key::open(&uri).map_err(token_failure)?;
        if key.algorithm() != fleet_pkcs11::Algorithm::Ed25519 {
            return Err(Failure::api(
                "invalid_request",
                format!(
                    "--key {}: releases are signed with Ed25519 keys; this one is ECDSA P-256",
                    uri.object_description()
                ),
            ));
        }
        Ok(ReleaseKey::Token(key))
    } else {
        signing_key(&PathBuf::from(text)).map(ReleaseKey::File)
    }
}

/// `fleet keygen --out FILE`: a new Ed25519 signing key (its 32-byte seed,
/// base64, in a file only its owner may read); prints the public key.
/// `fleet keygen --pkcs11 URI`: the key made inside the token instead.
pub(crate) fn keygen(out: Option<&PathBuf>, pkcs11: Option<&str>) -> Result<(), Failure> {
    let out = match (out, pkcs11) {
        (_, Some(uri)) => {
            let uri: fleet_pkcs11::Pkcs11Uri = uri
                .parse()
                .map_err(|e: fleet_pkcs11::UriError| Failure::usage(format!("--pkcs11: {e}")))?;
            let key = fleet_pkcs11::Pkcs11Key::generate(&uri, fleet_pkcs11::Algorithm::Ed25519)
                .map_err(token_failure)?;
            println!("{}", b64().encode(key.public_key()));
            return Ok(());
        }
        (Some(out), None) => out,
        (None, None) => return Err(Failure::usage("give --out FILE or --pkcs11 URI")),
    };
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
            keys,
            component,
            version,
            sequence,
            hardware_ids,
            out,
        } => {
            if keys.len() > fleet_core::ota::MAX_SIGNATURES {
                return Err(Failure::usage("at most 8 keys"));
            }
            let keys = keys
                .iter()
                .map(|k| release_key(k))
                .collect::<Result<Vec<_>, _>>()?;
            let (size, digest) = fleet_core::ota::tools::hash_file(&image)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", image.display())))?;
            let mut m = ManifestBuilder::new(&component, &version, sequence, size, digest);
            for h in &hardware_ids {
                m = m.hardware_id(h);
            }
            let signers: Vec<&ReleaseKey> = keys.iter().collect();
            let envelope = fleet_core::ota::sign_envelope_with(
                fleet_core::ota::MANIFEST_PAYLOAD_TYPE,
                &m.build(),
                &signers,
            )
            .map_err(token_failure)?;
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
