"""Provisioning by claim through the bindings, against `fleet serve` with its
embedded broker (which routes each provisioning reply to its requester)."""

import asyncio
import json
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


async def test_a_device_with_its_keys_in_a_token(tmp_path):
    """Issue 23 from Python: the device's TLS key and receipt key are made in
    a SoftHSM2 token and never leave it; it provisions by claim (the CSR
    signed in the token), connects, reports its shadow, installs a release
    and its receipt, signed in the token, verifies in the cloud."""
    import base64

    from conftest import softhsm_token
    from test_device import MemorySlots, Passes, next_matching

    uri = softhsm_token(tmp_path)
    fleet_bin, port, api = _fleet_bin(), _free_port(), _free_port()
    d = tmp_path / "dev"
    env = dict(os.environ, USER=os.environ.get("USER") or "root")
    subprocess.run([fleet_bin, "dev-setup", "--dir", str(d), "--claim", "claim@factory",
                    "--port", str(port)], check=True, env=env, capture_output=True)
    serve = subprocess.Popen(
        [fleet_bin, "serve", "--dir", str(d), "--listen", f"127.0.0.1:{port}", "--api",
         f"127.0.0.1:{api}", "--claim", "claim@factory"],
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    cli_env = dict(env, FLEET_API=f"https://localhost:{api}",
                   FLEET_TOKEN_FILE=str(d / "admin.token"), FLEET_CA=str(d / "ca.pem"))

    def cli(*args):
        p = subprocess.run([fleet_bin, *args, "--json"], env=cli_env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, f"fleet {' '.join(args)}: {p.stderr}"
        return p.stdout

    try:
        _wait_port(api, serve, "fleet serve")
        ca = (d / "ca.pem").read_text()
        receipt_public = fleet.pkcs11_generate_key(uri("receipts"), fleet.KeyAlgorithm.ED25519)
        assert len(receipt_public) == 32
        try:
            fleet.pkcs11_generate_key(uri("receipts"), fleet.KeyAlgorithm.ED25519)
            raise AssertionError("a second key under one label was made")
        except fleet.FleetError.Rejected:
            pass
        state = str(tmp_path / "state")
        claim = fleet.ClaimConfig(
            host="localhost", port=port, claim_cert_pem=(d / "claims/claim@factory.pem").read_text(),
            claim_key_pem=(d / "claims/claim@factory.key").read_text(), ca_pem=ca,
            template="default", parameters={"SerialNumber": "py-hsm"}, thing_name="thing-py-hsm",
            state_dir=state, timeout_ms=10_000, pkcs11_uri=uri("device"))
        p = await fleet.provision_by_claim(claim)
        assert p.thing_name == "thing-py-hsm" and p.key_pem == "", "no key leaves the token"
        assert not (tmp_path / "state" / "device.key").exists()
        assert fleet.load_provisioned(state) == p
        assert len(fleet.pkcs11_public_key(uri("device"))) == 65

        cli("thing", "set-attributes", p.thing_name, "--attribute",
            "receiptKey=" + base64.b64encode(receipt_public).decode())
        release = fleet.generate_signing_key()
        image = bytes(i % 249 for i in range(20_000))
        envelope = fleet.sign_manifest(
            fleet.manifest_for_image("py-fw", "2.0.0", 2, image, ["rig-1"]), [release.secret_key])
        (tmp_path / "fw.env").write_bytes(envelope)
        (tmp_path / "fw.bin").write_bytes(image)
        cli("release", "upload", "py-hsm-2", "--envelope", str(tmp_path / "fw.env"),
            "--image", str(tmp_path / "fw.bin"))
        slots = MemorySlots(sequence=1)
        ota = fleet.OtaConfig(trust_root=fleet.trust_root_for_key(release.public_key),
                              hardware_id="rig-1", receipt_key=b"", slots=slots,
                              self_test=Passes(), block_size=4096,
                              receipt_key_pkcs11_uri=uri("receipts"))

        def start():
            return fleet.Agent.start(fleet.AgentConfig(
                host="localhost", port=port, thing=p.thing_name, cert_pem=p.cert_pem, ca_pem=ca,
                pkcs11_uri=uri("device"), state_dir=str(tmp_path / "agent"),
                request_timeout_ms=2000, ota=ota))

        agent = start()
        await next_matching(agent, lambda e: e.is_connected())
        assert await agent.report(None, '{"keys": "in a token"}') >= 1
        campaign = subprocess.Popen(
            [fleet_bin, "campaign", "start", "py-hsm-rollout", "--release", "py-hsm-2",
             "--thing", p.thing_name, "--watch", "--json"], env=cli_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ev = await next_matching(agent, lambda e: e.is_reboot_required() or e.is_ota_rejected(),
                                 timeout=60)
        assert ev.is_reboot_required(), ev
        await agent.shutdown()
        slots.boot()
        agent = start()
        ev = await next_matching(agent, lambda e: e.is_ota_finished(), timeout=60)
        assert ev.committed
        out, err = await asyncio.get_running_loop().run_in_executor(
            None, lambda: campaign.communicate(timeout=90))
        assert campaign.returncode == 0, err
        status = json.loads(cli("campaign", "status", "py-hsm-rollout"))
        assert status["succeeded"] == 1 and status["unverifiedReceipt"] == 0, status
        await agent.shutdown()
    finally:
        serve.terminate()
        serve.wait(timeout=10)
