//! Validated names: things, shadows, jobs, streams, provisioning templates
//! and client tokens.
//!
//! Every name that reaches a topic or a document is checked once, on the way
//! in, against the rules of the AWS IoT device API. A value of one of these
//! types is therefore always safe to put in a topic: it never contains `/`,
//! `+`, `#` or a NUL byte, and it is never empty or over its length limit.
//!
//! The types borrow by default (`ThingName<'a>` holds a `&'a str`), so topic
//! parsing allocates nothing. With the `alloc` feature they may also own their
//! text (`ThingName<'static>` from a `String`, or
//! [`into_owned`](ThingName::into_owned)).
//!
//! ```
//! use fleet_core::{NameProblem, ThingName};
//!
//! let thing = ThingName::new("greenhouse-7:pump")?;
//! assert_eq!(thing.as_str(), "greenhouse-7:pump");
//!
//! let err = ThingName::new("a/b").unwrap_err();
//! assert_eq!(err.problem(), NameProblem::InvalidByte { position: 1, byte: b'/' });
//! # Ok::<(), fleet_core::NameError>(())
//! ```

#[cfg(feature = "alloc")]
use alloc::{borrow::Cow, string::String};
use core::fmt;

/// Which kind of name a [`NameError`] is about.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A [`ThingName`].
    ThingName,
    /// A [`ShadowName`].
    ShadowName,
    /// A [`JobId`].
    JobId,
    /// A [`StreamId`].
    StreamId,
    /// A [`TemplateName`].
    TemplateName,
    /// A [`ClientToken`].
    ClientToken,
    /// A [`ClientName`].
    ClientName,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ThingName => "thing name",
            Self::ShadowName => "shadow name",
            Self::JobId => "job id",
            Self::StreamId => "stream id",
            Self::TemplateName => "provisioning template name",
            Self::ClientToken => "client token",
            Self::ClientName => "client name",
        })
    }
}

/// What is wrong with a rejected name.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameProblem {
    /// The name is empty.
    Empty,
    /// The name is longer than its kind allows (lengths in bytes).
    TooLong {
        /// Length of the rejected name.
        len: usize,
        /// Largest length allowed for this kind.
        max: usize,
    },
    /// The byte at `position` is not allowed in this kind of name.
    InvalidByte {
        /// Byte offset of the first offending byte.
        position: usize,
        /// The offending byte (the first byte of a multi-byte character).
        byte: u8,
    },
}

/// A name was rejected: which kind of name, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NameError {
    kind: NameKind,
    problem: NameProblem,
}

impl NameError {
    /// The kind of name that was rejected.
    pub fn kind(&self) -> NameKind {
        self.kind
    }

    /// Why it was rejected.
    pub fn problem(&self) -> NameProblem {
        self.problem
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problem {
            NameProblem::Empty => write!(f, "{} is empty", self.kind),
            NameProblem::TooLong { len, max } => {
                write!(
                    f,
                    "{} is {len} bytes long, at most {max} allowed",
                    self.kind
                )
            }
            NameProblem::InvalidByte { position, byte } => write!(
                f,
                "{} has a character that is not allowed ({:?}) at byte {position}",
                self.kind,
                char::from(byte)
            ),
        }
    }
}

impl core::error::Error for NameError {}

/// Which bytes a kind of name may contain.
#[derive(Clone, Copy)]
enum Charset {
    /// `[a-zA-Z0-9:_-]`: what AWS IoT allows in thing and shadow names.
    NameWithColon,
    /// `[a-zA-Z0-9_-]`: what AWS IoT allows in job, stream and template ids.
    Id,
    /// Client tokens are free text, but they travel in payloads and logs:
    /// control characters are refused.
    Printable,
    /// One topic level of free text: no space, control character, `/`, `+`
    /// or `#`.
    Level,
}

impl Charset {
    const fn allows(self, b: u8) -> bool {
        match self {
            Self::NameWithColon => b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'),
            Self::Id => b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'),
            Self::Printable => b >= 0x20 && b != 0x7f,
            Self::Level => b > 0x20 && b != 0x7f && !matches!(b, b'/' | b'+' | b'#'),
        }
    }
}

const fn check(s: &str, kind: NameKind, max: usize, allowed: Charset) -> Result<(), NameError> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return Err(NameError {
            kind,
            problem: NameProblem::Empty,
        });
    }
    if bytes.len() > max {
        return Err(NameError {
            kind,
            problem: NameProblem::TooLong {
                len: bytes.len(),
                max,
            },
        });
    }
    let mut i = 0;
    while i < bytes.len() {
        if !allowed.allows(bytes[i]) {
            return Err(NameError {
                kind,
                problem: NameProblem::InvalidByte {
                    position: i,
                    byte: bytes[i],
                },
            });
        }
        i += 1;
    }
    Ok(())
}

#[cfg(feature = "alloc")]
type Text<'a> = Cow<'a, str>;
#[cfg(not(feature = "alloc"))]
type Text<'a> = &'a str;

#[cfg(feature = "alloc")]
const fn borrowed(s: &str) -> Text<'_> {
    Cow::Borrowed(s)
}
#[cfg(not(feature = "alloc"))]
const fn borrowed(s: &str) -> Text<'_> {
    s
}

macro_rules! validated_name {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:expr, max = $max:expr, allowed = $allowed:expr, example = $example:literal
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name<'a>(Text<'a>);

        impl<'a> $name<'a> {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Checks `s` and borrows it.
            pub fn new(s: &'a str) -> Result<Self, NameError> {
                check(s, $kind, $max, $allowed)?;
                Ok(Self(borrowed(s)))
            }

            /// Checks a literal at compile time when used in a `const`.
            ///
            /// # Panics
            /// Panics if `s` is not a valid name; use [`new`](Self::new) for
            /// anything that is not a literal.
            ///
            /// ```
            #[doc = concat!("const NAME: fleet_core::", stringify!($name), "<'static> = fleet_core::", stringify!($name), "::from_static(\"", $example, "\");")]
            /// ```
            pub const fn from_static(s: &'static str) -> $name<'static> {
                match check(s, $kind, $max, $allowed) {
                    Ok(()) => $name(borrowed(s)),
                    Err(_) => panic!(concat!("invalid ", stringify!($name))),
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// A copy that borrows from `self`.
            pub fn borrow(&self) -> $name<'_> {
                $name(borrowed(&self.0))
            }

            /// A copy that owns its text.
            #[cfg(feature = "alloc")]
            pub fn into_owned(self) -> $name<'static> {
                $name(Cow::Owned(self.0.into_owned()))
            }
        }

        #[cfg(feature = "alloc")]
        impl TryFrom<String> for $name<'static> {
            type Error = NameError;

            fn try_from(s: String) -> Result<Self, NameError> {
                check(&s, $kind, $max, $allowed)?;
                Ok(Self(Cow::Owned(s)))
            }
        }

        impl<'a> TryFrom<&'a str> for $name<'a> {
            type Error = NameError;

            fn try_from(s: &'a str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        #[cfg(feature = "alloc")]
        impl core::str::FromStr for $name<'static> {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, NameError> {
                check(s, $kind, $max, $allowed)?;
                Ok(Self(Cow::Owned(String::from(s))))
            }
        }

        impl AsRef<str> for $name<'_> {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl PartialEq<str> for $name<'_> {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name<'_> {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl fmt::Display for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.as_str()).finish()
            }
        }
    };
}

validated_name! {
    /// The name of a thing (a device): 1–128 bytes of `[a-zA-Z0-9:_-]`.
    ///
    /// With mutual TLS the thing name is the common name of the device's
    /// certificate, and the broker confines a device to the topics that
    /// carry its own name.
    ThingName, NameKind::ThingName, max = 128, allowed = Charset::NameWithColon, example = "sensor-1"
}

validated_name! {
    /// The name of a named shadow: 1–64 bytes of `[a-zA-Z0-9:_-]`.
    ///
    /// The classic (unnamed) shadow has no name; APIs take an
    /// `Option<ShadowName>` for it.
    ShadowName, NameKind::ShadowName, max = 64, allowed = Charset::NameWithColon, example = "config"
}

validated_name! {
    /// The id of a job: 1–64 bytes of `[a-zA-Z0-9_-]`.
    JobId, NameKind::JobId, max = 64, allowed = Charset::Id, example = "firmware-2024-06"
}

validated_name! {
    /// The id of an MQTT file stream (OTA downloads): 1–128 bytes of `[a-zA-Z0-9_-]`.
    StreamId, NameKind::StreamId, max = 128, allowed = Charset::Id, example = "image-42"
}

validated_name! {
    /// The name of a fleet-provisioning template: 1–36 bytes of `[a-zA-Z0-9_-]`.
    TemplateName, NameKind::TemplateName, max = 36, allowed = Charset::Id, example = "factory"
}

validated_name! {
    /// The `clientToken` of a request, echoed in its reply: 1–64 bytes of
    /// printable text (no control characters).
    ClientToken, NameKind::ClientToken, max = 64, allowed = Charset::Printable, example = "req-0001"
}

validated_name! {
    /// A connection's name in a topic level: an MQTT client id, or a claim
    /// identity (its certificate's common name, the broker's user name):
    /// 1–128 bytes, no space, control character, `/`, `+` or `#`.
    ClientName, NameKind::ClientName, max = 128, allowed = Charset::Level, example = "claim@factory"
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits_are_inclusive() {
        let max = "a".repeat(128);
        assert!(ThingName::new(&max).is_ok());
        let over = "a".repeat(129);
        assert_eq!(
            ThingName::new(&over).unwrap_err().problem(),
            NameProblem::TooLong { len: 129, max: 128 }
        );
        assert!(ShadowName::new(&"s".repeat(64)).is_ok());
        assert!(ShadowName::new(&"s".repeat(65)).is_err());
        assert!(JobId::new(&"j".repeat(64)).is_ok());
        assert!(JobId::new(&"j".repeat(65)).is_err());
        assert!(StreamId::new(&"s".repeat(128)).is_ok());
        assert!(StreamId::new(&"s".repeat(129)).is_err());
        assert!(TemplateName::new(&"t".repeat(36)).is_ok());
        assert!(TemplateName::new(&"t".repeat(37)).is_err());
        assert!(ClientToken::new(&"é".repeat(32)).is_ok());
        assert!(ClientToken::new(&"é".repeat(33)).is_err());
    }

    #[test]
    fn empty_is_rejected_for_every_kind() {
        assert_eq!(
            ThingName::new("").unwrap_err().problem(),
            NameProblem::Empty
        );
        assert_eq!(
            ShadowName::new("").unwrap_err().kind(),
            NameKind::ShadowName
        );
        assert_eq!(JobId::new("").unwrap_err().kind(), NameKind::JobId);
        assert_eq!(StreamId::new("").unwrap_err().kind(), NameKind::StreamId);
        assert_eq!(
            TemplateName::new("").unwrap_err().kind(),
            NameKind::TemplateName
        );
        assert_eq!(
            ClientToken::new("").unwrap_err().kind(),
            NameKind::ClientToken
        );
    }

    #[test]
    fn topic_metacharacters_are_rejected() {
        for bad in ["a/b", "a+b", "a#b", "a\0b", "$aws", "a b", "ä"] {
            assert!(ThingName::new(bad).is_err(), "{bad:?}");
            assert!(ShadowName::new(bad).is_err(), "{bad:?}");
            assert!(JobId::new(bad).is_err(), "{bad:?}");
        }
        // Colons are allowed in thing and shadow names, not in ids.
        assert!(ThingName::new("a:b").is_ok());
        assert!(ShadowName::new("a:b").is_ok());
        assert!(JobId::new("a:b").is_err());
        assert!(StreamId::new("a:b").is_err());
        assert!(TemplateName::new("a:b").is_err());
        // Tokens are free text but not control characters.
        assert!(ClientToken::new("a/b c#").is_ok());
        assert!(ClientToken::new("a\nb").is_err());
    }

    #[test]
    fn error_messages_name_the_kind_and_position() {
        let err = JobId::new("job:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "job id has a character that is not allowed (':') at byte 3"
        );
    }

    #[test]
    fn owned_and_borrowed_compare_equal() {
        let owned: ThingName<'static> = String::from("dev-1").try_into().unwrap();
        let borrowed = ThingName::new("dev-1").unwrap();
        assert_eq!(owned, borrowed);
        assert_eq!(borrowed.clone().into_owned(), owned);
        assert_eq!(owned.borrow(), borrowed);
        assert_eq!(format!("{owned:?}"), "ThingName(\"dev-1\")");
        assert_eq!("dev-1".parse::<ThingName<'static>>().unwrap(), owned);
    }

    /// A reference implementation of the thing-name rule, written differently.
    fn thing_rule(s: &str) -> bool {
        (1..=128).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_' || c == '-')
    }

    proptest! {
        #[test]
        fn thing_names_follow_the_rule(s in "\\PC{0,140}") {
            prop_assert_eq!(ThingName::new(&s).is_ok(), thing_rule(&s));
        }

        #[test]
        fn valid_thing_names_are_accepted(s in "[a-zA-Z0-9:_-]{1,128}") {
            let name = ThingName::new(&s).unwrap();
            prop_assert_eq!(name.as_str(), s.as_str());
        }

        #[test]
        fn job_ids_never_contain_separators(s in "\\PC{0,80}") {
            if let Ok(id) = JobId::new(&s) {
                prop_assert!(!id.as_str().contains(['/', '+', '#', ':']));
            }
        }
    }
}
