//! The subcommands that call the management API.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;

use fleet_cloud::api::ErrorBody;
use fleet_cloud::api::types::{
    AuditList, CampaignList, CampaignView, CancelJob, CertificateView, ClaimIdentity,
    CommandResult, CreateClaim, CreateGroup, CreateJob, CreateThing, CreateToken, ExecutionList,
    GroupList, GroupMembers, GroupQueryView, HookSpec, JobList, JobView, Paged, PutTemplate,
    ReleaseList, ReleaseView, SendCommand, SetAttributes, SetEnabled, StartCampaign, Statistics,
    TemplateView, ThingList, ThingView, TokenView, UploadRelease,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::Failure;

/// Where the API is and who is calling.
#[derive(Args, Clone)]
pub(crate) struct Connection {
    /// The management API.
    #[arg(
        long,
        env = "FLEET_API",
        default_value = "https://localhost:8443",
        global = true
    )]
    api: String,
    /// An API token (`fleet serve` writes an admin token to
    /// `{dir}/admin.token` on first start).
    #[arg(long, env = "FLEET_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long, env = "FLEET_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The CA that signed the API's certificate (PEM).
    #[arg(
        long = "api-ca",
        env = "FLEET_CA",
        default_value = "fleet-data/ca.pem",
        global = true
    )]
    ca: PathBuf,
    /// Print the API's JSON instead of a table (for scripts).
    #[arg(long, global = true)]
    json: bool,
}

/// `fleet thing ...`
#[derive(Subcommand)]
pub(crate) enum ThingCommand {
    /// Lists things.
    List {
        /// Items per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this thing (the `next` of a previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Registers a thing.
    Create {
        /// Its name.
        name: String,
        /// An attribute, `key=value`; repeatable.
        #[arg(long = "attribute", value_parser = key_value)]
        attributes: Vec<(String, String)>,
    },
    /// Shows a thing.
    Get {
        /// Its name.
        name: String,
    },
    /// Replaces a thing's attributes.
    SetAttributes {
        /// Its name.
        name: String,
        /// An attribute, `key=value`; repeatable.
        #[arg(long = "attribute", value_parser = key_value)]
        attributes: Vec<(String, String)>,
    },
    /// Lets a thing connect again.
    Enable {
        /// Its name.
        name: String,
    },
    /// Stops a thing from connecting.
    Disable {
        /// Its name.
        name: String,
    },
    /// Deletes a thing.
    Delete {
        /// Its name.
        name: String,
    },
    /// Lists a thing's certificates.
    Certificates {
        /// Its name.
        name: String,
    },
    /// Finds things with a query in AWS IoT fleet indexing's syntax:
    /// `thingName:pump-* AND shadow.reported.temp > 80 AND
    /// connectivity.connected:false` (fields: thingName, thingGroupNames,
    /// enabled, attributes.*, shadow.reported.*, shadow.desired.*,
    /// shadow.name.{shadow}.*, connectivity.*, jobs.{jobId}).
    Search {
        /// The query (`*`: every thing).
        query: String,
        /// Items per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this thing (the `next` of a previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Counts the things a query finds; per value of a field with
    /// `--group-by`, and a numeric field's min/max/mean with `--field`.
    Stats {
        /// The query (`*`: every thing).
        query: String,
        /// Count per value of this field (`shadow.reported.firmware`).
        #[arg(long)]
        group_by: Option<String>,
        /// Min, max and mean of this numeric field.
        #[arg(long)]
        field: Option<String>,
        /// Values of --group-by shown at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `text` with everything but unreserved characters percent-encoded (for
/// a URL's query).
fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Milliseconds since the epoch as an RFC 3339 time (UTC).
fn time_ms(ms: u64) -> String {
    i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| time::OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| {
            t.replace_nanosecond(0)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// `fleet group ...`
#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// Creates a group (static; dynamic with `--query` or `--match`).
    Create {
        /// Its name.
        name: String,
        /// Dynamic: members are things with this attribute, `key=value`;
        /// repeatable.
        #[arg(long = "match", value_parser = key_value)]
        matches: Vec<(String, String)>,
        /// Dynamic: members are the things this fleet query finds, as they
        /// change (`shadow.reported.firmware:1.2 AND attributes.site:north`);
        /// jobs and campaigns that target the group reach things that come
        /// to match, when continuous.
        #[arg(long, conflicts_with = "matches")]
        query: Option<String>,
    },
    /// Adds a thing to a static group.
    Add {
        /// The group.
        group: String,
        /// The thing.
        thing: String,
    },
    /// Lists a group's members.
    Members {
        /// The group.
        group: String,
    },
    /// Lists groups (a dynamic group with its query).
    List {
        /// Items per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this group (the `next` of a previous page).
        #[arg(long)]
        after: Option<String>,
    },
}

/// `fleet shadow ...`
#[derive(Subcommand)]
pub(crate) enum ShadowCommand {
    /// Shows a shadow.
    Get {
        /// The thing.
        thing: String,
        /// A named shadow (default: the classic one).
        #[arg(long)]
        name: Option<String>,
    },
    /// Sets desired state (a JSON object).
    Update {
        /// The thing.
        thing: String,
        /// The desired state, e.g. `{"speed": 3}`.
        desired: String,
        /// A named shadow.
        #[arg(long)]
        name: Option<String>,
        /// Only if the shadow is at this version.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Deletes a shadow.
    Delete {
        /// The thing.
        thing: String,
        /// A named shadow.
        #[arg(long)]
        name: Option<String>,
    },
}

/// `fleet job ...`
#[derive(Subcommand)]
pub(crate) enum JobCommand {
    /// Creates a job.
    Create {
        /// Its id.
        id: String,
        /// The job document (JSON), or `@file`.
        document: String,
        /// A thing targeted; repeatable.
        #[arg(long = "thing")]
        things: Vec<String>,
        /// A group targeted; repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Also things that join the groups later.
        #[arg(long)]
        continuous: bool,
        /// Tries again after FAILED or TIMED_OUT.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// Minutes an execution may stay IN_PROGRESS.
        #[arg(long)]
        timeout_minutes: Option<u64>,
        /// Release under a rollout policy (JSON, or `@file`), e.g.
        /// `{"rate":{"constant":{"perMinute":600}}}` (also `groups`, `abort`,
        /// `retry`, `inProgressTimeoutSecs`); default: all at once.
        #[arg(long)]
        rollout: Option<String>,
    },
    /// Lists jobs.
    List,
    /// Shows a job.
    Get {
        /// Its id.
        id: String,
    },
    /// Lists a job's executions.
    Executions {
        /// Its id.
        id: String,
    },
    /// Cancels a job.
    Cancel {
        /// Its id.
        id: String,
        /// Also executions in progress.
        #[arg(long)]
        force: bool,
    },
    /// Shows a job's progress until every execution ended.
    Watch {
        /// Its id.
        id: String,
    },
}

/// `fleet release ...`
#[derive(Subcommand)]
pub(crate) enum ReleaseCommand {
    /// Uploads a signed release (`fleet manifest sign` makes the envelope).
    Upload {
        /// Its id.
        id: String,
        /// The signed manifest envelope.
        #[arg(long)]
        envelope: PathBuf,
        /// The image.
        #[arg(long)]
        image: PathBuf,
    },
    /// Lists releases.
    List {
        /// Items per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this release (the `next` of a previous page).
        #[arg(long)]
        after: Option<String>,
    },
}

/// `fleet campaign ...`
#[derive(Subcommand)]
pub(crate) enum CampaignCommand {
    /// Starts a campaign of a release.
    Start {
        /// Its id.
        id: String,
        /// The release.
        #[arg(long)]
        release: String,
        /// A thing targeted, in release order; repeatable.
        #[arg(long = "thing")]
        things: Vec<String>,
        /// A group targeted; repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The rollout policy (JSON), or `@file`; default: all at once, 100
        /// a minute.
        #[arg(long)]
        policy: Option<String>,
        /// Show progress until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Lists campaigns.
    List {
        /// Items per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this campaign (the `next` of a previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Shows where a campaign stands.
    Status {
        /// Its id.
        id: String,
    },
    /// Shows progress until the campaign ends.
    Watch {
        /// Its id.
        id: String,
    },
    /// Releases no more devices until resumed.
    Pause {
        /// Its id.
        id: String,
    },
    /// Goes on after a pause.
    Resume {
        /// Its id.
        id: String,
    },
    /// Opens the next group.
    Approve {
        /// Its id.
        id: String,
    },
    /// Stops the campaign.
    Abort {
        /// Its id.
        id: String,
    },
}

/// `fleet command ...`
#[derive(Subcommand)]
pub(crate) enum CommandCommand {
    /// Sends a command and waits for the device's answer.
    Send {
        /// The thing.
        thing: String,
        /// The command.
        command: String,
        /// Its arguments (JSON).
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Seconds to wait.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// `fleet token ...`
#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Creates a token (shown once).
    Create {
        /// Who holds it.
        name: String,
        /// `read`, `operator` or `admin`.
        #[arg(long, default_value = "read")]
        scope: String,
    },
    /// Lists tokens.
    List,
    /// Revokes a token.
    Revoke {
        /// Its id.
        id: String,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected key=value"))
}

fn json_arg(text: &str) -> Result<Value, Failure> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read {path}: {e}")))?,
        None => text.to_string(),
    };
    serde_json::from_str(&text).map_err(|e| Failure::usage(format!("not JSON: {e}")))
}

/// An API client.
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    json: bool,
}

/// What every list command prints with `--json`: its items, and where the
/// next page starts (`null` on the last; pass it as `--after`).
#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
    next: Option<String>,
}

impl<T> Items<T> {
    fn all(items: Vec<T>) -> Self {
        Self { items, next: None }
    }
}

impl Client {
    pub(crate) fn new(c: &Connection) -> Result<Self, Failure> {
        let token = match (&c.token, &c.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", f.display())))?
                .trim()
                .to_string(),
            (None, None) => {
                return Err(Failure::usage(
                    "no token: pass --token, FLEET_TOKEN or --token-file",
                ));
            }
        };
        let ca = std::fs::read_to_string(&c.ca)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", c.ca.display())))?;
        let tls = fleet_cloud::tls::client_config(&ca, None)
            .map_err(|e| Failure::usage(format!("{}: {e}", c.ca.display())))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(330))
            .build()
            .map_err(|e| Failure::other(e.to_string()))?;
        Ok(Self {
            http,
            base: c.api.trim_end_matches('/').to_string(),
            token,
            json: c.json,
        })
    }

    /// Sends a request and reads the answer as `R`: the API's own view
    /// type, so that a change to its shape breaks this build, not its
    /// users. An empty answer (204) reads as JSON `null`.
    async fn request<R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<R, Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::other(format!("{}: {}", self.base, crate::chain(&e))))?;
        Self::answer(path, resp).await
    }

    /// The answer of a success as `R`, or the API's typed error as a
    /// failure.
    async fn answer<R: DeserializeOwned>(
        path: &str,
        resp: reqwest::Response,
    ) -> Result<R, Failure> {
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::other(e.to_string()))?;
        let text = if text.is_empty() { "null" } else { &text };
        if status.is_success() {
            return serde_json::from_str(text).map_err(|e| {
                Failure::other(format!(
                    "{path}: the API answered what this fleet cannot read ({e}); is it the same version?"
                ))
            });
        }
        match serde_json::from_str::<ErrorBody>(text) {
            Ok(body) => {
                let code = serde_json::to_value(body.error.code)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                Err(Failure::api(&code, body.error.message))
            }
            Err(_) => Err(Failure::api("", format!("HTTP {status}"))),
        }
    }

    /// POSTs a JSON body given as a stream.
    async fn send_body<R: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
    ) -> Result<R, Failure> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::other(format!("{}: {}", self.base, crate::chain(&e))))?;
        Self::answer(path, resp).await
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, Failure> {
        self.request(reqwest::Method::GET, path, None::<&()>).await
    }

    async fn post<R: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<R, Failure> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put<R: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<R, Failure> {
        self.request(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn delete<R: DeserializeOwned>(&self, path: &str) -> Result<R, Failure> {
        self.request(reqwest::Method::DELETE, path, None::<&()>)
            .await
    }

    /// Every item of a paged list, page after page.
    async fn all<P: Paged + DeserializeOwned>(&self, path: &str) -> Result<Vec<P::Item>, Failure> {
        let mut items = Vec::new();
        let mut after = String::new();
        loop {
            let page: P = self
                .get(&format!("{path}?limit=1000&after={after}"))
                .await?;
            let (more, next) = page.into_parts();
            items.extend(more);
            match next {
                Some(n) => after = n,
                None => return Ok(items),
            }
        }
    }

    /// Prints a list: `{"items": [...], "next": ...}` as JSON, or a table
    /// of `rows` under `headers` with a hint at the next page.
    fn show_list<T: Serialize>(
        &self,
        list: &Items<T>,
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) {
        self.show(list, |l| {
            let mut t = table(headers, l.items.iter().map(row).collect());
            if let Some(n) = &l.next {
                t.push_str(&format!("\n(more: --after {n})"));
            }
            t
        });
    }

    /// Prints `value` as JSON, or `human` for people.
    fn show<T: Serialize + ?Sized>(&self, value: &T, human: impl FnOnce(&T) -> String) {
        let text = if self.json {
            serde_json::to_string_pretty(value).unwrap_or_default()
        } else {
            human(value)
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A table with a header row, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_uppercase()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn thing_row(t: &ThingView) -> Vec<String> {
    let attrs = t
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let (connected, seen) = match &t.connectivity {
        None => ("-".to_string(), "-".to_string()),
        Some(c) if c.connected => ("yes".to_string(), time_ms(c.last_seen)),
        Some(c) => (
            format!(
                "no ({})",
                c.disconnect_reason.as_deref().unwrap_or("?").to_lowercase()
            ),
            time_ms(c.last_seen),
        ),
    };
    vec![
        t.name.clone(),
        if t.enabled { "yes".into() } else { "no".into() },
        connected,
        seen,
        attrs,
    ]
}

/// The columns of [`thing_row`].
const THING_COLUMNS: &[&str] = &["thing", "enabled", "connected", "last seen", "attributes"];

fn attributes(list: &[(String, String)]) -> BTreeMap<String, String> {
    list.iter().cloned().collect()
}

pub(crate) async fn thing(c: &Connection, cmd: ThingCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    let one = |v: &ThingView| table(THING_COLUMNS, vec![thing_row(v)]);
    match cmd {
        ThingCommand::List { limit, after } => {
            let mut path = format!("/v1/things?limit={limit}");
            if let Some(a) = after {
                path.push_str(&format!("&after={a}"));
            }
            let v: ThingList = api.get(&path).await?;
            let list = Items {
                items: v.items,
                next: v.next,
            };
            api.show_list(&list, THING_COLUMNS, thing_row);
        }
        ThingCommand::Search {
            query,
            limit,
            after,
        } => {
            let mut path = format!("/v1/things?q={}&limit={limit}", encode(&query));
            if let Some(a) = after {
                path.push_str(&format!("&after={}", encode(&a)));
            }
            let v: ThingList = api.get(&path).await?;
            let list = Items {
                items: v.items,
                next: v.next,
            };
            api.show_list(&list, THING_COLUMNS, thing_row);
        }
        ThingCommand::Stats {
            query,
            group_by,
            field,
            limit,
        } => {
            let mut path = format!("/v1/statistics?q={}&limit={limit}", encode(&query));
            if let Some(g) = &group_by {
                path.push_str(&format!("&groupBy={}", encode(g)));
            }
            if let Some(f) = &field {
                path.push_str(&format!("&field={}", encode(f)));
            }
            let v: Statistics = api.get(&path).await?;
            api.show(&v, |v| {
                let mut out = format!("{} things", v.count);
                if let (Some(g), Some(groups)) = (&group_by, &v.groups) {
                    out.push_str("\n\n");
                    out.push_str(&table(
                        &[g.as_str(), "things"],
                        groups
                            .iter()
                            .map(|b| vec![b.value.clone(), b.count.to_string()])
                            .collect(),
                    ));
                }
                if let (Some(f), Some(st)) = (&field, &v.field) {
                    let n = |x: Option<f64>| x.map_or("-".to_string(), |x| x.to_string());
                    out.push_str(&format!(
                        "\n\n{f}: count {}, min {}, max {}, mean {}",
                        st.count,
                        n(st.min),
                        n(st.max),
                        n(st.avg)
                    ));
                }
                out
            });
        }
        ThingCommand::Create {
            name,
            attributes: a,
        } => {
            let body = CreateThing {
                name,
                attributes: attributes(&a),
            };
            let v: ThingView = api.post("/v1/things", &body).await?;
            api.show(&v, one);
        }
        ThingCommand::Get { name } => {
            let v: ThingView = api.get(&format!("/v1/things/{name}")).await?;
            api.show(&v, one);
        }
        ThingCommand::SetAttributes {
            name,
            attributes: a,
        } => {
            let body = SetAttributes {
                attributes: attributes(&a),
            };
            let v: ThingView = api
                .put(&format!("/v1/things/{name}/attributes"), &body)
                .await?;
            api.show(&v, one);
        }
        ThingCommand::Enable { name } => {
            let v = set_enabled(&api, &name, true).await?;
            api.show(&v, one);
        }
        ThingCommand::Disable { name } => {
            let v = set_enabled(&api, &name, false).await?;
            api.show(&v, one);
        }
        ThingCommand::Delete { name } => {
            api.delete::<()>(&format!("/v1/things/{name}")).await?;
            api.show(&json!({"deleted": name}), |_| format!("deleted {name}"));
        }
        ThingCommand::Certificates { name } => {
            certificates(&api, &name).await?;
        }
    }
    Ok(())
}

/// Prints a thing's certificates.
async fn certificates(api: &Client, thing: &str) -> Result<(), Failure> {
    let v: Vec<CertificateView> = api.get(&format!("/v1/things/{thing}/certificates")).await?;
    api.show_list(&Items::all(v), &["certificate", "status"], |c| {
        vec![c.id.clone(), c.status.clone()]
    });
    Ok(())
}

async fn set_enabled(api: &Client, name: &str, enabled: bool) -> Result<ThingView, Failure> {
    api.put(
        &format!("/v1/things/{name}/enabled"),
        &SetEnabled { enabled },
    )
    .await
}

pub(crate) async fn group(c: &Connection, cmd: GroupCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    let members = |v: &GroupMembers| {
        let rows = v.members.iter().map(|m| vec![m.clone()]).collect();
        table(&["member"], rows)
    };
    match cmd {
        GroupCommand::Create {
            name,
            matches,
            query,
        } => {
            let query = match (query, matches.is_empty()) {
                (Some(q), true) => Some(GroupQueryView::Search(q)),
                (None, false) => Some(GroupQueryView::Attributes(attributes(&matches))),
                (None, true) => None,
                (Some(_), false) => {
                    return Err(Failure::usage("--query and --match: one or the other"));
                }
            };
            let body = CreateGroup { name, query };
            let v: GroupMembers = api.post("/v1/groups", &body).await?;
            api.show(&v, members);
        }
        GroupCommand::Add { group, thing } => {
            api.request::<Value>(
                reqwest::Method::PUT,
                &format!("/v1/groups/{group}/members/{thing}"),
                None::<&()>,
            )
            .await?;
            api.show(&json!({"group": group, "added": thing}), |_| {
                format!("added {thing} to {group}")
            });
        }
        GroupCommand::Members { group } => {
            let v: GroupMembers = api.get(&format!("/v1/groups/{group}/members")).await?;
            api.show_list(&Items::all(v.members), &["member"], |m| vec![m.clone()]);
        }
        GroupCommand::List { limit, after } => {
            let v: GroupList = api.get(&page_path("/v1/groups", limit, after)).await?;
            let list = Items {
                items: v.items,
                next: v.next,
            };
            api.show_list(&list, &["group", "query"], |g| {
                let query = g.query.as_ref().map_or_else(
                    || "(static)".to_string(),
                    |q| match q {
                        GroupQueryView::Search(s) => s.clone(),
                        GroupQueryView::Attributes(a) => a
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    },
                );
                vec![g.name.clone(), query]
            });
        }
    }
    Ok(())
}

fn shadow_path(thing: &str, name: Option<&str>) -> String {
    match name {
        None => format!("/v1/things/{thing}/shadow"),
        Some(n) => format!("/v1/things/{thing}/shadows/{n}"),
    }
}

pub(crate) async fn shadow(c: &Connection, cmd: ShadowCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    // A shadow is AWS IoT's document, read as JSON.
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match cmd {
        ShadowCommand::Get { thing, name } => {
            let v: Value = api.get(&shadow_path(&thing, name.as_deref())).await?;
            api.show(&v, pretty);
        }
        ShadowCommand::Update {
            thing,
            desired,
            name,
            version,
        } => {
            let desired = json_arg(&desired)?;
            let mut body = json!({"state": {"desired": desired}});
            if let Some(v) = version {
                body["version"] = json!(v);
            }
            let v: Value = api
                .post(&shadow_path(&thing, name.as_deref()), &body)
                .await?;
            api.show(&v, |v| {
                format!(
                    "{thing}: desired state accepted, version {}",
                    s(&v["version"])
                )
            });
        }
        ShadowCommand::Delete { thing, name } => {
            let v: Value = api.delete(&shadow_path(&thing, name.as_deref())).await?;
            api.show(&v, |_| format!("{thing}: shadow deleted"));
        }
    }
    Ok(())
}

fn counts(executions: &BTreeMap<String, usize>) -> String {
    executions
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn job_table(v: &JobView) -> String {
    table(
        &["job", "state", "targets", "executions"],
        vec![vec![
            v.job_id.clone(),
            v.state.clone(),
            v.targets.to_string(),
            counts(&v.executions),
        ]],
    )
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total.max(1));
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{{bar:30}} {{pos}}/{{len}} {what}  {{msg}}"))
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

pub(crate) async fn job(c: &Connection, cmd: JobCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    match cmd {
        JobCommand::Create {
            id,
            document,
            things,
            groups,
            continuous,
            retries,
            timeout_minutes,
            rollout,
        } => {
            let body = CreateJob {
                job_id: id,
                document: json_arg(&document)?,
                things,
                groups,
                continuous,
                in_progress_timeout_minutes: timeout_minutes,
                max_retries: retries,
                rollout: rollout.as_deref().map(json_arg).transpose()?,
            };
            let v: JobView = api.post("/v1/jobs", &body).await?;
            api.show(&v, job_table);
        }
        JobCommand::List => {
            let v = api.all::<JobList>("/v1/jobs").await?;
            api.show_list(&Items::all(v), &["job"], |j| vec![j.clone()]);
        }
        JobCommand::Get { id } => {
            let v: JobView = api.get(&format!("/v1/jobs/{id}")).await?;
            api.show(&v, job_table);
        }
        JobCommand::Executions { id } => {
            let v = api
                .all::<ExecutionList>(&format!("/v1/jobs/{id}/executions"))
                .await?;
            api.show_list(&Items::all(v), &["thing", "status", "execution"], |e| {
                vec![
                    e.thing.clone(),
                    e.status.clone(),
                    e.execution_number.to_string(),
                ]
            });
        }
        JobCommand::Cancel { id, force } => {
            let v: JobView = api
                .post(&format!("/v1/jobs/{id}/cancel"), &CancelJob { force })
                .await?;
            api.show(&v, job_table);
        }
        JobCommand::Watch { id } => {
            let bar = (!api.json).then(|| bar(0, "ended"));
            loop {
                let v: JobView = api.get(&format!("/v1/jobs/{id}")).await?;
                let n = |k: &str| v.executions.get(k).copied().unwrap_or(0) as u64;
                let not_released = v.not_released as u64;
                let total: u64 =
                    v.executions.values().map(|n| *n as u64).sum::<u64>() + not_released;
                let running = n("QUEUED") + n("IN_PROGRESS");
                let ended = total.saturating_sub(running + not_released);
                if let Some(b) = &bar {
                    b.set_length(total.max(1));
                    b.set_position(ended);
                    b.set_message(counts(&v.executions));
                }
                let done = running == 0 && (v.state != "IN_PROGRESS" || not_released == 0);
                if done && total > 0 || v.state == "CANCELED" {
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    api.show(&v, job_table);
                    let failed = n("FAILED") + n("TIMED_OUT") + n("REJECTED") > 0;
                    return if failed {
                        Err(Failure::unsuccessful("some executions did not succeed"))
                    } else {
                        Ok(())
                    };
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Ok(())
}

pub(crate) async fn release(c: &Connection, cmd: ReleaseCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    let (id, envelope, image) = match cmd {
        ReleaseCommand::Upload {
            id,
            envelope,
            image,
        } => (id, envelope, image),
        ReleaseCommand::List { limit, after } => {
            let v: ReleaseList = api.get(&page_path("/v1/releases", limit, after)).await?;
            let list = Items {
                items: v.items,
                next: v.next,
            };
            api.show_list(&list, &["release", "bytes"], |r| {
                vec![r.release_id.clone(), r.size.to_string()]
            });
            return Ok(());
        }
    };
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| Failure::usage(format!("cannot read {}: {e}", p.display())))
    };
    let (envelope, image) = (read(&envelope)?, read(&image)?);
    let b64 = base64::engine::general_purpose::STANDARD;
    // The body is streamed in pieces (the image base64-encoded 48 KiB at a
    // time), so the bar follows what was sent. It is an UploadRelease whose
    // image is written last: serialized with an empty image, then the
    // image spliced in before the closing quote.
    let head = serde_json::to_string(&UploadRelease {
        release_id: id.clone(),
        envelope: b64.encode(&envelope),
        image: String::new(),
    })
    .map_err(|e| Failure::other(e.to_string()))?;
    let head = head
        .strip_suffix("\"}")
        .ok_or_else(|| Failure::other("an upload body ends with its image"))?
        .to_string();
    let total = image.len() as u64;
    let bar = (!api.json).then(|| {
        let b = bar(total, "bytes sent");
        b.set_message(format!("uploading {id}"));
        b
    });
    let progress = bar.clone();
    let image = Arc::new(image);
    let chunks = (0..image.len().div_ceil(UPLOAD_CHUNK)).map(move |i| {
        let start = i * UPLOAD_CHUNK;
        let end = (start + UPLOAD_CHUNK).min(image.len());
        if let Some(b) = &progress {
            b.set_position(end as u64);
        }
        Ok::<_, std::io::Error>(
            base64::engine::general_purpose::STANDARD.encode(&image[start..end]),
        )
    });
    let pieces = std::iter::once(Ok(head))
        .chain(chunks)
        .chain(std::iter::once(Ok("\"}".to_string())));
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let v = api.send_body::<ReleaseView>("/v1/releases", body).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let v = v?;
    api.show(&v, |v| {
        format!(
            "release {} registered ({} bytes, checked against its signed manifest)",
            v.release_id, v.size
        )
    });
    Ok(())
}

/// Image bytes per piece of an upload (a multiple of 3: base64 pieces
/// join without padding).
const UPLOAD_CHUNK: usize = 48 * 1024;

fn campaign_table(v: &CampaignView) -> String {
    let header = [
        "campaign",
        "rollout",
        "pending",
        "queued",
        "inProgress",
        "succeeded",
        "failed",
        "rolledBack",
        "timedOut",
        "canceled",
        "unverifiedReceipt",
    ];
    let mut row = vec![v.campaign_id.clone(), v.rollout.clone().unwrap_or_default()];
    row.extend(
        [
            v.pending,
            v.queued,
            v.in_progress,
            v.succeeded,
            v.failed,
            v.rolled_back,
            v.timed_out,
            v.canceled,
            v.unverified_receipt,
        ]
        .iter()
        .map(ToString::to_string),
    );
    table(&header, vec![row])
}

async fn watch_campaign(api: &Client, id: &str) -> Result<(), Failure> {
    let bar = (!api.json).then(|| bar(0, "devices done"));
    loop {
        let v: CampaignView = api.get(&format!("/v1/campaigns/{id}")).await?;
        let total = (v.pending
            + v.queued
            + v.in_progress
            + v.succeeded
            + v.failed
            + v.rolled_back
            + v.timed_out
            + v.canceled
            + v.unverified_receipt) as u64;
        let done = total - (v.pending + v.queued + v.in_progress) as u64;
        if let Some(b) = &bar {
            b.set_length(total.max(1));
            b.set_position(done);
            b.set_message(format!(
                "{} ok, {} rolled back, {} failed",
                v.succeeded,
                v.rolled_back,
                v.failed + v.timed_out + v.unverified_receipt
            ));
        }
        if v.done {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            api.show(&v, campaign_table);
            let aborted = v
                .rollout
                .as_deref()
                .is_some_and(|r| r.starts_with("Aborted"));
            return if aborted {
                Err(Failure::unsuccessful("the campaign was aborted"))
            } else {
                Ok(())
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(crate) async fn campaign(c: &Connection, cmd: CampaignCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    match cmd {
        CampaignCommand::Start {
            id,
            release,
            things,
            groups,
            policy,
            watch,
        } => {
            let policy = match policy {
                Some(p) => json_arg(&p)?,
                None => serde_json::to_value(fleet_core::jobs::RolloutPolicy {
                    rate: fleet_core::jobs::RateLimit::Constant { per_minute: 100 },
                    groups: Vec::new(),
                    abort: Vec::new(),
                    retry: fleet_core::jobs::RetryPolicy::default(),
                    in_progress_timeout_secs: None,
                })
                .map_err(|e| Failure::other(e.to_string()))?,
            };
            let body = StartCampaign {
                campaign_id: id.clone(),
                release_id: release,
                things,
                groups,
                policy,
                in_progress_timeout_minutes: None,
            };
            let v: CampaignView = api.post("/v1/campaigns", &body).await?;
            if watch {
                return watch_campaign(&api, &id).await;
            }
            api.show(&v, campaign_table);
        }
        CampaignCommand::List { limit, after } => {
            let v: CampaignList = api.get(&page_path("/v1/campaigns", limit, after)).await?;
            let list = Items {
                items: v.items,
                next: v.next,
            };
            api.show_list(&list, &["campaign", "state"], |c| {
                vec![c.campaign_id.clone(), c.state.clone()]
            });
        }
        CampaignCommand::Status { id } => {
            let v: CampaignView = api.get(&format!("/v1/campaigns/{id}")).await?;
            api.show(&v, campaign_table);
        }
        CampaignCommand::Watch { id } => return watch_campaign(&api, &id).await,
        CampaignCommand::Pause { id } => control(&api, &id, "pause").await?,
        CampaignCommand::Resume { id } => control(&api, &id, "resume").await?,
        CampaignCommand::Approve { id } => control(&api, &id, "approve").await?,
        CampaignCommand::Abort { id } => control(&api, &id, "abort").await?,
    }
    Ok(())
}

async fn control(api: &Client, id: &str, action: &str) -> Result<(), Failure> {
    let v: CampaignView = api
        .post(&format!("/v1/campaigns/{id}/{action}"), &json!({}))
        .await?;
    api.show(&v, campaign_table);
    Ok(())
}

pub(crate) async fn command(c: &Connection, cmd: CommandCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    let CommandCommand::Send {
        thing,
        command,
        payload,
        timeout,
    } = cmd;
    let body = SendCommand {
        command,
        payload: json_arg(&payload)?,
        timeout_seconds: Some(timeout),
    };
    let v: CommandResult = api
        .post(&format!("/v1/things/{thing}/commands"), &body)
        .await?;
    api.show(&v, |v| format!("{thing}: {} {}", v.status, v.payload));
    if v.status != "SUCCEEDED" {
        return Err(Failure::unsuccessful(format!(
            "the command ended {}",
            v.status
        )));
    }
    Ok(())
}

pub(crate) async fn token(c: &Connection, cmd: TokenCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    let rows = |list: &[TokenView]| {
        table(
            &["id", "name", "scope"],
            list.iter()
                .map(|t| vec![t.id.clone(), t.name.clone(), t.scope.clone()])
                .collect(),
        )
    };
    match cmd {
        TokenCommand::Create { name, scope } => {
            let v: TokenView = api.post("/v1/tokens", &CreateToken { name, scope }).await?;
            api.show(&v, |v| {
                format!(
                    "{}\n\ntoken (shown once): {}",
                    rows(std::slice::from_ref(v)),
                    v.token.as_deref().unwrap_or_default()
                )
            });
        }
        TokenCommand::List => {
            let v: Vec<TokenView> = api.get("/v1/tokens").await?;
            api.show_list(&Items::all(v), &["id", "name", "scope"], |t| {
                vec![t.id.clone(), t.name.clone(), t.scope.clone()]
            });
        }
        TokenCommand::Revoke { id } => {
            api.delete::<()>(&format!("/v1/tokens/{id}")).await?;
            api.show(&json!({"revoked": id}), |_| format!("revoked {id}"));
        }
    }
    Ok(())
}

/// `fleet audit`: the audit log, oldest first.
pub(crate) async fn audit(
    c: &Connection,
    limit: usize,
    after: Option<String>,
) -> Result<(), Failure> {
    let api = Client::new(c)?;
    let mut path = format!("/v1/audit?limit={limit}");
    if let Some(a) = after {
        path.push_str(&format!("&after={a}"));
    }
    let v: AuditList = api.get(&path).await?;
    let list = Items {
        items: v.items,
        next: v.next,
    };
    api.show_list(&list, &["id", "at", "token", "request", "status"], |e| {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.at_ms) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| e.at_ms.to_string());
        vec![
            e.id.to_string(),
            at,
            format!("{} ({})", e.token_id, e.token_name),
            format!("{} {}", e.method, e.path),
            e.status.to_string(),
        ]
    });
    Ok(())
}

/// `fleet ready`: the service's readiness (`GET /readyz`, no token), for
/// a container's health check or a deployment script.
pub(crate) async fn ready(api: &str, ca: &std::path::Path, json: bool) -> Result<(), Failure> {
    let ca_pem = std::fs::read_to_string(ca)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", ca.display())))?;
    let tls = fleet_cloud::tls::client_config(&ca_pem, None)
        .map_err(|e| Failure::usage(format!("{}: {e}", ca.display())))?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::other(e.to_string()))?;
    let base = api.trim_end_matches('/');
    let resp = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_err(|e| Failure::other(format!("{base}: {}", crate::chain(&e))))?;
    let status = resp.status();
    let health: fleet_cloud::api::types::Health = resp
        .json()
        .await
        .map_err(|e| Failure::other(format!("{base}/readyz: {e}")))?;
    let text = if json {
        serde_json::to_string_pretty(&health).unwrap_or_default()
    } else {
        let mut t = health.status.clone();
        for (check, state) in health.checks.iter().flatten() {
            t.push_str(&format!("\n  {check}: {state}"));
        }
        t
    };
    println!("{text}");
    if status.is_success() {
        Ok(())
    } else {
        Err(Failure::other(format!("not ready (HTTP {status})")))
    }
}

/// A list path with its page.
fn page_path(base: &str, limit: usize, after: Option<String>) -> String {
    let mut path = format!("{base}?limit={limit}");
    if let Some(a) = after {
        path.push_str(&format!("&after={a}"));
    }
    path
}

/// `fleet certs ...` through the API (admin).
#[derive(Subcommand)]
pub(crate) enum CertCommand {
    /// Lists a thing's certificates.
    List {
        /// The thing.
        thing: String,
    },
    /// Revokes a certificate: its device is disconnected and refused.
    Revoke {
        /// The certificate's id (`fleet certs list THING`).
        id: String,
    },
}

pub(crate) async fn cert(c: &Connection, cmd: CertCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    match cmd {
        CertCommand::List { thing } => certificates(&api, &thing).await?,
        CertCommand::Revoke { id } => {
            api.request::<Value>(
                reqwest::Method::POST,
                &format!("/v1/certificates/{id}/revoke"),
                None::<&()>,
            )
            .await?;
            api.show(&json!({"revoked": id}), |_| {
                format!("revoked certificate {id}")
            });
        }
    }
    Ok(())
}

/// `fleet claim ...`: claim identities for provisioning by claim (admin).
#[derive(Subcommand)]
pub(crate) enum ClaimCommand {
    /// Issues a claim certificate and key for a factory to put on devices;
    /// writes `{name}.pem`, `{name}.key` and `ca.pem` into `--out`.
    Create {
        /// One of the claim identities `fleet serve` admits (`--claim`).
        name: String,
        /// The directory to write into (created; files are not
        /// overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) async fn claim(c: &Connection, cmd: ClaimCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    match cmd {
        ClaimCommand::Create { name, out } => {
            let files = [
                format!("{name}.pem"),
                format!("{name}.key"),
                "ca.pem".into(),
            ];
            for f in &files {
                if out.join(f).exists() {
                    return Err(Failure::usage(format!(
                        "{} exists; not overwritten",
                        out.join(f).display()
                    )));
                }
            }
            let v: ClaimIdentity = api
                .post(
                    "/v1/provisioning/claims",
                    &CreateClaim { name: name.clone() },
                )
                .await?;
            std::fs::create_dir_all(&out)
                .map_err(|e| Failure::usage(format!("{}: {e}", out.display())))?;
            for (file, text) in files.iter().zip([&v.cert_pem, &v.key_pem, &v.ca_pem]) {
                crate::write_secret(&out.join(file), text)
                    .map_err(|e| Failure::other(format!("{}: {e}", out.join(file).display())))?;
            }
            api.show(
                &json!({"name": v.name, "dir": out.display().to_string(), "files": files}),
                |_| format!("claim identity {name} written to {}", out.display()),
            );
        }
    }
    Ok(())
}

/// `fleet template ...`: provisioning templates.
#[derive(Subcommand)]
pub(crate) enum TemplateCommand {
    /// Lists the provisioning templates served.
    List,
    /// Shows one template, its document included.
    Show {
        /// The template's name.
        name: String,
    },
    /// Creates or replaces a template (admin) from an AWS IoT fleet
    /// provisioning template document; every instance serves it from the
    /// next registration on. Templates of `fleet serve`'s configuration
    /// are changed there, not here.
    Put {
        /// The template's name (1-36 of A-Z a-z 0-9 _ -), as devices give
        /// it in RegisterThing's topic.
        name: String,
        /// The template document (JSON, AWS's shape).
        file: PathBuf,
        /// For people.
        #[arg(long, default_value = "")]
        description: String,
        /// Refuse registrations by it (it is kept).
        #[arg(long)]
        disabled: bool,
        /// Let a claimant provision onto an existing thing.
        #[arg(long)]
        allow_replace: bool,
        /// The pre-provisioning hook: an https:// URL asked before each
        /// registration.
        #[arg(long)]
        hook_url: Option<String>,
        /// The CA of the hook's certificate, PEM (default: the Web PKI's
        /// roots).
        #[arg(long, requires = "hook_url")]
        hook_ca: Option<PathBuf>,
        /// How long the hook may take, ms (default 5000).
        #[arg(long, requires = "hook_url")]
        hook_timeout_ms: Option<u64>,
    },
    /// Deletes a template created through the API; the things it made
    /// stay.
    Delete {
        /// The template's name.
        name: String,
    },
}

fn read_text(path: &std::path::Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))
}

fn template_human(t: &TemplateView) -> String {
    let mut out = format!(
        "template {} ({}, {}{})",
        t.name,
        t.source,
        if t.enabled { "enabled" } else { "disabled" },
        t.version
            .map(|v| format!(", version {v}"))
            .unwrap_or_default()
    );
    if !t.description.is_empty() {
        out.push_str(&format!("\n  {}", t.description));
    }
    out.push_str(&format!(
        "\n  parameters: {}",
        t.required_parameters.join(", ")
    ));
    if let Some(h) = &t.pre_provisioning_hook {
        out.push_str(&format!("\n  pre-provisioning hook: {h}"));
    }
    if t.allow_replace {
        out.push_str("\n  may provision onto an existing thing");
    }
    if let Some(d) = &t.document {
        out.push_str(&format!(
            "\n{}",
            serde_json::to_string_pretty(d).unwrap_or_default()
        ));
    }
    out
}

pub(crate) async fn template(c: &Connection, cmd: TemplateCommand) -> Result<(), Failure> {
    let api = Client::new(c)?;
    match cmd {
        TemplateCommand::List => {
            let v: Vec<TemplateView> = api.get("/v1/provisioning/templates").await?;
            api.show_list(
                &Items::all(v),
                &[
                    "template",
                    "source",
                    "enabled",
                    "thing name",
                    "parameters",
                    "hook",
                ],
                |t| {
                    vec![
                        t.name.clone(),
                        t.source.clone(),
                        t.enabled.to_string(),
                        match &t.document {
                            Some(_) => "(document)".into(),
                            None => format!("{}{{{}}}", t.thing_name_prefix, t.name_parameter),
                        },
                        t.required_parameters.join(","),
                        t.pre_provisioning_hook.clone().unwrap_or_default(),
                    ]
                },
            );
        }
        TemplateCommand::Show { name } => {
            let t: TemplateView = api
                .get(&format!("/v1/provisioning/templates/{name}"))
                .await?;
            api.show(&t, template_human);
        }
        TemplateCommand::Put {
            name,
            file,
            description,
            disabled,
            allow_replace,
            hook_url,
            hook_ca,
            hook_timeout_ms,
        } => {
            let text = read_text(&file)?;
            let document: Value = serde_json::from_str(&text)
                .map_err(|e| Failure::usage(format!("{}: not JSON: {e}", file.display())))?;
            let hook = match hook_url {
                Some(url) => Some(HookSpec {
                    url,
                    ca_pem: hook_ca.as_deref().map(read_text).transpose()?,
                    timeout_ms: hook_timeout_ms,
                }),
                None => None,
            };
            let body = PutTemplate {
                template_body: document,
                description,
                enabled: !disabled,
                allow_replace,
                pre_provisioning_hook: hook,
            };
            let t: TemplateView = api
                .put(&format!("/v1/provisioning/templates/{name}"), &body)
                .await?;
            api.show(&t, template_human);
        }
        TemplateCommand::Delete { name } => {
            api.delete::<()>(&format!("/v1/provisioning/templates/{name}"))
                .await?;
            api.show(&json!({"deleted": name}), |_| {
                format!("deleted template {name}")
            });
        }
    }
    Ok(())
}
