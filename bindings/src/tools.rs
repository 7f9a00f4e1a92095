//! The `fleet-core` tools a script needs: keys, signed manifests, trust
//! roots, and the shadow rules (process an update, compute a delta).

use ed25519_dalek::{SigningKey, VerifyingKey};
use fleet_core::ota::{DeviceProfile, ImageVerifier, ManifestBuilder, Role, TrustRootBuilder};
use fleet_core::shadow::{Shadow, ShadowLimits};
use fleet_core::topic::{Role as TopicRole, ShadowOp, ShadowTopicKind};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::FleetError;

/// An Ed25519 key pair for signing releases or install receipts.
#[derive(Clone, PartialEq, Eq, uniffi::Record)]
pub struct SigningKeyPair {
    /// The secret key (32-byte seed): keep it secret.
    pub secret_key: Vec<u8>,
    /// The public key (32 bytes).
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// What a release manifest says: what `sign_manifest` signs and
/// `verify_manifest` returns.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ManifestSpec {
    /// The component (firmware name).
    pub component: String,
    /// Its version, for people.
    pub version: String,
    /// Its sequence: devices install only a higher one.
    pub sequence: u64,
    /// The image's size, bytes.
    pub size: u64,
    /// The image's SHA-256 (32 bytes).
    pub sha256: Vec<u8>,
    /// Hardware ids it is for.
    pub hardware_ids: Vec<String>,
    /// Devices below this installed sequence may not install it.
    #[uniffi(default = None)]
    pub min_installed_sequence: Option<u64>,
    /// Epoch seconds after which it is refused.
    #[uniffi(default = None)]
    pub expires: Option<u64>,
}

/// A shadow operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ShadowOperation {
    /// `get`
    Get,
    /// `update`
    Update,
    /// `delete`
    Delete,
}

/// A message the shadow service publishes: `topic` is the suffix after the
/// shadow's topic prefix (`update/accepted`, `update/delta`, ...).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ShadowMessage {
    /// Topic suffix.
    pub topic: String,
    /// JSON payload.
    pub payload: String,
}

/// Everything a request causes.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ShadowOutcome {
    /// The shadow to store (its stored JSON) when the request changed it;
    /// `None` for a get, a rejection or a repeated request.
    pub stored: Option<String>,
    /// The messages to publish, in order.
    pub messages: Vec<ShadowMessage>,
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32], FleetError> {
    bytes
        .try_into()
        .map_err(|_| FleetError::invalid(format!("{what} must be 32 bytes, not {}", bytes.len())))
}

fn verifying_key(bytes: &[u8]) -> Result<VerifyingKey, FleetError> {
    VerifyingKey::from_bytes(&key32(bytes, "a public key")?)
        .map_err(|e| FleetError::invalid(format!("public key: {e}")))
}

/// Whether `name` is a valid thing name (1–128 bytes of `[a-zA-Z0-9:_-]`).
#[uniffi::export]
pub fn is_valid_thing_name(name: String) -> bool {
    fleet_core::ThingName::new(&name).is_ok()
}

/// A new Ed25519 key pair from the operating system's random source.
#[uniffi::export]
pub fn generate_signing_key() -> Result<SigningKeyPair, FleetError> {
    let key = fleet_core::ota::tools::generate_key().map_err(FleetError::other)?;
    Ok(SigningKeyPair {
        secret_key: key.to_bytes().to_vec(),
        public_key: key.verifying_key().to_bytes().to_vec(),
    })
}

/// The public key of a 32-byte secret key.
#[uniffi::export]
pub fn public_key_of(secret_key: Vec<u8>) -> Result<Vec<u8>, FleetError> {
    let key = SigningKey::from_bytes(&key32(&secret_key, "a secret key")?);
    Ok(key.verifying_key().to_bytes().to_vec())
}

/// A trust root (version 1) in which one key signs both manifests and
/// root rotations: what a device's `OtaConfig.trust_root` holds for a
/// fleet with one release key.
#[uniffi::export]
pub fn trust_root_for_key(public_key: Vec<u8>) -> Result<Vec<u8>, FleetError> {
    let key = verifying_key(&public_key)?;
    Ok(TrustRootBuilder::new(1)
        .key(&key, &[Role::Root, Role::Targets])
        .build())
}

/// The manifest of an image: its size and SHA-256 computed here.
#[uniffi::export]
pub fn manifest_for_image(
    component: String,
    version: String,
    sequence: u64,
    image: Vec<u8>,
    hardware_ids: Vec<String>,
) -> ManifestSpec {
    ManifestSpec {
        component,
        version,
        sequence,
        size: image.len() as u64,
        sha256: Sha256::digest(&image).to_vec(),
        hardware_ids,
        min_installed_sequence: None,
        expires: None,
    }
}

/// Signs a manifest with one or more secret keys into the envelope that
/// devices verify.
#[uniffi::export]
pub fn sign_manifest(
    manifest: ManifestSpec,
    secret_keys: Vec<Vec<u8>>,
) -> Result<Vec<u8>, FleetError> {
    if secret_keys.is_empty() {
        return Err(FleetError::invalid("no signing key"));
    }
    if manifest.hardware_ids.is_empty() {
        return Err(FleetError::invalid(
            "a manifest lists at least one hardware id",
        ));
    }
    let keys = secret_keys
        .iter()
        .map(|k| key32(k, "a secret key").map(|k| SigningKey::from_bytes(&k)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut m = ManifestBuilder::new(
        &manifest.component,
        &manifest.version,
        manifest.sequence,
        manifest.size,
        key32(&manifest.sha256, "sha256")?,
    );
    for h in &manifest.hardware_ids {
        m = m.hardware_id(h);
    }
    if let Some(s) = manifest.min_installed_sequence {
        m = m.min_installed_sequence(s);
    }
    if let Some(t) = manifest.expires {
        m = m.expires(t);
    }
    let refs: Vec<&SigningKey> = keys.iter().collect();
    Ok(fleet_core::ota::tools::sign_manifest(&m, &refs))
}

/// Checks a signed manifest as a device would: signed by the trust root's
/// threshold of keys, for this hardware, newer than what is installed,
/// small enough, not expired (when `now`, epoch seconds, is given).
#[uniffi::export]
pub fn verify_manifest(
    trust_root: Vec<u8>,
    envelope: Vec<u8>,
    hardware_id: String,
    installed_sequence: u64,
    max_image_size: u64,
    now: Option<u64>,
) -> Result<ManifestSpec, FleetError> {
    let root = fleet_core::ota::TrustRoot::parse(&trust_root)
        .map_err(|e| FleetError::invalid(format!("trust root: {e:?}")))?;
    let m = root
        .verify_manifest(
            &envelope,
            &DeviceProfile {
                hardware_id: &hardware_id,
                installed_sequence,
                max_image_size,
                now,
            },
        )
        .map_err(|e| FleetError::rejected("manifest", format!("{e:?}")))?;
    Ok(ManifestSpec {
        component: m.component.into(),
        version: m.version.into(),
        sequence: m.sequence,
        size: m.size,
        sha256: m.digest.to_vec(),
        hardware_ids: m.hardware_ids().iter().map(|h| (*h).to_string()).collect(),
        min_installed_sequence: m.min_installed_sequence,
        expires: m.expires,
    })
}

/// Checks an image against a verified manifest (size and SHA-256).
#[uniffi::export]
pub fn verify_image(manifest: ManifestSpec, image: Vec<u8>) -> Result<(), FleetError> {
    let mut v = ImageVerifier::new(manifest.size, key32(&manifest.sha256, "sha256")?);
    let bad = |e| FleetError::rejected("image", format!("{e:?}"));
    v.update(&image).map_err(bad)?;
    v.finish().map_err(bad)
}

/// Processes one shadow request exactly as the service does: `stored` is
/// the shadow's stored JSON (`None`: it never existed), `name` how the
/// messages name it (the thing's name for its classic shadow, the shadow's
/// name for a named one), `now` epoch seconds. A rejected request is an
/// outcome (its `rejected` message), not an error; an unreadable `stored` is.
#[uniffi::export]
pub fn shadow_process(
    stored: Option<String>,
    name: String,
    operation: ShadowOperation,
    request: String,
    now: u64,
) -> Result<ShadowOutcome, FleetError> {
    let shadow = match stored {
        None => Shadow::new(),
        Some(s) => Shadow::from_stored_json(s.as_bytes())
            .map_err(|e| FleetError::invalid(format!("stored shadow: {e:?}")))?,
    };
    let op = match operation {
        ShadowOperation::Get => ShadowOp::Get,
        ShadowOperation::Update => ShadowOp::Update,
        ShadowOperation::Delete => ShadowOp::Delete,
    };
    let out = fleet_core::shadow::process(
        &shadow,
        &name,
        op,
        request.as_bytes(),
        now,
        &ShadowLimits::default(),
    );
    Ok(ShadowOutcome {
        stored: out
            .shadow
            .map(|s| String::from_utf8_lossy(&s.to_stored_json()).into_owned()),
        messages: out
            .messages
            .into_iter()
            .map(|m| ShadowMessage {
                topic: topic_suffix(m.kind),
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
            })
            .collect(),
    })
}

fn topic_suffix(kind: ShadowTopicKind) -> String {
    let op = |op| match op {
        ShadowOp::Get => "get",
        ShadowOp::Update => "update",
        ShadowOp::Delete => "delete",
    };
    match kind {
        ShadowTopicKind::Op(o, TopicRole::Request) => op(o).into(),
        ShadowTopicKind::Op(o, TopicRole::Accepted) => format!("{}/accepted", op(o)),
        ShadowTopicKind::Op(o, TopicRole::Rejected) => format!("{}/rejected", op(o)),
        ShadowTopicKind::Delta => "update/delta".into(),
        ShadowTopicKind::Documents => "update/documents".into(),
    }
}

/// The delta of two states (JSON objects): every part of `desired` that
/// `reported` does not match, by the shadow service's rules.
#[uniffi::export]
pub fn shadow_delta(desired: String, reported: String) -> Result<String, FleetError> {
    let parse = |s: &str, what: &str| match serde_json::from_str(s) {
        Ok(Value::Object(m)) => Ok(Value::Object(m)),
        Ok(_) => Err(FleetError::invalid(format!("{what} must be a JSON object"))),
        Err(e) => Err(FleetError::invalid(format!("{what}: {e}"))),
    };
    let request = serde_json::json!({
        "state": { "desired": parse(&desired, "desired")?, "reported": parse(&reported, "reported")? }
    });
    let updated = Shadow::new()
        .update(request.to_string().as_bytes(), 0, &ShadowLimits::default())
        .map_err(|r| FleetError::invalid(format!("{:?}", r.error)))?;
    let delta = updated
        .shadow
        .state()
        .map(|s| s.delta().0)
        .unwrap_or_default();
    Ok(serde_json::to_string(&delta).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_manifest_verifies_and_a_tampered_one_does_not() {
        let k = generate_signing_key().unwrap();
        let root = trust_root_for_key(k.public_key.clone()).unwrap();
        let image = vec![7u8; 1000];
        let spec = manifest_for_image(
            "fw".into(),
            "2.0".into(),
            2,
            image.clone(),
            vec!["p100".into()],
        );
        let env = sign_manifest(spec, vec![k.secret_key.clone()]).unwrap();
        let m =
            verify_manifest(root.clone(), env.clone(), "p100".into(), 1, 1 << 20, None).unwrap();
        assert_eq!((m.sequence, m.size), (2, 1000));
        verify_image(m.clone(), image).unwrap();
        assert!(matches!(
            verify_image(m, vec![8u8; 1000]),
            Err(FleetError::Rejected { .. })
        ));
        // Another hardware, an older sequence, a flipped byte: refused.
        assert!(
            verify_manifest(root.clone(), env.clone(), "p200".into(), 1, 1 << 20, None).is_err()
        );
        assert!(
            verify_manifest(root.clone(), env.clone(), "p100".into(), 2, 1 << 20, None).is_err()
        );
        let mut bad = env;
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(verify_manifest(root, bad, "p100".into(), 1, 1 << 20, None).is_err());
        // Keys of the wrong size are typed errors.
        assert!(matches!(
            public_key_of(vec![1, 2, 3]),
            Err(FleetError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn shadow_updates_are_processed_by_the_service_rules() {
        let out = shadow_process(
            None,
            "pump-7".into(),
            ShadowOperation::Update,
            r#"{"state":{"desired":{"speed":3}},"clientToken":"t1"}"#.into(),
            1_700_000_000,
        )
        .unwrap();
        let topics: Vec<_> = out.messages.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["update/accepted", "update/delta", "update/documents"]
        );
        let stored = out.stored.unwrap();
        let again = shadow_process(
            Some(stored.clone()),
            "pump-7".into(),
            ShadowOperation::Update,
            r#"{"state":{"reported":{"speed":3}},"version":9}"#.into(),
            1_700_000_001,
        )
        .unwrap();
        assert_eq!(again.stored, None, "a version conflict changes nothing");
        assert_eq!(again.messages[0].topic, "update/rejected");
        let missing =
            shadow_process(None, "pump-7".into(), ShadowOperation::Get, "".into(), 0).unwrap();
        assert_eq!(missing.messages[0].topic, "get/rejected");
        assert!(
            missing.messages[0]
                .payload
                .contains("No shadow exists with name: 'pump-7'")
        );
        assert!(
            shadow_process(
                Some("{".into()),
                "pump-7".into(),
                ShadowOperation::Get,
                "{}".into(),
                0
            )
            .is_err()
        );
    }

    #[test]
    fn delta_is_what_reported_lacks() {
        assert_eq!(
            shadow_delta(
                r#"{"a":1,"b":{"c":2,"d":3}}"#.into(),
                r#"{"a":1,"b":{"c":2}}"#.into()
            )
            .unwrap(),
            r#"{"b":{"d":3}}"#
        );
        assert!(shadow_delta("[]".into(), "{}".into()).is_err());
    }
}
