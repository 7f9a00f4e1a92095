//! The API's request and view types: what the routes take and answer, in
//! JSON. Public, so that a client (the `fleet` CLI among them) reads the
//! same types the server writes, and a change to the API's shape breaks the
//! client's build, not its users.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A page of a list: its items, and where the next page starts (`after`).
pub trait Paged {
    /// What the list holds.
    type Item;
    /// The items, and the `after` of the next page (`None` on the last).
    fn into_parts(self) -> (Vec<Self::Item>, Option<String>);
}

macro_rules! paged {
    ($list:ty, $item:ty) => {
        impl Paged for $list {
            type Item = $item;
            fn into_parts(self) -> (Vec<$item>, Option<String>) {
                (self.items, self.next)
            }
        }
    };
}

paged!(ThingList, ThingView);
paged!(JobList, String);
paged!(ExecutionList, ExecutionView);
paged!(AuditList, AuditView);
paged!(GroupList, GroupView);
paged!(CampaignList, CampaignSummary);
paged!(ReleaseList, ReleaseView);

/// Whether the service is up (no token needed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` (liveness), `ready` or `not ready` (readiness).
    pub status: String,
    /// Readiness: each check and what it found (`ok`, or why not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<std::collections::BTreeMap<String, String>>,
}

/// A thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ThingView {
    /// Its name.
    pub name: String,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Whether it may connect.
    pub enabled: bool,
    /// Its connection, as the broker last reported it (absent: never
    /// connected, or no fleet index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<ConnectivityView>,
}

/// A thing's connection (AWS IoT fleet indexing's connectivity fields, and
/// more).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectivityView {
    /// Whether it is connected.
    pub connected: bool,
    /// When it last connected or disconnected (ms since the Unix epoch).
    pub timestamp: u64,
    /// When its current (or last) connection began (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<u64>,
    /// When its last connection ended (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_at: Option<u64>,
    /// Why its last connection ended (`CLIENT_INITIATED_DISCONNECT`,
    /// `MQTT_KEEP_ALIVE_TIMEOUT`, `DUPLICATE_CLIENTID`, ...), while it is
    /// disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
    /// When it last sent anything (ms).
    pub last_seen: u64,
}

impl From<crate::Connectivity> for ConnectivityView {
    fn from(c: crate::Connectivity) -> Self {
        Self {
            connected: c.connected,
            timestamp: c.timestamp,
            connected_since: c.connected_since,
            disconnected_at: c.disconnected_at,
            disconnect_reason: if c.connected {
                None
            } else {
                c.disconnect_reason
            },
            last_seen: c.last_seen,
        }
    }
}

/// Counts and statistics over the things a query matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    /// Things matching.
    pub count: u64,
    /// With `groupBy`: how many of them have each value of the field, most
    /// first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<Bucket>>,
    /// With `field`: its numeric values' statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<FieldStatistics>,
}

/// Things with one value of a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Bucket {
    /// The value.
    pub value: String,
    /// How many things have it.
    pub count: u64,
}

/// A numeric field's values over the things matching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldStatistics {
    /// Values counted.
    pub count: u64,
    /// The least.
    pub min: Option<f64>,
    /// The greatest.
    pub max: Option<f64>,
    /// The mean.
    pub avg: Option<f64>,
}

/// A page of things.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ThingList {
    /// This page's things.
    pub items: Vec<ThingView>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A thing to register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateThing {
    /// Its name (`[a-zA-Z0-9:_-]{1,128}`).
    pub name: String,
    /// Its attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Attributes that replace the thing's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAttributes {
    /// The new attributes (all of them).
    pub attributes: BTreeMap<String, String>,
}

/// Whether a thing may connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetEnabled {
    /// Whether it may connect.
    pub enabled: bool,
}

/// A certificate bound to a thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CertificateView {
    /// Its id: the SHA-256 of its DER.
    pub id: String,
    /// The thing.
    pub thing: String,
    /// `active` or `revoked`.
    pub status: String,
    /// The certificate, PEM.
    pub pem: String,
}

/// A static group to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// Its name.
    pub name: String,
    /// A dynamic group: the things a fleet query finds (a string, as
    /// `GET /v1/things?q=` takes), or every thing whose attributes have
    /// these values (an object).
    #[serde(default)]
    pub query: Option<GroupQueryView>,
}

/// A group's members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupMembers {
    /// The group's name.
    pub group: String,
    /// Its members' thing names.
    pub members: Vec<String>,
}

/// A job to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateJob {
    /// Its id (`[a-zA-Z0-9_-]{1,64}`).
    pub job_id: String,
    /// The document devices receive.
    #[schema(value_type = Object)]
    pub document: Value,
    /// Things targeted.
    #[serde(default)]
    pub things: Vec<String>,
    /// Groups targeted.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Also things that join the groups later.
    #[serde(default)]
    pub continuous: bool,
    /// Minutes an execution may stay IN_PROGRESS.
    #[serde(default)]
    pub in_progress_timeout_minutes: Option<u64>,
    /// Tries again after FAILED or TIMED_OUT, this many times.
    #[serde(default)]
    pub max_retries: u32,
    /// Release the executions under a rollout policy (rate, groups with
    /// thresholds, abort criteria, retries), as fleet-core's
    /// `RolloutPolicy` in JSON; without it, all at once.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub rollout: Option<Value>,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// The job's id.
    pub job_id: String,
    /// `IN_PROGRESS`, `CANCELED` or `COMPLETED`.
    pub state: String,
    /// The document devices receive.
    #[schema(value_type = Object)]
    pub document: Value,
    /// Things targeted so far.
    pub targets: usize,
    /// Executions per status (each target's latest).
    pub executions: BTreeMap<String, usize>,
    /// Targets a rollout has not released yet.
    pub not_released: usize,
    /// Epoch seconds.
    pub created_at: u64,
}

/// A page of job ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// This page's job ids.
    pub items: Vec<String>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One thing's execution of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionView {
    /// The thing.
    pub thing: String,
    /// `QUEUED`, `IN_PROGRESS`, `SUCCEEDED`, `FAILED`, ...
    pub status: String,
    /// Which execution of the job on this thing (retries add one).
    pub execution_number: u64,
    /// The execution's version (each update raises it).
    pub version_number: u64,
    /// What the device last reported with its status.
    pub status_details: BTreeMap<String, String>,
    /// When it was queued, epoch seconds.
    pub queued_at: u64,
    /// When it last changed, epoch seconds.
    pub last_updated_at: u64,
}

/// A page of executions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecutionList {
    /// This page's executions.
    pub items: Vec<ExecutionView>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// How to cancel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    /// Also cancel executions in progress.
    #[serde(default)]
    pub force: bool,
}

/// A signed release to register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UploadRelease {
    /// Its id (`[a-zA-Z0-9_-]{1,128}`).
    pub release_id: String,
    /// The signed manifest envelope, base64.
    pub envelope: String,
    /// The image, base64 (its size and SHA-256 must be the manifest's).
    pub image: String,
}

/// A registered release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseView {
    /// The release's id.
    pub release_id: String,
    /// Bytes.
    pub size: u64,
}

/// A campaign to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StartCampaign {
    /// The campaign's id (also its job's).
    pub campaign_id: String,
    /// The release to install.
    pub release_id: String,
    /// Things targeted.
    #[serde(default)]
    pub things: Vec<String>,
    /// Groups targeted.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The rollout policy (rate, groups with thresholds, abort criteria,
    /// retries), as fleet-core's `RolloutPolicy` in JSON.
    #[schema(value_type = Object)]
    pub policy: Value,
    /// Minutes an installation may stay IN_PROGRESS.
    #[serde(default)]
    pub in_progress_timeout_minutes: Option<u64>,
}

/// Where a campaign stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignView {
    /// The campaign's id.
    pub campaign_id: String,
    /// Targets not released yet.
    pub pending: usize,
    /// Targets queued.
    pub queued: usize,
    /// Targets installing.
    pub in_progress: usize,
    /// Targets that installed and reported a verified receipt.
    pub succeeded: usize,
    /// Targets that failed.
    pub failed: usize,
    /// Targets that rolled back to their previous image.
    pub rolled_back: usize,
    /// Targets that timed out.
    pub timed_out: usize,
    /// Targets canceled.
    pub canceled: usize,
    /// Targets whose install receipt did not verify.
    pub unverified_receipt: usize,
    /// The rollout's status (`InProgress`, `Paused`, `Completed`,
    /// `Aborted: ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Nothing more will change.
    pub done: bool,
}

/// A command to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SendCommand {
    /// Which command.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Seconds to wait for the answer (default 30, at most 300).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// A device's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandResult {
    /// The command execution's id.
    pub execution_id: String,
    /// `SUCCEEDED`, `FAILED`, `REJECTED`...
    pub status: String,
    /// The device's answer.
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Why, when the device said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
}

/// A provisioning template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateView {
    /// The template's name.
    pub name: String,
    /// What the things it names start with.
    pub thing_name_prefix: String,
    /// The parameter whose value names the thing.
    pub name_parameter: String,
    /// Parameters a device must give.
    pub required_parameters: Vec<String>,
    /// Attributes the thing gets.
    pub attributes: BTreeMap<String, String>,
    /// Groups the thing joins.
    pub groups: Vec<String>,
    /// The AWS-shaped template document, for a template given as one
    /// (which then names the thing; the fields above are empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub document: Option<Value>,
    /// The pre-provisioning hook's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_hook: Option<String>,
    /// Where it is defined: `configuration` (the file `fleet serve` read;
    /// not changed through the API) or `api` (kept in the store, shared by
    /// every instance).
    pub source: String,
    /// Whether devices may register by it.
    pub enabled: bool,
    /// Whether a claimant may provision onto an existing thing.
    pub allow_replace: bool,
    /// For people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Its version (templates from the API: 1 when created, one more at
    /// each replacement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// A provisioning template to create or replace (admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PutTemplate {
    /// The AWS IoT fleet provisioning template document (`Parameters`,
    /// `Mappings`, `Resources`): a JSON object, or a string holding one
    /// as AWS's `templateBody` does.
    #[schema(value_type = Object)]
    pub template_body: Value,
    /// For people.
    #[serde(default)]
    pub description: String,
    /// Whether devices may register by it (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Whether a claimant may provision onto an existing thing (default
    /// false).
    #[serde(default)]
    pub allow_replace: bool,
    /// The pre-provisioning hook, asked before each registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_hook: Option<HookSpec>,
}

fn yes() -> bool {
    true
}

/// A pre-provisioning hook: an HTTPS webhook with AWS's pre-provisioning
/// Lambda contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HookSpec {
    /// `https://...`.
    pub url: String,
    /// The CA of the hook's server certificate, PEM (default: the Web
    /// PKI's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// How long it may take, ms (default 5,000; at most 30,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A claim identity to issue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClaim {
    /// One of the claim identities the broker admits.
    pub name: String,
}

/// A claim certificate and key, for a factory to put on devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimIdentity {
    /// The claim identity (the certificate's common name).
    pub name: String,
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The CA that signed the broker's certificate, PEM.
    pub ca_pem: String,
}

/// A token to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who or what holds it.
    pub name: String,
    /// `read`, `operator` or `admin`.
    pub scope: String,
}

/// A token (without its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    /// The token's id (not secret).
    pub id: String,
    /// Who or what holds it.
    pub name: String,
    /// `read`, `operator` or `admin`.
    pub scope: String,
    /// When it was made, epoch seconds.
    pub created_at: u64,
    /// The token itself: shown once, when created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// One change made through the API, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    /// Its position in the log (increasing).
    pub id: u64,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The id of the token that made it (never the token).
    pub token_id: String,
    /// The token's name, as it was then.
    pub token_name: String,
    /// The HTTP method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The answer's HTTP status (a refused attempt is kept too).
    pub status: u16,
    /// The request's body when it was small JSON (secrets masked), or
    /// `{"bytes": n}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    /// What the change replaced, when the API read it and it was small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
}

/// A page of the audit log, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// The entries.
    pub items: Vec<AuditView>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A thing group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    /// Its name.
    pub name: String,
    /// A dynamic group's query: a fleet query (a string), or attributes
    /// that must all match (an object); absent for a static group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<GroupQueryView>,
}

/// A dynamic group's query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum GroupQueryView {
    /// A fleet query, as `GET /v1/things?q=` takes: the group's members
    /// change as the things do.
    Search(String),
    /// Attributes: every pair must match.
    Attributes(BTreeMap<String, String>),
}

impl From<GroupQueryView> for crate::GroupQuery {
    fn from(v: GroupQueryView) -> Self {
        match v {
            GroupQueryView::Search(s) => Self::Search(s),
            GroupQueryView::Attributes(a) => Self::Attributes(a),
        }
    }
}

impl From<crate::GroupQuery> for GroupQueryView {
    fn from(v: crate::GroupQuery) -> Self {
        match v {
            crate::GroupQuery::Search(s) => Self::Search(s),
            crate::GroupQuery::Attributes(a) => Self::Attributes(a),
        }
    }
}

/// A page of groups, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupList {
    /// The groups.
    pub items: Vec<GroupView>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A campaign in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignSummary {
    /// The campaign's id (its job's).
    pub campaign_id: String,
    /// Its job's state (`IN_PROGRESS`, `COMPLETED`, `CANCELED`, ...).
    pub state: String,
    /// When it started, epoch seconds.
    pub created_at: u64,
}

/// A page of campaigns, by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CampaignList {
    /// The campaigns.
    pub items: Vec<CampaignSummary>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A page of releases, by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseList {
    /// The releases (id and image size).
    pub items: Vec<ReleaseView>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}
