//! The `fleet` command line against a running `fleet serve` (embedded
//! broker, SQLite, the management API): each subcommand, its `--json`
//! output parsed back, and its exit codes.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Service {
    child: Child,
    dir: tempfile::TempDir,
    api: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (broker, api) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .arg("serve")
            .arg("--dir")
            .arg(dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{broker}"))
            .arg("--api")
            .arg(format!("127.0.0.1:{api}"))
            .arg("--claim")
            .arg("claim@factory")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fleet serve");
        for _ in 0..300 {
            if dir.path().join("admin.token").exists()
                && std::net::TcpStream::connect(("127.0.0.1", api)).is_ok()
            {
                return Self { child, dir, api };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("fleet serve did not start its API");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `fleet {args}` as the admin; exit code, stdout, stderr.
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.run_with(
            &std::fs::read_to_string(self.path("admin.token")).unwrap(),
            args,
        )
    }

    fn run_with(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        let out = assert_cmd::Command::cargo_bin("fleet")
            .unwrap()
            .args(args)
            .env("FLEET_API", format!("https://localhost:{}", self.api))
            .env("FLEET_TOKEN", token.trim())
            .env("FLEET_CA", self.path("ca.pem"))
            .env_remove("FLEET_TOKEN_FILE")
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `fleet --json {args}`, which must succeed; its output parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        // `--json` is global: after the subcommand's name.
        let (sub, rest) = all.split_at(1);
        let mut ordered: Vec<&str> = rest[..1].to_vec();
        ordered.extend_from_slice(sub);
        ordered.extend_from_slice(&rest[1..]);
        let (code, out, err) = self.run(&ordered);
        assert_eq!(code, 0, "fleet {ordered:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("fleet {ordered:?}: {e}: {out}"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "fleet {args:?}: {err}");
        out
    }

    fn fails(&self, args: &[&str], expected: i32) -> String {
        let (code, _, err) = self.run(args);
        assert_eq!(code, expected, "fleet {args:?}: {err}");
        err
    }
}

#[test]
fn things_groups_shadows_jobs_and_tokens() {
    let s = Service::start();
    let out = s.ok(&["thing", "create", "pump-1", "--attribute", "model=P100"]);
    assert!(
        out.contains("pump-1") && out.contains("model=P100"),
        "{out}"
    );
    s.ok(&["thing", "create", "pump-2"]);
    let t = s.json(&["thing", "get", "pump-1"]);
    assert_eq!(t["attributes"]["model"], "P100");
    let list = s.json(&["thing", "list"]);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let human = s.ok(&["thing", "list"]);
    assert!(
        human.starts_with("THING") && human.contains("pump-2"),
        "{human}"
    );
    s.fails(&["thing", "get", "nope"], 3);
    s.fails(&["thing", "create", "pump-1"], 5);
    s.fails(&["thing", "create", "bad/name"], 5);
    let t = s.json(&["thing", "disable", "pump-2"]);
    assert_eq!(t["enabled"], false);
    let t = s.json(&["thing", "enable", "pump-2"]);
    assert_eq!(t["enabled"], true);
    let t = s.json(&[
        "thing",
        "set-attributes",
        "pump-2",
        "--attribute",
        "site=north",
    ]);
    assert_eq!(t["attributes"]["site"], "north");

    s.ok(&["group", "create", "north"]);
    s.ok(&["group", "add", "north", "pump-1"]);
    let g = s.json(&["group", "members", "north"]);
    assert_eq!(g["members"], serde_json::json!(["pump-1"]));
    let g = s.json(&["group", "create", "p100s", "--match", "model=P100"]);
    assert_eq!(g["members"], serde_json::json!(["pump-1"]));

    let out = s.ok(&["shadow", "update", "pump-1", r#"{"speed": 3}"#]);
    assert!(out.contains("version 1"), "{out}");
    let doc = s.json(&["shadow", "get", "pump-1"]);
    assert_eq!(doc["state"]["desired"]["speed"], 3);
    s.fails(
        &[
            "shadow",
            "update",
            "pump-1",
            r#"{"speed": 4}"#,
            "--version",
            "9",
        ],
        5,
    );
    s.fails(&["shadow", "update", "pump-1", "not json"], 2);
    s.ok(&[
        "shadow",
        "update",
        "pump-1",
        r#"{"mode": "eco"}"#,
        "--name",
        "cfg",
    ]);
    let doc = s.json(&["shadow", "get", "pump-1", "--name", "cfg"]);
    assert_eq!(doc["state"]["desired"]["mode"], "eco");
    s.ok(&["shadow", "delete", "pump-1", "--name", "cfg"]);
    s.fails(&["shadow", "get", "pump-1", "--name", "cfg"], 3);

    let job = s.json(&[
        "job",
        "create",
        "j1",
        r#"{"op": "reboot"}"#,
        "--thing",
        "pump-1",
        "--group",
        "north",
    ]);
    assert_eq!(job["state"], "IN_PROGRESS");
    assert_eq!(job["targets"], 1);
    let ex = s.json(&["job", "executions", "j1"]);
    assert_eq!(ex[0]["status"], "QUEUED");
    assert_eq!(s.json(&["job", "list"]), serde_json::json!(["j1"]));
    let job = s.json(&["job", "cancel", "j1"]);
    assert_eq!(job["state"], "CANCELED");
    let out = s.ok(&["job", "watch", "j1"]);
    assert!(out.contains("CANCELED"), "{out}");
    s.fails(&["job", "get", "nope"], 3);

    // Tokens: a read token reads and may not change; a bad one is refused.
    let made = s.json(&["token", "create", "dashboard", "--scope", "read"]);
    let token = made["token"].as_str().unwrap().to_string();
    let (code, out, _) = s.run_with(&token, &["thing", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("pump-1"));
    let (code, _, err) = s.run_with(&token, &["thing", "create", "x"]);
    assert_eq!(code, 4, "{err}");
    let (code, _, _) = s.run_with("fleet_0_nope", &["thing", "list"]);
    assert_eq!(code, 4);
    let tokens = s.json(&["token", "list"]);
    assert_eq!(tokens.as_array().unwrap().len(), 2);
    s.ok(&["token", "revoke", made["id"].as_str().unwrap()]);
    let (code, _, _) = s.run_with(&token, &["thing", "list"]);
    assert_eq!(code, 4);
    // No device answers: the command times out.
    s.fails(&["command", "send", "pump-1", "ping", "--timeout", "1"], 6);
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn keys_manifests_releases_and_campaigns() {
    let s = Service::start();
    s.ok(&["thing", "create", "pump-1"]);
    let key = s.path("release.key");
    let public = s.ok(&["keygen", "--out", key.to_str().unwrap()]);
    let public = public.trim();
    s.fails(&["keygen", "--out", key.to_str().unwrap()], 2);
    let image = s.path("fw.bin");
    write(
        &image,
        &(0..50_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    );
    let envelope = s.path("fw.envelope");
    let out = s.ok(&[
        "manifest",
        "sign",
        "--image",
        image.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--component",
        "fw",
        "--version",
        "2.0.0",
        "--sequence",
        "2",
        "--hardware-id",
        "p100",
        "--out",
        envelope.to_str().unwrap(),
    ]);
    assert!(out.contains("50000 bytes"), "{out}");
    let verify = |image: &Path, hw: &str| {
        s.run(&[
            "manifest",
            "verify",
            "--envelope",
            envelope.to_str().unwrap(),
            "--public-key",
            public,
            "--hardware-id",
            hw,
            "--image",
            image.to_str().unwrap(),
        ])
    };
    let (code, out, err) = verify(&image, "p100");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: fw 2.0.0"), "{out}");
    let tampered = s.path("tampered.bin");
    write(&tampered, &[1, 2, 3]);
    assert_eq!(verify(&tampered, "p100").0, 7);
    assert_eq!(verify(&image, "other-board").0, 7);

    s.fails(
        &[
            "release",
            "upload",
            "r1",
            "--envelope",
            envelope.to_str().unwrap(),
            "--image",
            tampered.to_str().unwrap(),
        ],
        5,
    );
    let r = s.json(&[
        "release",
        "upload",
        "r1",
        "--envelope",
        envelope.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    assert_eq!(r["size"], 50_000);
    let c = s.json(&[
        "campaign",
        "start",
        "c1",
        "--release",
        "r1",
        "--thing",
        "pump-1",
    ]);
    assert_eq!(c["campaignId"], "c1");
    let c = s.json(&["campaign", "pause", "c1"]);
    assert_eq!(c["campaignId"], "c1");
    s.ok(&["campaign", "resume", "c1"]);
    s.ok(&["campaign", "abort", "c1"]);
    // Watching an aborted campaign ends with code 7 and the final table.
    let (code, out, err) = s.run(&["campaign", "watch", "c1"]);
    assert_eq!(code, 7, "{err}");
    assert!(out.contains("Aborted"), "{out}");
    s.fails(&["campaign", "status", "nope"], 3);
    s.fails(
        &[
            "campaign",
            "start",
            "c2",
            "--release",
            "nope",
            "--thing",
            "pump-1",
        ],
        3,
    );
}

#[test]
fn certs_init_writes_a_setup_and_usage_errors_are_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .args(["--thing", "pump-1", "--claim", "claim@factory"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "backend.pem",
        "things/pump-1.pem",
        "claims/claim@factory.key",
        "mosquitto.conf",
        "acl",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["thing", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // No token anywhere: a usage error, not a request.
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["thing", "list"])
        .env_remove("FLEET_TOKEN")
        .env_remove("FLEET_TOKEN_FILE")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The example configuration in the repository holds, and what it
    // shows reads back; a key it does not know is a usage error naming it;
    // flags and the environment override the file, passwords masked.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../fleet.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["serve", "--config", example, "--print-config"])
        .env("FLEET_SERVE_STORE", "postgres://fleet:secret@db/fleet")
        .args(["--client-id", "from-flag"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains("client-id = \"from-flag\""), "{shown}");
    assert!(shown.contains("claims = [\"claim@factory\"]"), "{shown}");
    assert!(shown.contains("postgres://fleet:***@db/fleet"), "{shown}");
    assert!(!shown.contains("secret"), "{shown}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:8883\"\nlisten-address = \"0.0.0.0:1\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["serve", "--print-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listen-address"), "{stderr}");

    // A --store that names no store is refused before anything is
    // written (a libpq key=value string used to become a SQLite file of
    // that name).
    for bad in ["mysql://db/fleet", "hots=db dbname=fleet", "sqlite:"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["serve", "--no-api", "--store", bad, "--dir"])
            .arg(dir.path().join("serve"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--store"), "{bad}: {stderr}");
        assert!(!dir.path().join("serve").exists(), "{bad}");
        assert!(!dir.path().join(bad).exists(), "{bad}");
    }
}

/// Issue 26: logs written to a file carry no terminal colour codes, and
/// `--log-format json` (or `FLEET_LOG_FORMAT=json`) writes one JSON object
/// per line.
#[test]
fn logs_are_plain_in_a_file_and_json_on_request() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .env("FLEET_LOG_FORMAT", format)
            .env("RUST_LOG", "info")
            .args(["serve", "--store", "memory", "--no-api", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--dir")
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("embedded broker listening") {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                "{format}: no start line: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !text.contains('\u{1b}'),
            "{format}: colour codes in a file: {text}"
        );
        if format == "json" {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    v["level"].is_string() && v["fields"]["message"].is_string(),
                    "{v}"
                );
            }
        } else {
            assert!(text.lines().any(|l| l.contains(" INFO ")), "{text}");
        }
    }
}
