"""connect() and data_converter(): fail fast in one line, TLS from settings, codec when keyed;
waiting_of(): work no worker does, told from work just scheduled (fast tier, no server)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.common.v1 import ActivityType
from temporalio.api.enums.v1 import (
    PendingActivityState,
    PendingWorkflowTaskState,
    WorkflowExecutionStatus,
)
from temporalio.api.workflow.v1 import (
    PendingActivityInfo,
    PendingWorkflowTaskInfo,
    WorkflowExecutionInfo,
)
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionResponse
from temporalio.converter import DefaultFailureConverterWithEncodedAttributes
from temporalio.service import TLSConfig

from worker.codec import EncryptionCodec, PayloadKeyError, generate_key
from worker.settings import Settings
from worker.temporal_client import (
    TemporalConfigError,
    TemporalUnreachable,
    connect,
    data_converter,
    tls_config,
    waiting_of,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.servers  # no server, but a real connect attempt (the fast tier refuses those)
async def test_nothing_listening_fails_fast_in_one_line() -> None:
    port = free_port()
    settings = Settings(temporal_address=f"127.0.0.1:{port}", temporal_namespace="ops")
    started = time.monotonic()
    with pytest.raises(TemporalUnreachable) as e:
        await connect(settings)
    # Bounded, not timed: the default connect timeout, with room for a busy machine.
    assert time.monotonic() - started < 30
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach Temporal at 127.0.0.1:{port} (namespace ops): ")


@pytest.mark.servers  # a listener of its own that never answers
async def test_silent_server_times_out() -> None:
    # A listener that never answers: the connect timeout, not the OS, ends the wait.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        settings = Settings(temporal_address=f"127.0.0.1:{port}", temporal_connect_timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(TemporalUnreachable, match="cannot reach Temporal"):
            await connect(settings)
        assert time.monotonic() - started < 30  # the 1 s timeout bounds it; not the OS's minutes


def test_converter_encodes_failures_and_adds_codec_only_with_a_key() -> None:
    plain = data_converter(Settings(payload_key=None))
    assert plain.payload_codec is None
    assert plain.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    keyed = data_converter(Settings(payload_key=generate_key()))
    assert isinstance(keyed.payload_codec, EncryptionCodec)
    with pytest.raises(PayloadKeyError):
        data_converter(Settings(payload_key="AAAA"))


def test_tls_off_by_default_and_on_with_api_key() -> None:
    assert tls_config(Settings()) is False
    assert isinstance(tls_config(Settings(temporal_api_key="k")), TLSConfig)
    assert isinstance(tls_config(Settings(temporal_tls=True)), TLSConfig)


def test_mtls_reads_files_and_refuses_half_a_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"CERT")
    key.write_bytes(b"KEY")
    cfg = tls_config(
        Settings(temporal_tls_cert=cert, temporal_tls_key=key, temporal_tls_server_name="x")
    )
    assert isinstance(cfg, TLSConfig)
    assert (cfg.client_cert, cfg.client_private_key, cfg.domain) == (b"CERT", b"KEY", "x")
    with pytest.raises(TemporalConfigError, match="set together"):
        tls_config(Settings(temporal_tls_cert=cert))
    with pytest.raises(TemporalConfigError, match="cannot read TLS CA"):
        tls_config(Settings(temporal_tls_ca=tmp_path / "missing.pem"))


def test_ui_link_defaults_to_the_dev_stack_and_escapes_the_id() -> None:
    assert (
        Settings(dev_ui_port=9000).ui_url_for("kill/a+b")
        == "http://127.0.0.1:9000/namespaces/default/workflows/kill%2Fa%2Bb"
    )
    assert (
        Settings(temporal_ui_url="https://ui.example/")
        .ui_url_for("x")
        .startswith("https://ui.example/namespaces/default/workflows/x")
    )


# --------------------------------------------------------------------------- waiting work


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(int(seconds * 1e6))
    return ts


def _running(**fields: object) -> DescribeWorkflowExecutionResponse:
    return DescribeWorkflowExecutionResponse(
        workflow_execution_info=WorkflowExecutionInfo(
            status=WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
        ),
        **fields,  # type: ignore[arg-type]
    )


def test_waiting_work_tells_a_task_no_worker_took_from_one_just_scheduled() -> None:
    now = 1_000_000.0
    scheduled = PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED

    def task(age: float) -> DescribeWorkflowExecutionResponse:
        return _running(
            pending_workflow_task=PendingWorkflowTaskInfo(
                state=scheduled, scheduled_time=_ts(now - age)
            )
        )

    young = waiting_of(task(0.5), now, pollers=1)
    assert young is not None and not young.stalled() and young.activity is None
    old = waiting_of(task(4.0), now, pollers=1)  # the dead worker is still listed as a poller
    assert old is not None and old.stalled() and round(old.since_s) == 4 and not old.started
    nobody = waiting_of(task(0.1), now, pollers=0)
    assert nobody is not None and nobody.no_pollers and nobody.stalled()
    started = waiting_of(
        _running(
            pending_workflow_task=PendingWorkflowTaskInfo(
                state=PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_STARTED,
                scheduled_time=_ts(now - 5),
                started_time=_ts(now - 4),
            )
        ),
        now,
    )
    assert started is not None and started.started and started.stalled()
    done = DescribeWorkflowExecutionResponse(
        workflow_execution_info=WorkflowExecutionInfo(
            status=WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED
        ),
        pending_workflow_task=PendingWorkflowTaskInfo(
            state=scheduled, scheduled_time=_ts(now - 60)
        ),
    )
    assert waiting_of(done, now) is None


def test_waiting_work_skips_activities_running_or_in_their_retry_backoff() -> None:
    now = 1_000_000.0
    scheduled = PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED

    def activity(name: str, **fields: object) -> PendingActivityInfo:
        return PendingActivityInfo(activity_type=ActivityType(name=name), **fields)  # type: ignore[arg-type]

    description = _running(
        pending_activities=[
            activity(
                "flatten",
                state=PendingActivityState.PENDING_ACTIVITY_STATE_STARTED,
                scheduled_time=_ts(now - 30),
                last_started_time=_ts(now - 30),
            ),
            activity(
                "halt",
                state=scheduled,
                scheduled_time=_ts(now - 20),
                last_attempt_complete_time=_ts(now - 2),
                next_attempt_schedule_time=_ts(now + 3),
            ),
        ]
    )
    assert waiting_of(description, now) is None
    orphan = activity("cancel_all", state=scheduled, scheduled_time=_ts(now - 6))
    description.pending_activities.append(orphan)
    waiting = waiting_of(description, now)
    assert waiting is not None and waiting.activity == "cancel_all" and waiting.stalled()
