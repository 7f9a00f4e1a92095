//! The `fleet` command line against a running `fleet serve` (embedded
//! broker, SQLite, the management API): each subcommand, its `--json`
//! output parsed back, and its exit codes.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

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
    broker: u16,
    metrics: u16,
    args: Vec<String>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// `fleet serve` (embedded broker, SQLite, the API, metrics) in a new
    /// directory where `fleet dev-setup` wrote certificates for `things`;
    /// its log (level info) goes to `serve.log` there.
    fn start_with(things: &[&str]) -> Self {
        Self::start_with_args(things, &[])
    }

    /// [`start_with`](Self::start_with), `fleet serve` given `args` too.
    fn start_with_args(things: &[&str], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (broker, api, metrics) = (free_port(), free_port(), free_port());
        if !things.is_empty() {
            let mut setup = Command::new(env!("CARGO_BIN_EXE_fleet"));
            setup.args(["dev-setup", "--port", &broker.to_string()]);
            setup.arg("--dir").arg(dir.path());
            for t in things {
                setup.args(["--thing", t]);
            }
            let out = setup.output().unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_serve(dir.path(), (broker, api, metrics), &args);
        Self {
            child,
            dir,
            api,
            broker,
            metrics,
            args,
        }
    }

    /// Stops `fleet serve` with `signal` (`TERM`, `KILL`) and starts it
    /// again on the same directory and ports.
    fn restart(&mut self, signal: &str) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(signal != "TERM" || status.success(), "{status}");
        self.child = spawn_serve(
            self.dir.path(),
            (self.broker, self.api, self.metrics),
            &self.args,
        );
    }

    /// What `fleet serve` logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("serve.log")).unwrap()
    }

    /// The admin token.
    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.path("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// No token's secret in the log (the admin token, and `others`).
    fn assert_no_token_logged(&self, others: &[&str]) {
        let log = self.log();
        let admin = self.admin_token();
        for token in others.iter().copied().chain([admin.as_str()]) {
            // The secret is what follows the id.
            assert!(!log.contains(token), "a token is in the log:\n{log}");
        }
    }

    /// The metrics endpoint's text.
    fn scrape(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        text
    }

    /// The certificate and key `fleet dev-setup` wrote for `thing`.
    fn identity(&self, thing: &str) -> fleet_cloud::pki::Identity {
        fleet_cloud::pki::Identity {
            common_name: thing.into(),
            cert_pem: std::fs::read_to_string(self.path(&format!("things/{thing}.pem"))).unwrap(),
            key_pem: std::fs::read_to_string(self.path(&format!("things/{thing}.key"))).unwrap(),
        }
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

/// Starts `fleet serve` on `dir` and `ports` (broker, API, metrics) with
/// `args` too, and waits for its API.
fn spawn_serve(dir: &Path, (broker, api, metrics): (u16, u16, u16), args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .env("RUST_LOG", "info")
        .arg("serve")
        .arg("--dir")
        .arg(dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{broker}"))
        .arg("--api")
        .arg(format!("127.0.0.1:{api}"))
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics}"))
        .arg("--claim")
        .arg("claim@factory")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet serve");
    for _ in 0..300 {
        if dir.join("admin.token").exists()
            && std::net::TcpStream::connect(("127.0.0.1", api)).is_ok()
        {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("fleet serve did not start its API");
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
    assert_eq!(g["items"], serde_json::json!(["pump-1"]));
    let g = s.json(&["group", "create", "p100s", "--match", "model=P100"]);
    assert_eq!(g["members"], serde_json::json!(["pump-1"]));
    let groups = s.json(&["group", "list"]);
    assert_eq!(
        groups,
        serde_json::json!({"items": [
            {"name": "north"},
            {"name": "p100s", "query": {"model": "P100"}},
        ], "next": null})
    );
    let page = s.json(&["group", "list", "--limit", "1"]);
    assert_eq!(page["next"], "north", "{page}");
    let rest = s.json(&["group", "list", "--after", "north"]);
    assert_eq!(rest["items"][0]["name"], "p100s", "{rest}");

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
    assert_eq!(ex["items"][0]["status"], "QUEUED");
    assert_eq!(
        s.json(&["job", "list"]),
        serde_json::json!({"items": ["j1"], "next": null})
    );
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
    assert_eq!(tokens["items"].as_array().unwrap().len(), 2);
    // Every list command's JSON has one shape: items and the next page.
    for list in [
        &["thing", "list"][..],
        &["group", "list"],
        &["group", "members", "north"],
        &["job", "list"],
        &["job", "executions", "j1"],
        &["campaign", "list"],
        &["release", "list"],
        &["token", "list"],
        &["template", "list"],
        &["certs", "list", "pump-1"],
        &["thing", "certificates", "pump-1"],
        &["audit"],
    ] {
        let v = s.json(list);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["items", "next"], "{list:?}: {v}");
        assert!(v["items"].is_array(), "{list:?}: {v}");
    }
    s.ok(&["token", "revoke", made["id"].as_str().unwrap()]);
    let (code, _, _) = s.run_with(&token, &["thing", "list"]);
    assert_eq!(code, 4);
    // No device answers: the command times out.
    s.fails(&["command", "send", "pump-1", "ping", "--timeout", "1"], 6);

    // Provisioning: the templates served, and a claim identity issued
    // into files (the key readable by its owner only).
    let templates = s.json(&["template", "list"]);
    assert_eq!(templates["items"][0]["name"], "default", "{templates}");
    let claim_dir = s.path("factory");
    let made = s.json(&[
        "claim",
        "create",
        "claim@factory",
        "--out",
        claim_dir.to_str().unwrap(),
    ]);
    assert_eq!(made["name"], "claim@factory");
    let cert = std::fs::read_to_string(claim_dir.join("claim@factory.pem")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(claim_dir.join("claim@factory.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    // Not overwritten; an identity the broker does not admit is refused.
    s.fails(
        &[
            "claim",
            "create",
            "claim@factory",
            "--out",
            claim_dir.to_str().unwrap(),
        ],
        2,
    );
    s.fails(
        &[
            "claim",
            "create",
            "stranger@x",
            "--out",
            s.path("x").to_str().unwrap(),
        ],
        5,
    );

    // Completions, man pages, and the exit codes in --help.
    let bash = s.ok(&["completions", "bash"]);
    assert!(
        bash.contains("complete") && bash.contains("fleet"),
        "{bash}"
    );
    let man = s.path("man");
    s.ok(&["man", "--out", man.to_str().unwrap()]);
    let page = std::fs::read_to_string(man.join("fleet.1")).unwrap();
    assert!(page.contains(".TH fleet"), "{page}");
    assert!(man.join("fleet-serve.1").exists());
    let help = s.ok(&["--help"]);
    assert!(
        help.contains("Exit codes:") && help.contains("4  not authenticated"),
        "{help}"
    );
    s.assert_no_token_logged(&[&token]);
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
    assert_eq!(
        s.json(&["release", "list"]),
        serde_json::json!({"items": [{"releaseId": "r1", "size": 50_000}], "next": null})
    );
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
    // Campaigns are listed; a plain job is not one.
    s.ok(&[
        "job",
        "create",
        "plain",
        r#"{"op":"reboot"}"#,
        "--thing",
        "pump-1",
    ]);
    let campaigns = s.json(&["campaign", "list"]);
    let items = campaigns["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{campaigns}");
    assert_eq!(items[0]["campaignId"], "c1", "{campaigns}");
    assert!(items[0]["state"].is_string(), "{campaigns}");
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
    // The packaged configuration (deploy/fleet.toml, /etc/fleet/fleet.toml)
    // holds too.
    // `fleet serve --config FILE --print-config ARGS`, which must hold.
    let print_config = |config: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["serve", "--config", config, "--print-config"])
            .env("FLEET_SERVE_STORE", "postgres://fleet:secret@db/fleet")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let packaged = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fleet.toml");
    let shown = print_config(packaged, &[]);
    assert!(shown.contains("metrics = \"127.0.0.1:9464\""), "{shown}");
    assert!(shown.contains("dir = \"/var/lib/fleet\""), "{shown}");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../fleet.example.toml");
    let shown = print_config(example, &["--client-id", "from-flag"]);
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

/// The sum of the series of `name` that carry `labels` in Prometheus's
/// text format (0 when there is none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r.trim_end_matches('}')),
                None => (series, ""),
            };
            let all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|p| p == format!("{k}=\"{v}\"")));
            (n == name && all)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Waits until `check` holds for a scrape (the broker counts a
/// disconnect once it has seen it), 10 s at most; the last scrape.
fn scrape_until(s: &Service, check: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = s.scrape();
        if check(&text) || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn reply(dev: &mut fleet_testkit::TestClient, topic: &str) -> Value {
    let m = dev
        .recv(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no reply on {topic}"));
    assert_eq!(m.topic, topic, "{}", String::from_utf8_lossy(&m.payload));
    serde_json::from_slice(&m.payload).unwrap()
}

/// Issue 26: the metrics endpoint is scraped during a device scenario and
/// its counters are exactly what the scenario did; every change through
/// the API is in the audit log with the id of the token that made it (a
/// refused attempt too), one log line per API request names the token's
/// id, and no token is in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_scenario_and_the_audit_log_names_the_token() {
    let s = Service::start_with(&["dev-a"]);
    let ca = std::fs::read_to_string(s.path("ca.pem")).unwrap();
    let id = |name: &str| s.identity(name);
    let before = s.scrape();
    assert!(
        metric(&before, "process_resident_memory_bytes", &[]) > 0.0,
        "{before}"
    );

    // Refused: a certificate of another CA (its handshake fails), and one
    // of the fleet's CA for a thing the registry does not know.
    let other = fleet_cloud::pki::Pki::new("someone else").unwrap();
    let foreign = other.client_identity("dev-a").unwrap();
    assert!(
        fleet_testkit::TestClient::connect_to(s.broker, &ca, &foreign, "dev-a")
            .await
            .is_err()
    );
    let pki =
        fleet_cloud::pki::Pki::from_pem(&ca, &std::fs::read_to_string(s.path("ca.key")).unwrap())
            .unwrap();
    let stranger = pki.client_identity("dev-z").unwrap();
    assert!(
        fleet_testkit::TestClient::connect_to(s.broker, &ca, &stranger, "dev-z")
            .await
            .is_err()
    );

    // A device: two shadow updates accepted, one refused for its version
    // (409), one for an invalid node (400); a job run to SUCCEEDED.
    let mut dev = fleet_testkit::TestClient::connect_to(s.broker, &ca, &id("dev-a"), "dev-a")
        .await
        .unwrap();
    for t in ["update/accepted", "update/rejected"] {
        assert!(
            dev.subscribe(&format!("$aws/things/dev-a/shadow/{t}"))
                .await
                .unwrap()
        );
    }
    let update = "$aws/things/dev-a/shadow/update";
    for (payload, answer) in [
        (r#"{"state":{"reported":{"x":1}}}"#, "accepted"),
        (r#"{"state":{"reported":{"x":2}}}"#, "accepted"),
        (r#"{"state":{"reported":{"x":3}},"version":99}"#, "rejected"),
        (r#"{"state":{"foo":{"y":1}}}"#, "rejected"),
    ] {
        dev.publish(update, payload).await.unwrap();
        reply(&mut dev, &format!("{update}/{answer}")).await;
    }
    let during = s.scrape();
    assert_eq!(
        metric(
            &during,
            "fleet_broker_connected_clients",
            &[("role", "device")]
        ),
        1.0,
        "{during}"
    );
    let job = s.json(&[
        "job",
        "create",
        "j1",
        r#"{"op":"reboot"}"#,
        "--thing",
        "dev-a",
    ]);
    assert_eq!(job["state"], "IN_PROGRESS");
    for t in ["start-next/accepted", "j1/update/accepted"] {
        assert!(
            dev.subscribe(&format!("$aws/things/dev-a/jobs/{t}"))
                .await
                .unwrap()
        );
    }
    dev.publish("$aws/things/dev-a/jobs/start-next", "{}")
        .await
        .unwrap();
    let next = reply(&mut dev, "$aws/things/dev-a/jobs/start-next/accepted").await;
    assert_eq!(next["execution"]["status"], "IN_PROGRESS", "{next}");
    dev.publish(
        "$aws/things/dev-a/jobs/j1/update",
        r#"{"status":"SUCCEEDED"}"#,
    )
    .await
    .unwrap();
    reply(&mut dev, "$aws/things/dev-a/jobs/j1/update/accepted").await;
    dev.disconnect().await;

    let text = scrape_until(&s, |t| {
        metric(
            t,
            "fleet_broker_disconnects_total",
            &[("reason", "client_initiated_disconnect")],
        ) >= 1.0
    });
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    // The backend's connection and the device's.
    assert_eq!(
        m("fleet_broker_connects_total", &[("outcome", "accepted")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        m(
            "fleet_broker_connects_total",
            &[("outcome", "not_authorized")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        m(
            "fleet_tls_handshake_failures_total",
            &[("listener", "mqtt"), ("reason", "unknown_issuer")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        m(
            "fleet_broker_disconnects_total",
            &[("reason", "client_initiated_disconnect")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        m("fleet_broker_connected_clients", &[("role", "device")]),
        0.0,
        "{text}"
    );
    let shadow = |outcome, code| {
        m(
            "fleet_shadow_requests_total",
            &[
                ("operation", "update"),
                ("outcome", outcome),
                ("code", code),
            ],
        )
    };
    assert_eq!(shadow("accepted", ""), 2.0, "{text}");
    assert_eq!(shadow("rejected", "409"), 1.0, "{text}");
    assert_eq!(shadow("rejected", "400"), 1.0, "{text}");
    assert_eq!(
        m(
            "fleet_messages_in_total",
            &[("service", "shadows"), ("qos", "1")]
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        m(
            "fleet_messages_in_total",
            &[("service", "jobs"), ("qos", "1")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        m(
            "fleet_requests_total",
            &[("service", "shadows"), ("outcome", "handled")]
        ),
        4.0,
        "{text}"
    );
    for status in ["QUEUED", "IN_PROGRESS", "SUCCEEDED"] {
        assert_eq!(
            m("fleet_job_executions_total", &[("status", status)]),
            1.0,
            "{status}: {text}"
        );
    }
    // The device's four updates and two jobs requests, each answered.
    assert!(
        m("fleet_broker_messages_received_total", &[("qos", "1")]) >= 6.0,
        "{text}"
    );
    assert!(
        m(
            "fleet_store_operation_seconds_count",
            &[("operation", "shadow_save")]
        ) >= 2.0,
        "{text}"
    );
    assert!(
        m(
            "fleet_api_requests_total",
            &[("method", "POST"), ("status", "201")]
        ) >= 1.0,
        "{text}"
    );

    // A certificate revoked through the CLI: the device is refused.
    let certs = s.json(&["certs", "list", "dev-a"]);
    assert_eq!(certs["items"][0]["status"], "active", "{certs}");
    let cert_id = certs["items"][0]["id"].as_str().unwrap().to_string();
    s.ok(&["certs", "revoke", &cert_id]);
    let certs = s.json(&["certs", "list", "dev-a"]);
    assert_eq!(certs["items"][0]["status"], "revoked", "{certs}");
    assert!(
        fleet_testkit::TestClient::connect_to(s.broker, &ca, &id("dev-a"), "dev-a")
            .await
            .is_err()
    );

    // The audit log: an operator's changes with its token id, and a read
    // token's refused attempt.
    let ops = s.json(&["token", "create", "ops", "--scope", "operator"]);
    let (ops_id, ops_token) = (
        ops["id"].as_str().unwrap().to_string(),
        ops["token"].as_str().unwrap().to_string(),
    );
    let reader = s.json(&["token", "create", "dashboard", "--scope", "read"]);
    let reader_token = reader["token"].as_str().unwrap().to_string();
    let (code, _, err) = s.run_with(
        &ops_token,
        &[
            "thing",
            "set-attributes",
            "dev-a",
            "--attribute",
            "site=north",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = s.run_with(
        &ops_token,
        &["shadow", "update", "dev-a", r#"{"speed": 3}"#],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = s.run_with(&reader_token, &["thing", "create", "intruder"]);
    assert_eq!(code, 4);
    let audit = s.json(&["audit", "--limit", "1000"]);
    let items = audit["items"].as_array().unwrap();
    let by = |path: &str, method: &str| {
        items
            .iter()
            .find(|e| e["path"] == path && e["method"] == method)
            .unwrap_or_else(|| panic!("{method} {path} not in the audit log: {audit}"))
    };
    let attrs = by("/v1/things/dev-a/attributes", "PUT");
    assert_eq!(attrs["tokenId"], ops_id.as_str(), "{attrs}");
    assert_eq!(attrs["tokenName"], "ops");
    assert_eq!(attrs["status"], 200);
    assert_eq!(attrs["request"]["attributes"]["site"], "north", "{attrs}");
    assert_eq!(
        attrs["before"]["attributes"],
        serde_json::json!({}),
        "{attrs}"
    );
    let update = by("/v1/things/dev-a/shadow", "POST");
    assert_eq!(update["tokenId"], ops_id.as_str());
    assert_eq!(update["before"]["reported"]["x"], 2, "{update}");
    assert_eq!(
        update["request"]["state"]["desired"]["speed"], 3,
        "{update}"
    );
    let refused = by("/v1/things", "POST");
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["tokenId"], reader["id"], "{refused}");
    // The token the admin made for `ops` is in the log's request, masked
    // nowhere because it was never sent: only its name and scope were.
    let made = by("/v1/tokens", "POST");
    assert_eq!(made["request"]["name"], "ops", "{made}");
    // The admin's reads are not changes.
    assert!(items.iter().all(|e| e["method"] != "GET"), "{audit}");
    // A read token may not read the audit log.
    let (code, _, _) = s.run_with(&reader_token, &["audit"]);
    assert_eq!(code, 4);

    // One line per API request, with the token's id and never the token.
    let log = s.log();
    assert!(
        log.lines().any(|l| l.contains("API request")
            && l.contains("/v1/things/dev-a/attributes")
            && l.contains(&ops_id)
            && l.contains("status=200")),
        "{log}"
    );
    s.assert_no_token_logged(&[&ops_token, &reader_token]);
}

/// Issue 26: `fleet serve` exits non-zero, saying what is missing and why
/// (the whole chain of causes), when a dependency it needs at start is not
/// there: PostgreSQL, an external broker.
#[test]
fn a_missing_dependency_at_start_is_an_exit_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let setup = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["dev-setup", "--dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(setup.status.success(), "{setup:?}");
    let serve = |args: &[&str]| {
        let out = assert_cmd::Command::cargo_bin("fleet")
            .unwrap()
            .args(["serve", "--no-api", "--dir"])
            .arg(&data)
            .args(args)
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Nothing listens on these ports.
    let (pg, broker) = (free_port(), free_port());
    let (code, err) = serve(&[
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--store",
        &format!("postgres://fleet@127.0.0.1:{pg}/fleet"),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot open the store") && err.contains("refused"),
        "{err}"
    );
    let (code, err) = serve(&[
        "--broker",
        &format!("127.0.0.1:{broker}"),
        "--start-timeout",
        "1",
        "--store",
        "memory",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot reach the broker at 127.0.0.1:{broker}"))
            && err.contains("refused"),
        "{err}"
    );
}

/// Issue 26: provisioning templates in `fleet serve`'s configuration, in
/// AWS's template shape with a pre-provisioning hook: served and listed
/// (document and hook) through the API; a template that does not hold is
/// a usage error naming its file and the fault's path.
#[test]
fn templates_in_the_configuration_are_served_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("factory.json");
    let document = serde_json::json!({
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
            "ThingName": {"Fn::Join": ["", ["pump-", {"Ref": "SerialNumber"}]]},
            "ThingGroups": ["pumps"]
        }}}
    });
    write(&template, document.to_string().as_bytes());
    let config = dir.path().join("fleet.toml");
    let table = format!(
        "[[template]]\nname = \"factory\"\nfile = \"{}\"\nhook-url = \"https://hooks.example.com/provision\"\nhook-timeout = 3\n",
        template.display()
    );
    write(&config, table.as_bytes());
    let s = Service::start_with_args(&[], &["--config", config.to_str().unwrap()]);
    let list = s.json(&["template", "list"]);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["name"], "factory");
    assert_eq!(items[0]["document"], document);
    assert_eq!(
        items[0]["preProvisioningHook"],
        "https://hooks.example.com/provision"
    );
    assert_eq!(
        items[0]["requiredParameters"],
        serde_json::json!(["SerialNumber"])
    );

    // Through the API (`fleet template put/show/delete`): made, shown,
    // listed after the configuration's; the configuration's own is not
    // replaced here (5); a document that does not hold is refused with
    // where (5); deleted, then unknown (3).
    let valves = dir.path().join("valves.json");
    write(&valves, document.to_string().as_bytes());
    let made = s.json(&[
        "template",
        "put",
        "valves",
        valves.to_str().unwrap(),
        "--description",
        "valves",
        "--hook-url",
        "https://hooks.example.com/v",
    ]);
    assert_eq!(
        (&made["source"], &made["version"], &made["enabled"]),
        (
            &serde_json::json!("api"),
            &serde_json::json!(1),
            &serde_json::json!(true)
        ),
        "{made}"
    );
    assert_eq!(s.json(&["template", "show", "valves"]), made);
    let shown = s.ok(&["template", "show", "valves"]);
    assert!(
        shown.contains("template valves (api, enabled, version 1)")
            && shown.contains("pre-provisioning hook: https://hooks.example.com/v"),
        "{shown}"
    );
    let list = s.json(&["template", "list"]);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["factory", "valves"]);
    let err = s.fails(&["template", "put", "factory", valves.to_str().unwrap()], 5);
    assert!(err.contains("configuration"), "{err}");
    let broken = dir.path().join("broken.json");
    write(
        &broken,
        br#"{"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::Base64": "x"}}}}}"#,
    );
    let err = s.fails(&["template", "put", "valves", broken.to_str().unwrap()], 5);
    assert!(
        err.contains("Resources.thing.Properties.ThingName.Fn::Base64"),
        "{err}"
    );
    assert_eq!(s.json(&["template", "show", "valves"]), made);
    s.ok(&["template", "delete", "valves"]);
    s.fails(&["template", "show", "valves"], 3);

    // `fleet serve --print-config` refuses the configuration: a usage
    // error (2); what it says.
    let refused = |config: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["serve", "--print-config", "--config"])
            .arg(config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        err
    };
    // A fault in the document: refused at start, with where.
    let bad = serde_json::json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing",
        "Properties": {"ThingName": {"Fn::Base64": "x"}}}}});
    write(&template, bad.to_string().as_bytes());
    let err = refused(&config);
    assert!(
        err.contains("factory.json")
            && err.contains("Resources.thing.Properties.ThingName.Fn::Base64"),
        "{err}"
    );
    // A hook that is not HTTPS is refused too.
    write(&template, document.to_string().as_bytes());
    write(&config, table.replace("https://", "http://").as_bytes());
    let err = refused(&config);
    assert!(err.contains("hook-url must be https://"), "{err}");
}

/// `fleet serve` with an OTLP endpoint set in the environment, its log in
/// `dir/serve.log`, the API on `api`.
fn serve_with_otlp(dir: &Path, endpoint: &str, api: u16) -> Child {
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fleet"))
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .args(["serve", "--store", "memory", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--api")
        .arg(format!("127.0.0.1:{api}"))
        .arg("--dir")
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits for `fleet serve`'s API, then asks `/readyz` through `fleet
/// ready` (an API request, so a span).
fn ready(dir: &Path, api: u16) {
    for _ in 0..300 {
        if dir.join("data/admin.token").exists()
            && std::net::TcpStream::connect(("127.0.0.1", api)).is_ok()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "ready",
            "--api",
            &format!("https://localhost:{api}"),
            "--api-ca",
        ])
        .arg(dir.join("data/ca.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Issue 26, built with `--features otlp`: spans of API requests reach an
/// OTLP/HTTP collector (here one that records what is POSTed to
/// `/v1/traces`), as protobuf, named `api_request`, from service `fleet`.
#[cfg(feature = "otlp")]
#[test]
fn traces_reach_an_otlp_collector() {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<(String, String, Vec<u8>)>();
    std::thread::spawn(move || {
        for stream in collector.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let (mut length, mut kind) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => length = v.trim().parse().unwrap(),
                            "content-type" => kind = v.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let _ = tx.send((path, kind, body));
                    writer
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                        .unwrap();
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let api = free_port();
    let mut child = serve_with_otlp(dir.path(), &endpoint, api);
    ready(dir.path(), api);
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        let Ok((path, kind, body)) = rx.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        assert_eq!(path, "/v1/traces");
        assert_eq!(kind, "application/x-protobuf");
        if contains(&body, b"api_request") && contains(&body, b"/readyz") {
            assert!(contains(&body, b"fleet"), "no service name");
            seen = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(seen, "no api_request span reached the collector: {log}");
    assert!(log.contains("traces exported over OTLP"), "{log}");
}

/// Without the `otlp` feature, an OTLP endpoint in the environment is not
/// ignored silently: `fleet serve` says that no traces are exported.
#[cfg(not(feature = "otlp"))]
#[test]
fn without_the_otlp_feature_an_otlp_endpoint_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let api = free_port();
    let mut child = serve_with_otlp(dir.path(), "http://127.0.0.1:4318", api);
    ready(dir.path(), api);
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("built without the `otlp` feature"), "{log}");
}

/// `fleet --json thing get {thing}`'s connectivity, once `check` holds of
/// it (within 10 s).
fn connectivity_when(s: &Service, thing: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = s.json(&["thing", "get", thing])["connectivity"].clone();
        if check(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{thing}: connectivity stayed {last}");
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// A device's connections as the embedded broker saw them, in the fleet
/// index: a clean disconnect, a device killed (keep-alive timeout), a
/// connection taken over; activity moves lastSeen; search and statistics
/// through `fleet thing search/stats`; after a restart of `fleet serve`
/// the device that was connected is recorded as disconnected by the
/// server, then connected again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectivity_search_and_statistics_through_the_cli() {
    let mut s =
        Service::start_with_args(&["dev-a", "dev-b", "dev-c"], &["--seen-interval-ms", "100"]);
    let ca = std::fs::read_to_string(s.path("ca.pem")).unwrap();
    let id = |name: &str| s.identity(name);
    // Never connected: no connectivity.
    assert!(
        s.json(&["thing", "get", "dev-a"])
            .get("connectivity")
            .is_none()
    );

    // dev-a connects, then disconnects cleanly.
    let a = fleet_testkit::TestClient::connect_to(s.broker, &ca, &id("dev-a"), "dev-a")
        .await
        .unwrap();
    let up = connectivity_when(&s, "dev-a", |c| c["connected"] == true);
    assert!(
        up["connectedSince"].as_u64().unwrap() > 1_700_000_000_000,
        "{up}"
    );
    a.disconnect().await;
    let down = connectivity_when(&s, "dev-a", |c| c["connected"] == false);
    assert_eq!(
        down["disconnectReason"], "CLIENT_INITIATED_DISCONNECT",
        "{down}"
    );
    assert!(down["disconnectedAt"].as_u64().unwrap() >= up["connectedSince"].as_u64().unwrap());

    // dev-b is killed: connected, then silent (keep-alive 1 s, no PINGREQ).
    let tls = fleet_testkit::client_tls_config(&id("dev-b"), &ca).unwrap();
    let mut o = rumqttc::MqttOptions::new("dev-b", "localhost", s.broker);
    o.set_keep_alive(Duration::from_secs(1))
        .set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
        ));
    let (_b, mut b_loop) = rumqttc::AsyncClient::new(o, 10);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = b_loop.poll().await.unwrap()
        {
            break;
        }
    }
    // (The event loop is not polled again: the socket stays open, silent.)
    let killed = connectivity_when(&s, "dev-b", |c| c["connected"] == false);
    assert_eq!(
        killed["disconnectReason"], "MQTT_KEEP_ALIVE_TIMEOUT",
        "{killed}"
    );

    // dev-c connects twice: the second connection takes over, and dev-c
    // stays connected (the first's end is not the thing's).
    let c1 = fleet_testkit::TestClient::connect_to(s.broker, &ca, &id("dev-c"), "dev-c")
        .await
        .unwrap();
    let first = connectivity_when(&s, "dev-c", |c| c["connected"] == true);
    let mut c2 = fleet_testkit::TestClient::connect_to(s.broker, &ca, &id("dev-c"), "dev-c")
        .await
        .unwrap();
    drop(c1);
    let second = connectivity_when(&s, "dev-c", |c| {
        c["connectedSince"] != first["connectedSince"]
    });
    assert_eq!(second["connected"], true, "{second}");
    // Its activity moves lastSeen; a reported firmware is found once the
    // update is acknowledged.
    for t in ["update/accepted"] {
        assert!(
            c2.subscribe(&format!("$aws/things/dev-c/shadow/{t}"))
                .await
                .unwrap()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c2.publish(
        "$aws/things/dev-c/shadow/update",
        r#"{"state":{"reported":{"firmware":"1.2","temp":81.5}}}"#,
    )
    .await
    .unwrap();
    reply(&mut c2, "$aws/things/dev-c/shadow/update/accepted").await;
    let seen = connectivity_when(&s, "dev-c", |c| {
        c["lastSeen"].as_u64() > second["lastSeen"].as_u64()
    });
    assert_eq!(seen["connected"], true);
    assert_eq!(
        names(&s.json(&[
            "thing",
            "search",
            "shadow.reported.firmware:1.2 AND shadow.reported.temp > 80"
        ])),
        ["dev-c"]
    );

    // Search and statistics.
    assert_eq!(
        names(&s.json(&["thing", "search", "connectivity.connected:true"])),
        ["dev-c"]
    );
    assert_eq!(
        names(&s.json(&["thing", "search", "NOT connectivity.connected:true"])),
        ["dev-a", "dev-b"]
    );
    assert_eq!(
        names(&s.json(&[
            "thing",
            "search",
            "connectivity.disconnectReason:MQTT_KEEP_ALIVE_TIMEOUT"
        ])),
        ["dev-b"]
    );
    let stats = s.json(&[
        "thing",
        "stats",
        "thingName:dev-*",
        "--group-by",
        "connectivity.connected",
        "--field",
        "shadow.reported.temp",
    ]);
    assert_eq!(stats["count"], 3, "{stats}");
    assert_eq!(
        stats["groups"],
        json!([{"value": "false", "count": 2}, {"value": "true", "count": 1}])
    );
    assert_eq!(stats["field"]["max"], 81.5);
    let table = s.ok(&["thing", "search", "thingName:dev-*"]);
    assert!(
        table.contains("CONNECTED") && table.contains("no (mqtt_keep_alive_timeout)"),
        "{table}"
    );
    // A malformed query: a usage error saying where.
    let (code, _, err) = s.run(&[
        "thing",
        "search",
        "thingName:dev-* AND (connectivity.connected:true",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("position 48") && err.contains("`)`"), "{err}");

    // dev-a connects again and stays, silent (keep-alive 60 s, not
    // polled: it will not reconnect); then fleet serve is killed.
    let silent = |thing: &str| {
        let tls = fleet_testkit::client_tls_config(&id(thing), &ca).unwrap();
        let mut o = rumqttc::MqttOptions::new(thing, "localhost", s.broker);
        o.set_keep_alive(Duration::from_secs(60)).set_transport(
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                std::sync::Arc::new(tls),
            )),
        );
        rumqttc::AsyncClient::new(o, 10)
    };
    let (_a2, mut a_loop) = silent("dev-a");
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = a_loop.poll().await.unwrap()
        {
            break;
        }
    }
    let a_up = connectivity_when(&s, "dev-a", |c| c["connected"] == true);
    let b_before = s.json(&["thing", "get", "dev-b"])["connectivity"].clone();
    s.restart("KILL");
    // The broker died with its connections: dev-a is recorded as
    // disconnected by the server, when it was last heard from.
    let a_after = s.json(&["thing", "get", "dev-a"])["connectivity"].clone();
    assert_eq!(a_after["connected"], false, "{a_after}");
    assert_eq!(
        a_after["disconnectReason"], "SERVER_INITIATED_DISCONNECT",
        "{a_after}"
    );
    assert!(
        a_after["disconnectedAt"].as_u64() >= a_up["connectedSince"].as_u64(),
        "{a_after}"
    );
    // A thing disconnected before stays as it was.
    assert_eq!(s.json(&["thing", "get", "dev-b"])["connectivity"], b_before);
    // dev-c (which reconnects by itself) is connected again.
    c2.wait_connected(Duration::from_secs(10)).await.unwrap();
    connectivity_when(&s, "dev-c", |c| {
        c["connected"] == true && c["connectedSince"] != second["connectedSince"]
    });
    // A clean restart: the search still finds what was indexed.
    s.restart("TERM");
    assert_eq!(
        names(&s.json(&["thing", "search", "shadow.reported.firmware:1.2"])),
        ["dev-c"]
    );
}

/// A group defined by a fleet query, targeted by a continuous job: a
/// device that comes to match (its reported firmware) gets the job; the
/// group's members follow the fleet; a malformed group query is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuous_job_on_a_query_group_reaches_a_device_that_comes_to_match() {
    let s = Service::start_with(&["dev-a", "dev-b"]);
    let ca = std::fs::read_to_string(s.path("ca.pem")).unwrap();
    let id = |name: &str| s.identity(name);
    let g = s.json(&[
        "group",
        "create",
        "on-1-2",
        "--query",
        "shadow.reported.firmware:1.2",
    ]);
    assert_eq!(g["members"], json!([]), "{g}");
    let err = s.fails(
        &[
            "group",
            "create",
            "bad",
            "--query",
            "shadow.reported.firmware:(1.2",
        ],
        5,
    );
    assert!(err.contains("position"), "{err}");
    s.ok(&[
        "job",
        "create",
        "fw-fix",
        r#"{"operation":"fix"}"#,
        "--group",
        "on-1-2",
        "--continuous",
    ]);

    let mut dev = fleet_testkit::TestClient::connect_to(s.broker, &ca, &id("dev-a"), "dev-a")
        .await
        .unwrap();
    for t in ["jobs/notify-next", "shadow/update/accepted"] {
        assert!(
            dev.subscribe(&format!("$aws/things/dev-a/{t}"))
                .await
                .unwrap()
        );
    }
    dev.publish(
        "$aws/things/dev-a/shadow/update",
        r#"{"state":{"reported":{"firmware":"1.2"}}}"#,
    )
    .await
    .unwrap();
    reply(&mut dev, "$aws/things/dev-a/shadow/update/accepted").await;
    assert_eq!(
        s.json(&["group", "members", "on-1-2"])["items"],
        json!(["dev-a"])
    );
    // Within a few seconds (continuous jobs are synced every 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = dev.recv(Duration::from_secs(1)).await;
        if let Some(m) = m
            && m.topic == "$aws/things/dev-a/jobs/notify-next"
        {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["execution"]["jobId"], "fw-fix", "{v}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never reached dev-a"
        );
    }
    // dev-b runs the fleet device agent, which reports its inventory:
    // found by component version, hardware id and protocol.
    let agent = fleet_device::AgentBuilder::from_files(
        "localhost",
        s.broker,
        "dev-b",
        s.path("things/dev-b.pem"),
        s.path("things/dev-b.key"),
        s.path("ca.pem"),
    )
    .unwrap()
    .inventory(fleet_device::Inventory {
        hardware_id: Some("board-b".into()),
        components: [("firmware".to_string(), "2.4.1".to_string())].into(),
    })
    .start()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let query = "inventory.components.firmware:2.4* AND inventory.hardwareId:board-b AND inventory.agent.protocol:mqtt5";
    while names(&s.json(&["thing", "search", query])) != ["dev-b"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the inventory never reached the index"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_version = s.json(&[
        "thing",
        "stats",
        "*",
        "--group-by",
        "inventory.components.firmware",
    ]);
    assert_eq!(
        by_version["groups"],
        json!([{"value": "2.4.1", "count": 1}]),
        "{by_version}"
    );
    agent.shutdown().await;
    let ex = s.json(&["job", "executions", "fw-fix"]);
    assert!(
        ex.to_string().contains("dev-a") && !ex.to_string().contains("dev-b"),
        "{ex}"
    );
    let groups = s.json(&["group", "list"]);
    assert_eq!(
        groups["items"][0]["query"], "shadow.reported.firmware:1.2",
        "{groups}"
    );
}
