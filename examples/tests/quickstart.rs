//! The quickstart runs the whole product on this machine and ends well:
//! every device provisioned, converged, answering; telemetry routed; the
//! campaign completed with one device rolled back.

use std::process::Command;

#[test]
fn the_quickstart_runs_end_to_end() {
    let out = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .output()
        .expect("run the quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "6/6 devices report speed = 3",
        "30 readings",
        "rollout: Some(Completed)",
        "pump-0101    1 (kept)   rolled back",
        "receipts verified: 6",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
