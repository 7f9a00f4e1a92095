//! The `fleet` command: `fleet serve` runs the backend.
//!
//! ```text
//! fleet serve --broker localhost:8883 --cert backend.pem --key backend.key \
//!             --ca ca.pem --store /var/lib/fleet/fleet.db
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_cloud::{
    BrokerConfig, MemoryStore, ShadowService, ShadowStore, SqliteStore, serve_shadows,
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
