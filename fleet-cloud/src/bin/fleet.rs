//! The `fleet` command: `fleet serve` runs the backend.
//!
//! ```text
//! fleet serve --broker localhost:8883 --cert backend.pem --key backend.key \
//!             --ca ca.pem --store /var/lib/fleet/fleet.db
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_cloud::pki::Pki;
use fleet_cloud::{
    BrokerConfig, BrokerPolicy, DEFAULT_BACKEND_IDENTITY, MemoryStore, MosquittoListener,
    ShadowService, ShadowStore, SqliteStore, serve_shadows,
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
    /// The MQTT broker, `host:port` (mutual TLS). The embedded broker is not
    /// available yet: run Mosquitto with `fleet`'s ACL.
    #[arg(long)]
    broker: String,
    /// The backend's client certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// The backend's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The CA of the broker's certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// A SQLite database path, or `memory`.
    #[arg(long, default_value = "fleet.db")]
    store: String,
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
            Command::Serve(args) => serve(args).await,
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

async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .ok_or("--broker must be host:port")?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let config = BrokerConfig {
        host: host.into(),
        port: port.parse().map_err(|_| "--broker port must be a number")?,
        client_id: args.client_id,
        cert_pem: read(&args.cert)?,
        key_pem: read(&args.key)?,
        ca_pem: read(&args.ca)?,
        share_group: args.share_group,
        queue_capacity: 1024,
    };
    if args.store == "memory" {
        run(config, MemoryStore::new(), &args.prefix).await
    } else {
        let store = SqliteStore::open(std::path::Path::new(&args.store))?;
        tracing::info!("store: SQLite at {}", args.store);
        run(config, store, &args.prefix).await
    }
}

fn dev_setup(args: &DevSetupArgs) -> Result<(), Box<dyn std::error::Error>> {
    for thing in &args.things {
        fleet_core::ThingName::new(thing).map_err(|e| format!("--thing {thing}: {e}"))?;
    }
    let policy = BrokerPolicy {
        claim_identities: args.claims.clone(),
        ..BrokerPolicy::default()
    };
    let acl = policy.try_mosquitto_acl()?;
    let dir = &args.dir;
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
    for (sub, names) in [("things", &args.things), ("claims", &args.claims)] {
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
        port: args.port,
        cafile: abs.join("ca.pem"),
        certfile: abs.join("server.pem"),
        keyfile: abs.join("server.key"),
        acl_file: abs.join("acl"),
        persistence_dir: None,
        // The key files belong to whoever ran this; so should the broker.
        run_as_user: std::env::var("USER").ok().filter(|u| !u.is_empty()),
    };
    write("mosquitto.conf", &policy.mosquitto_conf(&listener), false)?;
    println!("Wrote a development setup to {}.", abs.display());
    println!("  mosquitto -c {}/mosquitto.conf", abs.display());
    println!(
        "  fleet serve --broker localhost:{} --cert {d}/backend.pem --key {d}/backend.key --ca {d}/ca.pem",
        args.port,
        d = abs.display()
    );
    Ok(())
}

async fn run<S: ShadowStore>(
    config: BrokerConfig,
    store: S,
    prefix: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let service = ShadowService::new(store).with_prefix(prefix)?;
    let running = serve_shadows(config, service)?;
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
