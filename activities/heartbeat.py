"""Background heartbeats for activities whose work blocks: venue calls, threads, subprocesses.

A slow call must not look like a dead worker, so beats do not wait for the work's loop.
It imports no vendor client, so every activity module can use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

HEARTBEAT_EVERY_S = 1.0


@contextlib.asynccontextmanager
async def heartbeating(
    progress: dict[str, object], every_s: float = HEARTBEAT_EVERY_S
) -> AsyncIterator[None]:
    """Heartbeat the latest ``progress`` while the body runs, whatever the body blocks on."""

    async def beat() -> None:
        while True:
            activity.heartbeat(dict(progress))
            await asyncio.sleep(every_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
