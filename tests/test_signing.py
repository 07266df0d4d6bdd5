"""Signatures are Standard Webhooks v1 and verify with the public standardwebhooks library."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import SECRET_A, SECRET_B
from worker.signing import SigningKey, signature_header


def headers_for(keys: list[SigningKey], event_id: str, body: bytes, at: int) -> dict[str, str]:
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(at),
        "webhook-signature": signature_header(keys, event_id, at, body),
    }


def test_single_secret_verifies() -> None:
    """One secret gives one v1 signature over id.timestamp.body that the library accepts."""
    body = b'{"id":"e1","type":"a.b","timestamp":"2026-01-01T00:00:00Z","data":{}}'
    now = int(time.time())
    headers = headers_for([SigningKey.parse(SECRET_A)], "e1", body, now)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET_A).verify(body, headers)["id"] == "e1"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(body, headers)


def test_rotation_signs_with_every_secret() -> None:
    """Several secrets give space-separated signatures; receivers holding either verify."""
    body = b'{"id":"e2","type":"a","timestamp":"2026-01-01T00:00:00Z","data":{"x":1}}'
    keys = [SigningKey.parse(SECRET_B), SigningKey.parse(SECRET_A)]
    headers = headers_for(keys, "e2", body, int(time.time()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):
        Webhook(secret).verify(body, headers)


def test_signature_matches_the_library_for_the_same_moment() -> None:
    """Byte-for-byte the same signature as standardwebhooks computes."""
    body = '{"id":"e3","data":{"ü":"✓"}}'
    at = 1_790_000_000
    ours = signature_header([SigningKey.parse(SECRET_A)], "e3", at, body.encode())
    theirs = Webhook(SECRET_A).sign("e3", datetime.fromtimestamp(at, tz=UTC), body)
    assert ours == theirs


def test_tampered_body_or_old_timestamp_fails() -> None:
    """A changed body or a timestamp outside 5 minutes does not verify."""
    body = b'{"id":"e4"}'
    key = SigningKey.parse(SECRET_A)
    headers = headers_for([key], "e4", body, int(time.time()))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(b'{"id":"e5"}', headers)
    stale = headers_for([key], "e4", body, int(time.time()) - 600)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(body, stale)


def test_key_repr_hides_the_secret() -> None:
    """A SigningKey never shows its key material."""
    key = SigningKey.parse(SECRET_A)
    assert repr(key) == str(key) == "SigningKey(****)"


@pytest.mark.parametrize(
    "secret",
    ["", "whsec_", "secret_" + SECRET_A[6:], "whsec_c2hvcnQ=", "whsec_***", SECRET_A + "@"],
)
def test_malformed_secrets_are_refused(secret: str) -> None:
    """Secrets must be whsec_ plus base64 of at least 24 bytes."""
    with pytest.raises(ValueError, match="secret"):
        SigningKey.parse(secret)
