//! The `fleet` command: `fleet serve` runs the backend.
//!
//! ```text
//! # One process: embedded broker on 127.0.0.1:8883, SQLite, a development
//! # CA created in ./fleet-data on first start.
//! fleet serve
//! # Against an external broker (Mosquitto with fleet's ACL):
//! fleet serve --broker localhost:8883 --cert backend.pem --key backend.key \
//!             --ca ca.pem --store /var/lib/fleet/fleet.db
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_cloud::pki::Pki;
use fleet_cloud::{
    BrokerConfig, BrokerPolicy, DEFAULT_BACKEND_IDENTITY, EmbeddedBroker, EmbeddedConfig, Extras,
    JobStore, JobsService, MemoryStore, MosquittoListener, ProvisioningService,
    ProvisioningTemplate, Registry, ShadowService, ShadowStore, SqliteStore, StreamService, serve,
};

#[derive(Parser)]
#[command(name = "fleet", version, about = "The fleet backend and its tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the backend service until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Write a development setup: a CA, broker, backend, device and claim
    /// certificates, and the Mosquitto configuration and ACL for them.
    DevSetup(DevSetupArgs),
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
}

#[derive(clap::Args)]
struct ServeArgs {
    /// An external MQTT broker, `host:port` (mutual TLS, with fleet's ACL).
    /// Without it, fleet runs its embedded broker.
    #[arg(long)]
    broker: Option<String>,
    /// Embedded broker: the address to listen on. Loopback by default; bind
    /// a public address only if devices on other machines must connect.
    #[arg(long, default_value = "127.0.0.1:8883")]
    listen: SocketAddr,
    /// The fleet's keys and certificates (embedded broker: `ca.pem`,
    /// `ca.key`, `server.*`, `backend.*`; written with a new development CA
    /// on first start if `ca.pem` is missing), and the default store.
    #[arg(long, default_value = "fleet-data")]
    dir: PathBuf,
    /// The backend's client certificate (PEM); default `{dir}/backend.pem`.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The backend's private key (PEM); default `{dir}/backend.key`.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The CA of the broker's certificate (PEM); default `{dir}/ca.pem`.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A SQLite database path, or `memory`; default `{dir}/fleet.db`.
    #[arg(long)]
    store: Option<String>,
    /// Embedded broker: a claim identity allowed to provision (its name
    /// contains `@`); repeatable. Provisioning by claim is served when
    /// `{dir}/ca.key` exists.
    #[arg(long = "claim")]
    claims: Vec<String>,
    /// MQTT client id of this instance.
    #[arg(long, default_value = "fleet-cloud")]
    client_id: String,
    /// Share the load with other instances in this group (MQTT 5 shared
    /// subscriptions; with Mosquitto, needs a prefix without `$`).
    #[arg(long)]
    share_group: Option<String>,
    /// Topic prefix.
    #[arg(long, default_value = "$aws")]
    prefix: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve_command(args).await,
            Command::DevSetup(args) => dev_setup(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_command(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let dir = &args.dir;
    let mut embedded = None;
    let (host, port) = match &args.broker {
        Some(broker) => {
            let (host, port) = broker
                .rsplit_once(':')
                .ok_or("--broker must be host:port")?;
            (
                host.to_owned(),
                port.parse().map_err(|_| "--broker port must be a number")?,
            )
        }
        None => {
            if !dir.join("ca.pem").exists() {
                write_setup(dir, &[], &args.claims, args.listen.port())?;
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
            let broker = EmbeddedBroker::start(config).await?;
            let port = broker.local_addr().port();
            embedded = Some(broker);
            ("localhost".to_owned(), port)
        }
    };
    let or_dir = |p: &Option<PathBuf>, name: &str| p.clone().unwrap_or_else(|| dir.join(name));
    let config = BrokerConfig {
        host,
        port,
        client_id: args.client_id.clone(),
        cert_pem: read(&or_dir(&args.cert, "backend.pem"))?,
        key_pem: read(&or_dir(&args.key, "backend.key"))?,
        ca_pem: read(&or_dir(&args.ca, "ca.pem"))?,
        share_group: args.share_group.clone(),
        queue_capacity: 1024,
    };
    let provisioning = match (
        std::fs::read_to_string(dir.join("ca.pem")),
        std::fs::read_to_string(dir.join("ca.key")),
    ) {
        // Provisioning speaks the `$aws` topics only.
        (Ok(ca), Ok(key)) if embedded.is_some() && args.prefix == "$aws" => {
            let registry = Registry::open(&dir.join("registry.db"))?;
            // What the registry says is revoked or denied, the broker refuses.
            if let Some(b) = &embedded {
                b.revoke(registry.revoked_certificates()?);
                let mut policy = b.policy();
                policy.denied_identities = registry.denied_identities()?;
                b.set_policy(policy);
            }
            tracing::info!("provisioning by claim: template `default` (parameter SerialNumber)");
            Some(ProvisioningService::new(
                Pki::from_pem(&ca, &key)?,
                registry,
                vec![default_template()],
            ))
        }
        _ => None,
    };
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| dir.join("fleet.db").display().to_string());
    let extras = Extras {
        provisioning,
        ..Extras::default()
    };
    let result = if store == "memory" {
        let extras = Extras {
            streams: Some(StreamService::new()),
            ..extras
        };
        run(config, MemoryStore::new(), &args.prefix, extras).await
    } else {
        if let Some(parent) = std::path::Path::new(&store).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        let path = std::path::Path::new(&store);
        let s = SqliteStore::open(path)?;
        tracing::info!("store: SQLite at {store}");
        // Release images are kept in the same database.
        let extras = Extras {
            streams: Some(StreamService::open(path)?),
            ..extras
        };
        run(config, s, &args.prefix, extras).await
    };
    if let Some(b) = embedded {
        b.shutdown().await;
    }
    result
}

/// Things provisioned by claim are named `thing-{SerialNumber}`.
fn default_template() -> ProvisioningTemplate {
    ProvisioningTemplate {
        name: "default".into(),
        thing_name_prefix: "thing-".into(),
        name_parameter: "SerialNumber".into(),
        required_parameters: Vec::new(),
        attributes: Default::default(),
        groups: Vec::new(),
    }
}

fn dev_setup(args: &DevSetupArgs) -> Result<(), Box<dyn std::error::Error>> {
    let abs = write_setup(&args.dir, &args.things, &args.claims, args.port)?;
    println!("Wrote a development setup to {}.", abs.display());
    println!("  fleet serve --dir {}", abs.display());
    println!("or, with Mosquitto:");
    println!("  mosquitto -c {}/mosquitto.conf", abs.display());
    println!(
        "  fleet serve --dir {d} --broker localhost:{}",
        args.port,
        d = abs.display()
    );
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
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    for thing in things {
        fleet_core::ThingName::new(thing).map_err(|e| format!("--thing {thing}: {e}"))?;
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
    let pki = Pki::new("fleet development CA")?;
    write("ca.pem", &pki.ca_pem(), false)?;
    write("ca.key", &pki.ca_key_pem(), true)?;
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
        // The key files belong to whoever ran this; so should the broker.
        run_as_user: std::env::var("USER").ok().filter(|u| !u.is_empty()),
    };
    write("mosquitto.conf", &policy.mosquitto_conf(&listener), false)?;
    Ok(abs)
}

async fn run<S: ShadowStore + JobStore + Clone>(
    config: BrokerConfig,
    store: S,
    prefix: &str,
    extras: Extras,
) -> Result<(), Box<dyn std::error::Error>> {
    // The jobs service (with its rollouts and campaigns) speaks `$aws`.
    let extras = if prefix == "$aws" {
        Extras {
            jobs: Some(JobsService::new(store.clone()).into()),
            ..extras
        }
    } else {
        extras
    };
    let service = ShadowService::new(store).with_prefix(prefix)?;
    let running = serve(config, service, extras)?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
