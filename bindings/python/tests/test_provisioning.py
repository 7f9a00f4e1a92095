"""Provisioning by claim through the bindings, against `fleet serve` with its
embedded broker (which routes each provisioning reply to its requester)."""

import os
import subprocess

import fleet
from conftest import _fleet_bin, _free_port, _wait_port


async def test_a_device_provisions_by_claim_and_connects(tmp_path):
    fleet_bin, port, api = _fleet_bin(), _free_port(), _free_port()
    d = tmp_path / "dev"
    env = dict(os.environ, USER=os.environ.get("USER") or "root")
    subprocess.run([fleet_bin, "dev-setup", "--dir", str(d), "--claim", "claim@factory",
                    "--port", str(port)], check=True, env=env, capture_output=True)
    serve = subprocess.Popen(
        [fleet_bin, "serve", "--dir", str(d), "--listen", f"127.0.0.1:{port}", "--api",
         f"127.0.0.1:{api}", "--claim", "claim@factory"],
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        _wait_port(api, serve, "fleet serve")
        ca = (d / "ca.pem").read_text()
        claim = fleet.ClaimConfig(
            host="localhost", port=port, claim_cert_pem=(d / "claims/claim@factory.pem").read_text(),
            claim_key_pem=(d / "claims/claim@factory.key").read_text(), ca_pem=ca,
            template="default", parameters={"SerialNumber": "py-0042"}, thing_name="thing-py-0042",
            state_dir=str(tmp_path / "state"), timeout_ms=10_000)
        assert fleet.load_provisioned(str(tmp_path / "state")) is None
        p = await fleet.provision_by_claim(claim)
        assert p.thing_name == "thing-py-0042" and "BEGIN CERTIFICATE" in p.cert_pem
        assert fleet.load_provisioned(str(tmp_path / "state")) == p
        agent = fleet.Agent.start(fleet.AgentConfig(
            host="localhost", port=port, thing=p.thing_name, cert_pem=p.cert_pem,
            key_pem=p.key_pem, ca_pem=ca))
        ev = await agent.next_event()
        assert ev.is_connected(), ev
        assert await agent.report(None, '{"provisioned": true}') >= 1
        await agent.shutdown()
        bad = fleet.ClaimConfig(**{**claim.__dict__, "template": "nope", "state_dir": str(tmp_path / "s2")})
        try:
            await fleet.provision_by_claim(bad)
            raise AssertionError("an unknown template was accepted")
        except (fleet.FleetError.Rejected, fleet.FleetError.Unauthorized):
            pass
        assert fleet.load_provisioned(str(tmp_path / "s2")) is None, "nothing stored on failure"
    finally:
        serve.terminate()
        serve.wait(timeout=10)
