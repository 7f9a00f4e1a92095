"""A device through the Python bindings against a real Mosquitto (mutual
TLS, the fleet's ACL) and a real `fleet serve`: telemetry, a shadow round
trip, a job, a command, and an OTA update into slots written in Python."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading

import pytest

import fleet


def config(cloud, thing: str, state_dir: str, **kw) -> fleet.AgentConfig:
    return fleet.AgentConfig(
        host="localhost", port=cloud.port, thing=thing,
        cert_pem=cloud.read(f"things/{thing}.pem"), key_pem=cloud.read(f"things/{thing}.key"),
        ca_pem=cloud.read("ca.pem"), state_dir=state_dir, request_timeout_ms=2000, **kw)


async def next_matching(agent, pred, timeout=30.0):
    """The next event for which `pred` is true (others are skipped)."""
    async def go():
        while True:
            ev = await agent.next_event()
            assert ev is not None, "the agent stopped"
            if pred(ev):
                return ev
    return await asyncio.wait_for(go(), timeout)


@pytest.fixture
async def device(cloud, tmp_path):
    agent = fleet.Agent.start(config(cloud, "py-device", str(tmp_path / "state")))
    await next_matching(agent, lambda e: e.is_connected())
    yield agent
    await agent.shutdown()


def test_bad_input_is_a_typed_error(cloud, tmp_path):
    with pytest.raises(fleet.FleetError.InvalidArgument):
        fleet.Agent.start(fleet.AgentConfig(
            host="localhost", port=cloud.port, thing="bad/name", cert_pem="x", key_pem="y",
            ca_pem="z"))
    with pytest.raises(fleet.FleetError.InvalidArgument):
        fleet.shadow_delta("[1]", "{}")


async def test_telemetry_is_acknowledged(device):
    d = await device.publish("telemetry", b'{"t": 21.5}', fleet.Qos.AT_LEAST_ONCE)
    await asyncio.wait_for(d.acknowledged(), 20)
    assert d.state().is_acknowledged()
    assert d.seq() > 0
    batch = await device.publish_batch("telemetry", [b'{"t": 1}', b'{"t": 2}'])
    for b in batch:
        await asyncio.wait_for(b.acknowledged(), 20)
    assert [b.seq() for b in batch] == [d.seq() + 1, d.seq() + 2]
    with pytest.raises(fleet.FleetError.InvalidArgument):
        await device.publish("no/#", b"x", fleet.Qos.AT_MOST_ONCE)


async def test_shadow_round_trip(cloud, device):
    cloud.cli("shadow", "update", "py-device", '{"speed": 3}')
    ev = await next_matching(device, lambda e: e.is_shadow_delta() and "speed" in json.loads(e.delta))
    assert json.loads(ev.delta) == {"speed": 3}
    version = await device.report(None, ev.delta)
    assert version > ev.version
    shadow = cloud.json("shadow", "get", "py-device")
    assert shadow["state"]["reported"]["speed"] == 3, shadow
    snap = await device.shadow(None)
    assert json.loads(snap.reported)["speed"] == 3
    with pytest.raises(fleet.FleetError.InvalidArgument):
        await device.report(None, "[not an object]")


async def until(probe, pred, timeout=20.0):
    """`probe()` once `pred` holds of it (polled)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = probe()
        if pred(got):
            return got
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.2)


async def test_presence_and_inventory_reach_the_fleet_index(cloud, tmp_path):
    """Through Mosquitto, which reports no lifecycle events: the agent's
    retained birth and goodbye make the thing connected, then disconnected
    by its own choice; its inventory is searchable."""
    agent = fleet.Agent.start(config(
        cloud, "py-device", str(tmp_path / "inv"), presence=True,
        inventory=fleet.InventoryConfig(hardware_id="board-py", components={"firmware": "1.4.2"})))
    await next_matching(agent, lambda e: e.is_connected())
    query = ("connectivity.connected:true AND inventory.components.firmware:1.4.2"
             " AND inventory.hardwareId:board-py AND inventory.agent.name:fleet-device")
    found = await until(lambda: cloud.json("thing", "search", query),
                        lambda r: [t["name"] for t in r["items"]] == ["py-device"])
    assert found["items"][0]["connectivity"]["connected"] is True, found
    await agent.shutdown()
    c = await until(lambda: cloud.json("thing", "get", "py-device")["connectivity"],
                    lambda c: c["connected"] is False)
    assert c["disconnectReason"] == "CLIENT_INITIATED_DISCONNECT", c


async def test_a_job_runs_to_success(cloud, device):
    cloud.cli("job", "create", "py-job-1", '{"operation": "reboot"}', "--thing", "py-device")
    ev = await next_matching(device, lambda e: e.is_job())
    assert ev.job_id == "py-job-1"
    assert json.loads(ev.document) == {"operation": "reboot"}
    await device.update_job(fleet.JobStatus.IN_PROGRESS, {"step": "rebooting"})
    await device.update_job(fleet.JobStatus.SUCCEEDED, None)
    executions = cloud.json("job", "executions", "py-job-1")
    text = json.dumps(executions)
    assert "SUCCEEDED" in text, text


async def test_a_command_is_answered(cloud, device):
    sender = subprocess.Popen(
        [cloud.fleet_bin, "command", "send", "py-device", "ping", "--payload", '{"n": 7}',
         "--timeout", "30", "--json"], env=cloud.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    ev = await next_matching(device, lambda e: e.is_command())
    assert ev.command == "ping" and json.loads(ev.payload) == {"n": 7}
    await device.respond(ev.execution_id, fleet.CommandStatus.SUCCEEDED, '{"pong": 7}')
    out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err
    assert json.loads(out)["payload"] == {"pong": 7}, out
    with pytest.raises(fleet.FleetError.Rejected):
        await device.respond(ev.execution_id, fleet.CommandStatus.SUCCEEDED, "{}")


async def test_listener_events_reach_asyncio(cloud, tmp_path):
    agent = fleet.Agent.start(config(cloud, "py-device", str(tmp_path / "s2"),
                                     client_id="py-device-listener"))
    seen = []
    async for ev in fleet.events(agent):
        seen.append(ev)
        if ev.is_connected():
            break
    assert seen[-1].is_connected()
    await agent.shutdown()


class MemorySlots(fleet.FirmwareSlots):
    """A/B slots in memory, with a bootloader (`boot`) that takes a pending
    trial once: what a test rig implements over its flash."""

    def __init__(self, sequence: int) -> None:
        self.lock = threading.Lock()
        self.images = {fleet.Slot.A: bytearray(), fleet.Slot.B: bytearray()}
        self.sequences = {fleet.Slot.A: sequence, fleet.Slot.B: 0}
        self.active = fleet.Slot.A
        self.current = fleet.Slot.A
        self.trial = None
        self.record = None
        self.reboots = 0

    def boot(self) -> None:
        self.current, self.trial = (self.trial or self.active), None

    def booted(self):
        return self.current

    def installed_sequence(self):
        return self.sequences[self.current]

    def capacity(self):
        return 1 << 20

    def write(self, slot, offset, data):
        with self.lock:
            img = self.images[slot]
            if offset > len(img):
                raise fleet.FleetError.Storage("a gap in the image")
            img[offset:offset + len(data)] = data

    def set_trial_boot(self, slot):
        self.trial = slot

    def confirm(self, slot, sequence):
        self.active = slot
        self.sequences[slot] = sequence

    def reboot(self):
        self.reboots += 1

    def load_record(self):
        return self.record

    def save_record(self, record):
        self.record = bytes(record)

    def clear_record(self):
        self.record = None


class Passes(fleet.SelfTest):
    def run(self):
        return True


async def test_ota_update_into_python_slots(cloud, tmp_path):
    release = fleet.generate_signing_key()
    receipt = fleet.generate_signing_key()
    cloud.cli("thing", "set-attributes", "py-ota", "--attribute",
              "receiptKey=" + base64.b64encode(receipt.public_key).decode())
    image = bytes(i % 251 for i in range(40_000))
    envelope = fleet.sign_manifest(
        fleet.manifest_for_image("py-fw", "2.0.0", 2, image, ["rig-1"]), [release.secret_key])
    root = fleet.trust_root_for_key(release.public_key)
    info = fleet.verify_manifest(root, envelope, "rig-1", 1, 1 << 20, None)
    fleet.verify_image(info, image)
    (tmp_path / "fw.env").write_bytes(envelope)
    (tmp_path / "fw.bin").write_bytes(image)
    cloud.cli("release", "upload", "py-fw-2", "--envelope", str(tmp_path / "fw.env"),
              "--image", str(tmp_path / "fw.bin"))

    slots = MemorySlots(sequence=1)
    ota = fleet.OtaConfig(trust_root=root, hardware_id="rig-1", receipt_key=receipt.secret_key,
                          slots=slots, self_test=Passes(), block_size=4096)
    state = str(tmp_path / "ota-state")
    agent = fleet.Agent.start(config(cloud, "py-ota", state, ota=ota))
    await next_matching(agent, lambda e: e.is_connected())
    campaign = subprocess.Popen(
        [cloud.fleet_bin, "campaign", "start", "py-rollout", "--release", "py-fw-2",
         "--thing", "py-ota", "--watch", "--json"], env=cloud.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = []
    ev = await next_matching(
        agent, lambda e: (e.is_ota_progress() and progress.append(e.received)) or e.is_reboot_required()
        or e.is_ota_rejected(), timeout=60)
    assert ev.is_reboot_required(), ev
    assert bytes(slots.images[fleet.Slot.B]) == image
    await agent.shutdown()

    slots.boot()  # the trial boot into B
    assert slots.booted() == fleet.Slot.B
    agent = fleet.Agent.start(config(cloud, "py-ota", state, ota=ota))
    ev = await next_matching(agent, lambda e: e.is_ota_finished(), timeout=60)
    assert ev.committed
    assert slots.active == fleet.Slot.B and slots.sequences[fleet.Slot.B] == 2
    out, err = await asyncio.get_running_loop().run_in_executor(
        None, lambda: campaign.communicate(timeout=90))
    assert campaign.returncode == 0, err
    status = cloud.json("campaign", "status", "py-rollout")
    assert status["succeeded"] == 1, status
    await agent.shutdown()
