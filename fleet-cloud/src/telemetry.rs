//! Telemetry routing: rules send device telemetry to sinks; a sink that
//! fails is retried, then the message goes to a dead-letter file, never
//! silently away.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// One telemetry message as routed.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRecord {
    /// The thing that sent it (from the topic, which the broker policy ties
    /// to the sender's certificate).
    pub thing: String,
    /// The full topic.
    pub topic: String,
    /// Epoch seconds when the service received it.
    pub received_at: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

impl TelemetryRecord {
    /// The payload as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.payload).ok()
    }

    fn to_line(&self) -> Value {
        let payload = self
            .json()
            .unwrap_or_else(|| Value::String(String::from_utf8_lossy(&self.payload).into_owned()));
        json!({"thing": self.thing, "topic": self.topic, "receivedAt": self.received_at, "payload": payload})
    }
}

/// A sink could not store records; the cause is the
/// [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct SinkError(Box<dyn std::error::Error + Send + Sync>);

impl SinkError {
    /// A failure caused by `cause` (an error, or a message).
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(cause.into())
    }
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl From<std::io::Error> for SinkError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e)
    }
}

impl From<rusqlite::Error> for SinkError {
    fn from(e: rusqlite::Error) -> Self {
        Self::new(e)
    }
}

impl From<serde_json::Error> for SinkError {
    fn from(e: serde_json::Error) -> Self {
        Self::new(e)
    }
}

/// Where routed telemetry goes. `write` runs on a blocking thread.
pub trait TelemetrySink: Send + Sync + 'static {
    /// A name for logs and dead letters.
    fn name(&self) -> &str;
    /// Stores the record durably, or says why not.
    fn write(&self, record: &TelemetryRecord) -> Result<(), SinkError>;

    /// Stores several records, or says why not (the router then tries the
    /// whole batch again, so a sink that stored part of it stores that part
    /// twice: telemetry is delivered at least once). By default, one
    /// [`write`](Self::write) each; a sink that can store a batch at once
    /// (one transaction, one append) should.
    fn write_batch(&self, records: &[Arc<TelemetryRecord>]) -> Result<(), SinkError> {
        records.iter().try_for_each(|r| self.write(r))
    }
}

/// Appends each record as one JSON line to a file.
#[derive(Debug)]
pub struct JsonLinesSink {
    path: PathBuf,
    lock: Mutex<()>,
}

impl JsonLinesSink {
    /// A sink writing to `path` (created if missing).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }
}

fn append_line(path: &Path, line: &Value) -> Result<(), SinkError> {
    append_lines(path, std::slice::from_ref(line))
}

/// Appends JSON lines with one write and one `fsync`.
fn append_lines(path: &Path, lines: &[Value]) -> Result<(), SinkError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut bytes = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut bytes, line)?;
        bytes.push(b'\n');
    }
    file.write_all(&bytes)?;
    Ok(file.sync_data()?)
}

impl TelemetrySink for JsonLinesSink {
    fn name(&self) -> &str {
        "json-lines"
    }

    fn write(&self, record: &TelemetryRecord) -> Result<(), SinkError> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| SinkError::new("a writer panicked"))?;
        append_line(&self.path, &record.to_line())
    }

    fn write_batch(&self, records: &[Arc<TelemetryRecord>]) -> Result<(), SinkError> {
        let lines: Vec<Value> = records.iter().map(|r| r.to_line()).collect();
        let _guard = self
            .lock
            .lock()
            .map_err(|_| SinkError::new("a writer panicked"))?;
        append_lines(&self.path, &lines)
    }
}

/// Inserts each record into a SQLite table
/// `(thing TEXT, topic TEXT, received_at INTEGER, payload BLOB)`.
#[derive(Debug)]
pub struct SqliteSink {
    conn: Mutex<rusqlite::Connection>,
    table: String,
}

impl SqliteSink {
    /// Opens `path` and creates `table` if needed. The table name must be
    /// `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn open(path: &Path, table: &str) -> Result<Self, SinkError> {
        let valid = table
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(SinkError::new(format!("invalid table name {table:?}")));
        }
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                thing TEXT NOT NULL, topic TEXT NOT NULL,
                received_at INTEGER NOT NULL, payload BLOB NOT NULL)"
        ))?;
        Ok(Self {
            conn: Mutex::new(conn),
            table: table.into(),
        })
    }
}

impl TelemetrySink for SqliteSink {
    fn name(&self) -> &str {
        "sqlite"
    }

    fn write(&self, r: &TelemetryRecord) -> Result<(), SinkError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| SinkError::new("a writer panicked"))?;
        conn.execute(
            &format!(
                "INSERT INTO {} (thing, topic, received_at, payload) VALUES (?1, ?2, ?3, ?4)",
                self.table
            ),
            (&r.thing, &r.topic, r.received_at, &r.payload),
        )
        .map(|_| ())
        .map_err(SinkError::from)
    }

    fn write_batch(&self, records: &[Arc<TelemetryRecord>]) -> Result<(), SinkError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| SinkError::new("a writer panicked"))?;
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT INTO {} (thing, topic, received_at, payload) VALUES (?1, ?2, ?3, ?4)",
                self.table
            ))?;
            for r in records {
                insert.execute((&r.thing, &r.topic, r.received_at, &r.payload))?;
            }
        }
        Ok(tx.commit()?)
    }
}

/// A condition on the JSON payload: the value at `pointer` (RFC 6901, as
/// `/temp`) must equal `equals`, or, with `above`, be a number greater.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// The value at the pointer equals this.
    Equals {
        /// JSON pointer.
        pointer: String,
        /// Expected value.
        value: Value,
    },
    /// The value at the pointer is a number above this.
    Above {
        /// JSON pointer.
        pointer: String,
        /// Threshold.
        threshold: f64,
    },
}

impl Predicate {
    fn holds(&self, payload: Option<&Value>) -> bool {
        let Some(payload) = payload else {
            return false;
        };
        match self {
            Self::Equals { pointer, value } => payload.pointer(pointer) == Some(value),
            Self::Above { pointer, threshold } => payload
                .pointer(pointer)
                .and_then(Value::as_f64)
                .is_some_and(|v| v > *threshold),
        }
    }
}

/// A routing rule: telemetry whose topic matches `filter` (an MQTT filter
/// over the full topic) and whose payload satisfies `predicate` goes to
/// `sink`.
#[derive(Clone)]
pub struct Rule {
    /// MQTT topic filter (`+`, `#`).
    pub filter: String,
    /// Optional condition on the JSON payload.
    pub predicate: Option<Predicate>,
    /// Where matching messages go.
    pub sink: Arc<dyn TelemetrySink>,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("filter", &self.filter)
            .field("predicate", &self.predicate)
            .field("sink", &self.sink.name())
            .finish()
    }
}

/// Routes telemetry by rules, with retries and a dead-letter file.
#[derive(Debug, Clone)]
pub struct TelemetryRouter {
    rules: Vec<Rule>,
    /// Topics under this prefix are telemetry (`dt` by default, as in
    /// [`BrokerPolicy`](crate::BrokerPolicy)).
    pub prefix: String,
    /// Tries per sink before a dead letter.
    pub attempts: u32,
    /// Pause between tries (doubling).
    pub backoff: Duration,
    dead_letters: PathBuf,
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteOutcome {
    /// Sinks that stored it.
    pub delivered: usize,
    /// Sinks that failed every try (each wrote a dead letter).
    pub dead_lettered: usize,
}

impl TelemetryRouter {
    /// A router with `rules`; failed deliveries go to `dead_letters`
    /// (JSON lines: the record, the sink, the last error).
    pub fn new(rules: Vec<Rule>, dead_letters: &Path) -> Self {
        Self {
            rules,
            prefix: "dt".into(),
            attempts: 3,
            backoff: Duration::from_millis(50),
            dead_letters: dead_letters.into(),
        }
    }

    /// Routes one message to every matching rule's sink.
    pub async fn route(&self, record: TelemetryRecord) -> RouteOutcome {
        self.route_batch(vec![record]).await
    }

    /// Routes messages to every matching rule's sink: each sink gets the
    /// records its rule selects in one [`TelemetrySink::write_batch`],
    /// tried again with backoff; a batch that fails every try is written
    /// to the dead letters, one line per record. Counts are per record and
    /// sink.
    pub async fn route_batch(&self, records: Vec<TelemetryRecord>) -> RouteOutcome {
        let parsed: Vec<Option<Value>> = if self.rules.iter().any(|r| r.predicate.is_some()) {
            records.iter().map(TelemetryRecord::json).collect()
        } else {
            vec![None; records.len()]
        };
        let records: Vec<Arc<TelemetryRecord>> = records.into_iter().map(Arc::new).collect();
        let mut outcome = RouteOutcome::default();
        for rule in &self.rules {
            let selected: Vec<Arc<TelemetryRecord>> = records
                .iter()
                .zip(&parsed)
                .filter(|(r, json)| {
                    fleet_core::topic::filter_matches(&rule.filter, &r.topic)
                        && rule
                            .predicate
                            .as_ref()
                            .is_none_or(|p| p.holds(json.as_ref()))
                })
                .map(|(r, _)| r.clone())
                .collect();
            if selected.is_empty() {
                continue;
            }
            let selected = Arc::new(selected);
            let mut delay = self.backoff;
            let mut last_error = String::new();
            let mut ok = false;
            for attempt in 0..self.attempts.max(1) {
                if attempt > 0 {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                let (sink, batch) = (rule.sink.clone(), selected.clone());
                match tokio::task::spawn_blocking(move || sink.write_batch(&batch)).await {
                    Ok(Ok(())) => {
                        ok = true;
                        break;
                    }
                    Ok(Err(e)) => last_error = e.to_string(),
                    Err(e) => last_error = e.to_string(),
                }
            }
            if ok {
                outcome.delivered += selected.len();
                metrics::counter!("fleet_telemetry_messages_total", "outcome" => "routed")
                    .increment(selected.len() as u64);
                continue;
            }
            outcome.dead_lettered += selected.len();
            metrics::counter!("fleet_telemetry_messages_total", "outcome" => "dead_lettered")
                .increment(selected.len() as u64);
            tracing::warn!(
                "sink {} failed for {} messages: {last_error}; dead letters written",
                rule.sink.name(),
                selected.len()
            );
            let letters: Vec<Value> = selected
                .iter()
                .map(|r| json!({"record": r.to_line(), "sink": rule.sink.name(), "error": last_error}))
                .collect();
            let path = self.dead_letters.clone();
            let written = tokio::task::spawn_blocking(move || append_lines(&path, &letters)).await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::error!("dead letters could not be written: {written:?}");
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Failing;
    impl TelemetrySink for Failing {
        fn name(&self) -> &str {
            "failing"
        }
        fn write(&self, _: &TelemetryRecord) -> Result<(), SinkError> {
            Err(SinkError::new("disk full"))
        }
    }

    fn record(topic: &str, payload: &str) -> TelemetryRecord {
        TelemetryRecord {
            thing: "dev-1".into(),
            topic: topic.into(),
            received_at: 7,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn rules_predicates_sinks_and_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let lines = Arc::new(JsonLinesSink::new(&dir.path().join("hot.jsonl")));
        let table = Arc::new(SqliteSink::open(&dir.path().join("t.db"), "telemetry").unwrap());
        let router = TelemetryRouter {
            backoff: Duration::from_millis(1),
            ..TelemetryRouter::new(
                vec![
                    Rule {
                        filter: "dt/+/temp".into(),
                        predicate: Some(Predicate::Above {
                            pointer: "/c".into(),
                            threshold: 30.0,
                        }),
                        sink: lines,
                    },
                    Rule {
                        filter: "dt/#".into(),
                        predicate: None,
                        sink: table,
                    },
                    Rule {
                        filter: "dt/+/alarm".into(),
                        predicate: Some(Predicate::Equals {
                            pointer: "/level".into(),
                            value: json!("high"),
                        }),
                        sink: Arc::new(Failing),
                    },
                ],
                &dir.path().join("dead.jsonl"),
            )
        };
        assert_eq!(
            router
                .route(record("dt/dev-1/temp", r#"{"c":35}"#))
                .await
                .delivered,
            2
        );
        assert_eq!(
            router
                .route(record("dt/dev-1/temp", r#"{"c":20}"#))
                .await
                .delivered,
            1
        );
        assert_eq!(
            router
                .route(record("dt/dev-1/temp", "not json"))
                .await
                .delivered,
            1
        );
        let out = router
            .route(record("dt/dev-1/alarm", r#"{"level":"high"}"#))
            .await;
        assert_eq!(
            out,
            RouteOutcome {
                delivered: 1,
                dead_lettered: 1
            }
        );

        let hot = std::fs::read_to_string(dir.path().join("hot.jsonl")).unwrap();
        assert_eq!(hot.lines().count(), 1);
        assert!(hot.contains(r#""c":35"#));
        let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        let n: u32 = conn
            .query_row("SELECT count(*) FROM telemetry", (), |r| r.get(0))
            .unwrap();
        assert_eq!(n, 4);
        let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
        let letter: Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
        assert_eq!(letter["sink"], "failing");
        assert_eq!(letter["error"], "disk full");
        assert_eq!(letter["record"]["payload"]["level"], "high");
        assert!(SqliteSink::open(&dir.path().join("t.db"), "x; DROP TABLE y").is_err());
    }
}
