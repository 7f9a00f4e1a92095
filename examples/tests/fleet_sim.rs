//! The load tool runs every scenario against both brokers and reports each
//! side: a small N here (the figures are in BENCHMARKS.md), so that the
//! tool itself is known to work in CI.

use std::process::Command;

fn run(broker: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-sim"))
        .args(["--broker", broker, "-n", "20", "--duration", "1"])
        .output()
        .expect("run fleet-sim");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The table row of `scenario`, split into its cells.
fn row(report: &str, scenario: &str) -> Vec<String> {
    report
        .lines()
        .find(|l| l.starts_with(&format!("| {scenario} |")))
        .unwrap_or_else(|| panic!("no {scenario} row in:\n{report}"))
        .split('|')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

fn check(report: &str) {
    for scenario in [
        "connect storm",
        "shadow updates",
        "job fan-out",
        "telemetry",
    ] {
        let cells = row(report, scenario);
        // scenario, raw, fleet, ratio, raw latency, fleet latency, errors
        assert_eq!(cells.len(), 7, "{cells:?}");
        assert_eq!(cells[6], "0 / 0", "{scenario}: errors in\n{report}");
        let figure = |cell: &str| -> f64 {
            cell.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{scenario}: no figure in {cell:?}"))
        };
        assert!(figure(&cells[1]) > 0.0, "{scenario}: raw {cells:?}");
        assert!(figure(&cells[2]) > 0.0, "{scenario}: fleet {cells:?}");
    }
    assert!(
        report.contains("the service records 20 SUCCEEDED"),
        "{report}"
    );
    assert!(report.contains("B per device"), "{report}");
}

#[test]
fn fleet_sim_measures_every_scenario_on_the_embedded_broker() {
    check(&run("embedded"));
}

#[test]
fn fleet_sim_measures_every_scenario_on_mosquitto() {
    check(&run("mosquitto"));
}
