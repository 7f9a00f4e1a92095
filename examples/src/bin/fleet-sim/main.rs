//! `fleet-sim`: how far fleet scales on one machine, and what it costs.
//!
//! ```text
//! cargo build --release -p examples --bin fleet-sim
//! target/release/fleet-sim --broker embedded -n 1000
//! target/release/fleet-sim --broker mosquitto -n 10000 --duration 10
//! ```
//!
//! N simulated devices, each a real MQTT connection with mutual TLS, all in
//! this process, against a broker and the fleet cloud service (in a child
//! process, so its memory is its own). For each scenario (connect storm,
//! shadow updates, job fan-out, telemetry) it first measures the **raw
//! broker ceiling**: the same connections, certificates, topics and message
//! pattern with plain MQTT clients and an echo responder that does no work.
//! Then the same through fleet: `fleet_device::Agent`s against the
//! services (shadows on SQLite, jobs, telemetry routing). It reports both,
//! their ratio, latency percentiles and the cloud service's memory per
//! device.
//!
//! Brokers: `embedded` (fleet's own, in the cloud process), `mosquitto`
//! (started here from Debian's package), or `HOST:PORT` of a running broker
//! that trusts the CA in `--ca-dir` (`ca.pem`, `ca.key`) and enforces
//! fleet's policy.

mod agents;
mod cloud;
mod index;
mod raw;
mod stats;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use fleet_cloud::pki::{Identity, Pki};
use fleet_device::Agent;
use fleet_testkit::{Broker, BrokerKind, BrokerOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::raw::RawClient;
use crate::stats::{Latencies, padding, thing_name};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(
    name = "fleet-sim",
    about = "Load tool: fleet against the raw broker ceiling"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// The cloud side of a run (started by fleet-sim itself).
    #[command(hide = true)]
    Cloud(cloud::CloudArgs),
    /// The fleet index: query latency against a full scan, and what the
    /// index costs a shadow update.
    Index(index::IndexArgs),
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// `embedded`, `mosquitto`, or `HOST:PORT` of a running broker.
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// With `--broker HOST:PORT`: a directory with the CA the broker trusts
    /// (`ca.pem`, `ca.key`); device and backend certificates are issued
    /// from it.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Simulated devices.
    #[arg(short = 'n', long, default_value_t = 1000)]
    devices: usize,
    /// Seconds each throughput scenario runs.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Bytes of padding in each shadow report and telemetry message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// A PostgreSQL store for the cloud (URL) instead of SQLite.
    #[arg(long)]
    store: Option<String>,
    /// Cloud instances sharing the store and the devices' requests (MQTT 5
    /// shared subscriptions; needs `--store` and the embedded broker, as
    /// Mosquitto 2.0 does not share `$aws` topics).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Scenarios to run, comma-separated: connect (always), shadow, jobs,
    /// telemetry.
    #[arg(long, default_value = "shadow,jobs,telemetry", value_delimiter = ',')]
    scenarios: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Cloud(args)) => cloud::run(args).await,
            Some(Command::Index(args)) => index::run(args).await,
            None => run(cli.run).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The broker under test.
enum Target {
    Embedded,
    Mosquitto(Box<Broker>),
    External(u16),
}

/// The cloud child process.
struct CloudProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
}

impl CloudProcess {
    async fn spawn(
        dir: &Path,
        log: &str,
        embedded: bool,
        services: bool,
        broker_port: Option<u16>,
        extra: &[String],
    ) -> Result<Self, BoxError> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("cloud").arg("--dir").arg(dir).args(extra);
        if embedded {
            cmd.arg("--embedded");
        }
        if services {
            cmd.arg("--services");
        }
        if let Some(p) = broker_port {
            cmd.arg("--broker-port").arg(p.to_string());
        }
        let log = std::fs::File::create(dir.join(log))?;
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut this = Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            port: 0,
        };
        let ready = this.read("ready").await?;
        this.port = ready.first().ok_or("no port")?.parse()?;
        Ok(this)
    }

    /// Reads lines until one starts with `word`; returns its other words.
    async fn read(&mut self, word: &str) -> Result<Vec<String>, BoxError> {
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .ok_or("the cloud process ended (see its log)")?;
            let mut words = line.split_whitespace().map(String::from);
            if words.next().as_deref() == Some(word) {
                return Ok(words.collect());
            }
            if line.starts_with("error") || line.starts_with("job-failed") {
                return Err(format!("cloud: {line}").into());
            }
        }
    }

    async fn ask(&mut self, command: &str, answer: &str) -> Result<Vec<String>, BoxError> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        self.read(answer).await
    }

    /// (resident, peak) KiB.
    async fn memory(&mut self) -> Result<(u64, u64), BoxError> {
        let m = self.ask("mem", "mem").await?;
        Ok((
            m.first().ok_or("mem")?.parse()?,
            m.get(1).ok_or("mem")?.parse()?,
        ))
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}

/// The keys and certificates of a run.
struct Setup {
    dir: tempfile::TempDir,
    ca_pem: String,
    backend: Identity,
    devices: Vec<Identity>,
}

fn write_setup(pki: &Pki, n: usize) -> Result<Setup, BoxError> {
    let dir = tempfile::Builder::new().prefix("fleet-sim-").tempdir()?;
    let server = pki.server_identity()?;
    let backend = pki.client_identity(cloud::BACKEND)?;
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), pki.ca_pem())?;
    std::fs::write(d.join("server.pem"), &server.cert_pem)?;
    std::fs::write(d.join("server.key"), &server.key_pem)?;
    std::fs::write(d.join("backend.pem"), &backend.cert_pem)?;
    std::fs::write(d.join("backend.key"), &backend.key_pem)?;
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        devices.push(pki.client_identity(&thing_name(i))?);
    }
    Ok(Setup {
        dir,
        ca_pem: pki.ca_pem(),
        backend,
        devices,
    })
}

/// Runs `f` on every item in its own task; returns the items with results.
async fn each<T, U, R, F, Fut>(items: Vec<T>, f: F) -> Vec<(U, Result<R, BoxError>)>
where
    U: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = (U, Result<R, BoxError>)> + Send + 'static,
{
    let tasks: Vec<_> = items.into_iter().map(|t| tokio::spawn(f(t))).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => eprintln!("fleet-sim: a device task failed: {e}"),
        }
    }
    out
}

/// What one side of a scenario measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    /// Operations completed.
    ops: usize,
    /// Failed devices (each stops at its first failure).
    errors: usize,
    elapsed: Duration,
    latencies: Latencies,
    first_error: Option<String>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn collect<T>(
        results: Vec<(T, Result<Latencies, BoxError>)>,
        elapsed: Duration,
    ) -> (Vec<T>, Self) {
        let mut m = Measured {
            elapsed,
            ..Measured::default()
        };
        let mut items = Vec::with_capacity(results.len());
        for (item, r) in results {
            match r {
                Ok(l) => {
                    m.ops += l.len();
                    m.latencies.extend(l);
                }
                Err(e) => {
                    m.errors += 1;
                    m.first_error.get_or_insert(e.to_string());
                }
            }
            items.push(item);
        }
        (items, m)
    }
}

/// One row of the report.
struct Row {
    scenario: &'static str,
    unit: &'static str,
    raw: Measured,
    fleet: Measured,
    /// Time-based scenario (ratio = raw time / fleet time is shown inverted).
    by_time: bool,
}

#[derive(Default)]
struct Memory {
    raw_base: u64,
    raw_peak: u64,
    fleet_base: u64,
    fleet_connected: u64,
    fleet_peak: u64,
}

/// Runs a throughput scenario on every device for `duration`.
async fn for_duration<T, F, Fut>(items: Vec<T>, duration: Duration, op: F) -> (Vec<T>, Measured)
where
    T: Send + 'static,
    F: Fn(Arc<tokio::sync::Mutex<T>>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    let started = Instant::now();
    let until = started + duration;
    // The rate counts what completed within the window: one straggling
    // request must not stretch it (its latency still counts).
    let in_window = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = in_window.clone();
    let results = each(items, move |item| {
        let op = op.clone();
        let counted = counted.clone();
        async move {
            let item = Arc::new(tokio::sync::Mutex::new(item));
            let mut lat = Latencies::default();
            let mut seq = 0;
            let mut result = Ok(());
            while Instant::now() < until {
                seq += 1;
                let t0 = Instant::now();
                if let Err(e) = op(item.clone(), seq).await {
                    result = Err(e);
                    break;
                }
                lat.push(t0.elapsed());
                if Instant::now() <= until {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
            let item = match Arc::try_unwrap(item) {
                Ok(m) => m.into_inner(),
                Err(_) => unreachable!("the loop holds the only other reference"),
            };
            (item, result.map(|()| lat))
        }
    })
    .await;
    let (items, mut m) = Measured::collect(results, started.elapsed());
    m.ops = in_window.load(Ordering::Relaxed);
    m.elapsed = duration;
    (items, m)
}

fn wants(args: &RunArgs, scenario: &str) -> bool {
    args.scenarios.iter().any(|s| s == scenario)
}

async fn run(args: RunArgs) -> Result<(), BoxError> {
    let n = args.devices;
    let duration = Duration::from_secs(args.duration);
    let pad: Arc<str> = padding(args.payload).into();
    let started = Instant::now();
    let say = |text: &str| println!("[{:6.1} s] {text}", started.elapsed().as_secs_f64());

    if args.instances > 1 && (args.store.is_none() || args.broker != "embedded") {
        return Err(
            "--instances above 1 needs --store postgres://... and --broker embedded".into(),
        );
    }
    let (target, pki) = match args.broker.as_str() {
        "embedded" => (Target::Embedded, Pki::new("fleet-sim CA")?),
        "mosquitto" => {
            let broker = Broker::start_with(BrokerOptions {
                kind: BrokerKind::Mosquitto,
                ..BrokerOptions::default()
            })
            .map_err(|e| {
                format!("{e} (install Mosquitto: `apt-get install mosquitto`, or set $MOSQUITTO)")
            })?;
            let pki = broker.pki().clone();
            (Target::Mosquitto(Box::new(broker)), pki)
        }
        external => {
            let port = external
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or("--broker: embedded, mosquitto or HOST:PORT")?;
            let ca_dir = args
                .ca_dir
                .as_ref()
                .ok_or("--broker HOST:PORT needs --ca-dir")?;
            let pki = Pki::from_pem(
                &std::fs::read_to_string(ca_dir.join("ca.pem"))?,
                &std::fs::read_to_string(ca_dir.join("ca.key"))?,
            )?;
            (Target::External(port), pki)
        }
    };
    say(&format!("issuing {n} device certificates"));
    let setup = tokio::task::spawn_blocking(move || write_setup(&pki, n)).await??;
    let dir = setup.dir.path().to_path_buf();
    let ca = setup.ca_pem.clone();
    let mut rows = Vec::new();
    let mut memory = Memory::default();

    // ---- The raw broker ceiling.
    let (raw_cloud, port) = match &target {
        Target::Embedded => {
            let c = CloudProcess::spawn(&dir, "broker.log", true, false, None, &[]).await?;
            let port = c.port;
            (Some(c), port)
        }
        Target::Mosquitto(b) => (None, b.port()),
        Target::External(p) => (None, *p),
    };
    let mut raw_cloud = raw_cloud;
    if let Some(c) = &mut raw_cloud {
        memory.raw_base = c.memory().await?.0;
    }
    let echo = raw::Echo::start(port, &ca, &setup.backend).await?;
    let consumer = raw::Consumer::start(port, &ca, &setup.backend).await?;
    say(&format!("raw: connecting {n} plain MQTT clients"));
    let t0 = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for id in &setup.devices {
        pending.push(raw::connect(port, &ca, id, &id.common_name)?);
    }
    let results = each(pending, move |(client, connected)| async move {
        let r = raw::connected_after(connected, t0).await.map(|d| {
            let mut l = Latencies::default();
            l.push(d);
            l
        });
        (client, r)
    })
    .await;
    let (clients, mut raw_connect) = Measured::collect(results, t0.elapsed());
    raw_connect.elapsed = t0.elapsed();
    let raw_retries = raw::RETRIES.swap(0, Ordering::Relaxed);
    for c in &clients {
        c.subscribe_answers().await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    say(&format!(
        "raw: {} connected in {:.1} s ({raw_retries} retries)",
        raw_connect.ops,
        raw_connect.elapsed.as_secs_f64()
    ));
    let mut clients: Vec<RawClient> = clients;
    let mut raw_shadow = Measured::default();
    if wants(&args, "shadow") {
        let p = pad.clone();
        let (c, m) = for_duration(clients, duration, move |d, seq| {
            let p = p.clone();
            async move { d.lock().await.shadow_update(seq, &p).await }
        })
        .await;
        clients = c;
        say(&format!("raw: {:.0} shadow updates/s", m.rate()));
        raw_shadow = m;
    }
    let mut raw_jobs = Measured::default();
    if wants(&args, "jobs") {
        let waiting = tokio::spawn(each(clients, |mut c| async move {
            let r = c.job().await.map(|()| Latencies::default());
            (c, r)
        }));
        // Every device is waiting for its notification before it is sent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let things: Vec<String> = (0..n).map(thing_name).collect();
        echo.notify(&things).await?;
        let results = waiting.await?;
        let elapsed = t.elapsed();
        let (c, mut m) = Measured::collect(results, elapsed);
        m.ops = n - m.errors;
        clients = c;
        say(&format!(
            "raw: job fan-out to {n} in {:.2} s",
            elapsed.as_secs_f64()
        ));
        raw_jobs = m;
    }
    let mut raw_telemetry = Measured::default();
    if wants(&args, "telemetry") {
        let _ = consumer.take();
        for c in &mut clients {
            c.forget_acks();
        }
        let p = pad.clone();
        let t = Instant::now();
        let (c, sent) = for_duration(clients, duration, move |d, _| {
            let p = p.clone();
            async move { d.lock().await.telemetry(&p).await }
        })
        .await;
        clients = c;
        let mut delivered = consumer.take();
        let drain = Instant::now();
        while delivered.len() < sent.latencies.len() && drain.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            delivered.extend(consumer.take());
        }
        let lost = sent.latencies.len().saturating_sub(delivered.len());
        raw_telemetry = Measured {
            ops: delivered.len(),
            errors: sent.errors,
            elapsed: t.elapsed(),
            latencies: delivered,
            first_error: sent.first_error.or_else(|| {
                (lost > 0).then(|| {
                    format!(
                        "{lost} of {} acknowledged messages not delivered",
                        sent.latencies.len()
                    )
                })
            }),
        };
        say(&format!(
            "raw: {:.0} telemetry messages/s delivered ({} sent)",
            raw_telemetry.rate(),
            sent.latencies.len()
        ));
    }
    if let Some(c) = &mut raw_cloud {
        memory.raw_peak = c.memory().await?.1;
    }
    drop(clients);
    drop(echo);
    drop(consumer);
    if let Some(c) = raw_cloud {
        c.stop().await;
    }
    // Let the sockets close before the next storm.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ---- Through fleet.
    // Several instances share a PostgreSQL store and the devices' requests
    // (MQTT 5 shared subscriptions): the embedded broker then runs alone.
    let separate = args.instances > 1 || args.store.is_some();
    let mut broker_child = None;
    let broker_port = match &target {
        Target::Embedded if separate => {
            let b = CloudProcess::spawn(&dir, "broker-2.log", true, false, None, &[]).await?;
            let p = b.port;
            broker_child = Some(b);
            Some(p)
        }
        Target::Embedded => None,
        Target::Mosquitto(b) => Some(b.port()),
        Target::External(p) => Some(*p),
    };
    let instance_args = |k: usize| -> Vec<String> {
        let mut v = vec!["--client-id".to_string(), format!("cloud-{k}")];
        if let Some(store) = &args.store {
            v.extend(["--store".to_string(), store.clone()]);
        }
        if args.instances > 1 {
            v.extend(["--share-group".to_string(), "sim".to_string()]);
        }
        v
    };
    let mut cloud = CloudProcess::spawn(
        &dir,
        "cloud.log",
        broker_port.is_none(),
        true,
        broker_port,
        &instance_args(0),
    )
    .await?;
    let mut others = Vec::new();
    for k in 1..args.instances {
        others.push(
            CloudProcess::spawn(
                &dir,
                &format!("cloud-{k}.log"),
                false,
                true,
                broker_port,
                &instance_args(k),
            )
            .await?,
        );
    }
    let port = broker_port.unwrap_or(cloud.port);
    memory.fleet_base = cloud.memory().await?.0;
    say(&format!("fleet: starting {n} device agents"));
    let t0 = Instant::now();
    let mut agents = Vec::with_capacity(n);
    for id in &setup.devices {
        agents.push(agents::start(port, &ca, id)?);
    }
    let results = each(agents, move |mut a| async move {
        let r = agents::connected(&mut a, t0).await.map(|d| {
            let mut l = Latencies::default();
            l.push(d);
            l
        });
        (a, r)
    })
    .await;
    let (agents, mut fleet_connect) = Measured::collect(results, t0.elapsed());
    fleet_connect.elapsed = t0.elapsed();
    let fleet_retries = agents::RETRIES.swap(0, Ordering::Relaxed);
    // Each agent reads its shadow and asks for jobs when it connects.
    tokio::time::sleep(Duration::from_secs(2)).await;
    memory.fleet_connected = cloud.memory().await?.0;
    say(&format!(
        "fleet: {} connected in {:.1} s ({fleet_retries} retries)",
        fleet_connect.ops,
        fleet_connect.elapsed.as_secs_f64()
    ));
    rows.push(Row {
        scenario: "connect storm",
        unit: "connections/s",
        raw: raw_connect,
        fleet: fleet_connect,
        by_time: false,
    });
    let mut agents: Vec<Agent> = agents;
    if wants(&args, "shadow") {
        let p = pad.clone();
        let (a, m) = for_duration(agents, duration, move |a, seq| {
            let p = p.clone();
            async move { agents::shadow_update(&*a.lock().await, seq, &p).await }
        })
        .await;
        agents = a;
        say(&format!("fleet: {:.0} shadow updates/s", m.rate()));
        rows.push(Row {
            scenario: "shadow updates",
            unit: "updates/s",
            raw: raw_shadow,
            fleet: m,
            by_time: false,
        });
    }
    if wants(&args, "jobs") {
        let waiting = tokio::spawn(each(agents, |mut a| async move {
            let r = agents::job(&mut a, "sim-job")
                .await
                .map(|()| Latencies::default());
            (a, r)
        }));
        let t = Instant::now();
        cloud
            .ask(&format!("job sim-job {n}"), "job-created")
            .await?;
        let results = waiting.await?;
        let elapsed = t.elapsed();
        let (a, mut m) = Measured::collect(results, elapsed);
        m.ops = n - m.errors;
        agents = a;
        let status = cloud.ask("job-status sim-job", "job-status").await?;
        let succeeded: usize = status.get(1).ok_or("job-status")?.parse()?;
        say(&format!(
            "fleet: job fan-out to {n} in {:.2} s; the service records {succeeded} SUCCEEDED",
            elapsed.as_secs_f64()
        ));
        if succeeded != n {
            m.first_error
                .get_or_insert(format!("the service records {succeeded} of {n} SUCCEEDED"));
        }
        rows.push(Row {
            scenario: "job fan-out",
            unit: "s to all SUCCEEDED",
            raw: raw_jobs,
            fleet: m,
            by_time: true,
        });
    }
    if wants(&args, "telemetry") {
        cloud.ask("telemetry", "telemetry").await?;
        for o in &mut others {
            o.ask("telemetry", "telemetry").await?;
        }
        let p = pad.clone();
        let t = Instant::now();
        let (a, sent) = for_duration(agents, duration, move |a, _| {
            let p = p.clone();
            async move { agents::telemetry(&*a.lock().await, &p).await }
        })
        .await;
        agents = a;
        let mut delivered = 0;
        let mut latencies = Vec::new();
        let drain = Instant::now();
        loop {
            let mut r = cloud.ask("telemetry", "telemetry").await?;
            let mut count: usize = r.first().ok_or("telemetry")?.parse()?;
            for o in &mut others {
                let ro = o.ask("telemetry", "telemetry").await?;
                let c: usize = ro.first().ok_or("telemetry")?.parse()?;
                if c > count {
                    r = ro;
                }
                count += c;
            }
            delivered += count;
            if count > 0 {
                latencies.push((
                    count,
                    r.get(1).ok_or("telemetry")?.parse::<u64>()?,
                    r.get(2).ok_or("telemetry")?.parse::<u64>()?,
                ));
            }
            if delivered >= sent.latencies.len() || drain.elapsed() > Duration::from_secs(10) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The cloud reports percentiles per batch; the first batch holds
        // nearly all messages.
        let (p50, p99) = latencies
            .iter()
            .max_by_key(|(c, _, _)| *c)
            .map_or((0, 0), |(_, a, b)| (*a, *b));
        let mut l = Latencies::default();
        l.push(Duration::from_micros(p50));
        let lost = sent.latencies.len().saturating_sub(delivered);
        let fleet = Measured {
            ops: delivered,
            errors: sent.errors,
            elapsed: t.elapsed(),
            latencies: Latencies::default(),
            first_error: sent.first_error.or_else(|| {
                (lost > 0).then(|| {
                    format!(
                        "{lost} of {} acknowledged messages not routed",
                        sent.latencies.len()
                    )
                })
            }),
        };
        say(&format!(
            "fleet: {:.0} telemetry messages/s routed ({} sent)",
            fleet.rate(),
            sent.latencies.len()
        ));
        let mut row = Row {
            scenario: "telemetry",
            unit: "messages/s",
            raw: raw_telemetry,
            fleet,
            by_time: false,
        };
        row.fleet.latencies = fixed_percentiles(p50, p99);
        rows.push(row);
    }
    memory.fleet_peak = cloud.memory().await?.1;
    let stopping = Instant::now();
    each(agents, |a| async move {
        a.shutdown().await;
        ((), Ok(Latencies::default()))
    })
    .await;
    cloud.stop().await;
    for o in others {
        o.stop().await;
    }
    if let Some(b) = broker_child {
        b.stop().await;
    }
    say(&format!(
        "stopped the agents in {:.1} s",
        stopping.elapsed().as_secs_f64()
    ));
    report(&args, &rows, &memory);
    let failed: usize = rows.iter().map(|r| r.raw.errors + r.fleet.errors).sum();
    if failed > 0 {
        return Err(format!("{failed} device operations failed (see the table)").into());
    }
    Ok(())
}

/// Latencies whose 50th and 99th percentiles are the given ones (for the
/// cloud's figures, which arrive as percentiles).
fn fixed_percentiles(p50: u64, p99: u64) -> Latencies {
    let mut l = Latencies::default();
    for i in 0..100 {
        l.push(Duration::from_micros(if i < 50 { p50 } else { p99 }));
    }
    l
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn report(args: &RunArgs, rows: &[Row], memory: &Memory) {
    let n = args.devices;
    println!(
        "\n## fleet-sim: {} broker, N = {n}, {} s per scenario, {} B padding\n",
        args.broker, args.duration, args.payload
    );
    println!(
        "| scenario | raw ceiling | fleet | fleet vs raw | raw p50 / p99 ms | fleet p50 / p99 ms | errors raw / fleet |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let (raw, fleet, ratio) = if r.by_time {
            let (a, b) = (r.raw.elapsed.as_secs_f64(), r.fleet.elapsed.as_secs_f64());
            (
                format!("{a:.2} {}", r.unit),
                format!("{b:.2} {}", r.unit),
                format!("{:.2}x the time", b / a.max(1e-9)),
            )
        } else {
            (
                format!("{:.0} {}", r.raw.rate(), r.unit),
                format!("{:.0} {}", r.fleet.rate(), r.unit),
                format!("{:.2}x", r.fleet.rate() / r.raw.rate().max(1e-9)),
            )
        };
        let lat = |m: &Measured| {
            if m.latencies.len() == 0 {
                "-".to_string()
            } else {
                format!(
                    "{} / {}",
                    millis(m.latencies.percentile(50.0)),
                    millis(m.latencies.percentile(99.0))
                )
            }
        };
        println!(
            "| {} | {raw} | {fleet} | {ratio} | {} | {} | {} / {} |",
            r.scenario,
            lat(&r.raw),
            lat(&r.fleet),
            r.raw.errors,
            r.fleet.errors
        );
    }
    for r in rows {
        for (side, m) in [("raw", &r.raw), ("fleet", &r.fleet)] {
            if let Some(e) = &m.first_error {
                println!("\n{} ({side}): first error: {e}", r.scenario);
            }
        }
    }
    let per = |kib: u64| kib as f64 * 1024.0 / n.max(1) as f64;
    println!("\nCloud service memory (resident, KiB):");
    if memory.raw_peak > 0 {
        println!(
            "- broker alone (raw run): {} at start, peak {} = {:.0} B per connection",
            memory.raw_base,
            memory.raw_peak,
            per(memory.raw_peak.saturating_sub(memory.raw_base))
        );
    }
    println!(
        "- fleet: {} at start, {} with {n} devices connected, peak {} = {:.0} B per device (peak over start)",
        memory.fleet_base,
        memory.fleet_connected,
        memory.fleet_peak,
        per(memory.fleet_peak.saturating_sub(memory.fleet_base))
    );
}
