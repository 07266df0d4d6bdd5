"""Payload filters: the match language of :mod:`worker.filters` (each operator, missing
paths, type mismatches, list indexing, the envelope's own fields, bounds and their error
messages, equality and hashing, properties checked with hypothesis), and filtered
deliveries through a real worker, RabbitMQ and a loopback HTTP receiver."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import pickle
from datetime import date
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from producer import EventSpec, Publisher
from producer.envelope import Envelope, parse_envelope
from producer.exceptions import ConfigError
from tests.conftest import (
    AMQP_URL,
    Broker,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_document,
    make_settings,
)
from worker.consumer import OUTCOME_EVENTS
from worker.filters import (
    MAX_BYTES,
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_LIST_ITEMS,
    MAX_PATH_SEGMENTS,
    Filter,
    parse_filter,
)
from worker.outcomes import Action
from worker.reload import plan_reload
from worker.series import OTHER
from worker.settings import settings_from_document
from worker.topology import dead_letter_queue, delay_queue, endpoint_queue

TIMESTAMP = "2026-11-28T12:00:00Z"


def event(
    data: dict[str, Any],
    *,
    event_type: str = "order.created",
    event_id: str = "evt_1",
    timestamp: str = TIMESTAMP,
) -> Envelope:
    """An envelope as the worker sees it: serialised and parsed again."""
    body = json.dumps({"id": event_id, "type": event_type, "timestamp": timestamp, "data": data})
    return parse_envelope(body.encode(), 1_000_000)


def matches(document: dict[str, Any], envelope: Envelope) -> bool:
    return parse_filter(document).matches(envelope)


ORDER = event(
    {
        "amount": 150,
        "price": 9.5,
        "currency": "EUR",
        "paid": True,
        "coupon": None,
        "customer": {"id": "c_1", "tier": "gold", "address": {"country": "FR"}},
        "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 1}],
        "tags": ["new", "vip"],
        "codes": {"0": "zero"},
    }
)


# The language: each operator.


def test_a_literal_is_equality_with_booleans_apart_from_numbers() -> None:
    """A literal means $eq: strings, numbers (1 == 1.0), booleans (never equal to 1 or 0)
    and null (only an explicit null)."""
    assert matches({"data.currency": "EUR"}, ORDER)
    assert not matches({"data.currency": "eur"}, ORDER)
    assert matches({"data.amount": 150.0}, ORDER)
    assert matches({"data.price": 9.5}, ORDER)
    assert matches({"data.paid": True}, ORDER)
    assert not matches({"data.paid": 1}, ORDER)
    assert not matches({"data.amount": True}, event({"amount": 1}))
    assert not matches({"data.amount": 1}, event({"amount": True}))
    assert not matches({"data.amount": 0}, event({"amount": False}))
    assert matches({"data.coupon": None}, ORDER)
    assert not matches({"data.nothing": None}, ORDER)
    assert not matches({"data.amount": "150"}, ORDER)


def test_eq_on_objects_and_lists_is_deep_json_equality() -> None:
    """Objects compare deeply, key order aside; lists in order; numbers as numbers,
    booleans as booleans at any depth. A plain object value is an object literal."""
    assert matches(
        {"data.customer": {"tier": "gold", "address": {"country": "FR"}, "id": "c_1"}}, ORDER
    )
    assert not matches({"data.customer": {"tier": "gold"}}, ORDER)
    assert matches(
        {"data.items": {"$eq": [{"qty": 2.0, "sku": "A-1"}, {"sku": "B-2", "qty": 1}]}}, ORDER
    )
    assert not matches({"data.tags": ["vip", "new"]}, ORDER)
    assert not matches({"data.x": [1, True]}, event({"x": [1, 1]}))
    assert not matches({"data.x": {"a": 1}}, event({"x": {"a": True}}))
    assert not matches({"data.x": {"a": None}}, event({"x": {}}))
    assert matches({"data.x": {}}, event({"x": {}}))
    assert matches({"data.x": {"$eq": {"$weird": 1}}}, event({"x": {"$weird": 1}}))
    assert matches({"data.x": {"$eq": {"a": 1}}}, event({"x": {"a": 1}}))


def test_neq_is_the_negation_of_eq() -> None:
    """$neq holds exactly where $eq does not, a missing path included."""
    assert matches({"data.currency": {"$neq": "USD"}}, ORDER)
    assert not matches({"data.currency": {"$neq": "EUR"}}, ORDER)
    assert matches({"data.paid": {"$neq": 1}}, ORDER)
    assert matches({"data.nothing": {"$neq": 1}}, ORDER)


def test_in_and_nin_take_lists_of_literals_of_any_type() -> None:
    """$in: equal to one of the items (with $eq's rules, objects too); $nin: to none."""
    assert matches({"type": {"$in": ["order.paid", "order.created"]}}, ORDER)
    assert not matches({"type": {"$in": ["order.paid"]}}, ORDER)
    assert matches({"data.amount": {"$in": ["150", 150.0]}}, ORDER)
    assert not matches({"data.paid": {"$in": [1, "true"]}}, ORDER)
    assert matches({"data.paid": {"$in": [False, True]}}, ORDER)
    assert not matches({"data.amount": {"$in": [True, False, None]}}, event({"amount": 1}))
    assert matches({"data.coupon": {"$in": [None]}}, ORDER)
    assert matches({"data.tags": {"$in": [["new", "vip"], "x"]}}, ORDER)
    assert matches({"data.customer.address": {"$in": [{"country": "FR"}]}}, ORDER)
    assert not matches({"data.customer": {"$in": []}}, ORDER)
    assert matches({"data.currency": {"$nin": ["USD", "GBP"]}}, ORDER)
    assert not matches({"data.currency": {"$nin": ["EUR"]}}, ORDER)
    assert matches({"data.customer": {"$nin": []}}, ORDER)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"$gt": 100}, True),
        ({"$gt": 150}, False),
        ({"$gte": 150}, True),
        ({"$gte": 150.5}, False),
        ({"$lt": 150.5}, True),
        ({"$lt": 150}, False),
        ({"$lte": 150}, True),
        ({"$gt": 100, "$lt": 200}, True),
        ({"$gt": 100, "$lt": 120}, False),
        ({"$gt": "100"}, False),  # a string bound never matches a number
    ],
)
def test_comparisons_of_numbers(condition: dict[str, Any], expected: bool) -> None:
    """Numbers compare with numbers; several operators in one object must all hold."""
    assert matches({"data.amount": condition}, ORDER) is expected


def test_comparisons_of_strings_and_type_mismatches() -> None:
    """Strings compare with strings, by code point; a value of another type (a boolean is
    not a number, null, an object, a list) simply does not match, nor does a missing path."""
    assert matches({"data.currency": {"$gte": "EUR", "$lt": "EUS"}}, ORDER)
    assert not matches({"data.currency": {"$gt": "eur"}}, ORDER)  # "E" < "e"
    assert not matches({"data.currency": {"$gt": 1}}, ORDER)
    for value in (True, False, None, {"a": 1}, [1], "2"):
        assert not matches({"data.x": {"$gt": 1}}, event({"x": value}))
        assert not matches({"data.x": {"$lte": 1}}, event({"x": value}))
    assert not matches({"data.x": {"$lt": "z"}}, event({"x": 1}))
    assert not matches({"data.nothing": {"$lt": 1}}, ORDER)
    assert not matches({"data.nothing": {"$gte": ""}}, ORDER)


def test_exists() -> None:
    """$exists: true holds when the path resolves (to null too); false when it does not."""
    assert matches({"data.coupon": {"$exists": True}}, ORDER)
    assert not matches({"data.coupon": {"$exists": False}}, ORDER)
    assert matches({"data.nothing": {"$exists": False}}, ORDER)
    assert not matches({"data.nothing": {"$exists": True}}, ORDER)
    assert matches({"data.items.1": {"$exists": True}}, ORDER)
    assert matches({"data.items.2": {"$exists": False}}, ORDER)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("x", False),
        ({"$eq": None}, False),
        ({"$in": [None, "x"]}, False),
        ({"$gt": 0}, False),
        ({"$lte": "z"}, False),
        ({"$neq": None}, True),
        ({"$nin": [None, 1]}, True),
        ({"$exists": False}, True),
        ({"$exists": True}, False),
    ],
)
def test_missing_path_rule(condition: object, expected: bool) -> None:
    """On a path that leads nowhere, $eq, $in and comparisons are false; $neq, $nin and
    $exists: false are true, whatever the reason the path is missing."""
    for path in (
        "data.nothing",
        "data.customer.nothing",
        "data.currency.length",  # into a string
        "data.amount.0",  # into a number
        "data.coupon.x",  # into null
        "data.items.5.sku",  # past the end of a list
        "data.items.first",  # not an index
        "data.items.01",  # a leading zero is not an index
    ):
        assert matches({path: condition}, ORDER) is expected, path


def test_list_indexing_and_digit_keys() -> None:
    """A segment of digits indexes a list; on an object it is a key like any other."""
    assert matches({"data.items.0.sku": "A-1"}, ORDER)
    assert matches({"data.items.1.qty": {"$lt": 2}}, ORDER)
    assert matches({"data.tags.1": "vip"}, ORDER)
    assert matches({"data.codes.0": "zero"}, ORDER)
    assert matches({"data.x.0.1": 3}, event({"x": [[2, 3]]}))
    assert matches({"data.x.10": "k"}, event({"x": list("abcdefghijk")}))


def test_envelope_fields_type_id_and_data() -> None:
    """type and id are the envelope's strings; data alone is the whole data object."""
    assert matches({"type": "order.created", "id": "evt_1"}, ORDER)
    assert matches({"id": {"$gte": "evt_0", "$lt": "evt_2"}}, ORDER)
    assert matches({"data": {"x": 1}}, event({"x": 1}))
    assert not matches({"data": {"x": 1}}, event({"x": 1, "y": 2}))
    assert matches({"data": {"$exists": True}}, event({}))
    assert matches({"data": {}}, event({}))


def test_timestamp_compares_as_an_instant() -> None:
    """timestamp operands are RFC 3339 date-times read as instants: another offset naming
    the same moment is equal, and ranges select by time (to the microsecond)."""
    stamped = event({}, timestamp="2026-11-28T13:00:00.250+01:00")
    assert matches({"timestamp": "2026-11-28T12:00:00.25Z"}, stamped)
    assert not matches({"timestamp": "2026-11-28T12:00:00Z"}, stamped)
    assert matches({"timestamp": {"$gte": "2026-11-28T12:00:00Z"}}, stamped)
    assert matches({"timestamp": {"$lt": "2026-11-28T07:00:01-05:00"}}, stamped)
    assert not matches({"timestamp": {"$lt": "2026-11-28T12:00:00.25Z"}}, stamped)
    assert matches(
        {"timestamp": {"$in": ["2020-01-01T00:00:00Z", "2026-11-28T12:00:00.250000Z"]}}, stamped
    )
    assert matches({"timestamp": {"$nin": ["2026-11-28T12:00:00Z"]}}, stamped)
    assert matches({"timestamp": {"$exists": True}}, stamped)


def test_logical_operators_and_implicit_and() -> None:
    """Every key of an object must hold; $and all, $or any, $not none; {} matches all."""
    assert matches({}, ORDER)
    assert matches({"type": "order.created", "data.amount": {"$gt": 100}}, ORDER)
    assert not matches({"type": "order.created", "data.amount": {"$gt": 200}}, ORDER)
    assert matches({"$and": [{"data.paid": True}, {"data.currency": "EUR"}]}, ORDER)
    assert not matches({"$and": [{"data.paid": True}, {"data.currency": "USD"}]}, ORDER)
    assert matches({"$or": [{"data.currency": "USD"}, {"data.customer.tier": "gold"}]}, ORDER)
    assert not matches({"$or": [{"data.currency": "USD"}, {"data.nothing": 1}]}, ORDER)
    assert matches({"$not": {"data.currency": "USD"}}, ORDER)
    assert not matches({"$not": {}}, ORDER)
    nested = {
        "$or": [
            {"$and": [{"type": "order.paid"}, {"data.amount": {"$gt": 1000}}]},
            {"$not": {"$or": [{"data.tags.0": "new"}, {"data.paid": False}]}},
        ]
    }
    assert not matches(nested, ORDER)
    assert matches(nested, event({"tags": ["old"], "paid": True}))


# Parsing: errors and bounds.


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a JSON object"),
        ("type", "must be a JSON object"),
        (
            {"$and": [{"type": "a"}, {"data.amount": {"$gt": True}}]},
            "$and[1].data.amount: $gt needs a number or a string",
        ),
        ({"data.amount": {"$gt": [1]}}, "data.amount: $gt needs a number or a string"),
        ({"$and": []}, "$and: needs a non-empty list of filters"),
        ({"$or": {"type": "a"}}, "$or: needs a non-empty list of filters"),
        ({"$or": [{"type": "a"}, "b"]}, "$or[1]: must be a filter (a JSON object)"),
        ({"$not": [{"type": "a"}]}, "$not: must be a filter (a JSON object)"),
        (
            {"$nor": [{"type": "a"}]},
            "$nor: unknown operator $nor: a filter's keys are $and, $or, $not or paths"
            " (type, id, timestamp, data.<field>...)",
        ),
        (
            {"payload.amount": 1},
            "payload.amount: unknown path: a path is type, id, timestamp, data or data.<field>...",
        ),
        (
            {"Data.x": 1},
            "Data.x: unknown path: a path is type, id, timestamp, data or data.<field>...",
        ),
        ({"type.name": "a"}, "type.name: type is a string, with no fields"),
        ({"timestamp.year": 1}, "timestamp.year: timestamp is a string, with no fields"),
        ({"data..x": 1}, "data..x: a path has an empty segment"),
        ({"data.x.": 1}, "data.x.: a path has an empty segment"),
        (
            {"data.x": {"$gt": 1, "y": 2}},
            "data.x: an object of operators cannot also hold fields ('y'); to compare with an"
            " object, use $eq",
        ),
        (
            {"data.x": {"$regex": "a"}},
            "data.x: unknown operator $regex: use one of $eq, $neq, $in, $nin, $gt, $gte, $lt,"
            " $lte, $exists",
        ),
        (
            {"data.x": {"$not": {"$eq": 1}}},
            "data.x: unknown operator $not: use one of $eq, $neq, $in, $nin, $gt, $gte, $lt,"
            " $lte, $exists ($and, $or and $not combine filters, not values)",
        ),
        ({"data.x": {"$in": "abc"}}, "data.x: $in needs a list"),
        ({"data.x": {"$nin": None}}, "data.x: $nin needs a list"),
        ({"data.x": {"$exists": 1}}, "data.x: $exists needs true or false"),
        ({"type": 5}, "type: $eq needs a string: this field is always one"),
        ({"id": {"$in": ["a", 1]}}, "id: $in[1] needs a string: this field is always one"),
        (
            {"timestamp": {"$gt": "yesterday"}},
            "timestamp: $gt needs an RFC 3339 date-time string such as 2026-11-28T12:00:00Z",
        ),
        (
            {"timestamp": {"$gt": 1700000000}},
            "timestamp: $gt needs an RFC 3339 date-time string such as 2026-11-28T12:00:00Z",
        ),
        (
            {"timestamp": "2026-11-28"},
            "timestamp: $eq needs an RFC 3339 date-time string such as 2026-11-28T12:00:00Z",
        ),
    ],
)
def test_parse_errors_name_the_place(document: object, message: str) -> None:
    """Every refusal is a ValueError whose message starts with where in the filter the
    problem is."""
    with pytest.raises(ValueError) as raised:  # noqa: PT011 - the message is compared below
        parse_filter(document)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "data.x: NaN and Infinity are not JSON numbers"),
        (-math.inf, "data.x: NaN and Infinity are not JSON numbers"),
        (10**400, "data.x: a number must be within the range of a 64-bit float"),
        ((1, 2), "data.x: tuple is not a JSON value"),
        ({1, 2}, "data.x: set is not a JSON value"),
        (b"x", "data.x: bytes is not a JSON value"),
        (date(2026, 1, 1), "data.x: date is not a JSON value: quote it to make it a string"),
        ("\ud800", "data.x: a string is not valid Unicode (lone surrogate)"),
        ({1: "a"}, "data.x: object keys must be strings, not int"),
        ({"$eq": [1, {"a": math.nan}]}, "data.x.$eq[1].a: NaN and Infinity are not JSON numbers"),
    ],
)
def test_non_json_values_are_refused(value: object, message: str) -> None:
    """Only JSON values: finite numbers within float range, strings of valid Unicode, string
    keys; what YAML reads as a date is refused with a hint to quote it."""
    with pytest.raises(ValueError) as raised:  # noqa: PT011 - the message is compared below
        parse_filter({"data.x": value})
    assert str(raised.value) == message


def _nested(depth: int) -> dict[str, Any]:
    """A filter whose JSON nesting is exactly ``depth`` levels (the filter itself is 1)."""
    document: dict[str, Any] = {"type": "a"}
    for _ in range(depth - 1):
        document = {"$not": document}
    return document


def test_bounds_are_enforced_at_their_limit() -> None:
    """Size, depth, conditions, list items and path segments: the limit itself parses,
    one more is refused with a message saying so."""
    # Size: compact UTF-8 JSON, multi-byte characters counted in bytes.
    overhead = len(json.dumps({"data.x": ""}, separators=(",", ":")))
    assert parse_filter({"data.x": "a" * (MAX_BYTES - overhead)})
    with pytest.raises(ValueError, match=r"^is 8193 bytes as JSON, over the limit of 8192 bytes$"):
        parse_filter({"data.x": "a" * (MAX_BYTES - overhead + 1)})
    with pytest.raises(ValueError, match="over the limit of 8192 bytes"):
        parse_filter({"data.x": "é" * (MAX_BYTES // 2)})
    # Depth.
    assert parse_filter(_nested(MAX_DEPTH)).matches(ORDER) is (MAX_DEPTH % 2 == 0)
    with pytest.raises(ValueError, match=r"^\$not(\.\$not)*: nested more than 8 levels deep$"):
        parse_filter(_nested(MAX_DEPTH + 1))
    assert parse_filter({"data.x": [[[[[[["deep"]]]]]]]})
    with pytest.raises(ValueError, match=r"^data\.x(\[0\]){7}: nested more than 8 levels deep$"):
        parse_filter({"data.x": [[[[[[[["deep"]]]]]]]]})
    # Conditions: each operator and each literal counts; logical operators do not.
    conditions = {f"data.f{n}": {"$exists": True} for n in range(MAX_CONDITIONS - 1)}
    assert parse_filter({**conditions, "$and": [{"data.last": 1}]})
    with pytest.raises(
        ValueError, match=r"^\$and\[0\]\.data\.last: a filter has at most 64 conditions$"
    ):
        parse_filter({**conditions, "$and": [{"data.last": {"$gt": 1, "$lt": 3}}]})
    # $in and $nin items.
    assert parse_filter({"data.x": {"$in": list(range(MAX_LIST_ITEMS))}})
    with pytest.raises(ValueError, match=r"^data\.x: \$nin has 257 items, at most 256$"):
        parse_filter({"data.x": {"$nin": list(range(MAX_LIST_ITEMS + 1))}})
    # Path segments, the root included.
    path = ".".join(["data", *(["a"] * (MAX_PATH_SEGMENTS - 1))])
    assert parse_filter({path: {"$exists": False}}).matches(ORDER)
    with pytest.raises(ValueError, match=r"a path has at most 16 segments$"):
        parse_filter({f"{path}.a": 1})


def test_a_deeply_nested_hostile_document_is_refused_without_recursion() -> None:
    """A document nested far deeper than Python's recursion limit is refused by the depth
    bound, not by a RecursionError."""
    document: Any = "leaf"
    for _ in range(100_000):
        document = [document]
    with pytest.raises(ValueError, match="nested more than 8 levels deep"):
        parse_filter({"data.x": document})


# Equality, hashing, immutability.


def test_equal_documents_make_equal_filters_with_equal_hashes() -> None:
    """Equality is JSON equality of the documents: key order aside and 1 == 1.0, but true is
    not 1; equal filters hash alike, so they work as set members and dict keys."""
    first = parse_filter({"type": "a", "data.x": {"$in": [1, 2.5]}, "$or": [{"id": "b"}]})
    second = parse_filter({"$or": [{"id": "b"}], "data.x": {"$in": [1.0, 2.5]}, "type": "a"})
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    assert parse_filter({"data.x": 1}) != parse_filter({"data.x": True})
    assert parse_filter({"data.x": [1, 2]}) != parse_filter({"data.x": [2, 1]})
    assert first != {"type": "a"}


def test_filters_are_immutable_and_their_document_is_a_copy() -> None:
    """The filter keeps what it was given at parse time: changing the original document,
    or the copy ``document`` returns, changes nothing; attributes cannot be set. Copies and
    pickles give an equal filter."""
    original: dict[str, Any] = {"data.tags": {"$in": [["a"]]}, "type": "x"}
    compiled = parse_filter(original)
    original["data.tags"]["$in"][0].append("b")
    original["type"] = "y"
    assert compiled.document == {"data.tags": {"$in": [["a"]]}, "type": "x"}
    assert list(compiled.document) == ["data.tags", "type"]  # key order kept
    copied = compiled.document
    copied["type"] = "z"
    assert compiled.document["type"] == "x"
    assert compiled.matches(event({"tags": ["a"]}, event_type="x"))
    with pytest.raises(AttributeError):
        compiled._match = None  # type: ignore[misc]
    with pytest.raises(AttributeError):
        compiled.document = {}  # type: ignore[misc]
    assert copy.deepcopy(compiled) == compiled
    assert pickle.loads(pickle.dumps(compiled)) == compiled
    assert repr(compiled) == 'Filter({"data.tags":{"$in":[["a"]]},"type":"x"})'
    assert Filter({"type": "x"}) == parse_filter({"type": "x"})


# Properties.

KEYS = st.sampled_from(["a", "b", "0", "1"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, -1.5, 1e300]),
    st.text(alphabet="ab1", max_size=2),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(KEYS, children, max_size=3)
    ),
    max_leaves=6,
)
DATA = st.dictionaries(KEYS, VALUES, max_size=4)
PATHS = st.sampled_from(["data", "data.a", "data.b", "data.a.0", "data.a.b", "data.1.a.0"])
BOUNDS = st.one_of(st.integers(min_value=-3, max_value=3), st.text(alphabet="ab1", max_size=2))


def _conditions() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        VALUES.map(lambda value: {"$eq": value}),
        VALUES.map(lambda value: {"$neq": value}),
        st.lists(VALUES, max_size=3).map(lambda items: {"$in": items}),
        st.lists(VALUES, max_size=3).map(lambda items: {"$nin": items}),
        st.tuples(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), BOUNDS).map(
            lambda pair: {pair[0]: pair[1]}
        ),
        st.booleans().map(lambda flag: {"$exists": flag}),
    )


FILTERS = st.recursive(
    st.dictionaries(PATHS, _conditions(), min_size=1, max_size=2),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda parts: {"$and": parts}),
        st.lists(children, min_size=1, max_size=3).map(lambda parts: {"$or": parts}),
        children.map(lambda part: {"$not": part}),
    ),
    max_leaves=4,
)


def _compile(document: dict[str, Any]) -> Filter:
    try:
        return parse_filter(document)
    except ValueError:
        assume(False)  # over a bound (depth, size): not what these properties are about
        raise


def _canonical_json(value: Any) -> str:
    """A reference for JSON equality: integral floats as integers, keys sorted."""

    def canonical(item: Any) -> Any:
        if isinstance(item, float) and item.is_integer():
            return int(item)
        if isinstance(item, dict):
            return {key: canonical(child) for key, child in item.items()}
        if isinstance(item, list):
            return [canonical(child) for child in item]
        return item

    return json.dumps(canonical(value), sort_keys=True)


@settings(max_examples=400, deadline=None)
@given(FILTERS, DATA)
def test_not_is_the_negation_and_or_is_any(document: dict[str, Any], data: dict[str, Any]) -> None:
    """For any filter f and event: {"$not": f} matches exactly when f does not, and
    {"$or": [f, {"$not": f}]} always matches."""
    envelope = event(data)
    compiled = _compile(document)
    negated = _compile({"$not": document})
    assert negated.matches(envelope) is (not compiled.matches(envelope))
    assert _compile({"$or": [document, {"$not": document}]}).matches(envelope)


@settings(max_examples=400, deadline=None)
@given(PATHS, VALUES, DATA)
def test_in_one_item_is_eq_and_eq_is_json_equality(
    path: str, value: Any, data: dict[str, Any]
) -> None:
    """$in [x] is $eq x, $nin [x] is $neq x, and $eq agrees with a reference JSON equality
    (a missing path equals nothing)."""
    envelope = event(data)
    equal = matches({path: {"$eq": value}}, envelope)
    assert matches({path: {"$in": [value]}}, envelope) is equal
    assert matches({path: {"$nin": [value]}}, envelope) is (not equal)
    assert matches({path: {"$neq": value}}, envelope) is (not equal)
    found: Any = data
    for segment in path.split(".")[1:]:
        if isinstance(found, dict) and segment in found:
            found = found[segment]
        elif isinstance(found, list) and segment.isdigit() and int(segment) < len(found):
            found = found[int(segment)]
        else:
            assert not equal
            assert matches({path: {"$exists": False}}, envelope)
            return
    assert equal is (_canonical_json(found) == _canonical_json(value))


@settings(max_examples=300, deadline=None)
@given(VALUES, BOUNDS)
def test_comparisons_match_a_reference(value: Any, bound: int | str) -> None:
    """Each comparison holds exactly when value and bound are both numbers (not booleans)
    or both strings, and Python's order says so."""
    envelope = event({"v": value})
    comparable = (isinstance(value, str) and isinstance(bound, str)) or (
        type(value) in (int, float) and isinstance(bound, int)
    )
    for name, holds in (
        ("$gt", lambda: value > bound),
        ("$gte", lambda: value >= bound),
        ("$lt", lambda: value < bound),
        ("$lte", lambda: value <= bound),
    ):
        assert matches({"data.v": {name: bound}}, envelope) is bool(comparable and holds())


# In the config, and on a reload.


def test_a_filter_in_config_yaml_is_compiled_and_its_errors_name_the_field(tmp_path: Path) -> None:
    """``filter:`` under an endpoint in YAML compiles to a Filter; a bad one is refused with
    the endpoint's field and the place inside the filter."""
    yaml_filter = yaml.safe_load(
        """
        filter:
          type: {$in: [order.created, order.paid]}
          data.amount: {$gt: 100}
        """
    )
    settings = make_settings(
        "hl-filters", [endpoint("big", "http://127.0.0.1/b", ["order.*"], **yaml_filter)]
    )
    [big] = settings.endpoints
    assert big.filter == parse_filter(
        {"type": {"$in": ["order.created", "order.paid"]}, "data.amount": {"$gt": 100}}
    )
    assert big.filter is not None and big.filter.matches(ORDER)
    bad = make_document(
        "hl-filters",
        [endpoint("big", "http://127.0.0.1/b", ["#"], filter={"$or": [{"data.x": {"$gt": None}}]})],
    )
    with pytest.raises(ConfigError) as raised:
        settings_from_document(bad, tmp_path / "config.yaml", {})
    assert "endpoints[0].filter: $or[0].data.x: $gt needs a number or a string" in str(raised.value)


def test_a_reload_replaces_the_consumer_only_when_the_filter_changes() -> None:
    """The reload plan compares filters as filters: the same document with other key
    order is unchanged; a new filter, or none, changes the endpoint."""

    def with_filter(document: dict[str, Any] | None) -> Any:
        extra = {} if document is None else {"filter": document}
        return make_settings("x", [endpoint("a", "http://127.0.0.1:1/a", ["#"], **extra)])

    running = with_filter({"type": "a", "data.x": 1})
    assert plan_reload(running, with_filter({"data.x": 1.0, "type": "a"})).changed == ()
    assert plan_reload(running, with_filter({"data.x": 2, "type": "a"})).changed == ("a",)
    assert plan_reload(running, with_filter(None)).changed == ("a",)


# Delivery through a real worker.


async def test_filtered_events_are_acked_without_a_request_and_counted(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """An event its filter does not match is acked without a request: nothing POSTed,
    retried or dead-lettered, no attempt counted. It is logged once as delivery_filtered
    (no payload data) and counted in webhook_filtered_total, under the endpoint's own label
    for a notable endpoint and under _other for the rest. Matching events are delivered."""
    settings = make_settings(
        exchange_name,
        [
            endpoint(
                "big",
                receiver.url("/big"),
                ["order.*"],
                filter={"data.amount": {"$gt": 100}},
                metrics_detail=True,
            ),
            endpoint("paid", receiver.url("/paid"), ["order.*"], filter={"type": "order.paid"}),
        ],
        metrics={"queue_poll_s": 3600},  # no backlog poll makes "paid" notable meanwhile
    )
    worker = await run_worker(settings)
    registry = worker.metrics.registry

    def filtered(label: str) -> float | None:
        return registry.get_sample_value("webhook_filtered_total", {"endpoint": label})

    assert filtered("big") == 0  # created at zero with the endpoint's other series
    with capture_logs() as logs:
        async with Publisher(AMQP_URL, exchange_name) as publisher:
            await publisher.publish_many(
                [
                    EventSpec("order.created", {"amount": 50, "card": "4242"}, id="small"),
                    EventSpec("order.created", {"amount": 150}, id="large"),
                    EventSpec("order.paid", {"amount": 5}, id="paid"),
                ]
            )
        await receiver.wait_for(lambda: len(receiver.requests) == 2)
        await eventually(lambda: _equals(lambda: (filtered("big"), filtered(OTHER)), (2, 2)))
        await asyncio.sleep(0.3)  # nothing else may arrive
    assert receiver.delivered_ids("/big") == ["large"]
    assert receiver.delivered_ids("/paid") == ["paid"]
    for name in ("big", "paid"):
        await broker.wait_depth(endpoint_queue(exchange_name, name), 0)
    assert await broker.depth(dead_letter_queue(exchange_name)) == 0

    def deliveries(label: str, outcome: str) -> float | None:
        labels = {"endpoint": label, "outcome": outcome}
        return registry.get_sample_value("webhook_deliveries_total", labels)

    assert deliveries("big", "delivered") == 1
    assert deliveries(OTHER, "delivered") == 1
    assert deliveries("big", "filtered") is None  # not an attempt outcome
    attempts = registry.get_sample_value(
        "webhook_attempts_total", {"endpoint": "big", "status_class": "2xx"}
    )
    assert attempts == 1
    lines = [entry for entry in logs if entry["event"] == "delivery_filtered"]
    assert sorted((line["endpoint"], line["event_id"]) for line in lines) == [
        ("big", "paid"),
        ("big", "small"),
        ("paid", "large"),
        ("paid", "small"),
    ]
    for line in lines:
        assert line["log_level"] == "info"
        assert line["outcome"] == "filtered"
        assert line["event_type"] in ("order.created", "order.paid")
        assert "4242" not in json.dumps(line, default=str)
        assert not {"data", "status", "duration_ms"} & set(line)
    succeeded = [entry["event_id"] for entry in logs if entry["event"] == "delivery_succeeded"]
    assert sorted(succeeded) == ["large", "paid"]


async def _equals(read: Any, expected: Any) -> bool:
    return bool(read() == expected)


async def test_filtered_events_neither_count_against_nor_reset_the_circuit(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Filtered events are not attempts: after one failed attempt, filtered events leave the
    circuit breaker's failure streak and the recent rates as they were (a success would
    reset the streak, a failure lengthen it)."""
    receiver.script("/down", 503)
    settings = make_settings(
        exchange_name,
        [endpoint("down", receiver.url("/down"), ["#"], filter={"data.send": True})],
        circuit_breaker={"enabled": True, "failure_threshold": 10},
        retry={"delays_s": [60]},
    )
    worker = await run_worker(settings)
    assert worker._endpoints is not None
    [consumer] = worker._endpoints.consumers
    assert consumer.breaker is not None
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        await publisher.publish("e.x", {"send": True}, event_id="sent")
        await receiver.wait_for(lambda: len(receiver.requests) == 1)
        await eventually(lambda: _equals(lambda: consumer.breaker.consecutive_failures, 1))
        await publisher.publish_many([EventSpec("e.x", {"send": False}) for _ in range(3)])
    registry = worker.metrics.registry
    await eventually(
        lambda: _equals(
            lambda: sum(
                registry.get_sample_value("webhook_filtered_total", {"endpoint": label}) or 0
                for label in ("down", OTHER)
            ),
            3,
        )
    )
    assert consumer.breaker.consecutive_failures == 1
    assert consumer.recent.rates().delivered_per_s == 0
    assert consumer.recent.rates().failed_per_s > 0
    assert len(receiver.requests) == 1


def test_every_action_has_its_log_event() -> None:
    """Each Action, the filter's included, is logged under an event name of its own."""
    assert set(OUTCOME_EVENTS) == set(Action)
    assert OUTCOME_EVENTS[Action.FILTER] == "delivery_filtered"
    assert len(set(OUTCOME_EVENTS.values())) == len(Action)


async def test_a_retried_event_meets_the_filter_again_on_its_retry(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, broker: Broker
) -> None:
    """The filter applies to every arrival, retries included: an event that failed its
    first attempt, and whose endpoint is then given a filter it does not match, is acked at
    its retry, not attempted again nor dead-lettered."""
    receiver.script("/ep", 503)
    before = make_settings(
        exchange_name, [endpoint("ep", receiver.url("/ep"), ["#"])], retry={"delays_s": [60]}
    )
    worker = await run_worker(before)
    async with Publisher(AMQP_URL, exchange_name) as publisher:
        await publisher.publish("order.created", {"amount": 1}, event_id="once")
    await receiver.wait_for(lambda: len(receiver.requests) == 1)
    await run_worker.stop(worker)
    # The retry waits in the 60 s tier; hand it back at once, as its TTL would.
    [retry] = await broker.drain(delay_queue(exchange_name, 60))
    after = make_settings(
        exchange_name,
        [endpoint("ep", receiver.url("/ep"), ["#"], filter={"data.amount": {"$gt": 100}})],
        retry={"delays_s": [60]},
    )
    worker = await run_worker(after)
    channel = await broker.channel()
    try:
        copied = aio_pika.Message(
            retry.body,
            headers=dict(retry.headers),
            message_id=retry.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await channel.default_exchange.publish(copied, endpoint_queue(exchange_name, "ep"))
    finally:
        await channel.close()
    registry = worker.metrics.registry
    await eventually(
        lambda: _equals(
            lambda: registry.get_sample_value("webhook_filtered_total", {"endpoint": OTHER}), 1
        )
    )
    await broker.wait_depth(endpoint_queue(exchange_name, "ep"), 0)
    assert len(receiver.requests) == 1
    assert await broker.depth(dead_letter_queue(exchange_name)) == 0
