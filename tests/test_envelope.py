"""The envelope parser agrees with the published JSON Schema and explains each rejection."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer import cli as producer_cli
from producer.envelope import build_body, parse_envelope
from producer.exceptions import InvalidEnvelope
from tests.conftest import make_document, write_config

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


@pytest.mark.parametrize("event_id", [" evt_1", "evt_1 ", " ", "  evt_1  "])
def test_ids_with_surrounding_spaces_are_refused(event_id: str) -> None:
    """HTTP trims header values, so a receiver could not verify a webhook-id that starts or
    ends with a space: the parser, build_body and the schema refuse it; inner spaces pass."""
    with pytest.raises(InvalidEnvelope, match="id"):
        parse_envelope(json.dumps(valid(id=event_id)).encode(), 10_000)
    with pytest.raises(InvalidEnvelope, match="id"):
        build_body("a.b", {}, event_id=event_id)
    assert not VALIDATOR.is_valid(valid(id=event_id))
    assert parse_envelope(json.dumps(valid(id="evt 1")).encode(), 10_000).id == "evt 1"
    assert VALIDATOR.is_valid(valid(id="x" + " " * 253 + "y"))


def raw_body(data: str, extra: str = "") -> bytes:
    """An envelope written by hand, for JSON that json.dumps cannot produce."""
    return (
        f'{{"id": "evt_1", "type": "a", "timestamp": "{STAMP}", {extra}"data": {data}}}'
    ).encode()


@pytest.mark.parametrize(
    "body",
    [
        raw_body("{}", extra='"id": "evt_2", '),
        raw_body('{"user": {"role": "guest", "role": "admin"}}'),
        raw_body('{"items": [{}, {"k": 1, "k": 1}]}'),
    ],
)
def test_duplicate_keys_at_any_depth_are_refused(body: bytes) -> None:
    """Receivers disagree on which of two equal keys wins, so any object with a duplicate
    key, at the top or nested in objects and arrays, is refused without echoing it."""
    with pytest.raises(InvalidEnvelope, match="duplicate key") as refused:
        parse_envelope(body, 10_000)
    assert "admin" not in str(refused.value) and "role" not in str(refused.value)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1.5E+309", "[1, 2e999]", "NaN"])
def test_numbers_beyond_the_float_range_are_refused(number: str) -> None:
    """1e400 is JSON syntax but parses to inf, which no receiver can represent: refused at
    any depth, like the NaN and Infinity literals; tiny numbers (1e-400) still pass."""
    body = raw_body(f'{{"x": {{"v": {number}}}}}')
    with pytest.raises(InvalidEnvelope, match="JSON"):
        parse_envelope(body, 10_000)
    tiny = body.replace(number.encode(), b"1e-400")
    assert parse_envelope(tiny, 10_000).data == {"x": {"v": 0.0}}


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-W48-6T12:00:00Z",  # ISO week date
        "2026-332T12:00:00Z",  # ordinal date
        "20261128T120000Z",  # basic format
        "2026-11-28",  # date only
        "2026-11-28T12:00Z",  # no seconds
        "2026-11-28T12Z",
        "2026-11-28 12:00:00Z",  # space separator
        "2026-11-28T12:00:00,5Z",  # comma fraction
        "2026-11-28T12:00:00.Z",
        "2026-11-28T12:00:00+0530",  # offset without colon
        "2026-11-28T12:00:00+05",
        "2026-11-28T12:00:00+05:30:15",  # offset with seconds
        "2026-11-28T12:00:00+24:00",
        "2026-11-28T12:00:00+05:60",
        "2026-11-28T12:00:00UTC",
        "2026-11-28T24:00:00Z",
        "2026-02-30T12:00:00Z",
        "2026-13-01T12:00:00Z",
        "0000-01-01T00:00:00Z",
        "2026-11-28T12:30:60Z",  # a leap second is only ever 23:59:60 UTC
        "\u0662\u0660\u0662\u0666-11-28T12:00:00Z",  # digits of another script
        " 2026-11-28T12:00:00Z",
        "2026-11-28T12:00:00Z\n",
    ],
)
def test_timestamps_must_be_rfc3339(stamp: str) -> None:
    """Only RFC 3339 date-times are accepted; datetime.fromisoformat's wider ISO 8601 forms
    (week and ordinal dates, basic format, date only, odd offsets) are refused."""
    with pytest.raises(InvalidEnvelope, match="timestamp"):
        parse_envelope(json.dumps(valid(timestamp=stamp)).encode(), 10_000)


@pytest.mark.parametrize(
    ("stamp", "moment"),
    [
        ("2026-11-28t12:00:00z", datetime(2026, 11, 28, 12, tzinfo=UTC)),
        ("2026-11-28T12:00:00.123456789Z", datetime(2026, 11, 28, 12, 0, 0, 123456, UTC)),
        ("2026-11-28T17:30:00.5+05:30", datetime(2026, 11, 28, 12, 0, 0, 500000, UTC)),
        ("2026-11-28T12:00:00-00:00", datetime(2026, 11, 28, 12, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, UTC)),
        ("2017-01-01T00:59:60+01:00", datetime(2016, 12, 31, 23, 59, 59, 999999, UTC)),
    ],
)
def test_rfc3339_forms_that_are_accepted(stamp: str, moment: datetime) -> None:
    """Lower-case t and z, any fraction length, -00:00 and leap seconds are RFC 3339; the
    schema accepts them too."""
    document = valid(timestamp=stamp)
    assert parse_envelope(json.dumps(document).encode(), 10_000).timestamp == moment
    VALIDATOR.validate(document)


def test_build_body_refuses_a_timestamp_it_cannot_write_as_rfc3339() -> None:
    """An offset with seconds has no RFC 3339 form; build_body refuses it."""
    odd = timezone(timedelta(hours=1, seconds=30))
    with pytest.raises(InvalidEnvelope, match="timestamp"):
        build_body("a.b", {}, timestamp=datetime(2026, 1, 1, tzinfo=odd))


@pytest.mark.parametrize(
    "line",
    [
        '{"type": "a.b", "timestamp": "2026-W48-6T12:00:00Z"}',
        '{"type": "a.b", "timestamp": "20261128T120000Z"}',
        '{"type": "a.b", "timestamp": "2026-11-28"}',
        '{"type": "a.b", "timestamp": 1700000000}',
        '{"type": "a.b", "id": " evt_1"}',
        '{"type": "a.b", "data": {"k": 1, "k": 2}}',
        '{"type": "a.b", "data": {"k": 1e400}}',
    ],
)
def test_publish_file_lines_follow_the_envelope_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], exchange_name: str, line: str
) -> None:
    """`python -m producer publish --file` applies the envelope's rules (RFC 3339
    timestamps, no duplicate keys or out-of-range numbers, no spaces around ids) to every
    line before connecting, and names the line."""
    config = write_config(tmp_path, make_document(exchange_name, []))
    events = tmp_path / "events.jsonl"
    events.write_text('{"type": "a.b", "timestamp": "2026-11-28T12:00:00Z"}\n' + line + "\n")
    code = producer_cli.main(["publish", "--config", str(config), "--file", str(events)])
    assert code == producer_cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{events}:2:" in err
    assert "Traceback" not in err


def test_publish_file_takes_every_rfc3339_form(tmp_path: Path) -> None:
    """The publish CLI reads --file timestamps with the envelope's rule, so the RFC 3339 forms
    datetime.fromisoformat refuses (lower-case t and z, leap seconds) are taken too."""
    events = tmp_path / "events.jsonl"
    stamps = ["2026-11-28t12:00:00z", "2016-12-31T23:59:60Z", "2026-11-28T12:00:00.123456789Z"]
    events.write_text("".join(f'{{"type": "a.b", "timestamp": "{s}"}}\n' for s in stamps))
    read = [spec.timestamp for spec in producer_cli._read_jsonl(events)]
    assert read == [
        datetime(2026, 11, 28, 12, tzinfo=UTC),
        datetime(2016, 12, 31, 23, 59, 59, 999999, UTC),
        datetime(2026, 11, 28, 12, 0, 0, 123456, UTC),
    ]


@pytest.mark.parametrize("data", [{"n": float("nan")}, {"n": float("inf")}, {"s": {1, 2}}])
def test_build_body_refuses_data_json_cannot_hold(data: dict[str, object]) -> None:
    """NaN, infinities and non-JSON types are the caller's mistake: InvalidEnvelope, not a
    bare ValueError or TypeError from the JSON encoder."""
    with pytest.raises(InvalidEnvelope, match="cannot be written as JSON"):
        build_body("a.b", data)


def test_extra_envelope_keys_travel_beside_the_four() -> None:
    """build_body adds extra top-level keys, which the parser accepts; it refuses extra keys
    that would replace id, type, timestamp or data."""
    _, body = build_body("a.b", {}, event_id="x", extra={"subject": "s", "version": 2})
    document = json.loads(body)
    assert (document["subject"], document["version"]) == ("s", 2)
    assert parse_envelope(body, 10_000).id == "x"
    with pytest.raises(InvalidEnvelope, match="cannot replace"):
        build_body("a.b", {}, extra={"id": "other"})
