"""A fleet device in Python: reports its shadow, applies desired changes,
answers `ping`, and sends telemetry until `--count` readings were acknowledged.
  python device.py --dir dev --port 8883 --thing pump-1   (fleet dev-setup wrote dev/)"""
import argparse, asyncio, json
from pathlib import Path
import fleet

async def main(a):
    d = Path(a.dir)
    agent = fleet.Agent.start(fleet.AgentConfig(
        host="localhost", port=a.port, thing=a.thing, ca_pem=(d / "ca.pem").read_text(),
        cert_pem=(d / f"things/{a.thing}.pem").read_text(),
        key_pem=(d / f"things/{a.thing}.key").read_text(), state_dir=str(d / a.thing)))
    print("version", await agent.report(None, json.dumps({"firmware": "1.0"})))
    async def handle():
        async for ev in fleet.events(agent):
            if ev.is_shadow_delta():
                await agent.report(ev.shadow, ev.delta)  # apply, then report
            elif ev.is_command() and ev.command == "ping":
                await agent.respond(ev.execution_id, fleet.CommandStatus.SUCCEEDED, '{"pong": true}')
    events = asyncio.create_task(handle())
    for n in range(a.count):
        delivery = await agent.publish("telemetry", json.dumps({"n": n}).encode(), fleet.Qos.AT_LEAST_ONCE)
        await delivery.acknowledged()
        print("acknowledged", n)
        await asyncio.sleep(a.every)
    events.cancel()
    await agent.shutdown()

p = argparse.ArgumentParser()
p.add_argument("--dir", default="dev"); p.add_argument("--port", type=int, default=8883)
p.add_argument("--thing", required=True); p.add_argument("--count", type=int, default=10)
p.add_argument("--every", type=float, default=1.0)
asyncio.run(main(p.parse_args()))
