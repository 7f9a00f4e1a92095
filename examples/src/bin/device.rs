//! A device agent against a real broker, with certificates from files.
//!
//! ```text
//! cargo run -p examples --bin device -- \
//!     --host localhost --port 8883 --thing pump-1 \
//!     --cert dev/things/pump-1.pem --key dev/things/pump-1.key --ca dev/ca.pem \
//!     --state-dir /tmp/pump-1
//! ```
//!
//! (`fleet dev-setup --dir dev --thing pump-1` writes such files; `fleet
//! serve --dir dev` runs a backend for them.) The device reports its
//! shadow, applies desired changes and reports them back, answers the
//! `ping` command, and publishes a telemetry reading every `--every`
//! seconds through its durable outbox. It stops on Ctrl-C, or after
//! `--count` readings were acknowledged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_core::jobs::CommandStatus;
use fleet_device::{AgentBuilder, AgentEvent, Qos};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Run a fleet device agent")]
struct Args {
    /// The broker's host.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// The broker's port (MQTT over TLS).
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// The thing name (the certificate's common name).
    #[arg(long)]
    thing: String,
    /// The device certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// The device private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The CA of the broker's certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Where the agent keeps its outbox.
    #[arg(long)]
    state_dir: PathBuf,
    /// Seconds between telemetry readings.
    #[arg(long, default_value_t = 5.0)]
    every: f64,
    /// Stop after this many readings were acknowledged (default: run on).
    #[arg(long)]
    count: Option<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let agent = AgentBuilder::from_files(
        &args.host,
        args.port,
        &args.thing,
        &args.cert,
        &args.key,
        &args.ca,
    )?
    .state_dir(&args.state_dir)
    .start()?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.every.max(0.01)));
    let mut sent = 0u64;
    let mut acknowledged = 0u64;
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if args.count.is_none_or(|n| sent < n) {
                    let reading = json!({"seq": sent, "temperature": 20.0 + (sent % 10) as f64 / 10.0});
                    pending.push(agent.publish("telemetry", reading.to_string(), Qos::AtLeastOnce).await?);
                    sent += 1;
                }
            }
            event = agent.next_event() => match event {
                Some(AgentEvent::Connected) => {
                    println!("connected as {}", args.thing);
                    let state = json!({"firmware": "example-1.0"}).as_object().cloned().unwrap_or_default();
                    match tokio::time::timeout(Duration::from_secs(5), agent.report(None, state)).await {
                        Ok(Ok(version)) => println!("shadow reported, version {version}"),
                        Ok(Err(e)) => println!("shadow report refused: {e}"),
                        Err(_) => println!("no shadow service answered yet; the report goes on in the background"),
                    }
                }
                Some(AgentEvent::Disconnected { reason, retry_in }) => {
                    println!("disconnected ({reason}); retrying in {retry_in:?}");
                }
                Some(AgentEvent::ShadowDelta { shadow, delta, .. }) => {
                    println!("desired change: {}", serde_json::Value::Object(delta.clone()));
                    // "Apply" it, then report the new state.
                    agent.report(shadow.as_deref(), delta).await?;
                }
                Some(AgentEvent::Command { execution_id, command, .. }) => {
                    let (status, answer) = if command == "ping" {
                        (CommandStatus::Succeeded, json!({"pong": true}))
                    } else {
                        (CommandStatus::Failed, json!({"error": format!("unknown command {command}")}))
                    };
                    agent.respond(&execution_id, status, answer).await?;
                }
                Some(other) => println!("{other:?}"),
                None => return Err("the agent stopped".into()),
            },
        }
        // Count what the broker acknowledged.
        pending.retain_mut(|d| match d.try_result() {
            None => true,
            Some(Ok(())) => {
                acknowledged += 1;
                false
            }
            Some(Err(e)) => {
                eprintln!("reading {} not delivered: {e}", d.seq());
                false
            }
        });
        if args.count.is_some_and(|n| acknowledged >= n) {
            println!("{acknowledged} readings acknowledged");
            break;
        }
    }
    agent.shutdown().await;
    Ok(())
}
