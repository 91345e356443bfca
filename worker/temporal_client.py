"""The one way every breakglass process connects to Temporal: same data converter (pydantic +
optional AES-GCM codec + encoded failure attributes), TLS from settings, bounded connect time;
a quiet SDK runtime for CLI commands; and whether a worker is doing a workflow's work, asked of
the server (``waiting_work``), so a dead worker is told within seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import time
from datetime import timedelta
from pathlib import Path

import temporalio.client
from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.enums.v1 import (
    PendingActivityState,
    PendingWorkflowTaskState,
    TaskQueueType,
    WorkflowExecutionStatus,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    DescribeWorkflowExecutionResponse,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime, TelemetryConfig
from temporalio.service import TLSConfig

from worker.codec import EncryptionCodec
from worker.settings import Settings


class TemporalUnreachable(Exception):
    """Temporal could not be reached (or refused the connection) within the connect timeout."""


class TemporalConfigError(ValueError):
    """The Temporal connection settings are unusable (missing TLS file, half an mTLS pair)."""


def data_converter(settings: Settings) -> DataConverter:
    """The converter every client, worker, test and replayer uses.

    Failure messages and stack traces go into encoded attributes so they are encrypted (with a
    payload key) rather than stored in clear.
    """
    codec = None
    if settings.payload_key is not None:
        codec = EncryptionCodec.from_base64(settings.payload_key.get_secret_value())
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TemporalConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e


def tls_config(settings: Settings) -> TLSConfig | bool:
    """TLS from settings: mTLS when a cert/key pair is set, plain TLS for the flag or an API key."""
    s = settings
    if (s.temporal_tls_cert is None) != (s.temporal_tls_key is None):
        raise TemporalConfigError(
            "BREAKGLASS_TEMPORAL_TLS_CERT and BREAKGLASS_TEMPORAL_TLS_KEY must be set together"
        )
    wants_tls = (
        s.temporal_tls
        or s.temporal_api_key is not None
        or s.temporal_tls_cert is not None
        or s.temporal_tls_ca is not None
        or s.temporal_tls_server_name is not None
    )
    if not wants_tls:
        return False
    return TLSConfig(
        server_root_ca_cert=_read(s.temporal_tls_ca, "TLS CA") if s.temporal_tls_ca else None,
        domain=s.temporal_tls_server_name,
        client_cert=_read(s.temporal_tls_cert, "TLS cert") if s.temporal_tls_cert else None,
        client_private_key=_read(s.temporal_tls_key, "TLS key") if s.temporal_tls_key else None,
    )


def _one_line(reason: object, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(reason)).strip() or type(reason).__name__
    if "Connection refused" in text:
        return "connection refused (is the server running?)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def connect(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    timeout_s: float | None = None,
) -> temporalio.client.Client:
    """Connect to Temporal per ``settings``; fail within the timeout with ``TemporalUnreachable``.

    Raises ``TemporalConfigError`` (nothing attempted) when TLS files are missing or the payload
    key is malformed (``worker.codec.PayloadKeyError``).
    """
    address = settings.temporal_address
    ns = settings.temporal_namespace
    timeout = timeout_s if timeout_s is not None else settings.temporal_connect_timeout_s
    converter = data_converter(settings)
    tls = tls_config(settings)
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    try:
        # The SDK's own connect_timeout bounds the TCP/TLS handshake; wait_for bounds the rest
        # (retries of the first RPC) so a black-holed address cannot hang a command.
        return await asyncio.wait_for(
            temporalio.client.Client.connect(
                address,
                namespace=ns,
                api_key=api_key,
                tls=tls,
                data_converter=converter,
                connect_timeout=timedelta(seconds=timeout),
                runtime=runtime,
            ),
            timeout=timeout + 1,
        )
    except TimeoutError:
        reason = f"no answer within {timeout:g}s"
    except Exception as e:
        reason = _one_line(e)
    raise TemporalUnreachable(f"cannot reach Temporal at {address} (namespace {ns}): {reason}")


async def live_pollers(
    client: temporalio.client.Client, task_queue: str, within_s: float = 70.0
) -> int:
    """Workers that polled ``task_queue`` for workflow tasks within the last ``within_s`` seconds.

    The server keeps a dead worker listed for minutes; a live one long-polls at least every
    minute, so recent access is what tells them apart.
    """
    answer = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        ),
        timeout=timedelta(seconds=5),
    )
    cutoff = time.time() - within_s
    return sum(1 for p in answer.pollers if p.last_access_time.ToSeconds() >= cutoff)


@functools.cache
def quiet_runtime() -> Runtime:
    """The SDK runtime for CLI commands: no log output of its own.

    The default runtime prints the Rust core's warnings (gRPC retries, with ANSI colour codes)
    straight to stderr; an operator's terminal gets the command's own one-line messages instead,
    which say the same in words. Workers keep the default runtime and its logs.
    """
    return Runtime(telemetry=TelemetryConfig(logging=None, metrics=None))


# --------------------------------------------------------------------------- is a worker on it?

STALL_AFTER_S = 3.0
"""A healthy worker starts a workflow task within milliseconds of it being scheduled and an
activity within a poll; after this long without, no live worker has it (or the machine is badly
overloaded). Short enough to tell a just-died worker in seconds, long enough not to cry wolf
under load."""


@dataclasses.dataclass(frozen=True)
class Waiting:
    """Work of a running workflow that waits for a worker, and since when."""

    activity: str | None
    """The activity type that waits; None: the workflow's next workflow task."""
    since_s: float
    started: bool = False
    """A worker took the task and has not answered yet (it may have died holding it)."""
    no_pollers: bool = False
    """No worker polls the task queue at all."""

    def stalled(self, after_s: float = STALL_AFTER_S) -> bool:
        """Waiting longer than a live worker would let it (or with no worker at all)."""
        return self.no_pollers or self.since_s >= after_s


def _seconds(ts: Timestamp) -> float:
    return ts.ToMicroseconds() / 1e6


def waiting_of(
    description: DescribeWorkflowExecutionResponse, now: float, *, pollers: int | None = None
) -> Waiting | None:
    """The longest-waiting work of a running workflow that no worker has finished, or None.

    Why not the task queue's poller list alone: the server keeps a SIGKILLed worker listed (its
    last poll was a moment ago) for minutes. A workflow task scheduled and not started, or
    started and not answered, for seconds is what a dead worker leaves behind, within seconds.
    An activity in its retry backoff does not wait for a worker; one whose worker died is retried
    after its heartbeat timeout and then waits, scheduled, for a worker that does not come.

    ``pollers``: live pollers of the task queue, when known; with none, a scheduled workflow
    task is marked ``no_pollers``.
    """
    info = description.workflow_execution_info
    if info.status != WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING:
        return None
    found: list[Waiting] = []
    if description.HasField("pending_workflow_task"):
        task = description.pending_workflow_task
        if task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED:
            # A sticky task moved to the normal queue is rescheduled: count from the first time.
            first = (
                task.original_scheduled_time
                if task.HasField("original_scheduled_time")
                else task.scheduled_time
            )
            since = max(0.0, now - _seconds(first))
            found.append(Waiting(None, since, no_pollers=pollers == 0))
        elif task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_STARTED:
            found.append(Waiting(None, max(0.0, now - _seconds(task.started_time)), started=True))
    for activity in description.pending_activities:
        if activity.state != PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED:
            continue
        marks = [
            _seconds(t)
            for t in (
                activity.scheduled_time,
                activity.last_attempt_complete_time,
                activity.next_attempt_schedule_time,
            )
            if t.seconds or t.nanos
        ]
        if marks and now >= max(marks):  # before that, the retry backoff runs
            found.append(Waiting(activity.activity_type.name, now - max(marks)))
    return max(found, key=lambda w: (w.no_pollers, w.since_s), default=None)


async def waiting_work(
    client: temporalio.client.Client, workflow_id: str, task_queue: str
) -> Waiting | None:
    """``waiting_of`` the workflow's latest run, as the server describes it now."""
    handle = client.get_workflow_handle(workflow_id)
    raw = (await handle.describe(rpc_timeout=timedelta(seconds=5))).raw_description
    pollers = None
    if (
        raw.HasField("pending_workflow_task")
        and raw.pending_workflow_task.state
        == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED
    ):
        pollers = await live_pollers(client, task_queue)
    return waiting_of(raw, time.time(), pollers=pollers)
