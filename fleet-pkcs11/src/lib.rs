//! Keys in hardware for fleet: signing keys that live in a PKCS#11 token
//! (an HSM, a smart card, a TPM's or secure element's PKCS#11 module,
//! SoftHSM2) and never leave it, addressed by RFC 7512 `pkcs11:` URIs.
//!
//! ```no_run
//! use fleet_pkcs11::{Algorithm, Pkcs11Key, Pkcs11Uri};
//!
//! // The PIN comes from a file or the environment, never the URI itself.
//! let uri: Pkcs11Uri = "pkcs11:token=fleet;object=device\
//!     ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:FLEET_PKCS11_PIN"
//!     .parse()?;
//! let key = Pkcs11Key::open_or_generate(&uri, Algorithm::EcdsaP256Sha256)?;
//! let signature = key.sign(b"the TLS transcript")?; // DER ECDSA, made in the token
//! assert!(!key.protection()?.extractable);
//! # let _ = signature;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The device agent uses a [`Pkcs11Key`] for its mutual-TLS identity,
//! its certificate request and its install receipts (`fleet-device`'s
//! `pkcs11` feature); `fleet serve` for the certificate authority that
//! signs devices' certificates; `fleet manifest sign` for release keys.
//!
//! What this crate does not do: manage tokens (initialize them, set PINs:
//! that is the security officer's job, with the vendor's tools or
//! `softhsm2-util`), or keep a PIN anywhere but in memory while a session
//! is logged in.
//!
//! With the `rcgen` feature, [`Pkcs11Key`] is an `rcgen::SigningKey`, so
//! certificates and certificate requests are signed in the token; with
//! `ota`, it is fleet-core's `Ed25519Signer`, so release manifests and
//! install receipts are.

mod der;
mod error;
mod key;
#[cfg(feature = "ota")]
mod ota_signer;
#[cfg(feature = "rcgen")]
mod rcgen_key;
mod uri;

pub use error::{LockReason, Pkcs11Error};
pub use key::{Algorithm, KeyProtection, Pkcs11Key};
pub use uri::{ObjectType, PinSource, Pkcs11Uri, UriError};
