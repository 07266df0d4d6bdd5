"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format prefix, not a secret
MIN_KEY_BYTES = 24
GENERATED_KEY_BYTES = 32


class SigningKey:
    """A decoded endpoint secret. Its repr and str never show the key."""

    __slots__ = ("_fingerprint", "_prototype")

    def __init__(self, key: bytes) -> None:
        # Keyed once here; each signature copies the prepared HMAC state.
        self._prototype = hmac.new(key, digestmod=hashlib.sha256)
        # Lets a config reload tell a rotated secret from an unchanged one.
        self._fingerprint = hashlib.sha256(key).digest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SigningKey):
            return NotImplemented
        return hmac.compare_digest(self._fingerprint, other._fingerprint)

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    @classmethod
    def parse(cls, secret: str) -> SigningKey:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"secret must start with {SECRET_PREFIX!r}")
        try:
            key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret must be {SECRET_PREFIX!r} followed by base64") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"secret must encode at least {MIN_KEY_BYTES} random bytes")
        return cls(key)

    def signature(self, signed_content: bytes) -> str:
        mac = self._prototype.copy()
        mac.update(signed_content)
        return "v1," + base64.b64encode(mac.digest()).decode("ascii")

    def __repr__(self) -> str:
        return "SigningKey(****)"

    __str__ = __repr__


def generate_secret() -> str:
    """A new endpoint secret, ``whsec_`` and base64 of 32 random bytes (as Svix makes them)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(GENERATED_KEY_BYTES)).decode()


def signature_header(keys: Sequence[SigningKey], event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,`` signature per key, space-separated."""
    signed_content = b"%s.%d.%s" % (event_id.encode(), timestamp, body)
    return " ".join(key.signature(signed_content) for key in keys)
