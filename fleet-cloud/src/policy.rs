//! Broker policy: who may touch which topics, generated for a fleet.

use std::fmt::Write as _;
use std::path::PathBuf;

use fleet_core::topic::{Service, TopicPrefix};

/// Where a Mosquitto listener finds its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoListener {
    /// Address to bind (`127.0.0.1` keeps it local).
    pub bind: String,
    /// Port (8883 is MQTT over TLS).
    pub port: u16,
    /// The CA that signs device and backend certificates, PEM.
    pub cafile: PathBuf,
    /// The broker's certificate, PEM.
    pub certfile: PathBuf,
    /// The broker's private key, PEM.
    pub keyfile: PathBuf,
    /// The ACL file written from [`BrokerPolicy::mosquitto_acl`].
    pub acl_file: PathBuf,
    /// Where Mosquitto keeps sessions and queued messages; `None`: in memory.
    pub persistence_dir: Option<PathBuf>,
    /// The user Mosquitto runs as when started as root (it reads the key
    /// files after switching). `None`: Mosquitto's default, `mosquitto`.
    pub run_as_user: Option<String>,
    /// `fleet-mosquitto-plugin`, which admits clients by the fleet's rules
    /// (a device only as its own thing, with a certificate the registry
    /// binds; claimants never take another's client id; replies only to
    /// the requester's namespace). `None`: Mosquitto knows a client by its
    /// common name and ACL only (see SECURITY.md for what that leaves
    /// open).
    pub plugin: Option<MosquittoPlugin>,
}

/// Where Mosquitto finds `fleet-mosquitto-plugin` and the roster it admits
/// by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoPlugin {
    /// The plugin's shared library (`libfleet_mosquitto_plugin.so`).
    pub library: PathBuf,
    /// The roster file `fleet serve --mosquitto-roster` keeps current.
    pub roster: PathBuf,
}

/// The access rules of a fleet, written out for a broker.
///
/// - A device authenticates with a client certificate whose common name is
///   its thing name (Mosquitto: `use_identity_as_username`), and may touch
///   only topics that carry its own name: it publishes requests and reads
///   replies, and never publishes a reply (that would forge the service's
///   answers to itself).
/// - A backend identity may touch everything.
/// - A claim identity (a certificate shared by devices in a factory, used
///   only to provision) may publish provisioning requests and read replies
///   on its own client's response topics, and nothing else. Claim identities'
///   common names must contain `@`, which no thing name can, so the
///   per-thing rules match no real thing for them.
///
/// ```
/// let acl = fleet_cloud::BrokerPolicy::default().mosquitto_acl();
/// assert!(acl.contains("pattern write $aws/things/%u/shadow/update\n"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerPolicy {
    /// Topic prefix of the protocol, `$aws` by default.
    pub prefix: String,
    /// Topic prefix of device telemetry: devices publish under
    /// `{telemetry_prefix}/{thing}/...`. `dt` by default.
    pub telemetry_prefix: String,
    /// Common names of the privileged backend identities.
    pub backend_identities: Vec<String>,
    /// Common names of claim identities (each contains `@`).
    pub claim_identities: Vec<String>,
    /// Identities refused everything: disabled things, and things whose
    /// certificates are all revoked ([`Registry::denied_identities`](crate::Registry::denied_identities)).
    /// Mosquitto re-reads the ACL on SIGHUP and applies it to connected
    /// clients too.
    pub denied_identities: Vec<String>,
    /// Claim identities may subscribe to AWS's provisioning reply topics
    /// (`.../create-from-csr/json/accepted`, ...), as AWS SDK devices do.
    /// Only safe with the embedded broker, which delivers a reply there only
    /// to the client that asked (it routes replies like AWS IoT does); with
    /// it off, such clients must use an MQTT 5 response topic.
    /// [`try_mosquitto_acl`](Self::try_mosquitto_acl) refuses it.
    pub reply_routing: bool,
}

/// The backend identity of the default policy.
pub const DEFAULT_BACKEND_IDENTITY: &str = "fleet-backend";

impl Default for BrokerPolicy {
    fn default() -> Self {
        Self {
            prefix: "$aws".into(),
            telemetry_prefix: "dt".into(),
            backend_identities: vec![DEFAULT_BACKEND_IDENTITY.into()],
            claim_identities: Vec::new(),
            denied_identities: Vec::new(),
            reply_routing: false,
        }
    }
}

/// A policy that cannot be written safely.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    /// A claim identity's name has no `@`, so it could be a thing's name.
    ClaimNameCouldBeAThing(String),
    /// A name holds a character that would change the ACL's meaning
    /// (whitespace, `+`, `#`, a line break).
    UnsafeName(String),
    /// [`BrokerPolicy::reply_routing`] needs the embedded broker: Mosquitto
    /// would show one claimant's replies to every other.
    ReplyRoutingNeedsTheEmbeddedBroker,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClaimNameCouldBeAThing(n) => {
                write!(
                    f,
                    "claim identity {n:?} must contain '@' so that it can never be a thing name"
                )
            }
            Self::UnsafeName(n) => write!(f, "{n:?} cannot be written into a broker policy"),
            Self::ReplyRoutingNeedsTheEmbeddedBroker => f.write_str(
                "reply routing would let every claimant read provisioning replies on Mosquitto",
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

impl BrokerPolicy {
    /// Checks the names, then writes the policy as a Mosquitto ACL file.
    pub fn try_mosquitto_acl(&self) -> Result<String, PolicyError> {
        self.validate()?;
        if self.reply_routing {
            return Err(PolicyError::ReplyRoutingNeedsTheEmbeddedBroker);
        }
        Ok(self.mosquitto_acl())
    }

    /// Checks that every name can be used in rules safely: no wildcard or
    /// whitespace in a name, an `@` in every claim identity.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let unsafe_name = |n: &str| {
            n.is_empty() || n.contains(|c: char| c.is_whitespace() || matches!(c, '+' | '#'))
        };
        for n in self
            .backend_identities
            .iter()
            .chain(&self.claim_identities)
            .chain(&self.denied_identities)
            .chain([&self.prefix, &self.telemetry_prefix])
        {
            if unsafe_name(n) {
                return Err(PolicyError::UnsafeName(n.clone()));
            }
        }
        if let Some(n) = self.claim_identities.iter().find(|n| !n.contains('@')) {
            return Err(PolicyError::ClaimNameCouldBeAThing(n.clone()));
        }
        Ok(())
    }

    /// A Mosquitto configuration that enforces this policy: mutual TLS
    /// required, the certificate's common name as the user name, no
    /// anonymous clients, TLS 1.2 at least, and the ACL file.
    pub fn mosquitto_conf(&self, l: &MosquittoListener) -> String {
        let mut conf = String::from("# Generated by fleet-cloud. Do not edit: regenerate.\n");
        conf.push_str("per_listener_settings false\nallow_anonymous false\n");
        // AWS IoT's limit; the backend accepts more, so nothing a device
        // may send can be refused by it.
        conf.push_str("max_packet_size 131072\n");
        // The backend's persistent session keeps what comes while it is
        // away; Mosquitto's default of 1,000 queued messages would drop the
        // rest, though the devices were told it arrived.
        conf.push_str("max_queued_messages 100000\n");
        // AWS IoT's longest keep-alive, as the embedded broker grants: a
        // client asking for more (or for none) gets this as the server
        // keep-alive (MQTT 5), or is refused (3.1.1).
        conf.push_str("max_keepalive 1200\n");
        if let Some(user) = &l.run_as_user {
            let _ = writeln!(conf, "user {user}");
        }
        let _ = writeln!(conf, "acl_file {}", l.acl_file.display());
        if let Some(plugin) = &l.plugin {
            let _ = writeln!(conf, "plugin {}", plugin.library.display());
            let _ = writeln!(conf, "plugin_opt_roster {}", plugin.roster.display());
            let _ = writeln!(
                conf,
                "plugin_opt_backend_identities {}",
                self.backend_identities.join(",")
            );
            if !self.claim_identities.is_empty() {
                let _ = writeln!(
                    conf,
                    "plugin_opt_claim_identities {}",
                    self.claim_identities.join(",")
                );
            }
            let _ = writeln!(conf, "plugin_opt_prefix {}", self.prefix);
        }
        match &l.persistence_dir {
            Some(dir) => {
                let _ = writeln!(
                    conf,
                    "persistence true\npersistence_location {}/",
                    dir.display()
                );
            }
            None => conf.push_str("persistence false\n"),
        }
        let _ = writeln!(conf, "\nlistener {} {}", l.port, l.bind);
        conf.push_str("protocol mqtt\n");
        let _ = writeln!(conf, "cafile {}", l.cafile.display());
        let _ = writeln!(conf, "certfile {}", l.certfile.display());
        let _ = writeln!(conf, "keyfile {}", l.keyfile.display());
        conf.push_str("tls_version tlsv1.2\nrequire_certificate true\n");
        // With the plugin, it sets the user name to the common name once it
        // has admitted the client: Mosquitto skips plugins' authentication
        // for a listener that takes the identity as the user name.
        if l.plugin.is_none() {
            conf.push_str("use_identity_as_username true\n");
        }
        conf
    }

    /// The policy as a Mosquitto ACL file (names unchecked; see
    /// [`try_mosquitto_acl`](Self::try_mosquitto_acl)).
    pub fn mosquitto_acl(&self) -> String {
        let mut acl = String::from("# Generated by fleet-cloud. Do not edit: regenerate.\n");
        // `pattern` lines apply to every client; `%u` is the certificate's
        // common name, `%c` the client id. A thing name never holds `/`, `+`
        // or `#`, so `%u` cannot widen a pattern.
        for block in self.rules() {
            let _ = writeln!(acl, "\n# {}", block.comment);
            if let Who::User(user) = &block.who {
                let _ = writeln!(acl, "user {user}");
            }
            for (access, topic) in &block.rules {
                let kind = match block.who {
                    Who::Anyone => "pattern",
                    Who::User(_) => "topic",
                };
                let _ = writeln!(acl, "{kind} {} {topic}", access.as_str());
            }
        }
        acl
    }

    /// Whether a client may do `access` on `topic` (a topic name for
    /// [`Access::Write`], a topic filter for [`Access::Read`]: a subscription
    /// is allowed only if every topic it can match is readable).
    ///
    /// This evaluates the same rules as [`mosquitto_acl`](Self::mosquitto_acl)
    /// writes, with Mosquitto's meaning: a matching `deny` wins, otherwise
    /// any matching rule that grants the access allows it. The embedded
    /// broker enforces it.
    ///
    /// ```
    /// use fleet_cloud::{Access, BrokerPolicy};
    /// let p = BrokerPolicy::default();
    /// assert!(p.allows("pump-1", "pump-1", Access::Write, "$aws/things/pump-1/shadow/update"));
    /// assert!(!p.allows("pump-1", "pump-1", Access::Write, "$aws/things/pump-2/shadow/update"));
    /// assert!(!p.allows("pump-1", "pump-1", Access::Read, "$aws/things/+/shadow/update/accepted"));
    /// ```
    pub fn allows(&self, identity: &str, client_id: &str, access: Access, topic: &str) -> bool {
        self.compile().allows(identity, client_id, access, topic)
    }

    /// The rules, built once, for checking many requests (what the
    /// embedded broker keeps).
    pub fn compile(&self) -> CompiledPolicy {
        CompiledPolicy {
            blocks: self.rules(),
            policy: self.clone(),
        }
    }

    fn rules(&self) -> Vec<RuleBlock> {
        use Access::{Deny, Read, ReadWrite, Write};
        let p = &self.prefix;
        let t = &self.telemetry_prefix;
        let mut device = Vec::new();
        // The protocol's topics, from fleet-core: a device writes its own
        // requests and reads what is sent to it (`%u`: its user name).
        if let Ok(prefix) = TopicPrefix::new(p) {
            for service in [
                Service::Shadows,
                Service::Jobs,
                Service::Streams,
                Service::Commands,
            ] {
                device.extend(
                    service
                        .requests_of(&prefix, "%u")
                        .into_iter()
                        .map(|f| (Write, f)),
                );
                device.extend(
                    service
                        .device_filters(&prefix, "%u")
                        .into_iter()
                        .map(|f| (Read, f)),
                );
            }
            // Replies meant for one connection only (provisioning secrets)
            // go to its own response topics.
            device.push((Read, fleet_core::topic::client_namespace(&prefix, "%c")));
            // Provisioning by claim without a response topic (MQTT 3.1.1
            // through Mosquitto): requests and replies under the
            // connection's own user name and client id. Anyone may write
            // there; the service answers only a claim identity.
            for f in Service::Provisioning.request_filters() {
                if let Some(rest) = f.strip_prefix("claims/+/+/") {
                    device.push((Write, format!("{p}/claims/%u/%c/{rest}")));
                }
            }
            device.push((Read, format!("{p}/claims/%u/%c/#")));
        }
        device.push((Write, format!("{t}/%u/#")));
        // Its own presence (a retained birth and last will, outside the
        // reserved prefix, which keeps no retained message): written, not
        // read.
        device.push((
            Write,
            format!("{}/things/%u/presence", fleet_core::presence::PREFIX),
        ));
        let mut blocks = vec![RuleBlock {
            comment: "Devices: only their own topics. Requests out, replies in.",
            who: Who::Anyone,
            rules: device,
        }];
        for denied in &self.denied_identities {
            blocks.push(RuleBlock {
                comment: "Denied identity: disabled, or every certificate revoked.",
                who: Who::User(denied.clone()),
                rules: vec![(Deny, format!("{p}/#")), (Deny, "#".into())],
            });
        }
        for claim in &self.claim_identities {
            let mut rules = Vec::new();
            if let Ok(prefix) = TopicPrefix::new(p) {
                let provisioning = Service::Provisioning;
                // (Its own `claims/%u/%c/` namespace is a pattern above.)
                let own = format!("{p}/claims/");
                rules.extend(
                    provisioning
                        .filters(&prefix)
                        .into_iter()
                        .filter(|f| !f.starts_with(&own))
                        .map(|f| (Write, f)),
                );
                if self.reply_routing {
                    let replies = provisioning.device_filters(&prefix, "%u");
                    rules.extend(replies.into_iter().map(|f| (Read, f)));
                }
            }
            blocks.push(RuleBlock {
                comment: "Claim identity: provisioning requests only.",
                who: Who::User(claim.clone()),
                rules,
            });
        }
        for backend in &self.backend_identities {
            // `#` does not match topics that start with `$`, so the prefix
            // and shared subscriptions get lines of their own.
            blocks.push(RuleBlock {
                comment: "Backend identity: everything.",
                who: Who::User(backend.clone()),
                rules: vec![
                    (ReadWrite, format!("{p}/#")),
                    (Read, "$share/#".into()),
                    (ReadWrite, "#".into()),
                ],
            });
        }
        blocks
    }
}

/// A [`BrokerPolicy`] with its rules built, checked without allocating.
pub struct CompiledPolicy {
    policy: BrokerPolicy,
    blocks: Vec<RuleBlock>,
}

impl std::fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CompiledPolicy").field(&self.policy).finish()
    }
}

impl CompiledPolicy {
    /// The policy it was built from.
    pub fn policy(&self) -> &BrokerPolicy {
        &self.policy
    }

    /// As [`BrokerPolicy::allows`].
    pub fn allows(&self, identity: &str, client_id: &str, access: Access, topic: &str) -> bool {
        // A name that could widen a pattern gets nothing.
        let unsafe_name = |n: &str| n.is_empty() || n.contains(['/', '+', '#']);
        if unsafe_name(identity) || unsafe_name(client_id) {
            return false;
        }
        let names = Names {
            identity,
            client_id,
        };
        let mut allowed = false;
        for block in &self.blocks {
            if let Who::User(user) = &block.who
                && user != identity
            {
                continue;
            }
            for (rule, pattern) in &block.rules {
                match rule {
                    Access::Deny if overlaps(topic, pattern, names) => return false,
                    Access::Deny => {}
                    _ if rule.grants(access) => allowed |= covers(pattern, topic, names),
                    _ => {}
                }
            }
        }
        allowed
    }
}

/// What `%u` and `%c` stand for in a pattern level.
#[derive(Clone, Copy)]
struct Names<'a> {
    identity: &'a str,
    client_id: &'a str,
}

impl Names<'_> {
    fn level<'p>(&self, pattern_level: &'p str) -> &'p str
    where
        Self: 'p,
    {
        match pattern_level {
            "%u" => self.identity,
            "%c" => self.client_id,
            l => l,
        }
    }
}

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// Subscribe to a filter, or receive a message.
    Read,
    /// Publish.
    Write,
    /// Both (a rule only).
    ReadWrite,
    /// Neither, whatever other rules say (a rule only).
    Deny,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::ReadWrite => "readwrite",
            Self::Deny => "deny",
        }
    }

    fn grants(self, wanted: Access) -> bool {
        self == wanted || (self == Self::ReadWrite && matches!(wanted, Self::Read | Self::Write))
    }
}

enum Who {
    Anyone,
    User(String),
}

struct RuleBlock {
    comment: &'static str,
    who: Who,
    rules: Vec<(Access, String)>,
}

/// Whether every topic matched by `filter` (a topic name is a filter that
/// matches itself) is matched by `pattern`.
fn covers(pattern: &str, filter: &str, names: Names<'_>) -> bool {
    if filter.starts_with('$') != pattern.starts_with('$') {
        return false;
    }
    let mut p = pattern.split('/').map(|l| names.level(l));
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(pl), Some(fl)) if pl == fl && pl != "+" && fl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic is matched by both `filter` and `pattern`.
fn overlaps(filter: &str, pattern: &str, names: Names<'_>) -> bool {
    if filter.starts_with('$') != pattern.starts_with('$') {
        return false;
    }
    let mut p = pattern.split('/').map(|l| names.level(l));
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(a), Some(b)) if a == "+" || b == "+" || a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_rules_never_leave_the_device_subtree() {
        let acl = BrokerPolicy::default().mosquitto_acl();
        for line in acl.lines().filter(|l| l.starts_with("pattern")) {
            assert!(
                line.contains("/things/%u/")
                    || line.contains("dt/%u/")
                    || line.contains("/clients/%c/")
                    || line.contains("/claims/%u/%c/"),
                "{line}"
            );
        }
        assert!(acl.contains("user fleet-backend\ntopic readwrite $aws/#\n"));
    }

    #[test]
    fn evaluation_matches_the_acl_meaning() {
        let p = BrokerPolicy {
            claim_identities: vec!["claim@f1".into()],
            denied_identities: vec!["gone".into()],
            ..BrokerPolicy::default()
        };
        let yes = |id: &str, a, t: &str| assert!(p.allows(id, id, a, t), "{id} {a:?} {t}");
        let no = |id: &str, a, t: &str| assert!(!p.allows(id, id, a, t), "{id} {a:?} {t}");
        yes("t1", Access::Write, "$aws/things/t1/shadow/name/cfg/update");
        yes("t1", Access::Read, "$aws/things/t1/shadow/#");
        yes("t1", Access::Read, "$aws/things/t1/jobs/+/update/accepted");
        yes("t1", Access::Write, "dt/t1/temp");
        yes("t1", Access::Read, "$aws/clients/t1/x");
        no("t1", Access::Read, "$aws/things/t2/shadow/update/accepted");
        no("t1", Access::Read, "$aws/things/+/shadow/update/accepted");
        no("t1", Access::Read, "$aws/things/t1/#");
        no("t1", Access::Read, "#");
        no("t1", Access::Write, "$aws/things/t1/shadow/update/accepted");
        no("t1", Access::Write, "$aws/things/t1/shadow/update/#");
        no("t1", Access::Read, "dt/t1/temp");
        // Wildcards in a name would widen a pattern.
        no("t1/+", Access::Write, "$aws/things/t1/+/shadow/update");
        no("+", Access::Write, "dt/+/x");
        yes(
            "claim@f1",
            Access::Write,
            "$aws/certificates/create-from-csr/json",
        );
        no(
            "claim@f1",
            Access::Read,
            "$aws/certificates/create-from-csr/json/accepted",
        );
        no("claim@f1", Access::Write, "$aws/things/t1/shadow/update");
        // Its own claim topics (MQTT 3.1.1 provisioning through Mosquitto):
        // under its user name and client id only.
        let claims = "$aws/claims/claim@f1/c-1";
        for (client, topic, access, want) in [
            (
                "c-1",
                "certificates/create-from-csr/json",
                Access::Write,
                true,
            ),
            (
                "c-1",
                "provisioning-templates/factory/json",
                Access::Write,
                true,
            ),
            ("c-1", "#", Access::Read, true),
            (
                "c-2",
                "certificates/create-from-csr/json",
                Access::Write,
                false,
            ),
            ("c-2", "#", Access::Read, false),
            (
                "c-1",
                "certificates/create-from-csr/json/accepted",
                Access::Write,
                false,
            ),
        ] {
            assert_eq!(
                p.allows("claim@f1", client, access, &format!("{claims}/{topic}")),
                want,
                "{client} {access:?} {topic}"
            );
        }
        assert!(!p.allows("claim@f1", "c-1", Access::Read, "$aws/claims/#"));
        assert!(!p.allows(
            "claim@f1",
            "c-1",
            Access::Write,
            "$aws/claims/other@f/c-1/certificates/create/json"
        ));
        yes("fleet-backend", Access::Read, "$aws/things/+/shadow/+");
        yes(
            "fleet-backend",
            Access::Read,
            "$share/g/$aws/things/+/shadow/+",
        );
        yes("fleet-backend", Access::Write, "anything/at/all");
        no("gone", Access::Write, "$aws/things/gone/shadow/update");
        no(
            "gone",
            Access::Read,
            "$aws/things/gone/shadow/update/accepted",
        );
        no("gone", Access::Write, "dt/gone/x");
    }

    #[test]
    fn unsafe_names_are_refused() {
        let mut p = BrokerPolicy {
            claim_identities: vec!["factory-1".into()],
            ..BrokerPolicy::default()
        };
        assert_eq!(
            p.try_mosquitto_acl(),
            Err(PolicyError::ClaimNameCouldBeAThing("factory-1".into()))
        );
        p.claim_identities = vec!["claim@factory-1".into()];
        assert!(
            p.try_mosquitto_acl()
                .unwrap()
                .contains("user claim@factory-1\n")
        );
        p.backend_identities = vec!["evil\ntopic readwrite #".into()];
        assert!(matches!(
            p.try_mosquitto_acl(),
            Err(PolicyError::UnsafeName(_))
        ));
    }
}
