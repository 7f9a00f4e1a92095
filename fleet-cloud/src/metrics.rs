//! What the backend counts, and a Prometheus endpoint to read it.
//!
//! The backend records through the [`metrics`](https://docs.rs/metrics)
//! facade: nothing is kept until a recorder is installed, so a program
//! that embeds the services pays nothing for metrics it does not read, and
//! may install the recorder of its choice. [`serve_metrics`] installs the
//! Prometheus recorder (once per process) and serves its text exposition
//! at `GET /metrics` over plain HTTP on an address of its own, off the
//! management API (`fleet serve --metrics 127.0.0.1:9464`). The Grafana
//! dashboard in `deploy/grafana-dashboard.json` shows these figures.
//!
//! Install the recorder before starting the broker and the services: the
//! hot paths (every message, every shadow update) register their counters
//! once, when they start, and count into them without a lookup.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let metrics = fleet_cloud::metrics::serve_metrics("127.0.0.1:9464".parse()?).await?;
//! println!("scrape http://{}/metrics", metrics.local_addr());
//! # Ok(()) }
//! ```
//!
//! # The figures
//! | name | kind | labels |
//! |---|---|---|
//! | `fleet_broker_connected_clients` | gauge | `role` (device, backend, claimant) |
//! | `fleet_broker_connects_total` | counter | `outcome` (accepted, or the CONNACK refusal) |
//! | `fleet_broker_disconnects_total` | counter | `reason`, AWS IoT's lifecycle reasons in lower case (client_initiated_disconnect, mqtt_keep_alive_timeout, duplicate_clientid, auth_error, connection_lost, client_error, throttled, server_initiated_disconnect, server_error) |
//! | `fleet_broker_messages_received_total` | counter | `qos` |
//! | `fleet_broker_messages_sent_total` | counter | `qos` |
//! | `fleet_broker_messages_dropped_total` | counter | |
//! | `fleet_broker_parked_sessions` | gauge | |
//! | `fleet_tls_handshake_failures_total` | counter | `listener` (mqtt, api), `reason` |
//! | `fleet_messages_in_total` | counter | `service` (shadows, jobs, streams, provisioning, commands, telemetry), `qos` |
//! | `fleet_messages_out_total` | counter | `service`, `qos` |
//! | `fleet_outbound_dropped_total` | counter | |
//! | `fleet_outbound_queued_bytes` | gauge | |
//! | `fleet_requests_total` | counter | `service`, `outcome` (handled, forbidden, not_a_request, failed) |
//! | `fleet_shadow_requests_total` | counter | `operation`, `outcome` (accepted, rejected), `code` |
//! | `fleet_job_executions_total` | counter | `status` (each execution reaching it) |
//! | `fleet_rollout_released_total` | counter | (things released or retried by rollouts) |
//! | `fleet_rollout_targets` | gauge | `job`, `status` (a rollout's things by status) |
//! | `fleet_campaign_devices` | gauge | `campaign`, `state` (as last read by a watcher or the API) |
//! | `fleet_provisioning_total` | counter | `operation` (create_certificate_from_csr, create_keys_and_certificate, register_thing), `outcome` (accepted, or the rejection's error code) |
//! | `fleet_telemetry_messages_total` | counter | `outcome` (routed, dead_lettered; per rule it matched) |
//! | `fleet_store_operation_seconds` | histogram | `operation` |
//! | `fleet_store_conflicts_total` | counter | `kind` (shadow, jobs) |
//! | `fleet_api_requests_total` | counter | `method`, `status` |
//! | `fleet_api_request_seconds` | histogram | `method` |
//! | `process_resident_memory_bytes` | gauge | |
//! | `process_open_fds` | gauge | |

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;

/// Why the metrics endpoint could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum MetricsError {
    /// Another recorder is installed in this process (metrics go there).
    Recorder(String),
    /// The address could not be bound.
    Bind(std::io::Error),
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Recorder(e) => write!(f, "cannot install the Prometheus recorder: {e}"),
            Self::Bind(_) => f.write_str("cannot listen for metrics scrapes"),
        }
    }
}

impl std::error::Error for MetricsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Bind(e) => Some(e),
            Self::Recorder(_) => None,
        }
    }
}

/// The process's Prometheus recorder, installed by the first
/// [`prometheus`] call.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALLING: Mutex<()> = Mutex::new(());

/// The latency buckets (seconds) of every `_seconds` histogram: from a
/// tenth of a millisecond (a SQLite read) to ten seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the Prometheus recorder as this process's recorder (once; later
/// calls return the same handle).
pub fn prometheus() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| MetricsError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The help text of each figure.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "fleet_broker_connected_clients",
        "Clients connected to the embedded broker"
    );
    describe_counter!(
        "fleet_broker_connects_total",
        "CONNECTs to the embedded broker, by outcome"
    );
    describe_counter!(
        "fleet_broker_disconnects_total",
        "Connections of the embedded broker ended, by reason"
    );
    describe_counter!(
        "fleet_broker_messages_received_total",
        "PUBLISH packets the embedded broker received"
    );
    describe_counter!(
        "fleet_broker_messages_sent_total",
        "PUBLISH packets the embedded broker sent"
    );
    describe_counter!(
        "fleet_broker_messages_dropped_total",
        "Messages the embedded broker dropped for a full client queue"
    );
    describe_gauge!(
        "fleet_broker_parked_sessions",
        "Persistent sessions kept for disconnected clients"
    );
    describe_counter!(
        "fleet_tls_handshake_failures_total",
        "TLS handshakes that failed, by listener and reason"
    );
    describe_counter!(
        "fleet_messages_in_total",
        "Messages the backend received, by service and QoS"
    );
    describe_counter!(
        "fleet_messages_out_total",
        "Messages the backend published, by service and QoS"
    );
    describe_counter!(
        "fleet_outbound_dropped_total",
        "Replies dropped because the backend's outbound queue was full"
    );
    describe_gauge!(
        "fleet_outbound_queued_bytes",
        "Bytes waiting in the backend's outbound queue"
    );
    describe_counter!(
        "fleet_requests_total",
        "Device requests handled, by service and outcome"
    );
    describe_counter!(
        "fleet_shadow_requests_total",
        "Shadow requests, by operation, outcome and rejection code"
    );
    describe_counter!(
        "fleet_job_executions_total",
        "Job executions reaching each status"
    );
    describe_counter!(
        "fleet_rollout_released_total",
        "Things released (or retried) by rollouts"
    );
    describe_gauge!("fleet_rollout_targets", "A rollout's things by status");
    describe_gauge!(
        "fleet_campaign_devices",
        "An OTA campaign's devices by state, as last read"
    );
    describe_counter!(
        "fleet_provisioning_total",
        "Provisioning requests, by operation and outcome"
    );
    describe_counter!(
        "fleet_telemetry_messages_total",
        "Telemetry messages, by outcome"
    );
    describe_histogram!(
        "fleet_store_operation_seconds",
        metrics::Unit::Seconds,
        "Store operations' latency"
    );
    describe_counter!(
        "fleet_store_conflicts_total",
        "Compare-and-set conflicts (another writer first), retried"
    );
    describe_counter!(
        "fleet_api_requests_total",
        "Management API requests, by method and status"
    );
    describe_histogram!(
        "fleet_api_request_seconds",
        metrics::Unit::Seconds,
        "Management API requests' latency"
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        metrics::Unit::Bytes,
        "Resident memory of the process"
    );
    describe_gauge!("process_open_fds", "Open file descriptors of the process");
}

/// One counter per QoS (0, 1, 2) of `name` with `labels`: registered
/// once, where a hot path counts every message.
pub(crate) fn per_qos(
    name: &'static str,
    labels: &[(&'static str, &'static str)],
) -> [metrics::Counter; 3] {
    ["0", "1", "2"].map(|qos| {
        let mut all: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        all.push(metrics::Label::new("qos", qos));
        metrics::counter!(name, all)
    })
}

/// Times a store operation into `fleet_store_operation_seconds`.
pub(crate) async fn timed<T>(operation: &'static str, f: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let r = f.await;
    metrics::histogram!("fleet_store_operation_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    r
}

/// Sets the process gauges from `/proc` (Linux; elsewhere they stay unset).
fn sample_process() {
    let page = 4096.0;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(rss) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<f64>().ok())
    {
        metrics::gauge!("process_resident_memory_bytes").set(rss * page);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

/// The current figures in Prometheus's text format.
pub fn render(handle: &PrometheusHandle) -> String {
    sample_process();
    handle.run_upkeep();
    handle.render()
}

/// A running metrics endpoint; stops when dropped.
#[derive(Debug)]
pub struct RunningMetrics {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RunningMetrics {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RunningMetrics {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Installs the Prometheus recorder ([`prometheus`]) and serves
/// `GET /metrics` on `bind` (plain HTTP: bind a loopback or private
/// address, where the scraper is).
pub async fn serve_metrics(bind: SocketAddr) -> Result<RunningMetrics, MetricsError> {
    let handle = prometheus()?;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(MetricsError::Bind)?;
    let addr = listener.local_addr().map_err(MetricsError::Bind)?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&handle),
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    tracing::info!("metrics on http://{addr}/metrics");
    Ok(RunningMetrics { addr, task })
}

#[cfg(test)]
mod tests {
    /// The names the module's table documents.
    fn documented() -> Vec<String> {
        include_str!("metrics.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! | `"))
            .filter_map(|l| l.split('`').next())
            .map(String::from)
            .collect()
    }

    /// Every figure the Grafana dashboard plots is one the table documents
    /// (a histogram by its `_bucket` series), and every documented figure
    /// is on the dashboard.
    #[test]
    fn the_dashboard_plots_the_documented_figures() {
        let names = documented();
        assert!(names.len() > 20, "{names:?}");
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/grafana-dashboard.json")).unwrap();
        let mut plotted = std::collections::BTreeSet::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("fleet_") || word.starts_with("process_") {
                        let name = word.trim_end_matches("_bucket");
                        assert!(names.iter().any(|n| n == name), "{name} is not documented");
                        plotted.insert(name.to_string());
                    }
                }
            }
        }
        for name in &names {
            assert!(plotted.contains(name), "{name} is not on the dashboard");
        }
    }

    /// A second call finds the recorder the first installed.
    #[test]
    fn the_recorder_is_installed_once() {
        let a = super::prometheus().unwrap();
        let b = super::prometheus().unwrap();
        metrics::counter!("fleet_requests_total", "service" => "test", "outcome" => "handled")
            .increment(3);
        let text = super::render(&b);
        assert!(
            text.contains(r#"fleet_requests_total{service="test",outcome="handled"} 3"#),
            "{text}"
        );
        assert!(text.contains("# HELP fleet_requests_total"), "{text}");
        drop(a);
    }
}
