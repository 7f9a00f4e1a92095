//! The `fleet` command: `fleet serve` runs the backend; the other
//! subcommands manage the fleet through its API, or sign releases.
//!
//! ```text
//! # One process: embedded broker on 127.0.0.1:8883, the management API on
//! # https://127.0.0.1:8443, SQLite, a development CA and an admin token
//! # created in ./fleet-data on first start.
//! fleet serve
//! # Against an external broker (Mosquitto with fleet's ACL):
//! fleet serve --broker localhost:8883 --cert backend.pem --key backend.key \
//!             --ca ca.pem --store /var/lib/fleet/fleet.db
//!
//! export FLEET_TOKEN_FILE=fleet-data/admin.token
//! fleet thing list
//! fleet shadow update pump-1 '{"speed": 3}'
//! fleet keygen --out release.key   # or in an HSM: --pkcs11 'pkcs11:token=..;object=release?...'
//! fleet manifest sign --image fw.bin --key release.key --component fw \
//!     --version 2.0.0 --sequence 2 --hardware-id p100 --out fw.envelope
//! fleet release upload fw-2 --envelope fw.envelope --image fw.bin
//! fleet campaign start rollout-2 --release fw-2 --group early --watch
//! ```
//!
//! Exit codes: 0 done; 1 failed (network, service); 2 bad usage or input
//! files; 3 not found; 4 not authenticated or not allowed; 5 refused as
//! invalid, existing or conflicting; 6 the device did not answer in time;
//! 7 it ran but did not succeed (a campaign aborted, a job or command
//! that failed).

mod client;
mod serve_config;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_cloud::api::ApiConfig;
use fleet_cloud::pki::Pki;
use fleet_cloud::store::StoreLocation;
use fleet_cloud::{
    BackendIdentity, BrokerPolicy, BrokerSetup, DEFAULT_BACKEND_IDENTITY, EmbeddedConfig,
    FleetConfig, FleetServer, MosquittoListener, ProvisioningSetup, ProvisioningTemplate, Registry,
    Scope,
};

/// The exit codes, shown under every command's `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  failed: network, service, or a dependency missing at start
  2  bad usage or input files
  3  not found
  4  not authenticated or not allowed
  5  refused as invalid, existing or conflicting
  6  the device did not answer in time
  7  it ran but did not succeed (a campaign aborted, a job or command that failed)";

#[derive(Parser)]
#[command(
    name = "fleet",
    version,
    about = "The fleet backend and its tools",
    after_help = EXIT_CODES
)]
struct Cli {
    /// How logs are written to stderr: `text` (colour only on a terminal)
    /// or `json` (one object per line, for a log collector). Also
    /// `FLEET_LOG_FORMAT`; the level is `RUST_LOG` (default `info`).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "FLEET_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines; colour only when stderr is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// Starts logging to stderr in `format`; with the `otlp` feature and
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set, spans are
/// exported over OTLP too. What it returns flushes the export when
/// dropped.
fn init_logging(format: LogFormat) -> Option<Tracing> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().with_current_span(false).boxed(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    let otlp_asked = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some());
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otlp")]
    if otlp_asked {
        match otlp::layer() {
            Ok((layer, provider)) => {
                registry.with(layer).init();
                tracing::info!("traces exported over OTLP");
                return Some(Tracing(provider));
            }
            Err(e) => {
                registry.init();
                tracing::error!("OTLP trace export not started: {e}");
                return None;
            }
        }
    }
    registry.init();
    if otlp_asked && !cfg!(feature = "otlp") {
        tracing::warn!(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this fleet was built without the `otlp` feature: no traces are exported (cargo install fleet-cloud --features otlp)"
        );
    }
    None
}

/// The OTLP export, flushed and stopped when dropped.
struct Tracing(#[cfg(feature = "otlp")] opentelemetry_sdk::trace::SdkTracerProvider);

impl Drop for Tracing {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Err(e) = self.0.shutdown() {
            eprintln!("fleet: flushing OTLP traces: {e}");
        }
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;

    /// The layer that turns spans into OTLP spans, batched to the endpoint
    /// the standard `OTEL_EXPORTER_OTLP_*` variables name.
    pub(crate) fn layer<S>() -> Result<
        (
            impl tracing_subscriber::Layer<S>,
            opentelemetry_sdk::trace::SdkTracerProvider,
        ),
        Box<dyn std::error::Error>,
    >
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("fleet")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("fleet");
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
    }
}

#[derive(Subcommand)]
// `fleet command ...` sends commands to things: the variant is named so.
#[allow(clippy::enum_variant_names)]
enum Command {
    /// Run the backend service until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Write a development setup: a CA, broker, backend, device and claim
    /// certificates, and the Mosquitto configuration and ACL for them.
    DevSetup(DevSetupArgs),
    /// Certificates: a development setup (`init`, no API), or a thing's
    /// certificates through the API (`list`, `revoke`; admin).
    Certs {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Claim identities for provisioning by claim (through the API; admin).
    Claim {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::ClaimCommand,
    },
    /// Provisioning templates (through the API).
    Template {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::TemplateCommand,
    },
    /// Shell completions for `fleet`: `fleet completions bash >
    /// /etc/bash_completion.d/fleet` (also zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Man pages for `fleet` and every subcommand, written into `--out`
    /// (`fleet.1`, `fleet-serve.1`, ...).
    Man {
        /// The directory to write into (created).
        #[arg(long)]
        out: PathBuf,
    },
    /// Make an Ed25519 key for signing releases; prints its public key.
    Keygen {
        /// Where to write it (not overwritten).
        #[arg(long, required_unless_present = "pkcs11", conflicts_with = "pkcs11")]
        out: Option<PathBuf>,
        /// Generate it inside a PKCS#11 token (an HSM) instead, under the
        /// URI's `object=` label; it never leaves the token. The PIN comes
        /// from the URI's `pin-source` (a file or an environment variable).
        #[arg(long)]
        pkcs11: Option<String>,
    },
    /// Sign or verify a release manifest.
    #[command(subcommand)]
    Manifest(tools::ManifestCommand),
    /// Things (through the API).
    Thing {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::ThingCommand,
    },
    /// Thing groups (through the API).
    Group {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::GroupCommand,
    },
    /// Shadows (through the API).
    Shadow {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::ShadowCommand,
    },
    /// Jobs (through the API).
    Job {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::JobCommand,
    },
    /// Releases (through the API).
    Release {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::ReleaseCommand,
    },
    /// OTA campaigns (through the API).
    Campaign {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::CampaignCommand,
    },
    /// Commands to things (through the API).
    Command {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::CommandCommand,
    },
    /// API tokens (through the API; admin).
    Token {
        #[command(flatten)]
        api: client::Connection,
        #[command(subcommand)]
        command: client::TokenCommand,
    },
    /// Whether `fleet serve` is ready (`GET /readyz`; no token): exit 0
    /// when it is, 1 with the reason of each failed check when not. For a
    /// container's health check.
    Ready {
        /// The management API.
        #[arg(long, env = "FLEET_API", default_value = "https://localhost:8443")]
        api: String,
        /// The CA that signed the API's certificate (PEM).
        #[arg(long = "api-ca", env = "FLEET_CA", default_value = "fleet-data/ca.pem")]
        ca: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The audit log: every change made through the API, with the token
    /// that made it, oldest first (admin).
    Audit {
        #[command(flatten)]
        api: client::Connection,
        /// Entries per page (1 to 1,000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this entry (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
}

/// `fleet certs ...`
#[derive(Subcommand)]
enum CertsCommand {
    /// A development CA with server, backend, device and claim certificates
    /// (the same as `fleet dev-setup`).
    Init(DevSetupArgs),
    /// Lists a thing's certificates (through the API).
    List {
        /// The thing.
        thing: String,
    },
    /// Revokes a certificate: its device is disconnected and refused
    /// (through the API).
    Revoke {
        /// The certificate's id (`fleet certs list THING`).
        id: String,
    },
}

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub(crate) fn other(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// An API error, by its stable code.
    pub(crate) fn api(code: &str, message: String) -> Self {
        let code = match code {
            "not_found" => 3,
            "unauthenticated" | "forbidden" => 4,
            "invalid_request" | "already_exists" | "conflict" => 5,
            "timeout" => 6,
            _ => 1,
        };
        Self { code, message }
    }

    pub(crate) fn unsuccessful(message: impl Into<String>) -> Self {
        Self {
            code: 7,
            message: message.into(),
        }
    }
}

impl From<Box<dyn std::error::Error>> for Failure {
    fn from(e: Box<dyn std::error::Error>) -> Self {
        Self::other(chain(e.as_ref()))
    }
}

/// An error with the whole chain of its causes.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    fleet_cloud::error_chain(e)
}

#[derive(clap::Args)]
struct DevSetupArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// A device to issue a certificate for (its thing name); repeatable.
    #[arg(long = "thing")]
    things: Vec<String>,
    /// A claim identity for provisioning (must contain `@`); repeatable.
    #[arg(long = "claim")]
    claims: Vec<String>,
    /// The broker's port.
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// `fleet-mosquitto-plugin`'s shared library: the Mosquitto
    /// configuration loads it, admitting devices by `{dir}/roster` (run
    /// `fleet serve --mosquitto-roster {dir}/roster`).
    #[arg(long)]
    mosquitto_plugin: Option<PathBuf>,
    /// Keep the CA's key in an HSM: a `pkcs11:` URI of an ECDSA P-256 key
    /// (generated in the token if it holds none by that label). No
    /// `ca.key` is written; run `fleet serve --ca-key` with the same URI.
    #[arg(long)]
    ca_key: Option<String>,
}

/// `fleet serve`'s flags: each overrides the configuration file
/// (`--config`) and the environment (`FLEET_SERVE_<KEY>`).
#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML configuration file (keys as the flags' names: `store`,
    /// `client-id`, ...; see fleet.example.toml). Environment variables
    /// `FLEET_SERVE_<KEY>` (for secrets, such as `FLEET_SERVE_STORE`)
    /// override it, and flags override both.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration (TOML, passwords masked) and exit.
    #[arg(long)]
    print_config: bool,
    /// An external MQTT broker, `host:port` (mutual TLS, with fleet's ACL).
    /// Without it, fleet runs its embedded broker.
    #[arg(long)]
    broker: Option<String>,
    /// Embedded broker: the address to listen on (default 127.0.0.1:8883).
    /// Bind a public address only if devices on other machines must
    /// connect.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The fleet's keys and certificates (embedded broker: `ca.pem`,
    /// `ca.key`, `server.*`, `backend.*`; written with a new development CA
    /// on first start if `ca.pem` is missing), and the default store
    /// (default `fleet-data`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The backend's client certificate (PEM); default `{dir}/backend.pem`.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The backend's private key (PEM); default `{dir}/backend.key`.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The CA of the broker's certificate (PEM); default `{dir}/ca.pem`.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The key of the CA (`{dir}/ca.pem`) that signs devices' certificates
    /// in provisioning by claim: a PEM file, or a `pkcs11:` URI of a key in
    /// an HSM (`...?module-path=/usr/lib/...so&pin-source=file:/run/pin`;
    /// the PIN is never on the command line). Default `{dir}/ca.key`.
    #[arg(long)]
    ca_key: Option<String>,
    /// Where state is kept: `sqlite:PATH` (or a path), PostgreSQL as
    /// `postgres://user@host/database` or `host=... dbname=...` (several
    /// instances may share it), or `memory`; anything else is refused.
    /// Default `{dir}/fleet.db`.
    #[arg(long, value_parser = parse_store)]
    store: Option<String>,
    /// A claim identity allowed to provision (its name contains `@`);
    /// repeatable. Provisioning by claim is served when `{dir}/ca.key`
    /// exists; with an external broker, only to devices that give an MQTT 5
    /// response topic (the broker's policy must admit the claim identities:
    /// `fleet dev-setup --claim`).
    #[arg(long = "claim")]
    claims: Vec<String>,
    /// MQTT client id of this instance (default `fleet-cloud`).
    #[arg(long)]
    client_id: Option<String>,
    /// Share the load with other instances in this group (MQTT 5 shared
    /// subscriptions; with Mosquitto, needs a prefix without `$`).
    #[arg(long)]
    share_group: Option<String>,
    /// Topic prefix (default `$aws`).
    #[arg(long)]
    prefix: Option<String>,
    /// The management API's address (HTTPS, with the broker's server
    /// certificate from `--dir`); default 127.0.0.1:8443.
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Do not serve the management API.
    #[arg(long)]
    no_api: bool,
    /// Route device telemetry (`dt/{thing}/...`) to this JSON-lines file
    /// (one line per message, written and synced before the message is
    /// acknowledged); undeliverable records go to `{file}.dead-letters`.
    #[arg(long)]
    telemetry_file: Option<PathBuf>,
    /// External broker (Mosquitto): the ACL file to keep current. It is
    /// written at start, and again whenever a certificate is revoked or a
    /// thing is enabled, disabled or deleted through the API: a disabled
    /// thing, or one whose every certificate is revoked, is denied
    /// everything.
    #[arg(long)]
    mosquitto_acl: Option<PathBuf>,
    /// The broker's pid file (Mosquitto's `pid_file`): after each rewrite of
    /// `--mosquitto-acl` that process gets SIGHUP, on which Mosquitto
    /// re-reads its ACL and applies it to connected clients too.
    #[arg(long)]
    broker_pid_file: Option<PathBuf>,
    /// External broker (Mosquitto with `fleet-mosquitto-plugin`): the
    /// roster file the plugin admits devices by (every thing and
    /// certificate with its standing). Written at start, after every change
    /// through the API, and before a `RegisterThing` is answered; the
    /// plugin reads it again when it changes and disconnects the devices it
    /// no longer admits.
    #[arg(long)]
    mosquitto_roster: Option<PathBuf>,
    /// Embedded broker: retained messages kept at most, all devices
    /// together (default 100,000). They are kept in the store and survive
    /// a restart; past the limit a new one is refused (PUBACK "quota
    /// exceeded").
    #[arg(long)]
    max_retained_messages: Option<usize>,
    /// Embedded broker: bytes (topic and payload) of one retained message
    /// at most (default 131,072).
    #[arg(long)]
    max_retained_message_bytes: Option<usize>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (plain HTTP, off
    /// the management API: bind a loopback or private address). Off by
    /// default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Seconds an external broker may take to accept the backend's
    /// connection at start (default 30); past them `fleet serve` exits
    /// with the reason (it keeps reconnecting once it has started).
    #[arg(long, value_name = "SECONDS")]
    start_timeout: Option<u64>,
    /// A shadow field the fleet index keeps (`shadow.reported.firmware`),
    /// or a prefix of them (`shadow.reported.*`); repeatable. Default:
    /// every field of every shadow. Queries on others are refused.
    #[arg(long = "index-shadow-field", value_name = "FIELD")]
    index_shadow_fields: Vec<String>,
    /// Embedded broker: how often a connected device's activity is
    /// recorded as `connectivity.lastSeen` (default 10,000 ms).
    #[arg(long, value_name = "MS")]
    seen_interval_ms: Option<u64>,
}

/// `--store` is checked as it is read, so that a bad one is a usage error.
fn parse_store(s: &str) -> Result<String, String> {
    s.parse::<StoreLocation>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

impl ServeArgs {
    /// What the flags set, as a configuration layer.
    fn layer(&self) -> serve_config::Layer {
        serve_config::Layer {
            broker: self.broker.clone(),
            listen: self.listen,
            dir: self.dir.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            ca_key: self.ca_key.clone(),
            store: self.store.clone(),
            claims: (!self.claims.is_empty()).then(|| self.claims.clone()),
            client_id: self.client_id.clone(),
            share_group: self.share_group.clone(),
            prefix: self.prefix.clone(),
            api: self.api,
            no_api: self.no_api.then_some(true),
            telemetry_file: self.telemetry_file.clone(),
            mosquitto_acl: self.mosquitto_acl.clone(),
            broker_pid_file: self.broker_pid_file.clone(),
            mosquitto_roster: self.mosquitto_roster.clone(),
            max_retained_messages: self.max_retained_messages,
            max_retained_message_bytes: self.max_retained_message_bytes,
            metrics: self.metrics,
            start_timeout: self.start_timeout,
            index_shadow_fields: (!self.index_shadow_fields.is_empty())
                .then(|| self.index_shadow_fields.clone()),
            seen_interval_ms: self.seen_interval_ms,
            template: None,
        }
    }

    /// The file, the environment and the flags, in that order.
    fn resolve(&self) -> Result<serve_config::ServeConfig, String> {
        let file = match &self.config {
            Some(path) => serve_config::Layer::from_file(path)?,
            None => serve_config::Layer::default(),
        };
        let env = serve_config::Layer::from_env(|v| std::env::var(v).ok())?;
        file.under(env).under(self.layer()).resolve()
    }
}

/// An external broker's files that follow the registry: the ACL and the
/// roster its plugin admits by, rewritten when a thing's standing changes,
/// and the broker told to apply the ACL.
struct BrokerFiles {
    registry: Registry,
    policy: BrokerPolicy,
    acl: Option<PathBuf>,
    roster: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    /// One rewrite at a time: each reads the registry afresh, so the last
    /// written is the latest.
    writing: tokio::sync::Mutex<()>,
}

/// Writes `text` to `path` atomically: a new file renamed over the old, so
/// that a reader sees the old file or the new one, never half of one.
fn replace_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(".new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

impl BrokerFiles {
    /// Writes the roster and the ACL, then signals the broker.
    async fn refresh(&self) -> Result<(), Box<dyn std::error::Error>> {
        let _one = self.writing.lock().await;
        if let Some(path) = &self.roster {
            let roster = self.registry.roster().await?;
            replace_file(path, &roster.to_text())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let (things, certificates) = roster.len();
            tracing::debug!(roster = %path.display(), things, certificates, "broker roster rewritten");
        }
        let Some(path) = &self.acl else {
            return Ok(());
        };
        let policy = BrokerPolicy {
            denied_identities: self.registry.denied_identities().await?,
            ..self.policy.clone()
        };
        let acl = policy.try_mosquitto_acl()?;
        replace_file(path, &acl).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(pid_file) = &self.pid_file {
            let pid = std::fs::read_to_string(pid_file)
                .map_err(|e| format!("{}: {e}", pid_file.display()))?;
            let pid: u32 = pid
                .trim()
                .parse()
                .map_err(|_| format!("{}: not a process id", pid_file.display()))?;
            let status = std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()?;
            if !status.success() {
                return Err(format!("kill -HUP {pid} failed: {status}").into());
            }
        }
        tracing::info!(acl = %path.display(), "broker ACL rewritten");
        Ok(())
    }

    /// [`refresh`](Self::refresh) for a hook: the change is answered once
    /// the files are written; a failure is logged (the registry changed
    /// already).
    fn refresh_hook(self: &std::sync::Arc<Self>) -> fleet_cloud::api::HookFuture {
        let files = self.clone();
        Box::pin(async move {
            if let Err(e) = files.refresh().await {
                tracing::error!("rewriting the broker's ACL or roster failed: {e}");
            }
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let tracing = init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), Failure> = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                // A configuration that does not hold is a usage error.
                let config = args.resolve().map_err(Failure::usage)?;
                if args.print_config {
                    print!("{}", config.to_toml());
                    return Ok(());
                }
                Ok(serve_command(config).await?)
            }
            Command::DevSetup(args)
            | Command::Certs {
                command: CertsCommand::Init(args),
                ..
            } => Ok(dev_setup(&args).await?),
            Command::Certs {
                api,
                command: CertsCommand::List { thing },
            } => client::cert(&api, client::CertCommand::List { thing }).await,
            Command::Certs {
                api,
                command: CertsCommand::Revoke { id },
            } => client::cert(&api, client::CertCommand::Revoke { id }).await,
            Command::Claim { api, command } => client::claim(&api, command).await,
            Command::Template { api, command } => client::template(&api, command).await,
            Command::Completions { shell } => {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut cmd, "fleet", &mut std::io::stdout());
                Ok(())
            }
            Command::Man { out } => man_pages(&out),
            Command::Keygen { out, pkcs11 } => tools::keygen(out.as_ref(), pkcs11.as_deref()),
            Command::Manifest(cmd) => tools::manifest(cmd),
            Command::Thing { api, command } => client::thing(&api, command).await,
            Command::Group { api, command } => client::group(&api, command).await,
            Command::Shadow { api, command } => client::shadow(&api, command).await,
            Command::Job { api, command } => client::job(&api, command).await,
            Command::Release { api, command } => client::release(&api, command).await,
            Command::Campaign { api, command } => client::campaign(&api, command).await,
            Command::Command { api, command } => client::command(&api, command).await,
            Command::Token { api, command } => client::token(&api, command).await,
            Command::Audit { api, limit, after } => client::audit(&api, limit, after).await,
            Command::Ready { api, ca, json } => client::ready(&api, &ca, json).await,
        }
    });
    drop(runtime);
    drop(tracing);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

async fn serve_command(args: serve_config::ServeConfig) -> Result<(), Box<dyn std::error::Error>> {
    // Registered before anything listens: a SIGTERM while the server
    // starts is a clean stop, not the default action (which kills).
    let shutdown = shutdown_signal();
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let dir = &args.dir;
    let broker = match &args.broker {
        Some(broker) => {
            let (host, port) = broker
                .rsplit_once(':')
                .ok_or("--broker must be host:port")?;
            BrokerSetup::External {
                host: host.to_owned(),
                port: port.parse().map_err(|_| "--broker port must be a number")?,
            }
        }
        None => {
            if !dir.join("ca.pem").exists() {
                let hsm = args
                    .ca_key
                    .as_deref()
                    .filter(|k| fleet_pkcs11::Pkcs11Uri::is_pkcs11(k));
                write_setup(dir, &[], &args.claims, args.listen.port(), None, hsm)?;
                tracing::info!(
                    "wrote a development CA and certificates to {}",
                    dir.display()
                );
            }
            let mut config = EmbeddedConfig::new(
                args.listen,
                &read(&dir.join("server.pem"))?,
                &read(&dir.join("server.key"))?,
                &read(&dir.join("ca.pem"))?,
            );
            config.policy = BrokerPolicy {
                prefix: args.prefix.clone(),
                claim_identities: args.claims.clone(),
                // AWS SDK devices provision over MQTT 3.1.1: the embedded
                // broker routes each reply to its requester alone.
                reply_routing: true,
                ..BrokerPolicy::default()
            };
            if let Some(n) = args.max_retained_messages {
                config.limits.max_retained_messages = n;
            }
            if let Some(n) = args.max_retained_message_bytes {
                config.limits.max_retained_message_bytes = n;
            }
            BrokerSetup::Embedded(config)
        }
    };
    let embedded = matches!(broker, BrokerSetup::Embedded(_));
    let or_dir = |p: &Option<PathBuf>, name: &str| p.clone().unwrap_or_else(|| dir.join(name));
    let backend = BackendIdentity {
        client_id: args.client_id.clone(),
        cert_pem: read(&or_dir(&args.cert, "backend.pem"))?,
        key_pem: read(&or_dir(&args.key, "backend.key"))?,
        ca_pem: read(&or_dir(&args.ca, "ca.pem"))?,
    };
    std::fs::create_dir_all(dir)?;
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| StoreLocation::Sqlite(dir.join("fleet.db")));
    if let StoreLocation::Sqlite(path) = &store
        && let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    // Instances sharing a database take turns: one at a time sweeps
    // timeouts and drives rollouts, another takes over within the lease's
    // 5 s when it dies (one instance alone on its store always leads).
    let instance = format!("{}-{:016x}", args.client_id, {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r)?;
        u64::from_le_bytes(r)
    });
    match &store {
        StoreLocation::Postgres(_) => tracing::info!("store: PostgreSQL; instance {instance}"),
        StoreLocation::Sqlite(path) => tracing::info!("store: SQLite at {}", path.display()),
        StoreLocation::Memory => tracing::info!("store: memory"),
    }
    let mut config = FleetConfig::new(store, broker, backend);
    config.instance = instance;
    config.prefix = args.prefix.clone();
    config.share_group = args.share_group.clone();
    config.claim_identities = args.claims.clone();
    config.index = fleet_cloud::store::IndexConfig {
        shadow_fields: args.index_shadow_fields.clone(),
        ..Default::default()
    };
    config.seen_interval = args.seen_interval;
    // With PostgreSQL, the registry (things, groups, certificates, API
    // tokens) is shared by every instance on the database too; a single
    // instance keeps it in `registry.db` in --dir, where `fleet dev-setup`
    // writes it, whatever --store says.
    config.registry = Some(dir.join("registry.db"));
    let ca_key = match (&args.ca_key, std::fs::read_to_string(dir.join("ca.pem"))) {
        // A CA key in an HSM: it must be there, or fleet serve does not start.
        (Some(uri), ca) if fleet_pkcs11::Pkcs11Uri::is_pkcs11(uri) => {
            let ca = ca.map_err(|e| format!("{}: {e}", dir.join("ca.pem").display()))?;
            let uri: fleet_pkcs11::Pkcs11Uri = uri.parse().map_err(|e| format!("ca-key: {e}"))?;
            let key = fleet_pkcs11::Pkcs11Key::open(&uri).map_err(|e| format!("ca-key: {e}"))?;
            tracing::info!(key = %uri, "the CA's key is in a PKCS#11 token");
            Some(std::sync::Arc::new(Pki::from_pem_with_key(
                &ca,
                fleet_cloud::pki::CaKey::Pkcs11(key),
            )?))
        }
        (Some(path), ca) => {
            let ca = ca.map_err(|e| format!("{}: {e}", dir.join("ca.pem").display()))?;
            let key = std::fs::read_to_string(path).map_err(|e| format!("ca-key {path}: {e}"))?;
            Some(std::sync::Arc::new(Pki::from_pem(&ca, &key)?))
        }
        (None, Ok(ca)) => match std::fs::read_to_string(dir.join("ca.key")) {
            Ok(key) => Some(std::sync::Arc::new(Pki::from_pem(&ca, &key)?)),
            Err(_) => None,
        },
        (None, Err(_)) => None,
    };
    config.claim_ca = ca_key.clone();
    if let Some(pki) = &ca_key
        && args.prefix == "$aws"
    {
        // Its ownership tokens are kept in the registry: with PostgreSQL, a
        // device's registration may reach another instance than its
        // certificate request did.
        let templates = if args.templates.is_empty() {
            tracing::info!("provisioning by claim: template `default` (parameter SerialNumber)");
            vec![default_template()]
        } else {
            let mut loaded = Vec::new();
            for t in &args.templates {
                loaded.push(t.load()?);
                tracing::info!(
                    template = t.name,
                    file = %t.file.display(),
                    hook = t.hook_url.as_deref().unwrap_or("-"),
                    "provisioning template"
                );
            }
            loaded
        };
        if !embedded {
            tracing::info!(
                "provisioning with an external broker: replies go only to an MQTT 5 response topic"
            );
        }
        config.provisioning = Some(ProvisioningSetup {
            ca: Pki::clone(pki),
            templates,
        });
    }
    // An external broker's ACL and roster follow the registry: rewritten
    // at start and after every change a broker must know of.
    let files: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<BrokerFiles>>> =
        std::sync::Arc::default();
    if args.mosquitto_acl.is_some() || args.mosquitto_roster.is_some() {
        let files = files.clone();
        config.on_registry_changed = Some(std::sync::Arc::new(move || match files.get() {
            Some(f) => f.refresh_hook(),
            None => Box::pin(async {}),
        }));
    }
    if !args.no_api {
        let tls = |name: &str| {
            read(&dir.join(name)).map_err(|e| {
                format!("the management API serves HTTPS with {{dir}}/server.pem and server.key ({e}); write them with `fleet certs init`, or pass --no-api")
            })
        };
        config.api = Some(ApiConfig {
            limits: fleet_cloud::api::ApiLimits::default(),
            bind: args.api,
            cert_pem: tls("server.pem")?,
            key_pem: tls("server.key")?,
        });
    }
    config.telemetry = args.telemetry_file.as_ref().map(|file| {
        let mut dead = file.clone().into_os_string();
        dead.push(".dead-letters");
        fleet_cloud::telemetry::TelemetryRouter::new(
            vec![fleet_cloud::telemetry::Rule {
                filter: "dt/#".into(),
                predicate: None,
                sink: std::sync::Arc::new(fleet_cloud::telemetry::JsonLinesSink::new(file)),
            }],
            std::path::Path::new(&dead),
        )
    });
    // Metrics first, so that what starts is counted.
    let _metrics = match args.metrics {
        Some(addr) => Some(fleet_cloud::metrics::serve_metrics(addr).await?),
        None => None,
    };
    let server = FleetServer::start(config).await?;
    if let Some(broker) = &args.broker
        && !server.link().wait_up(args.start_timeout).await
    {
        let why = server
            .link()
            .last_error()
            .unwrap_or_else(|| "no answer".into());
        server.shutdown().await;
        return Err(format!(
            "cannot reach the broker at {broker} within {:?}: {why}",
            args.start_timeout
        )
        .into());
    }
    let registry = server.registry().clone();
    if args.mosquitto_acl.is_some() || args.mosquitto_roster.is_some() {
        let f = std::sync::Arc::new(BrokerFiles {
            registry: registry.clone(),
            policy: BrokerPolicy {
                prefix: args.prefix.clone(),
                claim_identities: args.claims.clone(),
                ..BrokerPolicy::default()
            },
            acl: args.mosquitto_acl.clone(),
            roster: args.mosquitto_roster.clone(),
            pid_file: args.broker_pid_file.clone(),
            writing: tokio::sync::Mutex::new(()),
        });
        f.refresh().await?;
        let _ = files.set(f);
    }
    if let Some(addr) = server.api_addr() {
        if registry.tokens().await?.is_empty() {
            let (_, token) = registry
                .create_token("admin (first start)", Scope::Admin)
                .await?;
            write_secret(&dir.join("admin.token"), &format!("{token}\n"))?;
            tracing::info!(
                "wrote an admin API token to {}",
                dir.join("admin.token").display()
            );
        }
        tracing::info!("management API on https://{addr}");
    }
    shutdown.await;
    tracing::info!("shutting down");
    // A clean stop hands the lease over at once, not when it runs out.
    server.shutdown().await;
    Ok(())
}

/// Writes the man pages of `fleet` and of each subcommand into `out`.
fn man_pages(out: &std::path::Path) -> Result<(), Failure> {
    std::fs::create_dir_all(out).map_err(|e| Failure::usage(format!("{}: {e}", out.display())))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, out)
        .map_err(|e| Failure::other(format!("{}: {e}", out.display())))?;
    println!("man pages written to {}", out.display());
    Ok(())
}

/// Things provisioned by claim are named `thing-{SerialNumber}`.
fn default_template() -> ProvisioningTemplate {
    ProvisioningTemplate {
        allow_replace: false,
        name: "default".into(),
        thing_name_prefix: "thing-".into(),
        name_parameter: "SerialNumber".into(),
        required_parameters: Vec::new(),
        attributes: Default::default(),
        groups: Vec::new(),
        body: None,
        webhook: None,
    }
}

async fn dev_setup(args: &DevSetupArgs) -> Result<(), Box<dyn std::error::Error>> {
    let plugin = args
        .mosquitto_plugin
        .as_ref()
        .map(|p| {
            std::fs::canonicalize(p).map_err(|e| format!("--mosquitto-plugin {}: {e}", p.display()))
        })
        .transpose()?;
    let abs = write_setup(
        &args.dir,
        &args.things,
        &args.claims,
        args.port,
        plugin.as_deref(),
        args.ca_key.as_deref(),
    )?;
    // The things exist in the registry, bound to their certificates: the
    // embedded broker admits a device the registry knows.
    if !args.things.is_empty() {
        let registry = Registry::open(&abs.join("registry.db"))?;
        for thing in &args.things {
            match registry.create_thing(thing, Default::default()).await {
                Ok(_) | Err(fleet_cloud::RegistryError::AlreadyExists(_)) => {}
                Err(e) => return Err(format!("--thing {thing}: {e}").into()),
            }
            let pem = std::fs::read_to_string(abs.join(format!("things/{thing}.pem")))?;
            let id = fleet_cloud::certificate_fingerprint(&pem)
                .ok_or("a written certificate holds no certificate")?;
            registry.add_certificate(&id, thing, &pem).await?;
        }
    }
    println!("Wrote a development setup to {}.", abs.display());
    println!("  fleet serve --dir {}", abs.display());
    println!("or, with Mosquitto:");
    println!("  mosquitto -c {}/mosquitto.conf", abs.display());
    if plugin.is_some() {
        println!(
            "  fleet serve --dir {d} --broker localhost:{} --mosquitto-acl {d}/acl --mosquitto-roster {d}/roster",
            args.port,
            d = abs.display()
        );
    } else {
        println!(
            "  fleet serve --dir {d} --broker localhost:{}",
            args.port,
            d = abs.display()
        );
    }
    Ok(())
}

/// Writes a CA, server, backend, device and claim certificates, and the
/// Mosquitto configuration and ACL for them; returns the directory's
/// absolute path.
fn write_setup(
    dir: &std::path::Path,
    things: &[String],
    claims: &[String],
    port: u16,
    plugin: Option<&std::path::Path>,
    ca_key: Option<&str>,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    for thing in things {
        fleet_core::ThingName::new(thing).map_err(|e| format!("--thing {thing}: {e}"))?;
        if thing == DEFAULT_BACKEND_IDENTITY {
            return Err(
                format!("--thing {thing}: the backend's identity is not a thing name").into(),
            );
        }
    }
    let policy = BrokerPolicy {
        claim_identities: claims.to_vec(),
        ..BrokerPolicy::default()
    };
    let acl = policy.try_mosquitto_acl()?;
    std::fs::create_dir_all(dir.join("things"))?;
    std::fs::create_dir_all(dir.join("claims"))?;
    let write = |name: &str, text: &str, secret: bool| -> std::io::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        #[cfg(not(unix))]
        let _ = secret;
        Ok(())
    };
    let pki = match ca_key {
        Some(uri) => {
            let uri: fleet_pkcs11::Pkcs11Uri = uri.parse().map_err(|e| format!("--ca-key: {e}"))?;
            let key = fleet_pkcs11::Pkcs11Key::open_or_generate(
                &uri,
                fleet_pkcs11::Algorithm::EcdsaP256Sha256,
            )
            .map_err(|e| format!("--ca-key: {e}"))?;
            Pki::new_with_key("fleet CA", fleet_cloud::pki::CaKey::Pkcs11(key))?
        }
        None => Pki::new("fleet development CA")?,
    };
    write("ca.pem", &pki.ca_pem(), false)?;
    if let Some(key) = pki.ca_key_pem() {
        write("ca.key", &key, true)?;
    }
    let server = pki.server_identity()?;
    write("server.pem", &server.cert_pem, false)?;
    write("server.key", &server.key_pem, true)?;
    let backend = pki.client_identity(DEFAULT_BACKEND_IDENTITY)?;
    write("backend.pem", &backend.cert_pem, false)?;
    write("backend.key", &backend.key_pem, true)?;
    for (sub, names) in [("things", things), ("claims", claims)] {
        for name in names {
            let id = pki.client_identity(name)?;
            write(&format!("{sub}/{name}.pem"), &id.cert_pem, false)?;
            write(&format!("{sub}/{name}.key"), &id.key_pem, true)?;
        }
    }
    let abs = std::fs::canonicalize(dir)?;
    write("acl", &acl, false)?;
    let listener = MosquittoListener {
        bind: "127.0.0.1".into(),
        port,
        cafile: abs.join("ca.pem"),
        certfile: abs.join("server.pem"),
        keyfile: abs.join("server.key"),
        acl_file: abs.join("acl"),
        persistence_dir: None,
        // The key files belong to whoever ran this; so should the broker
        // (run as root without a `user` line, Mosquitto would become the
        // `mosquitto` user, which cannot read them).
        run_as_user: current_user(),
        plugin: plugin.map(|library| fleet_cloud::MosquittoPlugin {
            library: library.to_path_buf(),
            roster: abs.join("roster"),
        }),
    };
    write("mosquitto.conf", &policy.mosquitto_conf(&listener), false)?;
    Ok(abs)
}

/// The name of the user running this: `$USER`, `$LOGNAME`, or `id -un`.
fn current_user() -> Option<String> {
    std::env::var("USER")
        .ok()
        .or_else(|| std::env::var("LOGNAME").ok())
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("id").arg("-un").output().ok()?;
            let name = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !name.is_empty()).then_some(name)
        })
}

/// Writes a file only its owner may read.
pub(crate) fn write_secret(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Registers for SIGTERM and SIGINT (Ctrl-C) at once, and returns what
/// waits for either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
