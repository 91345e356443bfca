"""AES-GCM payload codec: payloads are encrypted before they reach Temporal, so history at rest
holds ciphertext only. Unencrypted payloads (history written before a key was set) still decode.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
_NONCE_BYTES = 12


class PayloadKeyError(ValueError):
    """The configured payload key is not a base64-encoded 32-byte key."""


def parse_key(key_b64: str) -> bytes:
    """Decode a base64 AES-256 key; the message never contains the key itself."""
    try:
        key = base64.b64decode(key_b64.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadKeyError("BREAKGLASS_PAYLOAD_KEY is not valid base64") from e
    if len(key) != 32:
        raise PayloadKeyError(
            f"BREAKGLASS_PAYLOAD_KEY must decode to 32 bytes (AES-256), got {len(key)}"
        )
    return key


def key_id(key: bytes) -> str:
    """A short, non-secret fingerprint stored with each payload to detect a wrong key."""
    return hashlib.sha256(b"breakglass-payload-key:" + key).hexdigest()[:16]


def generate_key() -> str:
    """A fresh base64 key suitable for ``BREAKGLASS_PAYLOAD_KEY``."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class EncryptionCodec(PayloadCodec):
    """Encrypts each whole serialized payload (data and metadata) with AES-256-GCM."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise PayloadKeyError(f"payload key must be 32 bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.key_id = key_id(key)
        self._key_id_bytes = self.key_id.encode()

    @classmethod
    def from_base64(cls, key_b64: str) -> EncryptionCodec:
        return cls(parse_key(key_b64))

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [
            Payload(
                metadata={"encoding": ENCODING, KEY_ID_METADATA: self._key_id_bytes},
                data=self._encrypt(p.SerializeToString()),
            )
            for p in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out: list[Payload] = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                # Written before the key was set (or by a client without a codec): pass through.
                out.append(p)
                continue
            found = p.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
            if found != self.key_id:
                raise ValueError(
                    f"payload was encrypted with key id {found!r}, "
                    f"but the configured key has id {self.key_id!r}"
                )
            decoded = Payload()
            decoded.ParseFromString(self._decrypt(p.data))
            out.append(decoded)
        return out

    def _encrypt(self, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, None)

    def _decrypt(self, data: bytes) -> bytes:
        return self._aead.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], None)
