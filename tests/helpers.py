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
    timeout: float = 60.0,  # noqa: ASYNC109 - a deadline for polling, not for one await
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``fn`` (sync or async) until it neither raises ``AssertionError`` nor returns a falsy
    value; return its result. After ``timeout`` seconds the last assertion error is raised.
    The default is generous on purpose: it returns as soon as the condition holds, and only a
    failing test waits it out, so a busy machine never fails a test that would pass.

    ``retry_on``: exceptions that also mean "not yet" (e.g. ``aiohttp.ClientError`` and
    ``TimeoutError`` while a process starts: on a busy machine one probe may time out). Pick a
    ``timeout`` that only a failing test reaches: the poll returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
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
        except retry_on as e:
            last = AssertionError(f"still failing after {timeout:g}s: {type(e).__name__}: {e}")
            last.__cause__ = e
        if time.monotonic() >= deadline:
            raise last
        await asyncio.sleep(interval)


async def wait_for_poller(
    client: Client,
    task_queue: str,
    timeout: float = 180.0,  # noqa: ASYNC109 - a deadline for polling, not for one await
) -> None:
    """Until a worker polls ``task_queue`` for activities (a worker process has started: seconds
    on a busy machine, hence the generous default that only a failing test reaches)."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    async def polled() -> bool:
        answer = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            )
        )
        return len(answer.pollers) > 0

    await assert_eventually(polled, timeout=timeout, interval=0.1)
