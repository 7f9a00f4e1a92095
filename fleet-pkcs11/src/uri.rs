//! RFC 7512 `pkcs11:` URIs: which module, which token, which object, and
//! where the PIN comes from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the user PIN comes from. Never from a URI's `pin-value` or a
/// command line: both end up in shell histories, process listings and logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PinSource {
    /// No PIN (a token that needs no login, or one already logged in).
    #[default]
    None,
    /// The first line of a file (`pin-source=file:/path` or an absolute
    /// path, as RFC 7512 §2.4 allows).
    File(PathBuf),
    /// An environment variable (`pin-source=env:NAME`, fleet's extension).
    Env(String),
}

/// The object class a URI names (`type=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// `type=private`
    Private,
    /// `type=public`
    Public,
    /// `type=cert`
    Cert,
}

/// A parsed `pkcs11:` URI (RFC 7512), the attributes fleet uses:
/// path `token`, `manufacturer`, `serial`, `model`, `slot-id`, `object`,
/// `id`, `type`; query `module-path`, `pin-source`.
///
/// ```
/// use fleet_pkcs11::{Pkcs11Uri, PinSource};
///
/// let uri: Pkcs11Uri = "pkcs11:token=fleet;object=device%20key;type=private\
///     ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:FLEET_PIN"
///     .parse()
///     .unwrap();
/// assert_eq!(uri.token.as_deref(), Some("fleet"));
/// assert_eq!(uri.object.as_deref(), Some("device key"));
/// assert_eq!(uri.pin, PinSource::Env("FLEET_PIN".into()));
/// assert!(uri.to_string().starts_with("pkcs11:token=fleet;object=device%20key"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Pkcs11Uri {
    /// The PKCS#11 module (shared library) to load.
    pub module_path: Option<PathBuf>,
    /// The token's label.
    pub token: Option<String>,
    /// The token's manufacturer id.
    pub manufacturer: Option<String>,
    /// The token's serial number.
    pub serial: Option<String>,
    /// The token's model.
    pub model: Option<String>,
    /// The slot's numeric id.
    pub slot_id: Option<u64>,
    /// The object's label (`CKA_LABEL`).
    pub object: Option<String>,
    /// The object's id (`CKA_ID`), raw bytes.
    pub id: Option<Vec<u8>>,
    /// The object class.
    pub object_type: Option<ObjectType>,
    /// Where the user PIN comes from.
    pub pin: PinSource,
}

/// A URI that is not a usable `pkcs11:` URI; `position` is the byte offset
/// of the fault in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError {
    /// Byte offset of the fault.
    pub position: usize,
    /// What is wrong there.
    pub reason: String,
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pkcs11 URI, at byte {}: {}", self.position, self.reason)
    }
}

impl std::error::Error for UriError {}

impl Pkcs11Uri {
    /// Whether `text` looks like a PKCS#11 URI (rather than a file path).
    pub fn is_pkcs11(text: &str) -> bool {
        text.get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("pkcs11:"))
    }

    /// The object this URI names, for messages (`label "x"`, `id 0a0b`).
    pub fn object_description(&self) -> String {
        match (&self.object, &self.id) {
            (Some(l), Some(id)) => format!("label \"{l}\" id {}", hex(id)),
            (Some(l), None) => format!("label \"{l}\""),
            (None, Some(id)) => format!("id {}", hex(id)),
            (None, None) => "any object".into(),
        }
    }

    /// The token this URI names, for messages.
    pub fn token_description(&self) -> String {
        match (&self.token, &self.serial, self.slot_id) {
            (Some(t), _, _) => format!("token \"{t}\""),
            (None, Some(s), _) => format!("token serial {s}"),
            (None, None, Some(id)) => format!("slot {id}"),
            _ => "the first token".into(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode(text: &str, at: usize) -> Result<Vec<u8>, UriError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UriError {
                    position: at + i,
                    reason: "a % must be followed by two hex digits".into(),
                })?;
            out.push(h);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_text(text: &str, at: usize) -> Result<String, UriError> {
    String::from_utf8(decode(text, at)?).map_err(|_| UriError {
        position: at,
        reason: "the value is not UTF-8".into(),
    })
}

/// Percent-encodes all but RFC 7512's unreserved and "res-avail"
/// characters (and `/` in query values, which `pk11-qchar` allows).
fn encode(bytes: &[u8], query: bool) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=".contains(&b) || (query && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One `name=value` of a URI's path or query, with where it starts.
struct Attr<'a> {
    name: &'a str,
    value: &'a str,
    at: usize,
    value_at: usize,
}

/// The `name=value` attributes of `part` (which starts at byte `base` of
/// the URI), separated by `sep`; empty ones are skipped.
fn attributes(
    part: &str,
    sep: char,
    base: usize,
) -> impl Iterator<Item = Result<Attr<'_>, UriError>> {
    let mut at = base;
    part.split(sep).filter_map(move |attr| {
        let here = at;
        at += attr.len() + 1;
        if attr.is_empty() {
            return None;
        }
        Some(match attr.split_once('=') {
            Some((name, value)) => Ok(Attr {
                name,
                value,
                at: here,
                value_at: here + name.len() + 1,
            }),
            None => Err(UriError {
                position: here,
                reason: format!("\"{attr}\" is not name=value"),
            }),
        })
    })
}

impl FromStr for Pkcs11Uri {
    type Err = UriError;

    fn from_str(text: &str) -> Result<Self, UriError> {
        if !Self::is_pkcs11(text) {
            return Err(UriError {
                position: 0,
                reason: "a PKCS#11 URI starts with \"pkcs11:\"".into(),
            });
        }
        let mut uri = Self::default();
        let (path, query, query_at) = match text[7..].split_once('?') {
            Some((p, q)) => (p, q, 7 + p.len() + 1),
            None => (&text[7..], "", text.len()),
        };
        for attr in attributes(path, ';', 7) {
            let Attr {
                name,
                value,
                at: here,
                value_at: vat,
            } = attr?;
            let dup = |set: bool| {
                if set {
                    Err(UriError {
                        position: here,
                        reason: format!("\"{name}\" given twice"),
                    })
                } else {
                    Ok(())
                }
            };
            match name {
                "token" => {
                    dup(uri.token.is_some())?;
                    uri.token = Some(decode_text(value, vat)?);
                }
                "manufacturer" => {
                    dup(uri.manufacturer.is_some())?;
                    uri.manufacturer = Some(decode_text(value, vat)?);
                }
                "serial" => {
                    dup(uri.serial.is_some())?;
                    uri.serial = Some(decode_text(value, vat)?);
                }
                "model" => {
                    dup(uri.model.is_some())?;
                    uri.model = Some(decode_text(value, vat)?);
                }
                "slot-id" => {
                    dup(uri.slot_id.is_some())?;
                    uri.slot_id = Some(value.parse().map_err(|_| UriError {
                        position: vat,
                        reason: "slot-id must be a decimal number".into(),
                    })?);
                }
                "object" => {
                    dup(uri.object.is_some())?;
                    uri.object = Some(decode_text(value, vat)?);
                }
                "id" => {
                    dup(uri.id.is_some())?;
                    uri.id = Some(decode(value, vat)?);
                }
                "type" => {
                    dup(uri.object_type.is_some())?;
                    uri.object_type = Some(match value {
                        "private" => ObjectType::Private,
                        "public" => ObjectType::Public,
                        "cert" => ObjectType::Cert,
                        other => {
                            return Err(UriError {
                                position: vat,
                                reason: format!(
                                    "type \"{other}\" is not one of private, public, cert"
                                ),
                            });
                        }
                    });
                }
                // Attributes fleet does not need identify the library or
                // slot further; RFC 7512 lets a consumer ignore them.
                "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-manufacturer"
                | "slot-description" => {}
                other => {
                    return Err(UriError {
                        position: here,
                        reason: format!("unknown path attribute \"{other}\""),
                    });
                }
            }
        }
        for attr in attributes(query, '&', query_at) {
            let Attr {
                name,
                value,
                at: here,
                value_at: vat,
            } = attr?;
            match name {
                "module-path" => {
                    uri.module_path = Some(PathBuf::from(decode_text(value, vat)?));
                }
                "pin-source" => {
                    let v = decode_text(value, vat)?;
                    uri.pin = if let Some(p) = v.strip_prefix("file:") {
                        PinSource::File(PathBuf::from(p.trim_start_matches("//")))
                    } else if let Some(var) = v.strip_prefix("env:") {
                        PinSource::Env(var.into())
                    } else if v.starts_with('/') {
                        PinSource::File(PathBuf::from(v))
                    } else {
                        return Err(UriError {
                            position: vat,
                            reason: "pin-source must be file:/path or env:NAME".into(),
                        });
                    };
                }
                "pin-value" => {
                    return Err(UriError {
                        position: here,
                        reason: "a PIN is never written in a URI: use \
                                 pin-source=file:/path or pin-source=env:NAME"
                            .into(),
                    });
                }
                "module-name" => {
                    return Err(UriError {
                        position: here,
                        reason: "give the module as module-path=/path/to/module.so".into(),
                    });
                }
                other => {
                    return Err(UriError {
                        position: here,
                        reason: format!("unknown query attribute \"{other}\""),
                    });
                }
            }
        }
        Ok(uri)
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path = Vec::new();
        let text = |name: &str, v: &Option<String>, path: &mut Vec<String>| {
            if let Some(v) = v {
                path.push(format!("{name}={}", encode(v.as_bytes(), false)));
            }
        };
        text("token", &self.token, &mut path);
        text("manufacturer", &self.manufacturer, &mut path);
        text("serial", &self.serial, &mut path);
        text("model", &self.model, &mut path);
        if let Some(s) = self.slot_id {
            path.push(format!("slot-id={s}"));
        }
        text("object", &self.object, &mut path);
        if let Some(id) = &self.id {
            path.push(format!(
                "id={}",
                id.iter().map(|b| format!("%{b:02X}")).collect::<String>()
            ));
        }
        if let Some(t) = self.object_type {
            path.push(
                match t {
                    ObjectType::Private => "type=private",
                    ObjectType::Public => "type=public",
                    ObjectType::Cert => "type=cert",
                }
                .into(),
            );
        }
        write!(f, "pkcs11:{}", path.join(";"))?;
        let mut query = Vec::new();
        if let Some(m) = &self.module_path {
            query.push(format!(
                "module-path={}",
                encode(m.to_string_lossy().as_bytes(), true)
            ));
        }
        match &self.pin {
            PinSource::None => {}
            PinSource::File(p) => query.push(format!(
                "pin-source=file:{}",
                encode(p.to_string_lossy().as_bytes(), true)
            )),
            PinSource::Env(v) => {
                query.push(format!("pin-source=env:{}", encode(v.as_bytes(), true)))
            }
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rfc_examples_and_round_trips() {
        let u: Pkcs11Uri = "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;\
             manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;\
             type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
            .parse()
            .unwrap();
        assert_eq!(u.token.as_deref(), Some("The Software PKCS#11 Softtoken"));
        assert_eq!(u.manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(
            u.id.as_deref(),
            Some(&[0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbd, 0xec, 0x91][..])
        );
        assert_eq!(u.object_type, Some(ObjectType::Cert));
        assert_eq!(u.serial.as_deref(), Some(""));
        let again: Pkcs11Uri = u.to_string().parse().unwrap();
        assert_eq!(again, u);

        let u: Pkcs11Uri = "pkcs11:object=k?module-path=/usr/lib/m.so&pin-source=file:/run/pin"
            .parse()
            .unwrap();
        assert_eq!(u.module_path, Some(PathBuf::from("/usr/lib/m.so")));
        assert_eq!(u.pin, PinSource::File("/run/pin".into()));
        let u: Pkcs11Uri = "pkcs11:?pin-source=%2Fetc%2Fpin".parse().unwrap();
        assert_eq!(u.pin, PinSource::File("/etc/pin".into()));
    }

    #[test]
    fn refuses_with_the_position_of_the_fault() {
        let e = "pkcs11:token=a;type=secret"
            .parse::<Pkcs11Uri>()
            .unwrap_err();
        assert_eq!(e.position, 20, "{e}");
        let e = "pkcs11:token=a?pin-value=1234"
            .parse::<Pkcs11Uri>()
            .unwrap_err();
        assert_eq!(e.position, 15);
        assert!(e.reason.contains("pin-source=env:NAME"), "{e}");
        let e = "pkcs11:object=%4".parse::<Pkcs11Uri>().unwrap_err();
        assert_eq!(e.position, 14);
        let e = "pkcs11:token=a;token=b".parse::<Pkcs11Uri>().unwrap_err();
        assert_eq!(e.position, 15);
        assert!("file:/x".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:colour=blue".parse::<Pkcs11Uri>().is_err());
        assert!("pkcs11:slot-id=x".parse::<Pkcs11Uri>().is_err());
    }
}
