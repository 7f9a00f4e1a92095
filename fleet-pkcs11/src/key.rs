//! A signing key inside a PKCS#11 token.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};

use crate::der;
use crate::error::Pkcs11Error;
use crate::uri::{PinSource, Pkcs11Uri};

/// A signing failure, and whether a fresh session may cure it.
enum Retry {
    Stale(Pkcs11Error),
    Final(Pkcs11Error),
}

impl Retry {
    fn into_error(self) -> Pkcs11Error {
        match self {
            Self::Stale(e) | Self::Final(e) => e,
        }
    }
}

/// What a [`Pkcs11Key`] signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256 (`CKM_ECDSA` over a SHA-256 digest);
    /// signatures ASN.1 DER encoded, as X.509 and TLS carry them.
    EcdsaP256Sha256,
    /// Ed25519 (`CKM_EDDSA`), 64-byte signatures.
    Ed25519,
}

/// How well the token guards the private key, read from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyProtection {
    /// `CKA_EXTRACTABLE`: whether the key may be wrapped out of the token.
    pub extractable: bool,
    /// `CKA_SENSITIVE`: whether its value is hidden from readers.
    pub sensitive: bool,
    /// Whether the token handed out `CKA_VALUE` when asked (it must not).
    pub value_readable: bool,
}

/// A private key that stays in a PKCS#11 token (an HSM, a smart card, a
/// secure element, SoftHSM2): it signs on request and never leaves.
///
/// One session per key, opened lazily and opened again after the token
/// was removed and put back, so a long-running agent or server survives a
/// token that comes and goes.
pub struct Pkcs11Key {
    uri: Pkcs11Uri,
    module: PathBuf,
    algorithm: Algorithm,
    public_key: Vec<u8>,
    conn: Mutex<Option<(Session, ObjectHandle)>>,
    /// The last failure of a signature made through an interface that
    /// cannot carry it (rcgen's), for [`Pkcs11Key::take_error`].
    pub(crate) last_error: Mutex<Option<Pkcs11Error>>,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("token", &self.uri.token_description())
            .field("object", &self.uri.object_description())
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// `PrintableString "edwards25519"`, the other encoding PKCS#11 3.0 allows.
const ED25519_NAME: &[u8] = b"\x13\x0cedwards25519";

/// The modules loaded in this process, by path: PKCS#11 allows one
/// `C_Initialize` per library, which every key of the process shares.
static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

fn init_args() -> CInitializeArgs {
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

/// The module at `path`, loaded and initialized once per process.
fn module(path: &Path) -> Result<Pkcs11, Pkcs11Error> {
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let load = |source| Pkcs11Error::ModuleLoad {
        path: path.to_path_buf(),
        source,
    };
    let ctx = Pkcs11::new(path).map_err(load)?;
    match ctx.initialize(init_args()) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(load(e)),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Starts the module at `path` again (`C_Finalize`, `C_Initialize`): some
/// modules notice a token that came back only then (SoftHSM2 reads its
/// token store at initialization; a module that talks to a remote token
/// connects then). Every session of the module ends; keys open fresh ones.
fn reinitialize(path: &Path) {
    let modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = modules.get(path) {
        let _ = ctx.clone().finalize();
        let _ = ctx.initialize(init_args());
    }
}

fn read_pin(pin: &PinSource) -> Result<Option<AuthPin>, Pkcs11Error> {
    match pin {
        PinSource::None => Ok(None),
        PinSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Pkcs11Error::PinUnreadable {
                source_description: format!("file {}", path.display()),
                source: Some(e),
            })?;
            let line = text.lines().next().unwrap_or_default().to_string();
            Ok(Some(AuthPin::from(line)))
        }
        PinSource::Env(var) => match std::env::var(var) {
            Ok(v) => Ok(Some(AuthPin::from(v))),
            Err(_) => Err(Pkcs11Error::PinUnreadable {
                source_description: format!("environment variable {var} (not set)"),
                source: None,
            }),
        },
    }
}

fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, Pkcs11Error> {
    let wanted = uri.token_description();
    // Slot by slot: one broken token must not hide the others.
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| Pkcs11Error::classify(&wanted, "listing slots", e))?;
    let mut available = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if !info.token_initialized() {
            continue;
        }
        let label = info.label().trim_end().to_string();
        let ok = uri.token.as_ref().is_none_or(|t| *t == label)
            && uri
                .serial
                .as_ref()
                .is_none_or(|s| s == info.serial_number().trim_end())
            && uri
                .manufacturer
                .as_ref()
                .is_none_or(|m| m == info.manufacturer_id().trim_end())
            && uri
                .model
                .as_ref()
                .is_none_or(|m| m == info.model().trim_end())
            && uri.slot_id.is_none_or(|id| id == slot.id());
        if ok {
            return Ok(slot);
        }
        available.push(format!("\"{label}\""));
    }
    Err(Pkcs11Error::TokenNotFound { wanted, available })
}

fn object_template(uri: &Pkcs11Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut t = vec![Attribute::Class(class)];
    if let Some(label) = &uri.object {
        t.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    t
}

/// A logged-in session on the URI's token.
fn open_session(uri: &Pkcs11Uri, module_path: &Path, rw: bool) -> Result<Session, Pkcs11Error> {
    let ctx = module(module_path)?;
    let slot = find_slot(&ctx, uri)?;
    let token = uri.token_description();
    let session = if rw {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| Pkcs11Error::classify(&token, "opening a session", e))?;
    if let Some(pin) = read_pin(&uri.pin)? {
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(Pkcs11Error::classify(&token, "login", e)),
        }
    }
    Ok(session)
}

fn one_object(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, Pkcs11Error> {
    let found = session
        .find_objects(&object_template(uri, class))
        .map_err(|e| Pkcs11Error::classify(&uri.token_description(), "finding objects", e))?;
    Ok(found.into_iter().next())
}

impl Pkcs11Key {
    /// Opens the private key the URI names (`object=` and/or `id=`) and
    /// reads its public half. The module is the URI's `module-path`.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, Pkcs11Error> {
        let module = uri.module_path.clone().ok_or(Pkcs11Error::NoModule)?;
        let session = open_session(uri, &module, false)?;
        let token = uri.token_description();
        let object = uri.object_description();
        let not_found = || Pkcs11Error::ObjectNotFound {
            token: token.clone(),
            object: object.clone(),
        };
        let private = one_object(&session, uri, ObjectClass::PRIVATE_KEY)?.ok_or_else(not_found)?;
        let attrs = session
            .get_attributes(private, &[AttributeType::KeyType, AttributeType::EcParams])
            .map_err(|e| Pkcs11Error::classify(&token, "reading the key", e))?;
        let mut key_type = None;
        let mut params = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => params = Some(p),
                _ => {}
            }
        }
        let unsupported = |what: String| Pkcs11Error::UnsupportedKey {
            object: object.clone(),
            key_type: what,
        };
        let algorithm = match (key_type, params.as_deref()) {
            (Some(t), Some(P256_OID)) if t == KeyType::EC => Algorithm::EcdsaP256Sha256,
            (Some(t), Some(p))
                if t == KeyType::EC_EDWARDS && (p == ED25519_OID || p == ED25519_NAME) =>
            {
                Algorithm::Ed25519
            }
            (Some(t), _) if t == KeyType::EC => {
                return Err(unsupported("an EC key on a curve other than P-256".into()));
            }
            (Some(t), _) if t == KeyType::EC_EDWARDS => {
                return Err(unsupported("an EdDSA key other than Ed25519".into()));
            }
            (Some(t), _) => return Err(unsupported(format!("a {t} key"))),
            (None, _) => return Err(unsupported("a key of unknown type".into())),
        };
        let public = one_object(&session, uri, ObjectClass::PUBLIC_KEY)?.ok_or_else(|| {
            Pkcs11Error::ObjectNotFound {
                token: token.clone(),
                object: format!("{object} (its public key)"),
            }
        })?;
        let point = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(|e| Pkcs11Error::classify(&token, "reading the public key", e))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| unsupported("a key without CKA_EC_POINT".into()))?;
        let want = match algorithm {
            Algorithm::EcdsaP256Sha256 => 65,
            Algorithm::Ed25519 => 32,
        };
        let public_key = der::unwrap_octet_string(&point, want)
            .ok_or_else(|| unsupported("a key whose public point is malformed".into()))?;
        Ok(Self {
            uri: uri.clone(),
            module,
            algorithm,
            public_key,
            conn: Mutex::new(Some((session, private))),
            last_error: Mutex::new(None),
        })
    }

    /// Generates a key pair inside the token under the URI's label and id
    /// (the private half `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, so it
    /// never leaves), then opens it. Refuses if the label or id is taken.
    pub fn generate(uri: &Pkcs11Uri, algorithm: Algorithm) -> Result<Self, Pkcs11Error> {
        let module = uri.module_path.clone().ok_or(Pkcs11Error::NoModule)?;
        let session = open_session(uri, &module, true)?;
        let token = uri.token_description();
        if one_object(&session, uri, ObjectClass::PRIVATE_KEY)?.is_some() {
            return Err(Pkcs11Error::ObjectExists {
                token,
                object: uri.object_description(),
            });
        }
        let (mechanism, params) = match algorithm {
            Algorithm::EcdsaP256Sha256 => (Mechanism::EccKeyPairGen, P256_OID),
            Algorithm::Ed25519 => (Mechanism::EccEdwardsKeyPairGen, ED25519_OID),
        };
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(params.to_vec()),
        ];
        let mut private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        for t in [&mut public, &mut private] {
            if let Some(label) = &uri.object {
                t.push(Attribute::Label(label.as_bytes().to_vec()));
            }
            if let Some(id) = &uri.id {
                t.push(Attribute::Id(id.clone()));
            }
        }
        session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| Pkcs11Error::classify(&token, "generating a key pair", e))?;
        drop(session);
        Self::open(uri)
    }

    /// Opens the key, or generates it when the token holds none by that
    /// label and id.
    pub fn open_or_generate(uri: &Pkcs11Uri, algorithm: Algorithm) -> Result<Self, Pkcs11Error> {
        match Self::open(uri) {
            Err(Pkcs11Error::ObjectNotFound { .. }) => Self::generate(uri, algorithm),
            other => other,
        }
    }

    /// The failure behind the last signature that failed through an
    /// interface whose error cannot carry it (an `rcgen` certificate
    /// signature), taken.
    pub fn take_error(&self) -> Option<Pkcs11Error> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The URI the key was opened by.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// The raw public key: the uncompressed P-256 point (65 bytes) or the
    /// Ed25519 key (32 bytes).
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// The public key as an X.509 `SubjectPublicKeyInfo`, DER.
    pub fn subject_public_key_info(&self) -> Vec<u8> {
        der::spki(self.algorithm, &self.public_key)
    }

    fn session(&self) -> Result<MutexGuard<'_, Option<(Session, ObjectHandle)>>, Pkcs11Error> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            let session = open_session(&self.uri, &self.module, false)?;
            let handle =
                one_object(&session, &self.uri, ObjectClass::PRIVATE_KEY)?.ok_or_else(|| {
                    Pkcs11Error::ObjectNotFound {
                        token: self.uri.token_description(),
                        object: self.uri.object_description(),
                    }
                })?;
            *conn = Some((session, handle));
        }
        Ok(conn)
    }

    /// Signs `message`: ECDSA P-256 over its SHA-256 (DER signature), or
    /// Ed25519 over the message itself. A session the token lost (closed,
    /// logged out) is opened again, transparently; a token that went away
    /// gives [`Pkcs11Error::TokenRemoved`] (or [`Pkcs11Error::TokenNotFound`]
    /// while it is gone), after the module was started again in case the
    /// token is back; the next call tries again.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        // As it is; then with a fresh session; then, the token still away,
        // with the module started again (a token put back is seen then).
        let mut failures = 0;
        loop {
            match self.sign_once(message) {
                Ok(signature) => return Ok(signature),
                Err(Retry::Final(e)) if !e.is_transient() => return Err(e),
                Err(e) => {
                    failures += 1;
                    match failures {
                        1 => {}
                        2 => reinitialize(&self.module),
                        _ => return Err(e.into_error()),
                    }
                }
            }
        }
    }

    fn sign_once(&self, message: &[u8]) -> Result<Vec<u8>, Retry> {
        let mut conn = self.session().map_err(Retry::Final)?;
        let Some((session, handle)) = conn.as_ref() else {
            return Err(Retry::Final(Pkcs11Error::NoModule));
        };
        let signed = match self.algorithm {
            Algorithm::EcdsaP256Sha256 => {
                let digest = Sha256::digest(message);
                session.sign(&Mechanism::Ecdsa, *handle, &digest)
            }
            Algorithm::Ed25519 => session.sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                *handle,
                message,
            ),
        };
        match signed {
            Ok(sig) => match self.algorithm {
                Algorithm::EcdsaP256Sha256 => {
                    der::ecdsa_signature(&sig).ok_or(Retry::Final(Pkcs11Error::Module {
                        operation: "signing",
                        source: CkError::InvalidValue,
                    }))
                }
                Algorithm::Ed25519 => Ok(sig),
            },
            Err(e) => {
                let stale = matches!(e, CkError::Pkcs11(RvError::UserNotLoggedIn, _));
                let e = Pkcs11Error::classify(&self.uri.token_description(), "signing", e);
                if stale || matches!(e, Pkcs11Error::TokenRemoved { .. }) {
                    // Open a fresh session next time: the token may be back.
                    *conn = None;
                    Err(Retry::Stale(e))
                } else {
                    Err(Retry::Final(e))
                }
            }
        }
    }

    /// Reads how the token protects the private key, and asks it for the
    /// key's value (which it must refuse).
    pub fn protection(&self) -> Result<KeyProtection, Pkcs11Error> {
        let conn = self.session()?;
        let Some((session, handle)) = conn.as_ref() else {
            return Err(Pkcs11Error::NoModule);
        };
        let token = self.uri.token_description();
        let attrs = session
            .get_attributes(
                *handle,
                &[AttributeType::Extractable, AttributeType::Sensitive],
            )
            .map_err(|e| Pkcs11Error::classify(&token, "reading the key", e))?;
        let mut p = KeyProtection {
            extractable: true,
            sensitive: false,
            value_readable: false,
        };
        for a in attrs {
            match a {
                Attribute::Extractable(x) => p.extractable = x,
                Attribute::Sensitive(s) => p.sensitive = s,
                _ => {}
            }
        }
        let info = session
            .get_attribute_info(*handle, &[AttributeType::Value])
            .map_err(|e| Pkcs11Error::classify(&token, "reading the key", e))?;
        p.value_readable = matches!(info.first(), Some(AttributeInfo::Available(_)));
        Ok(p)
    }
}
