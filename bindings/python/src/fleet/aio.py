"""asyncio helpers: the agent's events as an async iterator.

The agent calls a listener on one of its own (Rust) threads; these helpers
hand each event to the asyncio loop with `call_soon_threadsafe`. Awaiting the
agent's async methods needs nothing more: UniFFI completes each future on the
loop that awaited it. (`fleet.uniffi_set_event_loop(loop)` pins one loop for
every future, process-wide: only for an application with a single loop that
awaits from other threads; never with one loop per test.)
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

from .fleet import Agent, AgentEvent, EventListener


class QueueListener(EventListener):
    """An `EventListener` that puts events on an `asyncio.Queue` (`None` when
    the agent stopped)."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Optional[AgentEvent]] = asyncio.Queue()

    def on_event(self, event: AgentEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def on_stopped(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


async def events(agent: Agent) -> AsyncIterator[AgentEvent]:
    """Every event of `agent` until it stops (or the iteration is left,
    which cancels the subscription)."""
    listener = QueueListener(asyncio.get_running_loop())
    subscription = agent.subscribe(listener)
    try:
        while True:
            event = await listener.queue.get()
            if event is None:
                return
            yield event
    finally:
        subscription.cancel()
