"""Endpoint secrets at rest: AES-256-GCM under a key from ``HOOKLINE_SECRET_KEY``.

A sealed secret reads ``v1.<key id>.<base64 nonce + ciphertext>``. The key id (the first
8 hex digits of the key's SHA-256) says which key sealed it, so keys can be rotated: the
setting holds several keys separated by commas, the first seals and every one opens.
``python -m api reseal`` then seals every secret again under the first key. The endpoint's
name is the associated data: a sealed secret copied onto another endpoint's row does not
open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

from worker.exceptions import ConfigError, SecretUnreadable

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = "v1"


class SecretBox:
    """Seals and opens endpoint secrets. Its repr never shows a key."""

    __slots__ = ("_keys", "_sealing")

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._keys = {_key_id(key): AESGCM(key) for key in keys}
        self._sealing = _key_id(keys[0])

    @classmethod
    def from_setting(cls, value: SecretStr | None) -> SecretBox:
        """From ``registry.secret_key`` (``HOOKLINE_SECRET_KEY``), or a :class:`ConfigError`
        that says how to make one."""
        hint = (
            "make one with `python -m api generate-secret-key` and set HOOKLINE_SECRET_KEY "
            "(base64 of 32 random bytes; several, comma-separated, while rotating)"
        )
        if value is None or not value.get_secret_value().strip():
            raise ConfigError(f"registry.secret_key (HOOKLINE_SECRET_KEY) is not set: {hint}")
        keys = []
        for part in value.get_secret_value().split(","):
            try:
                key = base64.b64decode(part.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"registry.secret_key is not base64: {hint}") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(f"registry.secret_key must be 32 bytes: {hint}")
            keys.append(key)
        return cls(keys)

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._keys[self._sealing].encrypt(nonce, plaintext.encode(), context.encode())
        return f"{VERSION}.{self._sealing}.{base64.b64encode(nonce + sealed).decode('ascii')}"

    def open(self, token: str, context: str) -> str:
        try:
            version, key_id, payload = token.split(".", 2)
            raw = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            raise SecretUnreadable("a stored secret is malformed") from None
        key = self._keys.get(key_id)
        if version != VERSION or key is None:
            raise SecretUnreadable(
                f"a stored secret was sealed with key {key_id}, which registry.secret_key "
                "does not hold"
            )
        try:
            return key.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except (InvalidTag, ValueError):
            raise SecretUnreadable("a stored secret does not open with its key") from None

    def needs_reseal(self, token: str) -> bool:
        """Sealed under a key other than the first (after a key rotation)."""
        return not token.startswith(f"{VERSION}.{self._sealing}.")

    def __repr__(self) -> str:
        return f"SecretBox(keys={len(self._keys)})"


def generate_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]
