"""connect() and data_converter(): fail fast in one line, TLS from settings, codec when keyed."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
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
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_nothing_listening_fails_fast_in_one_line() -> None:
    port = free_port()
    settings = Settings(temporal_address=f"127.0.0.1:{port}", temporal_namespace="ops")
    started = time.monotonic()
    with pytest.raises(TemporalUnreachable) as e:
        await connect(settings)
    assert time.monotonic() - started < 10
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach Temporal at 127.0.0.1:{port} (namespace ops): ")


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
        assert time.monotonic() - started < 10


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
