"""The one way every breakglass process connects to Temporal: same data converter (pydantic +
optional AES-GCM codec + encoded failure attributes), TLS from settings, bounded connect time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from datetime import timedelta
from pathlib import Path

import temporalio.client
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import Runtime
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
