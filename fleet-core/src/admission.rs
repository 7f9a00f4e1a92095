//! Who may connect to a fleet's broker, as what, and under which client id.
//!
//! These are the rules every broker of the fleet applies at CONNECT: the
//! embedded broker in `fleet-cloud`, and Mosquitto through the
//! `fleet-mosquitto-plugin`. They are pure: the caller parses the client
//! certificate (its common name, whether provisioning by claim issued it,
//! its SHA-256 fingerprint) and looks the thing up in the registry
//! ([`Standing`]); the rules decide.
//!
//! 1. The role comes from the certificate ([`role`]). A certificate that
//!    provisioning by claim issued is only ever a device, and only once the
//!    registry binds it to that thing: until `RegisterThing` has bound it, it
//!    grants nothing (as in AWS IoT, where such a certificate has no policy
//!    attached). Otherwise the common name decides: a backend identity, a
//!    claim identity, or a thing name.
//! 2. A device's thing must exist and be enabled, and a certificate the
//!    registry knows must be active and bound to that thing
//!    ([`Standing::admits`]).
//! 3. A device's client id is its thing name (AWS IoT's usual policy).
//!    Backends and claimants choose theirs ([`check_client_id`]).
//! 4. A client id held by a live connection is taken over only by the same
//!    identity in the same role (a device reconnecting), by a device
//!    reclaiming its own thing name from a claimant, or by a backend
//!    reclaiming its id from a claimant ([`may_take_over`]). Claimants
//!    never take over (two claimants share a certificate, not a session),
//!    and nobody but a backend takes a backend's id.
//!
//! ```
//! use fleet_core::admission::{check_client_id, role, Refusal, Role, Standing};
//!
//! let backends = ["fleet-backend"];
//! let claims = ["factory@line-1"];
//! // A claim certificate may provision, under a client id of its choice.
//! assert_eq!(role("factory@line-1", false, &backends, &claims), Role::Claimant);
//! // What provisioning issued is a device, whatever its name says...
//! assert_eq!(role("fleet-backend", true, &backends, &claims), Role::Device);
//! // ...admitted only once the registry binds it to its thing.
//! let unbound = Standing { thing: Some(true), certificate: None };
//! assert!(!unbound.admits("pump-7", true));
//! let bound = Standing { thing: Some(true), certificate: Some(("pump-7".into(), true)) };
//! assert!(bound.admits("pump-7", true));
//! // A device connects as itself.
//! assert_eq!(check_client_id(Role::Device, "pump-7", "pump-8"), Err(Refusal::NotAuthorized));
//! ```
//!
//! [`Roster`] is the registry's standing of every thing and certificate in
//! a line-oriented text form, for a broker that cannot ask the registry
//! (Mosquitto's plugin reads the file `fleet serve --mosquitto-roster`
//! writes).

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};

/// The organizational unit that marks a certificate issued by provisioning
/// by claim (the fleet's CA writes it; a CSR cannot choose it).
pub const PROVISIONED_UNIT: &str = "fleet provisioned by claim";

/// The longest client id a broker of the fleet accepts (AWS IoT: 128).
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// What a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A privileged backend identity: everything.
    Backend,
    /// A claim identity: provisioning requests only.
    Claimant,
    /// A thing.
    Device,
}

/// Why a connection is refused (each maps to a CONNACK code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client id is malformed (a wildcard, a `/`, or over
    /// [`MAX_CLIENT_ID_BYTES`]): "client identifier not valid".
    BadClientId,
    /// The identity may not connect, or not under this client id: "not
    /// authorized".
    NotAuthorized,
    /// The identity already holds as many connections as it may: "quota
    /// exceeded".
    QuotaExceeded,
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::BadClientId => "client identifier not valid",
            Self::NotAuthorized => "not authorized",
            Self::QuotaExceeded => "quota exceeded",
        })
    }
}

impl core::error::Error for Refusal {}

/// The role of a certificate with common name `common_name`;
/// `provisioned`: issued by provisioning by claim (its subject holds the
/// organizational unit [`PROVISIONED_UNIT`]).
pub fn role<B: AsRef<str>, C: AsRef<str>>(
    common_name: &str,
    provisioned: bool,
    backend_identities: &[B],
    claim_identities: &[C],
) -> Role {
    if provisioned {
        // Whatever its name says: provisioning never makes anything but a
        // device.
        Role::Device
    } else if backend_identities.iter().any(|b| b.as_ref() == common_name) {
        Role::Backend
    } else if claim_identities.iter().any(|c| c.as_ref() == common_name) {
        Role::Claimant
    } else {
        Role::Device
    }
}

/// Whether `identity` in `role` may use `client_id` (not empty: a broker
/// gives an empty one the thing name, or a fresh id, first).
pub fn check_client_id(role: Role, identity: &str, client_id: &str) -> Result<(), Refusal> {
    if client_id.is_empty()
        || client_id.contains(['/', '+', '#', '\0'])
        || client_id.len() > MAX_CLIENT_ID_BYTES
    {
        Err(Refusal::BadClientId)
    } else if role == Role::Device && client_id != identity {
        // AWS IoT's usual policy: a thing connects as itself.
        Err(Refusal::NotAuthorized)
    } else {
        Ok(())
    }
}

/// Whether a connection of `newcomer` (role, identity) may take the client
/// id that `holder` has.
pub fn may_take_over(holder: (Role, &str), newcomer: (Role, &str)) -> bool {
    match (holder.0, newcomer.0) {
        (_, Role::Claimant) | (Role::Backend, Role::Device) => false,
        (Role::Claimant, Role::Device | Role::Backend) => true,
        (h, n) => h == n && holder.1 == newcomer.1,
    }
}

/// Whether `topic`, given as an MQTT 5 response topic by client
/// `client_id`, is in that client's own namespace:
/// `{prefix}/clients/{client_id}/...`, with something after the client id
/// and no wildcard. Replies go only there, so that a request cannot make
/// the services publish on someone else's topics.
pub fn is_own_response_topic(prefix: &str, client_id: &str, topic: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix("/clients/"))
        .and_then(|r| r.strip_prefix(client_id))
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(['+', '#', '\0']))
}

/// Whether `topic`, given as an MQTT 5 response topic by the thing
/// `thing`, is one of that thing's own reply or notice topics (its shadow's
/// `/update/accepted`, its jobs' `/notify`, ...): where the services answer
/// it anyway, so naming it makes nobody publish anywhere new. A
/// request/response client (Mosquitto's `mosquitto_rr`) names these.
///
/// ```
/// use fleet_core::admission::is_own_reply_topic;
/// assert!(is_own_reply_topic("$aws", "pump-1", "$aws/things/pump-1/shadow/update/accepted"));
/// assert!(!is_own_reply_topic("$aws", "pump-1", "$aws/things/pump-2/shadow/update/accepted"));
/// // A request is not a reply.
/// assert!(!is_own_reply_topic("$aws", "pump-1", "$aws/things/pump-1/shadow/update"));
/// ```
pub fn is_own_reply_topic(prefix: &str, thing: &str, topic: &str) -> bool {
    let Ok(prefix) = crate::topic::TopicPrefix::new(prefix) else {
        return false;
    };
    crate::topic::Topic::parse(&prefix, topic)
        .is_ok_and(|t| !t.is_from_device() && t.thing().is_some_and(|n| n.as_str() == thing))
}

/// What the registry says of a device connecting with a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Standing {
    /// The thing exists; `Some(enabled)`.
    pub thing: Option<bool>,
    /// The registry knows the certificate (by its SHA-256 fingerprint):
    /// the thing it is bound to, and whether it is active.
    pub certificate: Option<(String, bool)>,
}

impl Standing {
    /// Whether a device connecting as `thing` is admitted: the thing exists
    /// and is enabled, and the certificate, if the registry knows it, is
    /// active and bound to it. A `provisioned` certificate must be known:
    /// issued by provisioning by claim, it grants nothing until
    /// `RegisterThing` binds it.
    pub fn admits(&self, thing: &str, provisioned: bool) -> bool {
        let cert_ok = match &self.certificate {
            Some((bound, active)) => *active && bound == thing,
            None => !provisioned,
        };
        self.thing == Some(true) && cert_ok
    }
}

/// The first line of a roster's text.
pub const ROSTER_HEADER: &str = "fleet-roster 1";

/// The registry's standing of every thing and certificate, for a broker
/// that cannot ask the registry at each CONNECT.
///
/// Its text form is one record per line after [`ROSTER_HEADER`]:
/// `thing NAME enabled|disabled` and `certificate SHA256-HEX THING
/// active|revoked`.
///
/// ```
/// use fleet_core::admission::Roster;
///
/// let mut roster = Roster::default();
/// roster.add_thing("pump-7", true);
/// roster.add_certificate("ab12", "pump-7", true);
/// let text = roster.to_text();
/// let back = Roster::parse(&text)?;
/// assert!(back.standing("pump-7", "ab12").admits("pump-7", true));
/// assert!(!back.standing("pump-8", "cd34").admits("pump-8", false));
/// # Ok::<(), fleet_core::admission::RosterError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    things: BTreeMap<String, bool>,
    certificates: BTreeMap<String, (String, bool)>,
}

/// A roster's text is not one [`Roster::to_text`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterError {
    /// The line (1-based) that is wrong.
    pub line: usize,
}

impl core::fmt::Display for RosterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "roster line {} is not a roster record", self.line)
    }
}

impl core::error::Error for RosterError {}

/// Whether `word` can stand in a roster's text as one field.
fn is_field(word: &str) -> bool {
    !word.is_empty() && !word.contains(char::is_whitespace)
}

impl Roster {
    /// Records a thing and whether it is enabled. A name that cannot be
    /// one field of the text (empty, or holding whitespace) is left out,
    /// so it admits nothing.
    pub fn add_thing(&mut self, name: &str, enabled: bool) {
        if is_field(name) {
            self.things.insert(name.to_string(), enabled);
        }
    }

    /// Records a certificate by SHA-256 fingerprint (lower-case hex), the
    /// thing it is bound to, and whether it is active. One whose id or
    /// thing cannot be one field of the text is left out (it admits
    /// nothing).
    pub fn add_certificate(&mut self, fingerprint: &str, thing: &str, active: bool) {
        if is_field(fingerprint) && is_field(thing) {
            self.certificates
                .insert(fingerprint.to_string(), (thing.to_string(), active));
        }
    }

    /// The standing of `thing` and of the certificate `fingerprint`.
    pub fn standing(&self, thing: &str, fingerprint: &str) -> Standing {
        Standing {
            thing: self.things.get(thing).copied(),
            certificate: self.certificates.get(fingerprint).cloned(),
        }
    }

    /// The number of things and of certificates.
    pub fn len(&self) -> (usize, usize) {
        (self.things.len(), self.certificates.len())
    }

    /// Whether the roster holds nothing.
    pub fn is_empty(&self) -> bool {
        self.things.is_empty() && self.certificates.is_empty()
    }

    /// The text form (names never hold whitespace: thing names and hex
    /// fingerprints cannot).
    pub fn to_text(&self) -> String {
        use core::fmt::Write as _;
        let mut out = String::from(ROSTER_HEADER);
        out.push('\n');
        for (name, enabled) in &self.things {
            let state = if *enabled { "enabled" } else { "disabled" };
            let _ = writeln!(out, "thing {name} {state}");
        }
        for (fp, (thing, active)) in &self.certificates {
            let state = if *active { "active" } else { "revoked" };
            let _ = writeln!(out, "certificate {fp} {thing} {state}");
        }
        out
    }

    /// Reads the text form; a wrong line is an error naming it (nothing
    /// half-read is returned).
    pub fn parse(text: &str) -> Result<Self, RosterError> {
        let mut roster = Self::default();
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h.trim_end() == ROSTER_HEADER => {}
            _ => return Err(RosterError { line: 1 }),
        }
        for (i, line) in lines {
            let err = RosterError { line: i + 1 };
            let fields: alloc::vec::Vec<&str> = line.split_ascii_whitespace().collect();
            match fields.as_slice() {
                [] => {}
                ["thing", name, state] => {
                    let enabled = match *state {
                        "enabled" => true,
                        "disabled" => false,
                        _ => return Err(err),
                    };
                    crate::ThingName::new(name).map_err(|_| err.clone())?;
                    roster.add_thing(name, enabled);
                }
                ["certificate", fp, thing, state] => {
                    let active = match *state {
                        "active" => true,
                        "revoked" => false,
                        _ => return Err(err),
                    };
                    roster.add_certificate(fp, thing, active);
                }
                _ => return Err(err),
            }
        }
        Ok(roster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_rules() {
        use Role::{Backend, Claimant, Device};
        assert!(may_take_over((Device, "p1"), (Device, "p1")));
        assert!(!may_take_over((Device, "p1"), (Device, "p2")));
        assert!(!may_take_over(
            (Backend, "fleet-backend"),
            (Device, "fleet-cloud")
        ));
        assert!(may_take_over((Backend, "b"), (Backend, "b")));
        assert!(!may_take_over((Backend, "b"), (Backend, "c")));
        assert!(!may_take_over((Device, "p1"), (Backend, "b")));
        assert!(!may_take_over((Claimant, "c@f"), (Claimant, "c@f")));
        assert!(may_take_over((Claimant, "c@f"), (Device, "p1")));
        assert!(may_take_over((Claimant, "c@f"), (Backend, "b")));
        assert!(!may_take_over((Device, "p1"), (Claimant, "c@f")));
    }

    #[test]
    fn client_ids() {
        assert_eq!(check_client_id(Role::Device, "p1", "p1"), Ok(()));
        assert_eq!(
            check_client_id(Role::Device, "p1", "fleet-cloud"),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(check_client_id(Role::Backend, "b", "fleet-cloud"), Ok(()));
        assert_eq!(check_client_id(Role::Claimant, "c@f", "any-1"), Ok(()));
        for bad in ["", "a/b", "a+", "#", &"x".repeat(129)] {
            assert_eq!(
                check_client_id(Role::Claimant, "c@f", bad),
                Err(Refusal::BadClientId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn response_topics() {
        assert!(is_own_response_topic("$aws", "c1", "$aws/clients/c1/r"));
        assert!(is_own_response_topic("$aws", "c1", "$aws/clients/c1/a/b"));
        for bad in [
            "$aws/clients/c1",
            "$aws/clients/c1/",
            "$aws/clients/c10/r",
            "$aws/clients/c2/r",
            "$aws/clients/c1/+",
            "$aws/clients/c1/#",
            "$aws/things/c1/shadow/get",
            "dt/clients/c1/r",
        ] {
            assert!(!is_own_response_topic("$aws", "c1", bad), "{bad}");
        }
    }

    #[test]
    fn standing() {
        let s = |thing, cert: Option<(&str, bool)>| Standing {
            thing,
            certificate: cert.map(|(t, a)| (t.to_string(), a)),
        };
        assert!(s(Some(true), None).admits("p1", false));
        assert!(!s(Some(true), None).admits("p1", true));
        assert!(!s(Some(false), Some(("p1", true))).admits("p1", true));
        assert!(!s(None, None).admits("p1", false));
        assert!(!s(Some(true), Some(("p1", false))).admits("p1", false));
        assert!(!s(Some(true), Some(("p2", true))).admits("p1", true));
        assert!(s(Some(true), Some(("p1", true))).admits("p1", true));
    }

    #[test]
    fn roster_round_trips_and_refuses_bad_lines() {
        let mut r = Roster::default();
        r.add_thing("p1", true);
        r.add_thing("p2", false);
        r.add_certificate("00ff", "p1", true);
        r.add_certificate("11ee", "p2", false);
        assert_eq!(Roster::parse(&r.to_text()), Ok(r.clone()));
        assert_eq!(r.len(), (2, 2));
        for (text, line) in [
            ("", 1),
            ("fleet-roster 2\n", 1),
            ("fleet-roster 1\nthing p1\n", 2),
            ("fleet-roster 1\nthing p1 enabled\nthing p/2 enabled\n", 3),
            ("fleet-roster 1\ncertificate ab p1 maybe\n", 2),
            ("fleet-roster 1\nother\n", 2),
        ] {
            assert_eq!(Roster::parse(text), Err(RosterError { line }), "{text:?}");
        }
    }
}
