//! Keys in a real token (SoftHSM2): generated inside, signing there, never
//! readable, and every failure typed with what to fix.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use fleet_pkcs11::{Algorithm, LockReason, PinSource, Pkcs11Error, Pkcs11Key, Pkcs11Uri};
use fleet_testkit::SoftHsmToken;

/// One test at a time: taking a token away starts the module again, which
/// ends every session of the process.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one() -> std::sync::MutexGuard<'static, ()> {
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

fn verify_p256(public: &[u8], message: &[u8], der: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
        .verify(message, der)
        .is_ok()
}

#[test]
fn keys_are_generated_in_the_token_sign_there_and_never_leave() {
    let _one = one();
    let token = SoftHsmToken::new().unwrap();
    let uri = token.uri("device");
    let key = Pkcs11Key::generate(&uri, Algorithm::EcdsaP256Sha256).unwrap();
    assert_eq!(key.algorithm(), Algorithm::EcdsaP256Sha256);
    assert_eq!(key.public_key().len(), 65);
    let sig = key.sign(b"transcript").unwrap();
    assert!(verify_p256(key.public_key(), b"transcript", &sig));
    assert!(!verify_p256(key.public_key(), b"transcripT", &sig));
    let p = key.protection().unwrap();
    assert!(!p.extractable && p.sensitive && !p.value_readable, "{p:?}");

    // Opened again by its URI alone: the same key.
    let again = Pkcs11Key::open(&uri).unwrap();
    assert_eq!(again.public_key(), key.public_key());
    assert!(verify_p256(
        key.public_key(),
        b"x",
        &again.sign(b"x").unwrap()
    ));
    // A second generate under the label is refused; open_or_generate opens.
    assert!(matches!(
        Pkcs11Key::generate(&uri, Algorithm::EcdsaP256Sha256),
        Err(Pkcs11Error::ObjectExists { .. })
    ));
    let same = Pkcs11Key::open_or_generate(&uri, Algorithm::Ed25519).unwrap();
    assert_eq!(same.public_key(), key.public_key());

    // Ed25519, which SoftHSM2 supports.
    let ed = Pkcs11Key::generate(&token.uri("receipts"), Algorithm::Ed25519).unwrap();
    let public =
        ed25519_dalek::VerifyingKey::from_bytes(ed.public_key().try_into().unwrap()).unwrap();
    let sig = ed.sign(b"receipt body").unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    public.verify_strict(b"receipt body", &sig).unwrap();
    assert!(!ed.protection().unwrap().extractable);
    assert_eq!(ed.subject_public_key_info().len(), 44);
}

#[test]
fn each_failure_says_what_to_fix() {
    let _one = one();
    let token = SoftHsmToken::new().unwrap();
    Pkcs11Key::generate(&token.uri("device"), Algorithm::EcdsaP256Sha256).unwrap();

    // A missing module.
    let mut uri = token.uri("device");
    uri.module_path = Some("/nonexistent/libpkcs11.so".into());
    let e = Pkcs11Key::open(&uri).unwrap_err();
    assert!(matches!(e, Pkcs11Error::ModuleLoad { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
    uri.module_path = None;
    assert!(matches!(Pkcs11Key::open(&uri), Err(Pkcs11Error::NoModule)));

    // A wrong PIN.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pin"), "0000\n").unwrap();
    let mut uri = token.uri("device");
    uri.pin = PinSource::File(dir.path().join("pin"));
    let e = Pkcs11Key::open(&uri).unwrap_err();
    assert!(matches!(e, Pkcs11Error::WrongPin { .. }), "{e}");
    assert!(e.to_string().contains("refused the PIN"), "{e}");

    // A PIN file that is not there; a variable that is not set.
    uri.pin = PinSource::File(dir.path().join("missing"));
    assert!(matches!(
        Pkcs11Key::open(&uri),
        Err(Pkcs11Error::PinUnreadable { .. })
    ));
    uri.pin = PinSource::Env("FLEET_TEST_PIN_THAT_IS_NOT_SET".into());
    let e = Pkcs11Key::open(&uri).unwrap_err();
    assert!(
        e.to_string().contains("FLEET_TEST_PIN_THAT_IS_NOT_SET"),
        "{e}"
    );

    // A locked token: its user PIN was never set.
    let locked = SoftHsmToken::without_user_pin().unwrap();
    let e = Pkcs11Key::open(&locked.uri("device")).unwrap_err();
    assert!(
        matches!(
            e,
            Pkcs11Error::TokenLocked {
                reason: LockReason::PinNotInitialized,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("security officer"), "{e}");

    // A missing object; a missing token.
    let e = Pkcs11Key::open(&token.uri("no-such-key")).unwrap_err();
    assert!(matches!(e, Pkcs11Error::ObjectNotFound { .. }), "{e}");
    assert!(e.to_string().contains("no-such-key"), "{e}");
    let mut uri = token.uri("device");
    uri.token = Some("no-such-token".into());
    let e = Pkcs11Key::open(&uri).unwrap_err();
    assert!(matches!(e, Pkcs11Error::TokenNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains(token.label()),
        "lists the tokens there are: {e}"
    );

    // A key of an unsupported type (RSA), made with the token's own tools.
    make_rsa_key(&token, "rsa");
    let e = Pkcs11Key::open(&token.uri("rsa")).unwrap_err();
    assert!(matches!(e, Pkcs11Error::UnsupportedKey { .. }), "{e}");
    assert!(e.to_string().contains("ECDSA P-256 or Ed25519"), "{e}");

    // A URI with the PIN in it is refused before anything is loaded.
    let e = "pkcs11:token=x?pin-value=1234"
        .parse::<Pkcs11Uri>()
        .unwrap_err();
    assert!(e.to_string().contains("pin-source"), "{e}");
}

fn make_rsa_key(token: &SoftHsmToken, label: &str) {
    token
        .user_session()
        .unwrap()
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::Label(label.into()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Sign(true),
                Attribute::Label(label.into()),
            ],
        )
        .unwrap();
}

#[test]
fn a_lost_session_is_reopened_and_a_removed_token_comes_back() {
    let _one = one();
    let token = SoftHsmToken::new().unwrap();
    let uri = token.uri("device");
    let key = Pkcs11Key::generate(&uri, Algorithm::EcdsaP256Sha256).unwrap();
    key.sign(b"before").unwrap();

    // Another part of the process logs the token's user out: every session
    // of the application loses its login. The key logs in again by itself.
    token.user_session().unwrap().logout().unwrap();
    let sig = key.sign(b"after a logout").unwrap();
    assert!(verify_p256(key.public_key(), b"after a logout", &sig));

    // The token taken away (its store gone): typed, and marked transient
    // so the agent keeps retrying rather than giving up.
    let dir = token.directory().unwrap();
    // Out of the token store altogether (SoftHSM2 reads every directory in it).
    let away = dir
        .parent()
        .and_then(|tokens| tokens.parent())
        .unwrap()
        .join(format!("removed-{}", token.label()));
    std::fs::rename(&dir, &away).unwrap();
    let e = key.sign(b"while removed").unwrap_err();
    assert!(
        matches!(
            e,
            Pkcs11Error::TokenRemoved { .. } | Pkcs11Error::TokenNotFound { .. }
        ),
        "{e:?}"
    );
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains(token.label()), "{e}");
    assert!(
        e.to_string().contains("reinsert it") || e.to_string().contains("inserted"),
        "{e}"
    );
    let e = key.sign(b"still removed").unwrap_err();
    assert!(e.is_transient(), "{e}");
    // Put back: the key signs again (the module is started again to see it).
    std::fs::rename(&away, &dir).unwrap();
    let sig = key.sign(b"back").unwrap();
    assert!(verify_p256(key.public_key(), b"back", &sig));
}
