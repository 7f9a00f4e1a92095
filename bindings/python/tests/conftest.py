"""A real cloud for the binding tests: `fleet dev-setup` certificates, a
Mosquitto broker with mutual TLS and the fleet's ACL, and `fleet serve`
against it with its management API. The tests drive the cloud with the
`fleet` CLI (`--json`) and the device through the bindings."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# SoftHSM2 reads its configuration once per process, when the bindings
# first load it: the tests' own, with tokens in a temporary directory.
_SOFTHSM = Path(tempfile.mkdtemp(prefix="fleet-softhsm-"))
(_SOFTHSM / "tokens").mkdir()
(_SOFTHSM / "softhsm2.conf").write_text(
    f"directories.tokendir = {_SOFTHSM / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
os.environ["SOFTHSM2_CONF"] = str(_SOFTHSM / "softhsm2.conf")
_TOKENS = itertools.count()


def softhsm_token(tmp: Path):
    """A fresh SoftHSM2 token (made by `softhsm2-util`, its user PIN in a
    file); returns a function from an object label to its `pkcs11:` URI."""
    util = shutil.which("softhsm2-util")
    module = next((m for m in ["/usr/lib/softhsm/libsofthsm2.so",
                               "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"]
                   if os.path.exists(m)), None)
    if util is None or module is None:
        pytest.fail("SoftHSM2 is needed: apt-get install softhsm2")
    label = f"py-{os.getpid()}-{next(_TOKENS)}"
    subprocess.run([util, "--init-token", "--free", "--label", label, "--so-pin", "so-pin-0000",
                    "--pin", "user-pin-1234"], check=True, capture_output=True)
    pin = tmp / f"{label}.pin"
    pin.write_text("user-pin-1234\n")
    return lambda obj: (f"pkcs11:token={label};object={obj}"
                        f"?module-path={module}&pin-source=file:{pin}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def _mosquitto() -> str:
    found = os.environ.get("MOSQUITTO") or shutil.which("mosquitto")
    for p in ([found] if found else []) + ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]:
        if p and os.access(p, os.X_OK):
            return p
    pytest.fail("mosquitto is needed: apt-get install mosquitto (or MOSQUITTO=/path/to/mosquitto)")


def _fleet_bin() -> str:
    path = os.environ.get("FLEET_BIN") or str(ROOT / "target" / "debug" / "fleet")
    if not os.access(path, os.X_OK):
        pytest.fail(f"the fleet binary is needed at {path}: cargo build -p fleet-cloud (or FLEET_BIN=...)")
    return path


class Cloud:
    """Mosquitto and `fleet serve`, and the `fleet` CLI against them."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "dev"
        self.fleet_bin = _fleet_bin()
        self.port = _free_port()
        self.api_port = _free_port()
        self.things = ["py-device", "py-ota"]
        env = dict(os.environ, USER=os.environ.get("USER") or "root")
        args = [self.fleet_bin, "dev-setup", "--dir", str(self.dir), "--port", str(self.port)]
        for t in self.things:
            args += ["--thing", t]
        subprocess.run(args, check=True, env=env, capture_output=True)
        self.logs = tmp
        self.broker = subprocess.Popen(
            [_mosquitto(), "-c", str(self.dir / "mosquitto.conf")],
            stdout=open(tmp / "mosquitto.log", "w"), stderr=subprocess.STDOUT)
        _wait_port(self.port, self.broker, "mosquitto")
        self.service = subprocess.Popen(
            [self.fleet_bin, "serve", "--dir", str(self.dir), "--broker", f"localhost:{self.port}",
             "--api", f"127.0.0.1:{self.api_port}"],
            stdout=open(tmp / "fleet-serve.log", "w"), stderr=subprocess.STDOUT)
        _wait_port(self.api_port, self.service, "fleet serve")
        self.env = dict(os.environ, FLEET_API=f"https://localhost:{self.api_port}",
                        FLEET_TOKEN_FILE=str(self.dir / "admin.token"),
                        FLEET_CA=str(self.dir / "ca.pem"))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs `fleet ARGS --json`; returns the finished process."""
        p = subprocess.run([self.fleet_bin, *args, "--json"], env=self.env,
                           capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p

    def json(self, *args: str):
        return json.loads(self.cli(*args).stdout)

    def read(self, name: str) -> str:
        return (self.dir / name).read_text()

    def stop(self) -> None:
        for p in (self.service, self.broker):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session")
def cloud(tmp_path_factory):
    c = Cloud(tmp_path_factory.mktemp("cloud"))
    yield c
    c.stop()
