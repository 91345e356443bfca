"""Test helpers: a worker on a fresh task queue, polling assertions, fresh ids."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from temporalio.client import Client
from temporalio.worker import Worker

T = TypeVar("T")


def fresh_id(prefix: str = "test") -> str:
    """A unique id (workflow id, task queue, account) so tests never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def new_worker(
    client: Client,
    *workflows: type,
    activities: Sequence[Callable[..., Any]] = (),
    task_queue: str | None = None,
    **options: Any,
) -> AsyncIterator[Worker]:
    """Run a worker for the block; ``worker.task_queue`` is ``tq-<uuid>`` unless given."""
    async with Worker(
        client,
        task_queue=task_queue or fresh_id("tq"),
        workflows=list(workflows),
        activities=list(activities),
        **options,
    ) as worker:
        yield worker


async def assert_eventually(
    fn: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline for polling, not for one await
    interval: float = 0.05,
) -> T:
    """Call ``fn`` (sync or async) until it neither raises ``AssertionError`` nor returns a falsy
    value; return its result. After ``timeout`` seconds the last assertion error is raised."""
    deadline = time.monotonic() + timeout
    last: AssertionError | None = None
    while True:
        try:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            if result or result is None:
                # None counts as success so plain assertion functions work.
                return result  # type: ignore[return-value]
            last = AssertionError(f"condition still false after {timeout:g}s: {fn!r}")
        except AssertionError as e:
            last = e
        if time.monotonic() >= deadline:
            raise last
        await asyncio.sleep(interval)
