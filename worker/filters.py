"""Payload filters: a small JSON match language over the envelope, MongoDB-like.

An endpoint with a ``filter`` is sent only the events whose envelope matches it; the others
are acknowledged without a request (see :mod:`worker.consumer`). The user's guide, with
examples, is ``docs/filters.md``; the rules, all of them, are these:

**Filters.** A filter is a JSON object; every key must hold (an implicit *and*). ``{}``
matches every event. A key is a logical operator or a path:

- ``$and``, ``$or``: a non-empty list of filters (all of them, any of them);
- ``$not``: one filter, which must not match.

**Paths.** ``type`` and ``id`` (strings), ``timestamp``, ``data`` (the event's data object)
and ``data.<segment>...`` into it. A segment looks up a key of an object; on a list, a
segment of digits without leading zeros (``0``, ``7``, ``12``) is an index
(``data.items.0.sku``). A key that contains a dot cannot be addressed. Any other root, a
segment after ``type``, ``id`` or ``timestamp``, and an empty segment are errors. On an object,
every segment is a key (``data.codes.0`` looks up the key ``"0"``). A path is *missing* when
a key is absent, a list index is out of range (or the segment is not an index), or a
segment meets a string, number, boolean or ``null``. JSON ``null`` is a value, not a missing
path: ``{"data.x": null}`` matches only an explicit ``null``.

**Conditions.** A path's value is a literal, meaning ``{"$eq": literal}``, or an object of
operators, all of which must hold. An object is an operator object when it is not empty and
its keys start with ``$``; one that mixes ``$`` keys and other keys is an error; any other
object (``{}`` too) is a literal. The operators:

- ``$eq``, ``$neq``: JSON equality: objects and lists compare deeply, key order aside;
  ``1 == 1.0``, but ``true != 1`` and ``null`` equals only ``null``.
- ``$in``, ``$nin``: a list of at most 256 literals: equal to one of them, to none of them.
- ``$gt``, ``$gte``, ``$lt``, ``$lte``: a number or a string. Numbers compare with numbers
  only, strings with strings only (by Unicode code point); booleans are not numbers. A
  value of another type simply does not match.
- ``$exists``: ``true`` or ``false``.

On a missing path ``$eq``, ``$in`` and the comparisons are false; ``$neq`` and ``$nin`` are
true (MongoDB's rule: the value is not equal to it); ``$exists: false`` is true.

**Envelope fields have a known type**, so operands that could never match them are refused
when the filter is parsed: ``type`` and ``id`` take strings, and ``timestamp`` takes RFC 3339
date-time strings (``2026-11-28T12:00:00Z``, ``2026-11-28T13:00:00.5+01:00``) and compares as
an *instant*: both sides are read as points in time (to the microsecond), so
``...T13:00:00+01:00`` equals ``...T12:00:00Z`` and ``$gte``/``$lt`` select a time range.

**Bounds**, checked when the filter is parsed: at most 8,192 bytes as compact UTF-8 JSON,
nested at most 8 levels deep (objects and lists, the filter itself being level 1), at most
64 conditions (each operator on a path counts one, a literal counts one, ``$and``, ``$or``
and ``$not`` count none), ``$in``/``$nin`` lists of at most 256 items, paths of at most 16
segments (the root included). Only JSON values: objects with string keys, lists, strings
(valid Unicode), finite numbers within the range of a 64-bit float, booleans and ``null``.

Errors are :class:`ValueError` naming the place in the filter, such as
``$and[1].data.amount: $gt needs a number or a string``.

**Equality.** Two filters are equal, and hash alike, when their documents are equal as JSON:
key order aside, ``1 == 1.0``, ``true != 1``. A :class:`Filter` is immutable; its
``document`` is a fresh JSON-plain copy of what it was built from, key order kept.

A filter is compiled once, into closures, and evaluated once per delivery on the parsed
envelope; evaluation allocates nothing but what a path lookup returns.
"""

from __future__ import annotations

import json
import math
import operator
import sys
from collections.abc import Callable
from datetime import date
from typing import Any, Final, NoReturn

from producer.envelope import Envelope, parse_timestamp
from producer.exceptions import InvalidEnvelope

MAX_BYTES: Final = 8192
MAX_DEPTH: Final = 8
MAX_CONDITIONS: Final = 64
MAX_LIST_ITEMS: Final = 256
MAX_PATH_SEGMENTS: Final = 16
_FLOAT_MAX: Final = int(sys.float_info.max)

LOGICAL: Final = ("$and", "$or", "$not")
COMPARISONS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
OPERATORS: Final = ("$eq", "$neq", "$in", "$nin", *COMPARISONS, "$exists")


class _Missing:
    """What a path that leads nowhere resolves to."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()

Match = Callable[[Envelope], bool]
Test = Callable[[Any], bool]  # a test of one value (possibly _MISSING)
Getter = Callable[[Envelope], Any]

# A path's kind: what its value can be, which decides the operands it accepts.
_JSON, _STRING, _TIMESTAMP = "json", "string", "timestamp"
_KINDS: Final = {"type": _STRING, "id": _STRING, "timestamp": _TIMESTAMP, "data": _JSON}


class Filter:
    """A compiled filter. Equal when their documents are equal (as JSON); hashable and
    immutable. Built by :func:`parse_filter` (or by calling it with a document, which
    raises :class:`ValueError` in the same way)."""

    __slots__ = ("_hash", "_key", "_match", "_text")
    _text: str
    _key: str
    _hash: int
    _match: Match

    def __init__(self, document: dict[str, Any]) -> None:
        text, key, match = _compile(document)
        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))
        object.__setattr__(self, "_match", match)

    @property
    def document(self) -> dict[str, Any]:
        """The document it was built from, as a fresh JSON-plain copy (key order kept)."""
        document: dict[str, Any] = json.loads(self._text)
        return document

    @property
    def text(self) -> str:
        """The document as compact JSON, key order kept."""
        return self._text

    def matches(self, envelope: Envelope) -> bool:
        return self._match(envelope)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Filter):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Filter({self._text})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Filter is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a Filter is immutable")

    def __copy__(self) -> Filter:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Filter:
        return self

    def __reduce__(self) -> tuple[Callable[[object], Filter], tuple[dict[str, Any]]]:
        return parse_filter, (self.document,)


def parse_filter(document: object) -> Filter:
    """Compile a filter document (JSON-plain, as read from YAML or a request body), or raise
    :class:`ValueError` saying where in it the problem is."""
    if not isinstance(document, dict):
        raise ValueError("must be a JSON object")
    return Filter(document)


def _compile(document: dict[str, Any]) -> tuple[str, str, Match]:
    if not isinstance(document, dict):
        raise ValueError("must be a JSON object")
    _check_plain(document)
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise ValueError(f"is {size} bytes as JSON, over the limit of {MAX_BYTES} bytes")
    key = json.dumps(_canonical(document), sort_keys=True, separators=(",", ":"))
    # Compiled from a copy of its own: the closures keep literals (lists, objects), which
    # the caller's document must not be able to change afterwards.
    return text, key, _Compiler().filter(json.loads(text), "")


def _at(where: str, problem: str) -> str:
    return f"{where}: {problem}" if where else problem


def _fail(where: str, problem: str) -> NoReturn:
    raise ValueError(_at(where, problem))


def _key_at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_plain(document: dict[str, Any]) -> None:
    """Only JSON values, nested at most MAX_DEPTH deep; iterative, so that a hostile
    document cannot exhaust the stack before its depth is known."""
    stack: list[tuple[object, str, int]] = [(document, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                _fail(where, f"nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, dict):
                children: list[tuple[object, str, int]] = []
                for key, item in value.items():
                    if not isinstance(key, str):
                        _fail(where, f"object keys must be strings, not {type(key).__name__}")
                    _check_string(key, where)
                    children.append((item, _key_at(where, key), depth + 1))
            else:
                children = [(item, f"{where}[{n}]", depth + 1) for n, item in enumerate(value)]
            stack.extend(reversed(children))
        elif isinstance(value, str):
            _check_string(value, where)
        elif isinstance(value, float):
            if not math.isfinite(value):
                _fail(where, "NaN and Infinity are not JSON numbers")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if abs(value) > _FLOAT_MAX:
                _fail(where, "a number must be within the range of a 64-bit float")
        else:
            # YAML reads an unquoted 2026-01-01 as a date.
            hint = ": quote it to make it a string" if isinstance(value, date) else ""
            _fail(where, f"{type(value).__name__} is not a JSON value{hint}")


def _check_string(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _fail(where, "a string is not valid Unicode (lone surrogate)")
    if "\x00" in text:
        # PostgreSQL stores no NUL in text or jsonb, and no envelope carries one usefully.
        _fail(where, "a string contains a NUL character")


def _canonical(value: Any) -> Any:
    """What equality compares: integral floats as integers (``1.0`` is ``1``); sorted keys
    are the serialiser's."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def _json_equal(value: Any, literal: Any) -> bool:
    """JSON equality: deep, key order aside, 1 == 1.0, booleans are not numbers."""
    kind, literal_kind = type(value), type(literal)
    if kind is bool or literal_kind is bool or value is None or literal is None:
        return value is literal
    if (kind is int or kind is float) and (literal_kind is int or literal_kind is float):
        return bool(value == literal)
    if kind is not literal_kind:
        return False
    if kind is str:
        return bool(value == literal)
    if kind is list:
        return len(value) == len(literal) and all(
            _json_equal(item, other) for item, other in zip(value, literal, strict=True)
        )
    if kind is dict:
        return value.keys() == literal.keys() and all(
            _json_equal(item, literal[key]) for key, item in value.items()
        )
    return False


def _all(parts: list[Match]) -> Match:
    if not parts:
        return _always
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        first, second = parts

        def both(envelope: Envelope) -> bool:
            return first(envelope) and second(envelope)

        return both
    frozen = tuple(parts)

    def every(envelope: Envelope) -> bool:
        for part in frozen:  # noqa: SIM110 - all() would build a generator per call
            if not part(envelope):
                return False
        return True

    return every


def _any(parts: list[Match]) -> Match:
    if len(parts) == 1:
        return parts[0]
    frozen = tuple(parts)

    def some(envelope: Envelope) -> bool:
        for part in frozen:  # noqa: SIM110 - any() would build a generator per call
            if part(envelope):
                return True
        return False

    return some


def _always(envelope: Envelope) -> bool:
    return True


def _negate_match(match: Match) -> Match:
    def negated(envelope: Envelope) -> bool:
        return not match(envelope)

    return negated


def _negate_test(test: Test) -> Test:
    def negated(value: Any) -> bool:
        return not test(value)

    return negated


def _all_tests(tests: list[Test]) -> Test:
    if len(tests) == 1:
        return tests[0]
    frozen = tuple(tests)

    def every(value: Any) -> bool:
        for test in frozen:  # noqa: SIM110 - all() would build a generator per call
            if not test(value):
                return False
        return True

    return every


def _data_getter(steps: tuple[tuple[str, int | None], ...]) -> Getter:
    """Resolves ``data.<steps>``; _MISSING when the path leads nowhere."""

    def get(envelope: Envelope) -> Any:
        value: Any = envelope.data
        for key, index in steps:
            kind = type(value)
            if kind is dict:
                value = value.get(key, _MISSING)
                if value is _MISSING:
                    return value
            elif kind is list and index is not None and index < len(value):
                value = value[index]
            else:
                return _MISSING
        return value

    return get


def _index(segment: str) -> int | None:
    """A list index, for a segment of ASCII digits without leading zeros."""
    if segment.isascii() and segment.isdigit() and (segment == "0" or segment[0] != "0"):
        return int(segment)
    return None


class _Compiler:
    """One filter document into closures, counting its conditions."""

    def __init__(self) -> None:
        self.conditions = 0

    def filter(self, document: object, where: str) -> Match:
        if not isinstance(document, dict):
            _fail(where, "must be a filter (a JSON object)")
        clauses: list[Match] = []
        for key, value in document.items():
            at = _key_at(where, key)
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    _fail(at, "needs a non-empty list of filters")
                parts = [self.filter(item, f"{at}[{n}]") for n, item in enumerate(value)]
                clauses.append(_all(parts) if key == "$and" else _any(parts))
            elif key == "$not":
                clauses.append(_negate_match(self.filter(value, at)))
            elif key.startswith("$"):
                _fail(
                    at,
                    f"unknown operator {key}: a filter's keys are $and, $or, $not or paths"
                    " (type, id, timestamp, data.<field>...)",
                )
            else:
                clauses.append(self.path(key, value, at))
        return _all(clauses)

    def path(self, path: str, spec: object, at: str) -> Match:
        segments = path.split(".")
        root = segments[0]
        if root not in _KINDS:
            _fail(at, "unknown path: a path is type, id, timestamp, data or data.<field>...")
        if len(segments) > MAX_PATH_SEGMENTS:
            _fail(at, f"a path has at most {MAX_PATH_SEGMENTS} segments")
        if any(not segment for segment in segments):
            _fail(at, "a path has an empty segment")
        if len(segments) > 1 and root != "data":
            _fail(at, f"{root} is a string, with no fields")
        kind = _KINDS[root]
        getter: Getter
        if len(segments) == 1:
            getter = operator.attrgetter(root)
        else:
            getter = _data_getter(tuple((segment, _index(segment)) for segment in segments[1:]))
        test = _all_tests(self.conditions_of(spec, at, kind))

        def match(envelope: Envelope) -> bool:
            return test(getter(envelope))

        return match

    def conditions_of(self, spec: object, at: str, kind: str) -> list[Test]:
        if isinstance(spec, dict) and spec and any(key.startswith("$") for key in spec):
            fields = [key for key in spec if not key.startswith("$")]
            if fields:
                _fail(
                    at,
                    f"an object of operators cannot also hold fields ({fields[0]!r});"
                    " to compare with an object, use $eq",
                )
            return [self.condition(name, operand, at, kind) for name, operand in spec.items()]
        return [self.condition("$eq", spec, at, kind)]

    def condition(self, name: str, operand: object, at: str, kind: str) -> Test:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            _fail(at, f"a filter has at most {MAX_CONDITIONS} conditions")
        if name in ("$eq", "$neq"):
            test = self.equals(operand, at, name, kind)
            return test if name == "$eq" else _negate_test(test)
        if name in ("$in", "$nin"):
            test = self.member(operand, at, name, kind)
            return test if name == "$in" else _negate_test(test)
        if name in COMPARISONS:
            return self.compare(COMPARISONS[name], operand, at, name, kind)
        if name == "$exists":
            if not isinstance(operand, bool):
                _fail(at, "$exists needs true or false")
            return _present if operand else _absent
        hint = " ($and, $or and $not combine filters, not values)" if name in LOGICAL else ""
        _fail(at, f"unknown operator {name}: use one of {', '.join(OPERATORS)}{hint}")

    def typed(self, operand: object, at: str, what: str, kind: str) -> object:
        """An operand of an envelope field, checked against the field's type."""
        if kind == _JSON:
            return operand
        if kind == _STRING:
            if not isinstance(operand, str):
                _fail(at, f"{what} needs a string: this field is always one")
            return operand
        if not isinstance(operand, str):
            _fail(at, f"{what} needs an RFC 3339 date-time string such as 2026-11-28T12:00:00Z")
        try:
            return parse_timestamp(operand)
        except InvalidEnvelope:
            _fail(at, f"{what} needs an RFC 3339 date-time string such as 2026-11-28T12:00:00Z")

    def equals(self, operand: object, at: str, name: str, kind: str) -> Test:
        literal = self.typed(operand, at, name, kind)
        if kind != _JSON or isinstance(literal, str):
            # Strings and datetimes equal only their own kind.
            def same(value: Any) -> bool:
                return bool(value == literal)

            return same
        if isinstance(literal, bool) or literal is None:

            def identical(value: Any) -> bool:
                return value is literal

            return identical
        if isinstance(literal, int | float):

            def number(value: Any) -> bool:
                found = type(value)
                return (found is int or found is float) and bool(value == literal)

            return number

        def deep(value: Any) -> bool:
            return _json_equal(value, literal)

        return deep

    def member(self, operand: object, at: str, name: str, kind: str) -> Test:
        if not isinstance(operand, list):
            _fail(at, f"{name} needs a list")
        if len(operand) > MAX_LIST_ITEMS:
            _fail(at, f"{name} has {len(operand)} items, at most {MAX_LIST_ITEMS}")
        items = [self.typed(item, at, f"{name}[{n}]", kind) for n, item in enumerate(operand)]
        if kind != _JSON:
            # Strings, or aware datetimes (which hash by instant).
            choices = frozenset(items)

            def among(value: Any) -> bool:
                return value in choices

            return among
        strings = frozenset(item for item in items if isinstance(item, str))
        numbers = frozenset(
            item for item in items if isinstance(item, int | float) and not isinstance(item, bool)
        )
        has_true = any(item is True for item in items)
        has_false = any(item is False for item in items)
        has_null = any(item is None for item in items)
        structured = tuple(item for item in items if isinstance(item, list | dict))

        def among_json(value: Any) -> bool:
            found = type(value)
            if found is str:
                return value in strings
            if found is int or found is float:
                return value in numbers
            if found is bool:
                return has_true if value else has_false
            if value is None:
                return has_null
            if found is list or found is dict:
                return any(_json_equal(value, item) for item in structured)
            return False

        return among_json

    def compare(
        self, relation: Callable[[Any, Any], bool], operand: object, at: str, name: str, kind: str
    ) -> Test:
        if kind != _JSON:
            bound = self.typed(operand, at, name, kind)

            def field(value: Any) -> bool:
                return relation(value, bound)

            return field
        if isinstance(operand, str):

            def text(value: Any) -> bool:
                return type(value) is str and relation(value, operand)

            return text
        if isinstance(operand, int | float) and not isinstance(operand, bool):

            def number(value: Any) -> bool:
                found = type(value)
                return (found is int or found is float) and relation(value, operand)

            return number
        _fail(at, f"{name} needs a number or a string")


def _present(value: Any) -> bool:
    return value is not _MISSING


def _absent(value: Any) -> bool:
    return value is _MISSING
