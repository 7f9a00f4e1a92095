"""A fleet cloud for AWS's own device SDK: `fleet dev-setup` certificates and
`fleet serve`, with its embedded broker or with Mosquitto (mutual TLS, the
fleet's ACL). Devices are `awscrt` MQTT connections made by the AWS IoT
Device SDK for Python v2, used as AWS's documentation shows; the cloud is
driven with the `fleet` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from awscrt import mqtt, mqtt_request_response
from awsiot import mqtt5_client_builder, mqtt_connection_builder

ROOT = Path(__file__).resolve().parents[2]
THINGS = ["aws-shadow", "aws-jobs", "aws-next", "aws-parity", "aws-session"]
CLAIM = "claim@factory"
TIMEOUT = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
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


def mosquitto() -> str:
    found = os.environ.get("MOSQUITTO") or shutil.which("mosquitto")
    for p in ([found] if found else []) + ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]:
        if p and os.access(p, os.X_OK):
            return p
    pytest.fail("mosquitto is needed: apt-get install mosquitto (or MOSQUITTO=/path/to/mosquitto)")


def fleet_bin() -> str:
    path = os.environ.get("FLEET_BIN") or str(ROOT / "target" / "debug" / "fleet")
    if not os.access(path, os.X_OK):
        pytest.fail(f"the fleet binary is needed at {path}: cargo build -p fleet-cloud (or FLEET_BIN=...)")
    return path


class Cloud:
    """`fleet serve` (embedded broker, or Mosquitto beside it) and the CLI."""

    def __init__(self, tmp: Path, broker: str) -> None:
        self.broker_kind = broker
        self.dir = tmp / "dev"
        self.fleet = fleet_bin()
        self.port, self.api_port = free_port(), free_port()
        env = dict(os.environ, USER=os.environ.get("USER") or "root")
        args = [self.fleet, "dev-setup", "--dir", str(self.dir), "--port", str(self.port),
                "--claim", CLAIM]
        for t in THINGS:
            args += ["--thing", t]
        subprocess.run(args, check=True, env=env, capture_output=True)
        self.procs: list[subprocess.Popen] = []
        serve = [self.fleet, "serve", "--dir", str(self.dir), "--api", f"127.0.0.1:{self.api_port}"]
        if broker == "mosquitto":
            m = subprocess.Popen([mosquitto(), "-c", str(self.dir / "mosquitto.conf")],
                                 stdout=open(tmp / "mosquitto.log", "w"), stderr=subprocess.STDOUT)
            self.procs.append(m)
            wait_port(self.port, m, "mosquitto")
            serve += ["--broker", f"localhost:{self.port}"]
        else:
            serve += ["--listen", f"127.0.0.1:{self.port}", "--claim", CLAIM]
        self.serve_args, self.log = serve, tmp / "fleet-serve.log"
        self.start_serve()
        self.env = dict(os.environ, FLEET_API=f"https://localhost:{self.api_port}",
                        FLEET_TOKEN_FILE=str(self.dir / "admin.token"),
                        FLEET_CA=str(self.dir / "ca.pem"))

    def start_serve(self) -> None:
        s = subprocess.Popen(self.serve_args, stdout=open(self.log, "a"),
                             stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))
        self.procs.append(s)
        wait_port(self.api_port, s, "fleet serve")
        if self.broker_kind != "mosquitto":
            wait_port(self.port, s, "fleet serve's broker")

    def restart_serve(self) -> None:
        """Stops `fleet serve` (SIGTERM) and starts it again on the same
        directory and ports."""
        s = self.procs.pop()
        s.terminate()
        s.wait(timeout=30)
        self.start_serve()

    def cli(self, *args: str):
        """Runs `fleet ARGS --json`; returns its JSON output."""
        p = subprocess.run([self.fleet, *args, "--json"], env=self.env,
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return json.loads(p.stdout) if p.stdout.strip() else None

    def connect(self, client_id: str, cert: Path, key: Path,
                clean_session: bool = True, on_message=None) -> mqtt.Connection:
        """An AWS SDK MQTT 3.1.1 connection with mutual TLS, connected
        (`conn.session_present` says what the CONNACK said)."""
        conn = mqtt_connection_builder.mtls_from_path(
            endpoint="localhost", port=self.port, cert_filepath=str(cert),
            pri_key_filepath=str(key), ca_filepath=str(self.dir / "ca.pem"),
            client_id=client_id, clean_session=clean_session, keep_alive_secs=30)
        if on_message is not None:
            conn.on_message(on_message)
        result = conn.connect().result(TIMEOUT)
        conn.session_present = bool(result.get("session_present"))
        return conn

    @contextlib.contextmanager
    def mqtt5(self, client_id: str, cert: Path, key: Path):
        """An AWS SDK MQTT 5 client with mutual TLS, started and connected;
        stopped on leaving."""
        connected, stopped = threading.Event(), threading.Event()
        client = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost", port=self.port, client_id=client_id,
            cert_filepath=str(cert), pri_key_filepath=str(key),
            ca_filepath=str(self.dir / "ca.pem"),
            on_lifecycle_connection_success=lambda _: connected.set(),
            on_lifecycle_stopped=lambda _: stopped.set())
        client.start()
        try:
            assert connected.wait(TIMEOUT), f"{client_id}: the MQTT 5 client did not connect"
            yield client
        finally:
            client.stop()
            stopped.wait(TIMEOUT)

    def device(self, thing: str, **kwargs) -> mqtt.Connection:
        return self.connect(thing, self.dir / "things" / f"{thing}.pem",
                            self.dir / "things" / f"{thing}.key", **kwargs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def cloud(request, tmp_path_factory):
    c = Cloud(tmp_path_factory.mktemp(f"cloud-{request.param}"), request.param)
    yield c
    c.stop()


class Inbox:
    """What an SDK callback received, to wait on from the test."""

    def __init__(self) -> None:
        self.items: list = []
        self.cond = threading.Condition()

    def __call__(self, item) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait(self, pred=lambda _: True, timeout: float = TIMEOUT):
        """The first item received matching `pred` (waits for it)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for item in self.items:
                    if pred(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"nothing matching within {timeout} s; got {self.items!r}")
                self.cond.wait(left)

    def take(self, pred=lambda _: True, timeout: float = TIMEOUT):
        """Like `wait`, and removes it."""
        item = self.wait(pred, timeout)
        with self.cond:
            self.items.remove(item)
        return item


def subscribed(pair) -> None:
    """Waits for a `subscribe_to_*` call's SUBACK."""
    future, _topic = pair
    future.result(TIMEOUT)


QOS = mqtt.QoS.AT_LEAST_ONCE


def rr_options() -> mqtt_request_response.ClientOptions:
    """Options of the V2 service clients' request-response client."""
    return mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=4, max_streaming_subscriptions=4,
        operation_timeout_in_seconds=TIMEOUT)
