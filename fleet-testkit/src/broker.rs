//! A real Mosquitto with mutual TLS and ACLs, one per test.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::pki::{Identity, Pki};

/// The common name of the privileged backend identity in the default policy.
pub const BACKEND_IDENTITY: &str = "fleet-backend";

/// How long [`Broker::start`] waits for Mosquitto to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Who may touch which topics; written as a Mosquitto ACL file.
///
/// Devices authenticate with a client certificate whose common name is their
/// thing name (`use_identity_as_username`), and each device may touch only
/// the topics that carry its own name: it may publish requests and read
/// replies, never publish a reply (that would let it forge the service's
/// answers to itself). Backend identities may touch everything.
#[derive(Debug, Clone)]
pub struct AclPolicy {
    /// Topic prefix of the protocol, `$aws` by default.
    pub prefix: String,
    /// Common names of the privileged backend identities.
    pub backend_identities: Vec<String>,
}

impl Default for AclPolicy {
    fn default() -> Self {
        Self {
            prefix: "$aws".to_string(),
            backend_identities: vec![BACKEND_IDENTITY.to_string()],
        }
    }
}

impl AclPolicy {
    /// The policy as a Mosquitto ACL file.
    pub fn to_mosquitto_acl(&self) -> String {
        let p = &self.prefix;
        let mut acl = String::new();
        // `pattern` lines apply to every client; `%u` is the certificate's
        // common name. A thing name can never contain `/`, `+` or `#`, so
        // `%u` cannot widen a pattern.
        acl.push_str("# Devices: only their own topics. Requests out, replies in.\n");
        let things = format!("{p}/things/%u");
        for shadow in [
            things.clone() + "/shadow",
            things.clone() + "/shadow/name/+",
        ] {
            for op in ["get", "update", "delete"] {
                let _ = writeln!(acl, "pattern write {shadow}/{op}");
            }
        }
        let _ = writeln!(acl, "pattern read {things}/shadow/#");
        for req in ["get", "start-next", "+/get", "+/update"] {
            let _ = writeln!(acl, "pattern write {things}/jobs/{req}");
        }
        let _ = writeln!(acl, "pattern read {things}/jobs/#");
        for req in ["describe", "get"] {
            let _ = writeln!(acl, "pattern write {things}/streams/+/{req}/+");
        }
        let _ = writeln!(acl, "pattern read {things}/streams/#");
        for backend in &self.backend_identities {
            let _ = writeln!(acl, "\n# Backend identity: everything.");
            let _ = writeln!(acl, "user {backend}");
            // `#` does not match topics that start with `$`, so the prefix
            // gets a line of its own.
            let _ = writeln!(acl, "topic readwrite {p}/#");
            // Shared subscriptions are checked as written, `$share/...`.
            let _ = writeln!(acl, "topic read $share/#");
            let _ = writeln!(acl, "topic readwrite #");
        }
        acl
    }
}

/// Options of a [`Broker`].
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// The ACL policy; [`AclPolicy::default`] if not set.
    pub acl: AclPolicy,
    /// The `mosquitto` binary; if `None`, `$MOSQUITTO`, then `PATH`, then
    /// `/usr/sbin` and `/usr/local/sbin`.
    pub mosquitto: Option<PathBuf>,
}

/// A Mosquitto process on a free loopback port, with mutual TLS required,
/// the certificate's common name used as the user name, and an ACL. It has
/// its own CA ([`Broker::pki`]) and is killed when dropped.
pub struct Broker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    pki: Pki,
    mosquitto: PathBuf,
}

impl Broker {
    /// Starts a broker with the default options.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(BrokerOptions::default())
    }

    /// Starts a broker with `options`.
    pub fn start_with(options: BrokerOptions) -> Result<Self, HarnessError> {
        let mosquitto = find_mosquitto(options.mosquitto.as_deref())?;
        let dir = tempfile::Builder::new()
            .prefix("fleet-broker-")
            .tempdir()
            .map_err(|e| HarnessError::io("create the broker's temporary directory", e))?;
        let pki = Pki::new("fleet test CA")?;
        let server = pki.server_identity()?;
        write(dir.path().join("ca.pem"), &pki.ca_pem())?;
        write(dir.path().join("server.pem"), &server.cert_pem)?;
        write(dir.path().join("server.key"), &server.key_pem)?;
        write(dir.path().join("acl"), &options.acl.to_mosquitto_acl())?;

        let mut broker = Self {
            dir,
            port: 0,
            child: None,
            pki,
            mosquitto,
        };
        // Another process may take the port between our probe and
        // Mosquitto's bind; try a few ports before giving up.
        let mut last_err = None;
        for _ in 0..5 {
            broker.port = free_port()?;
            write(
                broker.dir.path().join("mosquitto.conf"),
                &config(broker.dir.path(), broker.port),
            )?;
            match broker.spawn_and_wait() {
                Ok(()) => return Ok(broker),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(HarnessError::StartTimeout { log: broker.log() }))
    }

    /// The loopback address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The port the broker listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's CA: issues server, device and backend certificates.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// A device identity: a client certificate whose common name is `thing`.
    pub fn device_identity(&self, thing: &str) -> Result<Identity, HarnessError> {
        self.pki.client_identity(thing)
    }

    /// The privileged backend identity of the default ACL.
    pub fn backend_identity(&self) -> Result<Identity, HarnessError> {
        self.pki.client_identity(BACKEND_IDENTITY)
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the broker (SIGKILL: no goodbye to clients, as in a crash or a
    /// network cut). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port, with the same certificates
    /// and ACL. Waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        // The old socket may linger for a moment; Mosquitto sets
        // SO_REUSEADDR, but retry a few times in case the bind still fails.
        let mut last_err = None;
        for _ in 0..5 {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last_err.unwrap_or(HarnessError::StartTimeout { log: self.log() }))
    }

    /// Everything Mosquitto has logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The directory holding the configuration, certificates and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let conf = self.dir.path().join("mosquitto.conf");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.out"))
            .map_err(|e| HarnessError::io("open the broker's output file", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::io("open the broker's output file", e))?;
        let child = Command::new(&self.mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| HarnessError::io("start mosquitto", e))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HarnessError::BrokerExited {
                    status: status.to_string(),
                    log: self.log() + &self.output(),
                });
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(HarnessError::StartTimeout {
                    log: self.log() + &self.output(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.out")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("addr", &self.addr())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

fn config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "# Written by fleet-testkit.
# Run as root, Mosquitto would switch to the `mosquitto` user, which cannot
# read this private directory. As another user the line has no effect.
user root
per_listener_settings false
allow_anonymous false
persistence false
log_dest file {d}/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
acl_file {d}/acl
max_queued_messages 100000

listener {port} 127.0.0.1
protocol mqtt
cafile {d}/ca.pem
certfile {d}/server.pem
keyfile {d}/server.key
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
"
    )
}

fn write(path: PathBuf, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(&path, contents)
        .map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HarnessError::io("find a free loopback port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("find a free loopback port", e))
}

/// Finds the `mosquitto` binary: `$MOSQUITTO`, then `PATH`, then the sbin
/// folders Debian installs it to (not on a normal user's `PATH`).
fn find_mosquitto(explicit: Option<&Path>) -> Result<PathBuf, HarnessError> {
    let explicit = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("MOSQUITTO").map(PathBuf::from));
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(HarnessError::MosquittoNotFound)
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"].map(PathBuf::from))
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .ok_or(HarnessError::MosquittoNotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_confines_devices_and_frees_the_backend() {
        let acl = AclPolicy::default().to_mosquitto_acl();
        assert!(acl.contains("pattern write $aws/things/%u/shadow/update\n"));
        assert!(acl.contains("pattern write $aws/things/%u/shadow/name/+/update\n"));
        assert!(acl.contains("pattern read $aws/things/%u/shadow/#\n"));
        assert!(acl.contains("pattern write $aws/things/%u/jobs/+/update\n"));
        assert!(acl.contains(
            "user fleet-backend\ntopic readwrite $aws/#\ntopic read $share/#\ntopic readwrite #\n"
        ));
        // No device line grants anything outside the device's own subtree.
        for line in acl.lines().filter(|l| l.starts_with("pattern")) {
            assert!(line.contains(" $aws/things/%u/"), "{line}");
        }
    }
}
