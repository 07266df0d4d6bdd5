"""The envelope parser agrees with the published JSON Schema and explains each rejection."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.envelope import build_body, parse_envelope
from producer.exceptions import InvalidEnvelope

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "envelope.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
STAMP = "2026-11-28T12:00:00Z"


def valid(**overrides: object) -> dict[str, object]:
    return {"id": "evt_1", "type": "order.created", "timestamp": STAMP, "data": {}, **overrides}


GOOD = [
    valid(),
    valid(timestamp="2026-11-28T12:00:00.123456+05:30"),
    valid(type="a"),
    valid(type="a-b.c_d.E9"),
    valid(id="x" * 255),
    valid(extra={"passes": "through"}),
]
BAD = [
    ({"type": "a", "timestamp": STAMP, "data": {}}, "id"),
    (valid(id=""), "id"),
    (valid(id="x" * 256), "id"),
    (valid(id=7), "id"),
    (valid(id="line\nbreak"), "id"),
    (valid(id="caf\u00e9"), "id"),
    (valid(type="a..b"), "type"),
    (valid(type="a.*"), "type"),
    (valid(type=""), "type"),
    (valid(timestamp="2026-11-28"), "timestamp"),
    (valid(timestamp="2026-11-28T12:00:00"), "timestamp"),
    (valid(timestamp="noon"), "timestamp"),
    (valid(timestamp=1700000000), "timestamp"),
    (valid(data=[1]), "data"),
    (valid(data=None), "data"),
]


@pytest.mark.parametrize("document", GOOD)
def test_valid_envelopes_parse_and_match_schema(document: dict[str, object]) -> None:
    """Valid envelopes parse, and the JSON Schema accepts them too."""
    envelope = parse_envelope(json.dumps(document).encode(), 1_000_000)
    assert envelope.id == document["id"]
    assert envelope.timestamp.tzinfo is not None
    VALIDATOR.validate(document)


@pytest.mark.parametrize(("document", "field"), BAD)
def test_invalid_envelopes_are_rejected_by_parser_and_schema(
    document: dict[str, object], field: str
) -> None:
    """Each invalid field is refused by the parser (naming it) and by the schema."""
    with pytest.raises(InvalidEnvelope, match=field):
        parse_envelope(json.dumps(document).encode(), 1_000_000)
    assert not VALIDATOR.is_valid(document)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xc3\x28", "UTF-8"),
        (b"{", "JSON"),
        (b'{"a": NaN}', "JSON"),
        (b"[]", "object"),
        (b'"text"', "object"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (json.dumps(valid(data={"x": "y" * 100})).encode(), "max_body_bytes"),
    ],
)
def test_bodies_that_are_not_envelopes(body: bytes, reason: str) -> None:
    """Bad encodings, non-JSON, non-objects, deep nesting and oversize bodies are refused."""
    with pytest.raises(InvalidEnvelope, match=reason):
        parse_envelope(body, 100 if reason == "max_body_bytes" else 10_000_000)


def test_build_body_round_trips() -> None:
    """What the SDK builds, the worker parses, with a UTC RFC 3339 timestamp."""
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event_id, body = build_body("a.b", {"k": 1}, timestamp=moment)
    assert event_id.startswith("evt_")
    assert json.loads(body)["timestamp"] == "2026-01-02T03:04:05Z"
    assert parse_envelope(body, 10_000).timestamp == moment
    with pytest.raises(InvalidEnvelope):
        build_body("a.b", {}, timestamp=datetime(2026, 1, 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_parser(body: bytes) -> None:
    """Random bytes either parse or raise InvalidEnvelope, nothing else."""
    with contextlib.suppress(InvalidEnvelope):
        parse_envelope(body, 1024)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "type", "timestamp", "data", "x"]), json_values))
def test_parser_and_schema_agree_on_arbitrary_objects(document: dict[str, object]) -> None:
    """For any JSON object, the parser accepts it exactly when the schema does."""
    body = json.dumps(document).encode()
    try:
        parse_envelope(body, 1_000_000)
        accepted = True
    except InvalidEnvelope:
        accepted = False
    assert accepted == VALIDATOR.is_valid(document)
