//! A Mosquitto 2 plugin that makes Mosquitto admit clients by the fleet's
//! rules, as the embedded broker does.
//!
//! ```
//! use fleet_mosquitto_plugin::{Config, Gate, Presented};
//! use fleet_core::admission::{Refusal, Role};
//!
//! // The options Mosquitto passes (`plugin_opt_*` lines of mosquitto.conf).
//! let dir = std::env::temp_dir().join(format!("fleet-plugin-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let roster = dir.join("roster");
//! std::fs::write(&roster, "fleet-roster 1\nthing pump-7 enabled\n")?;
//! let config = Config::from_options([
//!     ("roster", roster.to_str().unwrap()),
//!     ("claim_identities", "factory@line-1"),
//! ])?;
//! let mut gate = Gate::new(config);
//!
//! let pump = Presented { common_name: "pump-7".into(), provisioned: false, fingerprint: "ab".into() };
//! // A device connects as itself, and only as itself.
//! assert_eq!(gate.admit(1, &pump, "pump-8"), Err(Refusal::NotAuthorized));
//! assert_eq!(gate.admit(1, &pump, "pump-7"), Ok(Role::Device));
//! // A claimant cannot take the id another connection holds.
//! let claim = Presented { common_name: "factory@line-1".into(), provisioned: false, fingerprint: "cd".into() };
//! assert_eq!(gate.admit(2, &claim, "c-1"), Ok(Role::Claimant));
//! assert_eq!(gate.admit(3, &claim, "c-1"), Err(Refusal::NotAuthorized));
//! // Its requests' replies go only to its own namespace.
//! assert!(gate.may_publish("c-1", "$aws/certificates/create-from-csr/json", false, Some("$aws/clients/c-1/r")));
//! assert!(!gate.may_publish("c-1", "$aws/certificates/create-from-csr/json", false, Some("$aws/things/pump-7/shadow/get")));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Why
//!
//! Mosquitto on its own knows a client by its certificate's common name
//! (`use_identity_as_username`) and its ACL, and nothing else: any device
//! may connect under another's client id and throw it off, a certificate
//! issued by `create-from-csr` is honoured by its common name before
//! `RegisterThing` has bound it, and a claimant may point a request's
//! response topic at another client's topics. This plugin closes those gaps
//! with the rules of [`fleet_core::admission`], the same the embedded broker
//! applies:
//!
//! - **At CONNECT** ([`Gate::admit`]): the role comes from the certificate;
//!   a device's client id is its thing name, its thing must exist and be
//!   enabled in the registry, and a certificate the registry knows must be
//!   active and bound to it (one issued by provisioning by claim must be
//!   known); a claimant never takes over a client id that a live connection
//!   holds, and one claim identity holds at most `max_claim_connections`;
//!   nobody but a backend takes a backend's id. A refusal is CONNACK "not
//!   authorized", and the connection already there stays. The user name is
//!   set to the common name, so the ACL that `fleet` generates (`%u`)
//!   applies unchanged.
//! - **At PUBLISH** ([`Gate::may_publish`]): a client other than a backend
//!   may give a response topic only under `{prefix}/clients/{its client
//!   id}/`, and may not retain a message on a reserved (`{prefix}/...`)
//!   topic.
//! - **When the registry changes** ([`Gate::refresh`], every second): a
//!   connected device that the registry no longer admits (disabled,
//!   deleted, its certificate revoked) is disconnected.
//!
//! The registry's standing reaches the plugin as a file, the
//! [`Roster`], that `fleet serve
//! --mosquitto-roster PATH` writes (atomically) at start, after every
//! change through the API and before it answers a `RegisterThing`. A
//! missing or unreadable roster admits no device (backends and claimants
//! still connect), and says so in Mosquitto's log.
//!
//! # Configuration
//!
//! ```text
//! plugin /usr/local/lib/libfleet_mosquitto_plugin.so
//! plugin_opt_roster /var/lib/fleet/roster
//! plugin_opt_backend_identities fleet-backend
//! plugin_opt_claim_identities factory@line-1,factory@line-2
//! plugin_opt_prefix $aws
//! plugin_opt_max_claim_connections 100
//!
//! listener 8883
//! require_certificate true
//! # not use_identity_as_username: Mosquitto would then skip the plugin.
//! ```
//!
//! `BrokerPolicy::mosquitto_conf` in `fleet-cloud` writes this when given
//! the plugin's path.

use std::collections::HashMap;
use std::path::PathBuf;

use fleet_core::admission::{self, Refusal, Role, Roster};

mod ffi;

/// The plugin's options (`plugin_opt_{key} value` in mosquitto.conf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `roster`: the file `fleet serve --mosquitto-roster` writes
    /// (required).
    pub roster: PathBuf,
    /// `backend_identities`: common names of backend identities, comma
    /// separated (`fleet-backend`).
    pub backend_identities: Vec<String>,
    /// `claim_identities`: common names of claim identities, comma
    /// separated (none); each must hold an `@`.
    pub claim_identities: Vec<String>,
    /// `prefix`: the topic prefix of the protocol (`$aws`).
    pub prefix: String,
    /// `max_claim_connections`: connections one claim identity holds at
    /// once (100).
    pub max_claim_connections: usize,
}

/// An option is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fleet plugin: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the options; an unknown key is an error (a typo would
    /// otherwise loosen nothing but confuse everyone).
    pub fn from_options<'a, I: IntoIterator<Item = (&'a str, &'a str)>>(
        options: I,
    ) -> Result<Self, ConfigError> {
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        let mut roster = None;
        let mut config = Self {
            roster: PathBuf::new(),
            backend_identities: vec!["fleet-backend".into()],
            claim_identities: Vec::new(),
            prefix: "$aws".into(),
            max_claim_connections: 100,
        };
        for (key, value) in options {
            match key {
                "roster" => roster = Some(PathBuf::from(value)),
                "backend_identities" => config.backend_identities = list(value),
                "claim_identities" => config.claim_identities = list(value),
                "prefix" => config.prefix = value.trim().to_string(),
                "max_claim_connections" => {
                    config.max_claim_connections = value.trim().parse().map_err(|_| {
                        ConfigError(format!("max_claim_connections {value:?} is not a number"))
                    })?;
                }
                other => return Err(ConfigError(format!("unknown option plugin_opt_{other}"))),
            }
        }
        config.roster = roster
            .ok_or_else(|| ConfigError("plugin_opt_roster (a file path) is required".into()))?;
        if let Some(c) = config.claim_identities.iter().find(|c| !c.contains('@')) {
            return Err(ConfigError(format!(
                "claim identity {c:?} must contain '@' so that it can never be a thing name"
            )));
        }
        Ok(config)
    }
}

/// What a client certificate says, as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The subject's common name.
    pub common_name: String,
    /// Issued by provisioning by claim (the organizational unit
    /// [`PROVISIONED_UNIT`](admission::PROVISIONED_UNIT)).
    pub provisioned: bool,
    /// SHA-256 of the DER, lower-case hex (the registry's certificate id).
    pub fingerprint: String,
}

/// A certificate that cannot be read, or has no common name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateError;

impl std::fmt::Display for CertificateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client certificate cannot be read or has no common name")
    }
}

impl std::error::Error for CertificateError {}

impl Presented {
    /// Reads a certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<Self, CertificateError> {
        use sha2::Digest as _;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| CertificateError)?;
        let subject = cert.subject();
        let mut names = subject.iter_common_name();
        let common_name = names
            .next()
            .and_then(|n| n.as_str().ok())
            .ok_or(CertificateError)?
            .to_string();
        if names.next().is_some() || common_name.contains('\0') {
            // Two common names: which one is the identity is ambiguous.
            return Err(CertificateError);
        }
        let provisioned = subject
            .iter_organizational_unit()
            .any(|u| u.as_str().is_ok_and(|s| s == admission::PROVISIONED_UNIT));
        let digest = sha2::Sha256::digest(der);
        let fingerprint = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            common_name,
            provisioned,
            fingerprint,
        })
    }
}

/// A live connection the gate admitted.
#[derive(Debug, Clone)]
struct Held {
    /// Mosquitto's client context (its address): which connection.
    conn: usize,
    role: Role,
    identity: String,
    fingerprint: String,
    provisioned: bool,
}

/// The roster file as last read: its identity, to notice a new one.
type Stamp = (std::time::SystemTime, u64, u64);

/// The plugin's state: the options, the roster, and who holds which client
/// id. Pure (no Mosquitto calls): `ffi` feeds it Mosquitto's events.
#[derive(Debug)]
pub struct Gate {
    config: Config,
    roster: Option<Roster>,
    stamp: Option<Stamp>,
    clients: HashMap<String, Held>,
}

impl Gate {
    /// A gate with `config`; reads the roster.
    pub fn new(config: Config) -> Self {
        let mut gate = Self {
            config,
            roster: None,
            stamp: None,
            clients: HashMap::new(),
        };
        let _ = gate.refresh();
        gate
    }

    /// The options.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Reads the roster again if the file changed (a new file renamed over
    /// it, or other contents). `Ok(true)`: it changed and was read;
    /// `Err`: it cannot be read or parsed, and no device is admitted until
    /// it can (the message is for the log).
    pub fn refresh(&mut self) -> Result<bool, String> {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        let path = &self.config.roster;
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let was = self.roster.take().is_some() || self.stamp.is_none();
                self.stamp = None;
                return if was {
                    Err(format!(
                        "roster {}: {e}; no device is admitted",
                        path.display()
                    ))
                } else {
                    Ok(false)
                };
            }
        };
        #[cfg(unix)]
        let ino = meta.ino();
        #[cfg(not(unix))]
        let ino = 0;
        let stamp = (
            meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            meta.len(),
            ino,
        );
        if self.stamp == Some(stamp) {
            return Ok(false);
        }
        self.stamp = Some(stamp);
        let text = std::fs::read_to_string(path);
        match text
            .map_err(|e| e.to_string())
            .and_then(|t| Roster::parse(&t).map_err(|e| e.to_string()))
        {
            Ok(r) => {
                self.roster = Some(r);
                Ok(true)
            }
            Err(e) => {
                self.roster = None;
                Err(format!(
                    "roster {}: {e}; no device is admitted",
                    path.display()
                ))
            }
        }
    }

    /// Whether connection `conn` with certificate `cert` may connect under
    /// `client_id`; if so, it now holds that id.
    pub fn admit(
        &mut self,
        conn: usize,
        cert: &Presented,
        client_id: &str,
    ) -> Result<Role, Refusal> {
        let identity = cert.common_name.as_str();
        let role = admission::role(
            identity,
            cert.provisioned,
            &self.config.backend_identities,
            &self.config.claim_identities,
        );
        admission::check_client_id(role, identity, client_id)?;
        if role == Role::Device {
            let admitted = self.roster.as_ref().is_some_and(|r| {
                r.standing(identity, &cert.fingerprint)
                    .admits(identity, cert.provisioned)
            });
            if !admitted {
                return Err(Refusal::NotAuthorized);
            }
        }
        if let Some(held) = self.clients.get(client_id)
            && held.conn != conn
            && !admission::may_take_over((held.role, &held.identity), (role, identity))
        {
            return Err(Refusal::NotAuthorized);
        }
        if role == Role::Claimant {
            let claimed = self
                .clients
                .values()
                .filter(|h| h.role == Role::Claimant && h.identity == identity && h.conn != conn)
                .count();
            if claimed >= self.config.max_claim_connections {
                return Err(Refusal::QuotaExceeded);
            }
        }
        self.clients.insert(
            client_id.to_string(),
            Held {
                conn,
                role,
                identity: identity.to_string(),
                fingerprint: cert.fingerprint.clone(),
                provisioned: cert.provisioned,
            },
        );
        Ok(role)
    }

    /// Connection `conn`, which held `client_id`, is gone (a connection
    /// that took the id over keeps it).
    pub fn disconnected(&mut self, conn: usize, client_id: &str) {
        if self.clients.get(client_id).is_some_and(|h| h.conn == conn) {
            self.clients.remove(client_id);
        }
    }

    /// The role of the connection holding `client_id`.
    pub fn role_of(&self, client_id: &str) -> Option<Role> {
        self.clients.get(client_id).map(|h| h.role)
    }

    /// The client ids of connected devices that the roster no longer
    /// admits: they are to be disconnected.
    pub fn no_longer_admitted(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, h)| h.role == Role::Device)
            .filter(|(_, h)| {
                !self.roster.as_ref().is_some_and(|r| {
                    r.standing(&h.identity, &h.fingerprint)
                        .admits(&h.identity, h.provisioned)
                })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether the client holding `client_id` may publish on `topic` with
    /// these retain flag and response topic. Backends may do anything;
    /// others give response topics only under `{prefix}/clients/{client
    /// id}/` (a device also its own thing's reply topics), and retain nothing on a reserved topic (it would be replayed
    /// to the services at each of their reconnections).
    pub fn may_publish(
        &self,
        client_id: &str,
        topic: &str,
        retain: bool,
        response_topic: Option<&str>,
    ) -> bool {
        if self.role_of(client_id) == Some(Role::Backend) {
            return true;
        }
        let prefix = self.config.prefix.as_str();
        if retain
            && topic
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('/'))
        {
            return false;
        }
        let device = self.role_of(client_id) == Some(Role::Device);
        response_topic.is_none_or(|r| {
            admission::is_own_response_topic(prefix, client_id, r)
                || (device && admission::is_own_reply_topic(prefix, client_id, r))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gate(roster: &str, claims: &str) -> (Gate, tempfile_dir::Dir) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("roster");
        std::fs::write(&path, roster).unwrap();
        let config = Config::from_options([
            ("roster", path.to_str().unwrap()),
            ("claim_identities", claims),
            ("max_claim_connections", "2"),
        ])
        .unwrap();
        (Gate::new(config), dir)
    }

    /// A directory removed when dropped (no extra dependency for it).
    mod tempfile_dir {
        pub(super) struct Dir(pub(super) std::path::PathBuf);
        impl Dir {
            pub(super) fn new() -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "fleet-plugin-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn cert(cn: &str, provisioned: bool, fp: &str) -> Presented {
        Presented {
            common_name: cn.into(),
            provisioned,
            fingerprint: fp.into(),
        }
    }

    const ROSTER: &str = "fleet-roster 1
thing p1 enabled
thing p2 enabled
thing off disabled
certificate aa p1 active
certificate bb p2 revoked
certificate cc p2 active
";

    #[test]
    fn options_are_checked() {
        assert!(
            Config::from_options([("prefix", "$aws")]).is_err(),
            "roster required"
        );
        assert!(Config::from_options([("roster", "r"), ("claim_identities", "nope")]).is_err());
        assert!(Config::from_options([("roster", "r"), ("colour", "red")]).is_err());
        assert!(Config::from_options([("roster", "r"), ("max_claim_connections", "x")]).is_err());
        let c = Config::from_options([("roster", "r"), ("claim_identities", "a@b, c@d")]).unwrap();
        assert_eq!(c.claim_identities, ["a@b", "c@d"]);
        assert_eq!(c.backend_identities, ["fleet-backend"]);
    }

    #[test]
    fn devices_connect_as_themselves_with_a_standing_certificate() {
        let (mut g, _d) = gate(ROSTER, "");
        assert_eq!(g.admit(1, &cert("p1", false, "aa"), "p1"), Ok(Role::Device));
        assert_eq!(
            g.admit(2, &cert("p1", false, "aa"), "p2"),
            Err(Refusal::NotAuthorized),
            "another's client id"
        );
        assert_eq!(
            g.admit(2, &cert("p2", false, "bb"), "p2"),
            Err(Refusal::NotAuthorized),
            "revoked"
        );
        assert_eq!(g.admit(2, &cert("p2", false, "zz"), "p2"), Ok(Role::Device));
        assert_eq!(
            g.admit(3, &cert("off", false, "zz"), "off"),
            Err(Refusal::NotAuthorized),
            "disabled"
        );
        assert_eq!(
            g.admit(3, &cert("ghost", false, "zz"), "ghost"),
            Err(Refusal::NotAuthorized),
            "not in the registry"
        );
        // Provisioned: only once bound, whatever the name.
        assert_eq!(
            g.admit(4, &cert("p1", true, "unbound"), "p1"),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            g.admit(4, &cert("fleet-backend", true, "unbound"), "x"),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(g.admit(4, &cert("p2", true, "cc"), "p2"), Ok(Role::Device));
        // A device reconnecting takes its id over.
        assert_eq!(g.admit(5, &cert("p1", false, "aa"), "p1"), Ok(Role::Device));
    }

    #[test]
    fn claimants_and_backends_keep_their_ids() {
        let (mut g, _d) = gate(ROSTER, "c@f");
        let claim = cert("c@f", false, "ff");
        let backend = cert("fleet-backend", false, "ee");
        assert_eq!(g.admit(1, &backend, "fleet-cloud"), Ok(Role::Backend));
        assert_eq!(
            g.admit(2, &claim, "fleet-cloud"),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(g.admit(2, &claim, "c1"), Ok(Role::Claimant));
        assert_eq!(g.admit(3, &claim, "c1"), Err(Refusal::NotAuthorized));
        assert_eq!(g.admit(3, &claim, "c2"), Ok(Role::Claimant));
        assert_eq!(g.admit(4, &claim, "c3"), Err(Refusal::QuotaExceeded));
        // The first claimant leaves: its id and its share are free again.
        g.disconnected(2, "c1");
        assert_eq!(g.admit(4, &claim, "c1"), Ok(Role::Claimant));
        // A stale disconnect (of a connection taken over) frees nothing.
        g.disconnected(99, "c1");
        assert_eq!(g.admit(5, &claim, "c1"), Err(Refusal::NotAuthorized));
        // A backend reclaims its id from a claimant.
        g.disconnected(1, "fleet-cloud");
        assert_eq!(
            g.admit(6, &claim, "fleet-cloud"),
            Err(Refusal::QuotaExceeded)
        );
        g.disconnected(3, "c2");
        assert_eq!(g.admit(6, &claim, "fleet-cloud"), Ok(Role::Claimant));
        assert_eq!(g.admit(7, &backend, "fleet-cloud"), Ok(Role::Backend));
    }

    #[test]
    fn a_changed_roster_is_read_and_disconnects_who_it_no_longer_admits() {
        let (mut g, d) = gate(ROSTER, "");
        assert_eq!(g.admit(1, &cert("p1", false, "aa"), "p1"), Ok(Role::Device));
        assert_eq!(g.refresh(), Ok(false));
        assert!(g.no_longer_admitted().is_empty());
        let path = d.0.join("roster");
        let tmp = d.0.join("roster.new");
        std::fs::write(
            &tmp,
            ROSTER.replace("thing p1 enabled", "thing p1 disabled"),
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(g.refresh(), Ok(true));
        assert_eq!(g.no_longer_admitted(), ["p1"]);
        // Unreadable: no device is admitted.
        std::fs::write(&path, "garbage").unwrap();
        assert!(g.refresh().is_err());
        assert_eq!(
            g.admit(2, &cert("p2", false, "cc"), "p2"),
            Err(Refusal::NotAuthorized)
        );
        std::fs::remove_file(&path).unwrap();
        assert!(g.refresh().is_ok(), "reported once");
    }

    #[test]
    fn replies_only_to_the_own_namespace_and_no_retained_requests() {
        let (mut g, _d) = gate(ROSTER, "c@f");
        g.admit(1, &cert("c@f", false, "ff"), "c1").unwrap();
        g.admit(2, &cert("fleet-backend", false, "ee"), "b")
            .unwrap();
        let csr = "$aws/certificates/create-from-csr/json";
        assert!(g.may_publish("c1", csr, false, None));
        assert!(g.may_publish("c1", csr, false, Some("$aws/clients/c1/x")));
        for bad in [
            "$aws/clients/c2/x",
            "$aws/clients/c1",
            "$aws/clients/c1/",
            "$aws/clients/c1/+",
            "$aws/things/p1/shadow/get/accepted",
        ] {
            assert!(!g.may_publish("c1", csr, false, Some(bad)), "{bad}");
        }
        assert!(!g.may_publish("c1", csr, true, None), "retained request");
        assert!(g.may_publish("c1", "dt/c1/x", true, None));
        assert!(g.may_publish("b", "$aws/things/p1/shadow/get/accepted", true, Some("x")));
        // A device may also name its own thing's reply topics (a
        // request/response client), never another's, nor a request.
        g.admit(3, &cert("p1", false, "aa"), "p1").unwrap();
        let update = "$aws/things/p1/shadow/update";
        assert!(g.may_publish(
            "p1",
            update,
            false,
            Some("$aws/things/p1/shadow/update/accepted")
        ));
        for bad in [
            "$aws/things/p2/shadow/update/accepted",
            "$aws/things/p1/shadow/update",
            "dt/p1/x",
        ] {
            assert!(!g.may_publish("p1", update, false, Some(bad)), "{bad}");
        }
        // A claimant may not, even one naming a thing's topic.
        assert!(!g.may_publish("c1", csr, false, Some("$aws/things/c1/shadow/get/accepted")));
    }

    #[test]
    fn certificates_are_read() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pump-7");
        params.distinguished_name.push(
            rcgen::DnType::OrganizationalUnitName,
            admission::PROVISIONED_UNIT,
        );
        let cert = params.self_signed(&key).unwrap();
        let p = Presented::from_der(cert.der()).unwrap();
        assert_eq!(p.common_name, "pump-7");
        assert!(p.provisioned);
        assert_eq!(p.fingerprint.len(), 64);
        assert_eq!(
            Presented::from_der(b"not a certificate"),
            Err(CertificateError)
        );
    }
}
