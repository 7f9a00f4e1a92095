//! A private PostgreSQL server per test: a fresh cluster in a temporary
//! directory, on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;

/// A PostgreSQL server of its own for one test (`initdb`, then `pg_ctl
/// start` on a free loopback port, trust authentication for the user
/// `fleet`); stopped and deleted when dropped. As root it runs as the
/// `postgres` user (PostgreSQL refuses to run as root).
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
    /// The server options it was started with (for a restart).
    options: String,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The directory of `initdb` and `pg_ctl`: `$FLEET_PG_BIN`, Debian's
/// newest `/usr/lib/postgresql/*/bin`, or `PATH`.
fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FLEET_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versions.pop() {
        return Some(newest);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// TLS for a [`Postgres`] server: its certificate and key (PEM), and, for
/// certificate authentication, the CA of the clients' certificates (a
/// client then logs in as the user its certificate's common name names).
/// Connections over TCP without TLS are refused.
#[derive(Debug, Clone)]
pub struct PostgresTls {
    /// The server's certificate chain (PEM).
    pub cert_pem: String,
    /// The server's private key (PEM).
    pub key_pem: String,
    /// With it, clients must present a certificate it signed.
    pub client_ca_pem: Option<String>,
}

impl Postgres {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(None)
    }

    /// Starts a server that accepts TCP connections only over TLS.
    pub fn start_tls(tls: PostgresTls) -> Result<Self, HarnessError> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<PostgresTls>) -> Result<Self, HarnessError> {
        let bin = find_bin().ok_or(HarnessError::PostgresNotFound)?;
        let dir = tempfile::Builder::new()
            .prefix("fleet-pg-")
            .tempdir()
            .map_err(|e| HarnessError::io("create PostgreSQL's temporary directory", e))?;
        let run_as = is_root().then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg("-R")
                .arg(user)
                .arg(dir.path())
                .status()
                .map_err(|e| HarnessError::io("chown PostgreSQL's directory", e))?;
            if !status.success() {
                return Err(HarnessError::PostgresFailed {
                    what: format!("chown to {user} failed ({status}); is there a `{user}` user?"),
                    log: String::new(),
                });
            }
        }
        let mut pg = Self {
            dir,
            bin,
            port: 0,
            run_as,
            options: String::new(),
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "fleet",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut tls_options = String::new();
        if let Some(tls) = &tls {
            let write = |name: &str, text: &str| {
                let path = data.join(name);
                std::fs::write(&path, text)
                    .map_err(|e| HarnessError::io(format!("write {}", path.display()), e))?;
                // PostgreSQL refuses a key others can read.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| HarnessError::io("chmod a TLS file", e))?;
                }
                Ok::<_, HarnessError>(path)
            };
            write("server.crt", &tls.cert_pem)?;
            write("server.key", &tls.key_pem)?;
            let method = match &tls.client_ca_pem {
                Some(ca) => {
                    write("client-ca.crt", ca)?;
                    tls_options.push_str(" -c ssl_ca_file=client-ca.crt");
                    "cert"
                }
                None => "trust",
            };
            write(
                "pg_hba.conf",
                &format!(
                    "local all all trust\nhostssl all all 127.0.0.1/32 {method}\nhostnossl all all 127.0.0.1/32 reject\n"
                ),
            )?;
            tls_options
                .push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
            if let Some(user) = &pg.run_as {
                let status = Command::new("chown")
                    .arg("-R")
                    .arg(user)
                    .arg(&data)
                    .status()
                    .map_err(|e| HarnessError::io("chown PostgreSQL's TLS files", e))?;
                if !status.success() {
                    return Err(HarnessError::PostgresFailed {
                        what: format!("chown to {user} failed ({status})"),
                        log: String::new(),
                    });
                }
            }
        }
        // Another process may take the port between the probe and the
        // bind: try a few.
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200{tls_options}",
                pg.port,
                path_str(pg.dir.path())?
            );
            pg.options = options;
            match pg.pg_ctl_start() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::PostgresNotFound))
    }

    fn pg_ctl_start(&self) -> Result<(), HarnessError> {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &self.options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
    }

    /// Stops the server (connections are cut; its data stays), as a
    /// database going away does.
    pub fn stop(&self) -> Result<(), HarnessError> {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "fast", "-w", "stop"],
        )
    }

    /// Starts the server again after [`stop`](Self::stop), on the same
    /// port and data.
    pub fn restart(&self) -> Result<(), HarnessError> {
        self.pg_ctl_start()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), HarnessError> {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| HarnessError::io(format!("run {}", exe.display()), e))?;
        if out.status.success() {
            return Ok(());
        }
        let server_log =
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        Err(HarnessError::PostgresFailed {
            what: format!("{program} exited with {}", out.status),
            log: format!(
                "{}{}{server_log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }

    /// A connection string for the `postgres` database as `fleet`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=fleet dbname=postgres",
            self.port
        )
    }

    /// The same as a URI: `postgres://fleet@127.0.0.1:{port}/postgres`.
    pub fn uri(&self) -> String {
        format!("postgres://fleet@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates another database; returns its connection string.
    pub fn database(&self, name: &str) -> Result<String, HarnessError> {
        let exe = self.bin.join("createdb");
        let port = self.port.to_string();
        let out = Command::new(exe)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "fleet", name])
            .output()
            .map_err(|e| HarnessError::io("run createdb", e))?;
        if !out.status.success() {
            return Err(HarnessError::PostgresFailed {
                what: format!("createdb {name} exited with {}", out.status),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(format!(
            "host=127.0.0.1 port={} user=fleet dbname={name}",
            self.port
        ))
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        if let Some(data) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn path_str(p: &Path) -> Result<&str, HarnessError> {
    p.to_str().ok_or_else(|| HarnessError::PostgresFailed {
        what: format!("{} is not UTF-8", p.display()),
        log: String::new(),
    })
}

fn free_port() -> Result<u16, HarnessError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("find a free port", e))
}
