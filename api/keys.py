"""API keys: ``hlk_<id>_<secret>``, shown once and stored as a SHA-256 of the secret.

The id finds the row; the secret is compared in constant time. The secret is 32 random
bytes, so a fast hash is enough (a slow one defends low-entropy passwords, not keys).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "hlk_"
KEY_RE = re.compile(r"^hlk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    token: str  # shown once
    hash: bytes


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an admin key sees everything, a tenant key its tenant only."""

    key_id: str
    admin: bool
    tenant: str | None

    def may_see(self, tenant: str | None) -> bool:
        return self.admin or (tenant is not None and tenant == self.tenant)


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, f"{KEY_PREFIX}{key_id}_{secret}", digest(secret))


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    match = KEY_RE.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def matches(secret: str, stored: bytes) -> bool:
    return hmac.compare_digest(digest(secret), stored)
