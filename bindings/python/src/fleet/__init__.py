"""The fleet device SDK for Python: the Rust device agent and fleet-core's
rules through UniFFI (the same engine as Rust applications use).

    import asyncio, fleet

    async def main():
        agent = fleet.Agent.start(fleet.AgentConfig(
            host="localhost", port=8883, thing="pump-7",
            cert_pem=open("pump-7.pem").read(), key_pem=open("pump-7.key").read(),
            ca_pem=open("ca.pem").read()))
        delivery = await agent.publish("telemetry", b'{"t": 21.5}', fleet.Qos.AT_LEAST_ONCE)
        await delivery.acknowledged()
        async for event in fleet.events(agent):
            print(event)

    asyncio.run(main())

JSON values (shadow state, job documents, command payloads) are JSON text.
Errors are `fleet.FleetError` and its variants (`FleetError.Network`, ...).
"""

from .fleet import *  # noqa: F401,F403  (the generated bindings)
from .fleet.fleet import uniffi_set_event_loop  # noqa: F401  (not in __all__)
from .aio import QueueListener, events  # noqa: F401

import atexit as _atexit

# Stop the library's threads before the interpreter finalizes: a thread
# that calls into a finalizing interpreter is killed mid-call.
_atexit.register(shutdown_runtime)  # noqa: F405
