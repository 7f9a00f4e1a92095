//! SoftHSM2 tokens for tests: a fresh token per test, made in this
//! process by PKCS#11 itself (`C_InitToken`, `C_InitPIN`), its user PIN in
//! a temporary file the token's `pkcs11:` URI points at.
//!
//! SoftHSM2 reads its configuration from `$SOFTHSM2_CONF` when the module
//! is first initialized in a process; the workspace's `.cargo/config.toml`
//! points it at `target/softhsm/softhsm2.conf`, which this module writes
//! (tokens under `target/softhsm/tokens`) before the module is loaded.
//! Child processes (`fleet serve`, Python) inherit the variable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use fleet_pkcs11::{PinSource, Pkcs11Uri};

use crate::HarnessError;

/// Debian's (and most distributions') SoftHSM2 module, or `$FLEET_SOFTHSM_MODULE`.
pub fn softhsm_module() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("FLEET_SOFTHSM_MODULE")
        .map(PathBuf::from)
        .or_else(|| {
            [
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/local/lib/softhsm/libsofthsm2.so",
            ]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        });
    match path {
        Some(p) if p.exists() => Ok(p),
        _ => Err(HarnessError::SoftHsmNotFound),
    }
}

/// Where SoftHSM2's configuration and tokens are, from `$SOFTHSM2_CONF`.
fn conf() -> Result<PathBuf, HarnessError> {
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .map(PathBuf::from)
        .ok_or(HarnessError::SoftHsmNotConfigured)?;
    let dir = conf.parent().unwrap_or(Path::new(".")).to_path_buf();
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .map_err(|e| HarnessError::io(format!("create {}", tokens.display()), e))?;
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    if std::fs::read_to_string(&conf).ok().as_deref() != Some(text.as_str()) {
        let tmp = conf.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &conf))
            .map_err(|e| HarnessError::io(format!("write {}", conf.display()), e))?;
    }
    Ok(tokens)
}

/// The process's handle on the module (never finalized: PKCS#11 allows one
/// initialization per process, which fleet-pkcs11 shares).
fn context() -> Result<&'static Pkcs11, HarnessError> {
    static CONTEXT: OnceLock<Result<Pkcs11, String>> = OnceLock::new();
    let ctx = CONTEXT.get_or_init(|| {
        conf().map_err(|e| e.to_string())?;
        let module = softhsm_module().map_err(|e| e.to_string())?;
        let ctx = Pkcs11::new(&module).map_err(|e| e.to_string())?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
            Err(e) => Err(e.to_string()),
        }
    });
    ctx.as_ref()
        .map_err(|e| HarnessError::SoftHsm(format!("loading SoftHSM2: {e}")))
}

/// A fresh SoftHSM2 token for one test.
#[derive(Debug)]
pub struct SoftHsmToken {
    label: String,
    module: PathBuf,
    pin_dir: tempfile::TempDir,
    tokens: PathBuf,
}

/// The security officer PIN of test tokens.
pub const SO_PIN: &str = "so-pin-0000";

impl SoftHsmToken {
    /// A new token with a user PIN (kept in a temporary file).
    pub fn new() -> Result<Self, HarnessError> {
        Self::make(true)
    }

    /// A new token whose user PIN was never set: the token refuses its
    /// user until the security officer sets one.
    pub fn without_user_pin() -> Result<Self, HarnessError> {
        Self::make(false)
    }

    fn make(user_pin: bool) -> Result<Self, HarnessError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // One token made at a time: SoftHSM2 offers one free slot.
        static MAKING: Mutex<()> = Mutex::new(());
        let _one = MAKING.lock().unwrap_or_else(|p| p.into_inner());
        let ctx = context()?;
        let tokens = conf()?;
        let module = softhsm_module()?;
        let label = format!(
            "t{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let hsm = |what: &str, e: CkError| HarnessError::SoftHsm(format!("{what}: {e}"));
        let free = ctx
            .get_all_slots()
            .map_err(|e| hsm("listing slots", e))?
            .into_iter()
            .find(|s| ctx.get_token_info(*s).is_ok_and(|t| !t.token_initialized()))
            .ok_or_else(|| HarnessError::SoftHsm("SoftHSM2 offers no free slot".into()))?;
        ctx.init_token(free, &AuthPin::from(SO_PIN), &label)
            .map_err(|e| hsm("C_InitToken", e))?;
        let pin_dir = tempfile::tempdir().map_err(|e| HarnessError::io("make a PIN dir", e))?;
        let pin = "user-pin-1234";
        std::fs::write(pin_dir.path().join("pin"), format!("{pin}\n"))
            .map_err(|e| HarnessError::io("write the PIN file", e))?;
        if user_pin {
            let slot = ctx
                .get_all_slots()
                .map_err(|e| hsm("listing slots", e))?
                .into_iter()
                .find(|s| {
                    ctx.get_token_info(*s)
                        .is_ok_and(|t| t.label().trim_end() == label)
                })
                .ok_or_else(|| HarnessError::SoftHsm(format!("token {label} not listed")))?;
            let session = ctx
                .open_rw_session(slot)
                .map_err(|e| hsm("C_OpenSession", e))?;
            session
                .login(UserType::So, Some(&AuthPin::from(SO_PIN)))
                .map_err(|e| hsm("C_Login (SO)", e))?;
            session
                .init_pin(&AuthPin::from(pin))
                .map_err(|e| hsm("C_InitPIN", e))?;
        }
        Ok(Self {
            label,
            module,
            pin_dir,
            tokens,
        })
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The PKCS#11 module's path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The file holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.pin_dir.path().join("pin")
    }

    /// The URI of the object `label` on this token, with the module and the
    /// PIN file.
    pub fn uri(&self, object: &str) -> Pkcs11Uri {
        let text = format!("pkcs11:token={};object={object}", self.label);
        let mut uri: Pkcs11Uri = text.parse().unwrap_or_default();
        uri.module_path = Some(self.module.clone());
        uri.pin = PinSource::File(self.pin_file());
        uri
    }

    /// A read-write session on this token, logged in as its user (for a
    /// test that makes keys fleet would not, or logs the user out).
    pub fn user_session(&self) -> Result<cryptoki::session::Session, HarnessError> {
        let ctx = context()?;
        let hsm = |what: &str, e: CkError| HarnessError::SoftHsm(format!("{what}: {e}"));
        let slot = ctx
            .get_all_slots()
            .map_err(|e| hsm("listing slots", e))?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .is_ok_and(|t| t.label().trim_end() == self.label)
            })
            .ok_or_else(|| HarnessError::SoftHsm(format!("token {} not listed", self.label)))?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| hsm("C_OpenSession", e))?;
        let pin = std::fs::read_to_string(self.pin_file())
            .map_err(|e| HarnessError::io("read the PIN file", e))?;
        match session.login(UserType::User, Some(&AuthPin::from(pin.trim().to_string()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(hsm("C_Login", e)),
        }
    }

    /// The token's directory in SoftHSM2's file store.
    pub fn directory(&self) -> Option<PathBuf> {
        std::fs::read_dir(&self.tokens)
            .ok()?
            .flatten()
            .find_map(|e| {
                let tf = e.path().join("token.object");
                let bytes = std::fs::read(&tf).ok()?;
                bytes
                    .windows(self.label.len())
                    .any(|w| w == self.label.as_bytes())
                    .then(|| e.path())
            })
    }
}

impl Drop for SoftHsmToken {
    fn drop(&mut self) {
        // Keep the token store small: SoftHSM2 loads every token at start.
        if let Some(dir) = self.directory() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
