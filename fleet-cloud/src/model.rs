//! What the stores keep and the services share: the records that are
//! neither a store's nor a service's own (a service writes them, every
//! store keeps them, the API shows them): jobs, and the registry's things,
//! certificates, tokens and ownership tokens.

use std::collections::{BTreeMap, BTreeSet};

use fleet_core::jobs::{RolloutControl, RolloutPolicy, RolloutStatus, Target, TimeoutConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a job picks its things.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TargetSelection {
    /// The things in the targets when the job is created.
    Snapshot,
    /// Also things that join a target group later.
    Continuous,
}

/// What a job is: its document, whom it is for, and its rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// The job's id (`[a-zA-Z0-9_-]{1,64}`).
    pub job_id: String,
    /// The document devices receive.
    pub document: Value,
    /// Things targeted by name.
    pub things: Vec<String>,
    /// Thing groups targeted (static or dynamic).
    pub groups: Vec<String>,
    /// Snapshot or continuous.
    pub selection: TargetSelection,
    /// The in-progress timeout.
    pub timeouts: TimeoutConfig,
    /// How many times an execution that ends FAILED or TIMED_OUT is
    /// queued again (0: never). A rollout's own retry policy replaces it.
    pub max_retries: u32,
    /// Release the targets under this policy (rate, groups with
    /// thresholds, abort criteria, retries) instead of all at once. Targets
    /// are released in order: the things as listed, then the groups'
    /// members.
    #[serde(default)]
    pub rollout: Option<RolloutPolicy>,
}

/// A rollout's persisted state: every decision the controller took, so
/// that a restarted service goes on where it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// The targets, in release order.
    pub order: Vec<String>,
    /// Each target as the planner sees it.
    pub targets: Vec<Target>,
    /// Groups opened, paused, aborted.
    pub control: RolloutControl,
    /// Release times in the last minute (for the rate limit).
    pub recent_releases: Vec<u64>,
    /// The rollout's status after the last decision.
    pub status: Option<RolloutStatus>,
}

/// A job's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Executions are running or may be added.
    InProgress,
    /// Canceled: no new executions; queued ones were canceled.
    Canceled,
    /// Every execution ended (snapshot jobs only).
    Completed,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// What it is.
    pub spec: JobSpec,
    /// Its state.
    pub state: JobState,
    /// The things it was queued for so far.
    pub targets: BTreeSet<String>,
    /// Retries used, per thing.
    pub retries: BTreeMap<String, u32>,
    /// Epoch seconds.
    pub created_at: u64,
    /// The rollout, for a job with a rollout policy.
    #[serde(default)]
    pub rollout: Option<RolloutState>,
}

/// A registered thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thing {
    /// Its name.
    pub name: String,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Disabled things may not connect (see [`Registry::denied_identities`](crate::Registry::denied_identities)).
    pub enabled: bool,
}

/// The status of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    /// It may be used.
    Active,
    /// It may no longer be used.
    Revoked,
}

/// A certificate bound to a thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Its id (the caller's choice: the SHA-256 fingerprint, say).
    pub id: String,
    /// The thing it is bound to.
    pub thing: String,
    /// Its status.
    pub status: CertificateStatus,
    /// The certificate, PEM.
    pub pem: String,
}

/// How a dynamic group chooses its members: every attribute listed must
/// have the value given.
pub type AttributeQuery = BTreeMap<String, String>;

/// How a dynamic group chooses its members (stored as JSON: a string for a
/// search, an object for attributes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GroupQuery {
    /// A fleet query (`shadow.reported.firmware:1.2 AND
    /// attributes.site:north`): the things the fleet index finds, as they
    /// change.
    Search(String),
    /// Things whose attributes have every value given.
    Attributes(AttributeQuery),
}

impl From<AttributeQuery> for GroupQuery {
    fn from(a: AttributeQuery) -> Self {
        Self::Attributes(a)
    }
}

impl CertificateStatus {
    /// Its stored name: `ACTIVE` or `REVOKED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Revoked => "REVOKED",
        }
    }

    /// The status stored as `name` (anything but `ACTIVE` is revoked: a
    /// certificate is usable only when the store says so).
    pub fn parse(name: &str) -> Self {
        if name == "ACTIVE" {
            Self::Active
        } else {
            Self::Revoked
        }
    }
}

/// What a management API token may do; each scope includes the ones
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read everything.
    Read,
    /// Also change the fleet: things, groups, shadows, jobs, releases,
    /// campaigns, commands.
    Operator,
    /// Also certificates, claim identities and tokens.
    Admin,
}

impl Scope {
    /// Its name: `read`, `operator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// The scope named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Self::Read),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// One change made through the management API, as the audit log keeps
/// it: who (the token), what (the request, and what it changed where that
/// is small), when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// Its position in the log (assigned by the store, increasing).
    pub id: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The id of the token that made it (never the token).
    pub token_id: String,
    /// The token's name, as it was then.
    pub token_name: String,
    /// The HTTP method.
    pub method: String,
    /// The path (no query).
    pub path: String,
    /// The answer's HTTP status.
    pub status: u16,
    /// The request's body where it is small JSON (secrets masked);
    /// `{"bytes": n}` otherwise; `None` without a body.
    pub request: Option<serde_json::Value>,
    /// What it replaced, where the API read it (a thing's attributes, a
    /// shadow's state) and it is small.
    pub before: Option<serde_json::Value>,
}

/// A provisioning template created through the management API, as the
/// store keeps it (templates from the configuration file are not stored).
/// Every instance sharing the store serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredTemplate {
    /// Its name, as devices give it in `RegisterThing`'s topic.
    pub name: String,
    /// For people.
    #[serde(default)]
    pub description: String,
    /// A disabled template refuses registrations (as AWS's `enabled`).
    pub enabled: bool,
    /// The AWS IoT fleet provisioning template document (`templateBody`).
    pub document: serde_json::Value,
    /// Whether a claimant may provision onto an existing thing.
    #[serde(default)]
    pub allow_replace: bool,
    /// The pre-provisioning hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<StoredHook>,
    /// Increased by one at each replacement (1 when created).
    pub version: u64,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it was last replaced, ms since the Unix epoch.
    pub updated_ms: u64,
}

/// A stored template's pre-provisioning hook.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredHook {
    /// `https://...`.
    pub url: String,
    /// The CA of the hook's certificate, PEM (`None`: the Web PKI's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// How long the hook may take, ms.
    pub timeout_ms: u64,
}

/// A management API token's record (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Its id (the public part of the token).
    pub id: String,
    /// Who or what holds it, for people.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Epoch seconds.
    pub created_at: u64,
}

/// A management API token as the store keeps it: its record and the
/// SHA-256 of its secret (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// The record.
    pub record: TokenRecord,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
}

/// A certificate issued by provisioning that awaits its registration
/// (`RegisterThing`), kept under its ownership token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCertificate {
    /// The certificate's id (its SHA-256 fingerprint).
    pub certificate_id: String,
    /// The certificate, PEM.
    pub certificate_pem: String,
    /// Its subject's common name.
    pub common_name: String,
    /// Issued by `CreateKeysAndCertificate`: the thing is named after the
    /// certificate, whatever the template would name it.
    pub named_by_certificate: bool,
    /// Epoch seconds.
    pub expires_at: u64,
}

/// What spending an ownership token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// It was good, and is now used.
    Now,
    /// It was used before.
    Before,
    /// Unknown or expired.
    Unknown,
}

/// A thing's connection, as the fleet index keeps it (AWS IoT's
/// connectivity fields, and when it was last heard from).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Connectivity {
    /// Whether it is connected now.
    pub connected: bool,
    /// When it last connected or disconnected (ms since the Unix epoch).
    pub timestamp: u64,
    /// When its current (or last) connection began.
    pub connected_since: Option<u64>,
    /// When its last connection ended.
    pub disconnected_at: Option<u64>,
    /// Why its last connection ended, in AWS IoT's words
    /// (`CLIENT_INITIATED_DISCONNECT`, `MQTT_KEEP_ALIVE_TIMEOUT`,
    /// `DUPLICATE_CLIENTID`, `CONNECTION_LOST`, `SERVER_INITIATED_DISCONNECT`,
    /// ...).
    pub disconnect_reason: Option<String>,
    /// When it last sent anything (ms; as often as the broker reports it).
    pub last_seen: u64,
    /// The session identifier of its current (or last) connection.
    pub session: String,
}

/// Something a broker saw of a thing's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectivityEvent {
    /// It connected: `session` identifies the connection.
    Connected {
        /// The thing.
        thing: String,
        /// When (ms since the Unix epoch).
        at: u64,
        /// The connection's session identifier.
        session: String,
    },
    /// Its connection `session` ended, for `reason`.
    Disconnected {
        /// The thing.
        thing: String,
        /// When (ms).
        at: u64,
        /// The connection that ended.
        session: String,
        /// Why (AWS IoT's disconnect reason).
        reason: String,
    },
    /// It sent something.
    Seen {
        /// The thing.
        thing: String,
        /// When (ms).
        at: u64,
    },
}

impl ConnectivityEvent {
    /// The thing it is about.
    pub fn thing(&self) -> &str {
        match self {
            Self::Connected { thing, .. }
            | Self::Disconnected { thing, .. }
            | Self::Seen { thing, .. } => thing,
        }
    }
}

impl Connectivity {
    /// The broker it was connected to is gone without saying so: its
    /// connection is recorded as ended for `reason`, when it was last heard
    /// from. Whether it was connected.
    pub fn end(&mut self, reason: &str) -> bool {
        if !self.connected {
            return false;
        }
        let at = self.last_seen.max(self.timestamp);
        self.connected = false;
        self.timestamp = at;
        self.disconnected_at = Some(at);
        self.disconnect_reason = Some(reason.to_string());
        true
    }

    /// Applies `event` (events are applied in the order the broker saw
    /// them): a connect always; a disconnect only of the current
    /// connection (the end of a connection that another took over leaves
    /// the thing connected); "seen" moves `last_seen` forward only.
    pub fn apply(&mut self, event: &ConnectivityEvent) {
        match event {
            // The same connection told again (a retained birth replayed to
            // a backend that subscribed again): nothing new.
            ConnectivityEvent::Connected { at, session, .. }
                if self.connected && *session == self.session =>
            {
                self.last_seen = self.last_seen.max(*at);
            }
            ConnectivityEvent::Connected { at, session, .. } => {
                self.connected = true;
                self.timestamp = *at;
                self.connected_since = Some(*at);
                self.session = session.clone();
                self.last_seen = self.last_seen.max(*at);
            }
            ConnectivityEvent::Disconnected {
                at,
                session,
                reason,
                ..
            } => {
                self.last_seen = self.last_seen.max(*at);
                if *session != self.session && (self.connected || *at < self.timestamp) {
                    return;
                }
                // Its end told again (a retained will replayed).
                if *session == self.session && !self.connected && self.disconnected_at.is_some() {
                    return;
                }
                self.connected = false;
                self.timestamp = *at;
                self.disconnected_at = Some(*at);
                self.disconnect_reason = Some(reason.clone());
            }
            ConnectivityEvent::Seen { at, .. } => self.last_seen = self.last_seen.max(*at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(session: &str, at: u64) -> ConnectivityEvent {
        ConnectivityEvent::Connected {
            thing: "t".into(),
            at,
            session: session.into(),
        }
    }

    fn disconnected(session: &str, at: u64, reason: &str) -> ConnectivityEvent {
        ConnectivityEvent::Disconnected {
            thing: "t".into(),
            at,
            session: session.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn connectivity_follows_the_current_connection_and_ignores_replays() {
        let mut c = Connectivity::default();
        c.apply(&connected("a", 10));
        // A retained birth told again: the same connection.
        c.apply(&connected("a", 20));
        assert_eq!(
            (c.connected, c.connected_since, c.last_seen),
            (true, Some(10), 20)
        );
        // Taken over by b; a's late end leaves it connected.
        c.apply(&connected("b", 30));
        c.apply(&disconnected("a", 31, "DUPLICATE_CLIENTID"));
        assert_eq!((c.connected, c.connected_since), (true, Some(30)));
        c.apply(&disconnected("b", 40, "CONNECTION_LOST"));
        // A retained will told again: the same end.
        c.apply(&disconnected("b", 50, "CONNECTION_LOST"));
        assert_eq!(
            (
                c.connected,
                c.disconnected_at,
                c.disconnect_reason.as_deref(),
                c.last_seen
            ),
            (false, Some(40), Some("CONNECTION_LOST"), 50)
        );
        // The same session connecting again (an agent's reconnection).
        c.apply(&connected("b", 60));
        assert_eq!((c.connected, c.connected_since), (true, Some(60)));
        c.apply(&ConnectivityEvent::Seen {
            thing: "t".into(),
            at: 55,
        });
        assert_eq!(c.last_seen, 60, "seen never goes back");
    }
}
