"""The AES-GCM payload codec: round trip, wrong key, pass-through, and ciphertext-only history."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment

# The workflow below is defined here, so the sandbox re-imports this module: pass cryptography
# through (temporal.md: importing it inside the sandbox breaks the worker).
with workflow.unsafe.imports_passed_through():
    from tests.helpers import fresh_id, new_worker
    from worker.codec import (
        ENCODING,
        KEY_ID_METADATA,
        EncryptionCodec,
        PayloadKeyError,
        generate_key,
    )
    from worker.settings import Settings
    from worker.temporal_client import data_converter

SECRET = "sk-live-PLAINTEXT-0xDEADBEEF"


@activity.defn
async def leaky_activity(text: str) -> str:
    # Fails with the secret in its message: the failure must not be stored in clear either.
    raise ApplicationError(f"venue rejected key {text}", non_retryable=True)


@workflow.defn
class EchoWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        try:
            await workflow.execute_activity(
                leaky_activity, text, start_to_close_timeout=timedelta(seconds=10)
            )
        except ActivityError as e:
            return f"echo {text} / {e.cause}"
        return "unreachable"


async def test_round_trip_and_metadata() -> None:
    codec = EncryptionCodec.from_base64(generate_key())
    original = Payload(metadata={"encoding": b"json/plain"}, data=SECRET.encode())
    (encoded,) = await codec.encode([original])
    assert encoded.metadata["encoding"] == ENCODING
    assert encoded.metadata[KEY_ID_METADATA] == codec.key_id.encode()
    assert SECRET.encode() not in encoded.SerializeToString()
    assert await codec.decode([encoded]) == [original]


async def test_two_encodings_differ() -> None:
    codec = EncryptionCodec.from_base64(generate_key())
    p = Payload(metadata={"encoding": b"json/plain"}, data=b'"x"')
    a, b = await codec.encode([p, p])
    assert a.data != b.data  # a fresh nonce per payload


async def test_unencrypted_payload_passes_through() -> None:
    codec = EncryptionCodec.from_base64(generate_key())
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"old history"')
    assert await codec.decode([plain]) == [plain]


async def test_wrong_key_is_named() -> None:
    (encoded,) = await EncryptionCodec.from_base64(generate_key()).encode([Payload(data=b"x")])
    other = EncryptionCodec.from_base64(generate_key())
    with pytest.raises(ValueError, match="key id"):
        await other.decode([encoded])


@pytest.mark.parametrize(
    ("key", "match"),
    [("not base64!!", "not valid base64"), (base64.b64encode(b"short").decode(), "32 bytes")],
)
def test_bad_key_is_refused_without_echoing_it(key: str, match: str) -> None:
    with pytest.raises(PayloadKeyError, match=match) as e:
        EncryptionCodec.from_base64(key)
    assert key not in str(e.value)


async def test_history_holds_ciphertext_only(dev_env: WorkflowEnvironment) -> None:
    target = dev_env.client.service_client.config.target_host
    key_settings = Settings(payload_key=generate_key())
    encrypted = await Client.connect(target, data_converter=data_converter(key_settings))
    raw = await Client.connect(target)  # no codec: sees what Temporal stores

    async with new_worker(encrypted, EchoWorkflow, activities=[leaky_activity]) as w:
        workflow_id = fresh_id("codec")
        result = await encrypted.execute_workflow(
            EchoWorkflow.run, SECRET, id=workflow_id, task_queue=w.task_queue
        )
    assert SECRET in result and "venue rejected key" in result

    stored = await raw.get_workflow_handle(workflow_id).fetch_history()
    blob = stored.to_json() + str(stored.events)
    assert SECRET not in blob
    assert base64.b64encode(SECRET.encode()).decode() not in blob
    assert "venue rejected key" not in blob  # failure message encoded, then encrypted
    assert "binary/encrypted" in blob or base64.b64encode(ENCODING).decode() in blob


async def test_history_written_without_key_still_reads(dev_env: WorkflowEnvironment) -> None:
    target = dev_env.client.service_client.config.target_host
    plain = await Client.connect(target, data_converter=data_converter(Settings(payload_key=None)))
    keyed = await Client.connect(
        target, data_converter=data_converter(Settings(payload_key=generate_key()))
    )
    async with new_worker(plain, EchoWorkflow, activities=[leaky_activity]) as w:
        handle = await plain.start_workflow(
            EchoWorkflow.run, "before-the-key", id=fresh_id("plain"), task_queue=w.task_queue
        )
        await handle.result()
    assert (await keyed.get_workflow_handle(handle.id).result()).startswith("echo before-the-key")
