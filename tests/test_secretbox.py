"""Endpoint secrets at rest: sealed with AES-256-GCM, bound to their endpoint, readable
only with a configured key."""

from __future__ import annotations

import base64

import pytest
from pydantic import SecretStr

from worker.exceptions import ConfigError, SecretUnreadable
from worker.secretbox import SecretBox, generate_key

KEY_1 = base64.b64encode(b"1" * 32).decode()
KEY_2 = base64.b64encode(b"2" * 32).decode()
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def box(value: str) -> SecretBox:
    return SecretBox.from_setting(SecretStr(value))


def test_a_sealed_secret_opens_for_its_endpoint_only() -> None:
    """Sealing hides the secret; it opens with the endpoint's name and with no other."""
    sealed = box(KEY_1).seal(SECRET, "orders")
    assert SECRET not in sealed
    assert sealed.startswith("v1.")
    assert box(KEY_1).open(sealed, "orders") == SECRET
    with pytest.raises(SecretUnreadable):
        box(KEY_1).open(sealed, "billing")


def test_each_seal_is_different() -> None:
    """A fresh nonce every time: the same secret never seals to the same text."""
    assert box(KEY_1).seal(SECRET, "a") != box(KEY_1).seal(SECRET, "a")


def test_the_wrong_key_or_a_tampered_text_does_not_open() -> None:
    """Another key, a flipped byte or garbage: SecretUnreadable, never a wrong secret."""
    sealed = box(KEY_1).seal(SECRET, "a")
    with pytest.raises(SecretUnreadable, match="does not hold"):
        box(KEY_2).open(sealed, "a")
    version, key_id, payload = sealed.split(".")
    raw = bytearray(base64.b64decode(payload))
    raw[-1] ^= 1
    tampered = f"{version}.{key_id}.{base64.b64encode(bytes(raw)).decode()}"
    with pytest.raises(SecretUnreadable):
        box(KEY_1).open(tampered, "a")
    for garbage in ("", "v1", "v1.x.%%%", "v9.abc.AAAA"):
        with pytest.raises(SecretUnreadable):
            box(KEY_1).open(garbage, "a")


def test_key_rotation_first_key_seals_every_key_opens() -> None:
    """With "new,old", secrets sealed under the old key still open, new ones use the
    new key, and needs_reseal tells which to seal again."""
    old = box(KEY_1).seal(SECRET, "a")
    rotating = box(f"{KEY_2},{KEY_1}")
    assert rotating.open(old, "a") == SECRET
    assert rotating.needs_reseal(old)
    fresh = rotating.seal(SECRET, "a")
    assert not rotating.needs_reseal(fresh)
    assert box(KEY_2).open(fresh, "a") == SECRET


def test_bad_settings_say_how_to_make_a_key() -> None:
    """Missing, non-base64 or short keys are config errors that name the fix."""
    for value in (None, "", "not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ConfigError, match="generate-secret-key"):
            SecretBox.from_setting(SecretStr(value) if value is not None else None)


def test_generated_keys_work_and_the_repr_shows_no_key() -> None:
    """generate_key gives a usable key; the box's repr names only how many keys."""
    key = generate_key()
    sealed = box(key).seal(SECRET, "a")
    assert box(key).open(sealed, "a") == SECRET
    assert repr(box(key)) == "SecretBox(keys=1)"
    assert key not in repr(box(key))
