//! The cloud side of a run, in its own process (`fleet-sim cloud`), so that
//! its memory is measured alone and the devices' sockets do not count
//! against its file limit.
//!
//! It starts what `fleet serve` starts, from the same library calls: the
//! embedded broker (`--embedded`) and the services (`--services`: shadows on
//! SQLite, jobs, telemetry routing). It prints `ready {port}`, then answers
//! one command per line on stdin until stdin closes:
//!
//! - `mem` → `mem {rss KiB} {peak KiB}`
//! - `job {id} {n}` → creates a job for things `sim-00000`..`n-1` and
//!   publishes its notifications: `job-created {id} {ms}`, or
//!   `job-failed {id} {why}`
//! - `job-status {id}` → `job-status {id} {succeeded} {executions}`
//! - `telemetry` → `telemetry {count} {p50 µs} {p99 µs}` routed since the
//!   last `telemetry` (latency from the device's timestamp in the payload)

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_cloud::store::StoreLocation;
use fleet_cloud::telemetry::{Rule, SinkError, TelemetryRecord, TelemetryRouter, TelemetrySink};
use fleet_cloud::{
    BackendIdentity, BrokerPolicy, BrokerSetup, DEFAULT_BACKEND_IDENTITY, EmbeddedBroker,
    EmbeddedConfig, FleetConfig, FleetServer, JobSpec, TargetSelection,
};
use fleet_core::jobs::{JobStatus, TimeoutConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::BoxError;
use crate::stats::{Latencies, epoch_micros, thing_name};

/// `fleet-sim cloud` arguments.
#[derive(clap::Args)]
pub(crate) struct CloudArgs {
    /// Holds `ca.pem`, `server.pem`/`.key`, `backend.pem`/`.key`.
    #[arg(long)]
    dir: PathBuf,
    /// Run the embedded broker (on a free loopback port).
    #[arg(long)]
    embedded: bool,
    /// Run the services against the broker.
    #[arg(long)]
    services: bool,
    /// An external broker's port on localhost (without `--embedded`).
    #[arg(long)]
    broker_port: Option<u16>,
    /// A PostgreSQL store (URL) instead of a SQLite file of its own.
    #[arg(long)]
    store: Option<String>,
    /// Share the devices' requests with other instances in this group.
    #[arg(long)]
    share_group: Option<String>,
    /// This instance's MQTT client id.
    #[arg(long, default_value = "fleet-cloud")]
    client_id: String,
}

/// Counts routed telemetry and its latency.
#[derive(Default)]
struct CountingSink {
    seen: Mutex<Latencies>,
}

impl TelemetrySink for CountingSink {
    fn name(&self) -> &str {
        "counter"
    }

    fn write(&self, record: &TelemetryRecord) -> Result<(), SinkError> {
        let sent = record
            .json()
            .and_then(|v| v.get("t").and_then(serde_json::Value::as_u64))
            .ok_or_else(|| SinkError::new("no timestamp"))?;
        let latency = epoch_micros().saturating_sub(sent);
        self.seen
            .lock()
            .map_err(|_| SinkError::new("poisoned"))?
            .push(Duration::from_micros(latency));
        Ok(())
    }
}

/// Resident and peak memory of this process, KiB (Linux `/proc`).
pub(crate) fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Services {
    server: FleetServer,
    sink: Arc<CountingSink>,
}

pub(crate) async fn run(args: CloudArgs) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // FLEET_SIM_METRICS=1: the cloud records its metrics as `fleet serve
    // --metrics` does (the Prometheus recorder installed, nobody
    // scraping), to measure what recording costs.
    if std::env::var_os("FLEET_SIM_METRICS").is_some() {
        fleet_cloud::metrics::prometheus()?;
    }
    let read = |name: &str| {
        std::fs::read_to_string(args.dir.join(name)).map_err(|e| format!("cannot read {name}: {e}"))
    };
    let embedded = if args.embedded {
        let mut config = EmbeddedConfig::new(
            "127.0.0.1:0".parse()?,
            &read("server.pem")?,
            &read("server.key")?,
            &read("ca.pem")?,
        );
        config.policy = BrokerPolicy::default();
        // A storm of handshakes on two cores: give each its time.
        config.handshake_timeout = Duration::from_secs(30);
        Some(config)
    } else {
        None
    };
    // The services are started as `fleet serve` starts them.
    let mut broker = None;
    let (port, services) = if args.services {
        let sink = Arc::new(CountingSink::default());
        let setup = match embedded {
            Some(config) => BrokerSetup::Embedded(config),
            None => BrokerSetup::External {
                host: "localhost".into(),
                port: args.broker_port.ok_or("--broker-port or --embedded")?,
            },
        };
        let unique = epoch_micros();
        let store = match &args.store {
            Some(url) => StoreLocation::Postgres(url.clone()),
            None => StoreLocation::Sqlite(args.dir.join(format!("fleet-{unique}.db"))),
        };
        let mut config = FleetConfig::new(
            store,
            setup,
            BackendIdentity {
                client_id: args.client_id.clone(),
                cert_pem: read("backend.pem")?,
                key_pem: read("backend.key")?,
                ca_pem: read("ca.pem")?,
            },
        );
        config.registry = Some(args.dir.join(format!("registry-{unique}.db")));
        config.share_group = args.share_group.clone();
        // The simulated devices are not in the registry: admitted by their
        // certificate alone.
        config.admit_by_registry = false;
        config.telemetry = Some(TelemetryRouter::new(
            vec![Rule {
                filter: "dt/+/telemetry".into(),
                predicate: None,
                sink: sink.clone(),
            }],
            &args.dir.join("dead-letters.jsonl"),
        ));
        let server = FleetServer::start(config).await?;
        let port = match server.broker_addr() {
            Some(addr) => addr.port(),
            None => args.broker_port.ok_or("--broker-port or --embedded")?,
        };
        (port, Some(Arc::new(Services { server, sink })))
    } else if let Some(config) = embedded {
        let b = EmbeddedBroker::start(config).await?;
        let port = b.local_addr().port();
        broker = Some(b);
        (port, None)
    } else {
        (args.broker_port.ok_or("--broker-port or --embedded")?, None)
    };
    // The service subscribes after connecting; give it that moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("ready {port}");

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match (words.as_slice(), &services) {
            (["mem"], _) => {
                let (rss, peak) = memory_kib();
                println!("mem {rss} {peak}");
            }
            (["job", id, n], Some(s)) => {
                let n: usize = n.parse()?;
                let s = s.clone();
                let id = (*id).to_string();
                tokio::spawn(async move {
                    match fan_out(&s, &id, n).await {
                        Ok(ms) => println!("job-created {id} {ms}"),
                        Err(e) => println!("job-failed {id} {e}"),
                    }
                });
            }
            (["job-status", id], Some(s)) => match s.server.jobs().snapshot(id).await {
                Ok(snapshot) => println!(
                    "job-status {id} {} {}",
                    snapshot
                        .executions
                        .get(&JobStatus::Succeeded)
                        .copied()
                        .unwrap_or(0),
                    snapshot.executions.values().sum::<usize>()
                ),
                Err(e) => println!("job-failed {id} {e}"),
            },
            (["telemetry"], Some(s)) => {
                let seen = std::mem::take(&mut *s.sink.seen.lock().map_err(|_| "poisoned")?);
                println!(
                    "telemetry {} {} {}",
                    seen.len(),
                    seen.percentile(50.0).as_micros(),
                    seen.percentile(99.0).as_micros()
                );
            }
            _ => println!("error unknown command: {line}"),
        }
    }
    drop(broker);
    Ok(())
}

/// Creates a job for the first `n` simulated things and publishes its
/// notifications; returns the milliseconds that took.
async fn fan_out(s: &Services, id: &str, n: usize) -> Result<u128, BoxError> {
    let started = Instant::now();
    let spec = JobSpec {
        job_id: id.into(),
        document: serde_json::json!({"operation": "noop"}),
        things: (0..n).map(thing_name).collect(),
        groups: Vec::new(),
        selection: TargetSelection::Snapshot,
        timeouts: TimeoutConfig::default(),
        max_retries: 0,
        rollout: None,
    };
    let jobs = s.server.jobs();
    let out = jobs
        .create_job(spec, s.server.registry(), jobs.now())
        .await?;
    let publisher = s.server.publisher();
    for m in out {
        publisher.publish(&m.topic, m.payload).await?;
    }
    Ok(started.elapsed().as_millis())
}

/// The backend identity's common name (the services and the echo
/// responder both use it).
pub(crate) const BACKEND: &str = DEFAULT_BACKEND_IDENTITY;
