"""Tests of shellinfo_grpc._jsonvalue: the canonical json_value form (shared decision 1) and its limits.

The expected texts come from the decision's wording and from tests/json_oracle.py,
an independent implementation of the same rules; generated JSON texts are
written by Python's json module in several styles (spaces, key order, exponent
spellings) that must all reach the same canonical text.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_oracle import canonical_text, es_number, value_key

from shellinfo_grpc._jsonvalue import MAX_DEPTH, MAX_NUMBER_CHARS, canonical, decode, encode, number_text, same_value
from shellinfo_grpc.errors import RestDecodeError

SETTINGS = settings(max_examples=300, deadline=None)

# --- the decision's own examples ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-07", "1e-7"),
        ("1E-7", "1e-7"),
        ("0.0000001", "1e-7"),
        ("1e2", "100"),
        ("100", "100"),
        ("1.5", "1.5"),
        ("1e21", "1e+21"),
        ("1e+21", "1e+21"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("0.000001", "0.000001"),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("-18446744073709551617", "-18446744073709551617"),
        ("1.0", "1"),
        ("2.50", "2.5"),
        (" [ 1 , 2 ] ", "[1,2]"),
        ('{"b": 1, "a": 2}', '{"a":2,"b":1}'),
        ('{"a": {"d": [], "c": {}}}', '{"a":{"c":{},"d":[]}}'),
        ("true", "true"),
        ("false", "false"),
        ("null", "null"),
        ('"\\/"', '"/"'),
        ('"\\u0041\\u00e9"', '"Aé"'),
        ('"\\u007f"', '"\x7f"'),
        ('"\\b\\t\\n\\f\\r"', '"\\b\\t\\n\\f\\r"'),
        ('"\\u0000\\u001f\\u001F"', '"\\u0000\\u001f\\u001f"'),
        ('"\\"\\\\"', '"\\"\\\\"'),
        ('"\\ud83d\\ude00"', '"😀"'),
    ],
)
def test_canonical_examples(text: str, expected: str) -> None:
    assert canonical(text) == expected
    assert canonical(expected) == expected


def test_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+1F600 is D83D DE00 in UTF-16: before U+FFFF (and after U+D7FF), though its code point is larger.
    text = json.dumps({"\uffff": 1, "😀": 2, "\ud7ff": 3, "a": 4}, ensure_ascii=False)
    assert canonical(text) == '{"a":4,"\ud7ff":3,"😀":2,"\uffff":1}'


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1e-07", "1e-7"),
        ('{"b":[1,{"y":1,"x":2}],"a":null}', '{"a":null,"b":[1,{"x":2,"y":1}]}'),
        ("18446744073709551617", "18446744073709551617"),
        ("0.1", "1e-1"),
        ("1.0", "1"),
    ],
)
def test_same_value_compares_by_json_value(a: str, b: str) -> None:
    assert same_value(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("18446744073709551617", "18446744073709551616"),  # integers are exact beyond 2**53
        ("[1,2]", "[2,1]"),
        ('"a"', '"A"'),
        ("0.1", "0.10000000000000002"),
        ("null", "false"),
    ],
)
def test_different_values_are_different(a: str, b: str) -> None:
    assert not same_value(a, b)


# --- what is refused -----------------------------------------------------------------

INVALID_TEXTS = [
    pytest.param("", id="empty"),
    pytest.param("[1] 2", id="trailing-data"),
    pytest.param("NaN", id="nan"),
    pytest.param("-Infinity", id="minus-infinity"),
    pytest.param("[Infinity]", id="nested-infinity"),
    pytest.param("1e400", id="beyond-double"),
    pytest.param("-1e309", id="beyond-double-negative"),
    pytest.param('{"a":1,"a":1}', id="duplicate-key"),
    pytest.param('[{"a":{"b":1,"b":2}}]', id="nested-duplicate-key"),
    pytest.param('"\\ud800"', id="lone-high-surrogate"),
    pytest.param('"x\\udc00"', id="lone-low-surrogate"),
    pytest.param('{"\\udfff":1}', id="lone-surrogate-key"),
    pytest.param("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), id="depth-65"),
    pytest.param("[" * 100_000 + "]" * 100_000, id="depth-100000"),
    pytest.param("1" * (MAX_NUMBER_CHARS + 1), id="integer-101-chars"),
    pytest.param("0." + "1" * (MAX_NUMBER_CHARS - 1), id="fraction-101-chars"),
    pytest.param("01", id="leading-zero"),
    pytest.param("+1", id="plus-sign"),
    pytest.param(".5", id="no-integer-part"),
    pytest.param("'a'", id="single-quotes"),
    pytest.param('"\x01"', id="raw-control-character"),
    pytest.param("[1,]", id="trailing-comma"),
    pytest.param("\ufeff1", id="byte-order-mark"),
    pytest.param("\u00a01", id="no-break-space"),
    pytest.param("\u0661", id="arabic-indic-digit"),
]


@pytest.mark.parametrize("text", INVALID_TEXTS)
def test_invalid_text_is_refused(text: str) -> None:
    with pytest.raises(RestDecodeError) as info:
        canonical(text)
    assert info.value.field is None
    assert info.value.reason
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 200


def test_limits_are_inclusive() -> None:
    assert canonical("[" * MAX_DEPTH + "]" * MAX_DEPTH) == "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert canonical("9" * MAX_NUMBER_CHARS) == "9" * MAX_NUMBER_CHARS
    assert canonical("-" + "9" * (MAX_NUMBER_CHARS - 1)) == "-" + "9" * (MAX_NUMBER_CHARS - 1)
    with pytest.raises(RestDecodeError):
        canonical("-" + "9" * MAX_NUMBER_CHARS)
    assert encode(10 ** (MAX_NUMBER_CHARS - 1)) == "1" + "0" * (MAX_NUMBER_CHARS - 1)
    with pytest.raises(RestDecodeError):
        encode(10**MAX_NUMBER_CHARS)


class _Hostile:
    pass


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param([float("inf")], id="inf"),
        pytest.param({1: 2}, id="int-key"),
        pytest.param({"a": {None: 1}}, id="none-key"),
        pytest.param({1, 2}, id="set"),
        pytest.param(b"x", id="bytes"),
        pytest.param(_Hostile(), id="object"),
        pytest.param(1j, id="complex"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param({"\ud800": 1}, id="lone-surrogate-key"),
        pytest.param(10**5000, id="10**5000"),
        pytest.param(-(10**100), id="-10**100"),
    ],
)
def test_python_value_that_is_not_json_is_refused(value: Any) -> None:
    with pytest.raises(RestDecodeError):
        encode(value)


def test_deep_and_cyclic_python_values_are_refused_quickly() -> None:
    deep: list[Any] = []
    inner = deep
    for _ in range(10_000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(RestDecodeError, match="deeper"):
        encode(deep)
    cycle: dict[str, Any] = {}
    cycle["self"] = [cycle]
    with pytest.raises(RestDecodeError, match="cycle"):
        encode(cycle)
    shared = [1]
    assert encode([shared, shared]) == "[[1],[1]]"  # the same object twice is no cycle


# --- generated values: every writing reaches the oracle's canonical text ------------------

keys = st.text(st.characters(exclude_categories=["Cs"]), max_size=6)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**99) + 1, 10**99 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=15,
)


def _float_spellings(x: float) -> list[str]:
    """Several JSON spellings of one double (Python's, with the exponent uppercase, padded)."""
    text = repr(x)
    spellings = [text, text.upper(), es_number(x)]
    if "e" in text:
        mantissa, exponent = text.split("e")
        spellings.append(f"{mantissa}e{int(exponent):+04d}")
    elif "." in text:
        spellings.append(text + "000")
    return spellings


@SETTINGS
@given(json_values, st.booleans(), st.booleans(), st.randoms(use_true_random=False))
def test_any_writing_reaches_the_oracle(value: Any, sort: bool, spaces: bool, rnd: Any) -> None:
    separators = (", ", ": ") if spaces else (",", ":")
    text = json.dumps(value, sort_keys=sort, separators=separators, ensure_ascii=rnd.random() < 0.5)
    expected = canonical_text(value)
    assert canonical(text) == expected
    assert encode(value) == expected
    assert canonical(expected) == expected  # a fixed point
    assert same_value(text, expected)
    # The same JSON value by the decision's rules. (A double of 17 digits or more,
    # 6.718358096479533e16 say, is written "67183580964795330", which reads back
    # as that integer: the same double for a JavaScript reader, as the decision
    # intends, but not the double's exact binary value.)
    assert value_key(json.loads(expected)) == value_key(json.loads(text))


@SETTINGS
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_double_is_written_as_ecmascript_does(x: float) -> None:
    text = number_text(x)
    assert text == es_number(x)
    assert float(text) == x
    for spelling in _float_spellings(x):
        assert canonical(spelling) == text


@SETTINGS
@given(json_values)
def test_decode_gives_the_value_json_loads_gives(value: Any) -> None:
    text = json.dumps(value)
    assert decode(text) == json.loads(text)


@SETTINGS
@given(st.integers(0, 2 * MAX_DEPTH))
def test_depth_limit_holds_at_every_depth(depth: int) -> None:
    text = '{"a":' * depth + "1" + "}" * depth
    if depth <= MAX_DEPTH:
        assert canonical(text) == text
    else:
        with pytest.raises(RestDecodeError, match="deeper"):
            canonical(text)


def test_integer_text_is_exact_far_beyond_doubles() -> None:
    big = 2**300 + 1
    assert canonical(str(big)) == str(big)
    assert canonical(f"{big}.0") == es_number(float(big))  # a fraction makes it a double
    assert math.isfinite(float(canonical(f"{big}.0")))
