"""Property-based tests of shellinfo_grpc.rest (hypothesis).

Round trips REST -> message -> bytes -> message -> REST with nulls, unknown keys
and unknown enum spellings mixed in; arbitrary Python objects fed to
``from_rest``; and protobuf's own ``json_format`` as an oracle wherever its
mapping and the REST mapping agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from json_oracle import canonical_text, value_key

from shellinfo_grpc import REST_KEYS, ProtectionShellInfo, RestDecodeError, RunStatus, RunType, from_rest, to_rest
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc.rest import rest_names

SETTINGS = settings(max_examples=250, deadline=None)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RUN_TYPES = list(rest_names(RunType.DESCRIPTOR).values())
STATUSES = list(rest_names(RunStatus.DESCRIPTOR).values())
SPELLINGS = {"runType": RUN_TYPES, "status": STATUSES}

int64s = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, INT64_MAX, 0, -1])
hhmms = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
texts = st.text()  # no lone surrogates: hypothesis leaves category Cs out by default

KNOWN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "jobRunId": int64s,
    "startTimeUsecs": int64s,
    "endTimeUsecs": int64s,
    "runType": st.sampled_from(RUN_TYPES),
    "status": st.sampled_from(STATUSES),
    "error": texts,
    "startTimeHhmm": hhmms,
    "endTimeHhmm": hhmms,
}
unknown_spellings = st.text(max_size=16).filter(lambda s: s not in RUN_TYPES and s not in STATUSES)
unknown_keys = st.text(max_size=12).filter(lambda k: k not in REST_KEYS)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**80), 2**80)
    | st.sampled_from([2**53 + 1, 2**64, 2**64 + 1, -(2**64) - 1, 2**63])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def rest_records(
    draw: st.DrawFn, *, nulls: bool = False, extra_keys: bool = False, odd_spellings: bool = False
) -> dict[str, Any]:
    """A valid REST ``protectionShellInfo`` object, keys in random order."""
    keys = draw(st.lists(st.sampled_from(REST_KEYS), unique=True))
    items: list[tuple[str, Any]] = []
    for key in keys:
        values = KNOWN_VALUES[key]
        if odd_spellings and key in SPELLINGS:
            values |= unknown_spellings
        if nulls:
            values |= st.none()
        items.append((key, draw(values)))
    if extra_keys:
        items += draw(st.dictionaries(unknown_keys, json_values, max_size=5)).items()
        items = draw(st.permutations(items))
    return dict(items)


def plain_key(key: str) -> str:
    """A key as an error names it: itself if printable and short, else escaped and cut."""
    if key and key.isprintable() and len(key) <= 60 and "\\" not in key and '"' not in key:
        return key
    return "<escaped>"


def without_known_nulls(data: Mapping[str, Any]) -> dict[str, Any]:
    """What to_rest gives back: known keys that are null are unset (and left out)."""
    return {k: v for k, v in data.items() if v is not None or k not in REST_KEYS}


def through_the_wire(msg: ProtectionShellInfo) -> ProtectionShellInfo:
    wire = msg.SerializeToString(deterministic=True)
    back = ProtectionShellInfo.FromString(wire)
    assert back.SerializeToString(deterministic=True) == wire
    return back


# --- round trips ------------------------------------------------------------------


@SETTINGS
@given(data=rest_records())
def test_valid_record_round_trips_exactly(data: dict[str, Any], same_json: Any) -> None:
    msg = from_rest(data)
    assert same_json(to_rest(msg), data)
    assert same_json(to_rest(through_the_wire(msg)), data)
    assert list(to_rest(msg)) == [k for k in REST_KEYS if k in data]  # schema order
    assert from_rest(data, strict=True) == msg


@SETTINGS
@given(data=rest_records(nulls=True))
def test_null_means_the_same_as_absent(data: dict[str, Any], same_json: Any) -> None:
    msg = from_rest(data)
    assert msg == from_rest(without_known_nulls(data))
    assert same_json(to_rest(through_the_wire(msg)), without_known_nulls(data))


@SETTINGS
@given(data=rest_records(nulls=True, extra_keys=True, odd_spellings=True))
def test_unknown_keys_and_spellings_survive_the_wire(data: dict[str, Any], same_json: Any) -> None:
    msg = from_rest(data)
    expected = without_known_nulls(data)
    back = to_rest(through_the_wire(msg))
    assert same_json(
        {k: v for k, v in back.items() if k in REST_KEYS}, {k: v for k, v in expected.items() if k in REST_KEYS}
    )
    # Unknown values come back as the same JSON value, stored in canonical form.
    assert {k: value_key(v) for k, v in back.items()} == {k: value_key(v) for k, v in expected.items()}
    assert [e.json_value for e in msg.unrecognized.extra_keys] == [
        canonical_text(v) for k, v in data.items() if k not in REST_KEYS
    ]
    # And a second trip changes nothing: the canonical text is a fixed point.
    assert from_rest(back) == msg
    # Unknown keys keep their order, after the known keys.
    out = list(to_rest(msg))
    known = [k for k in out if k in REST_KEYS]
    assert out == known + [k for k in expected if k not in REST_KEYS]
    assert known == [k for k in REST_KEYS if k in expected]


@SETTINGS
@given(rest_records(nulls=True, extra_keys=True, odd_spellings=True))
def test_strict_rejects_exactly_what_the_schema_does_not_know(data: dict[str, Any]) -> None:
    offending = {k for k, v in data.items() if k not in REST_KEYS} | {
        k for k in SPELLINGS if data.get(k) is not None and data[k] not in SPELLINGS[k]
    }
    if not offending:
        assert from_rest(data, strict=True) == from_rest(data)
        return
    with pytest.raises(RestDecodeError) as info:
        from_rest(data, strict=True)
    assert info.value.field in offending or any(plain_key(k) != k for k in offending)


# --- arbitrary input ----------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=8)
any_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.complex_numbers(max_magnitude=10)
    | any_text
    | st.binary(max_size=4)
    | st.sampled_from([*RUN_TYPES, *STATUSES, "09:05", "24:00", "kSuccess\x00"])
)
any_keys = st.sampled_from(REST_KEYS) | any_text | st.integers(-2, 2) | st.none() | st.booleans() | st.floats()


def any_objects(*, tuples: bool) -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        containers = (
            st.lists(children, max_size=3)
            | st.dictionaries(any_keys, children, max_size=3)
            | st.frozensets(st.integers(0, 3), max_size=2)
        )
        if tuples:
            containers |= st.tuples(children) | st.sets(st.integers(0, 3), max_size=2)
        return containers

    return st.recursive(any_scalars, extend, max_leaves=8)


any_records = (
    st.dictionaries(any_keys, any_objects(tuples=True), max_size=6)
    # mostly valid records with a few arbitrary entries mixed in
    | st.builds(
        lambda good, odd: {**good, **odd},
        rest_records(nulls=True, extra_keys=True, odd_spellings=True),
        st.dictionaries(any_keys, any_objects(tuples=True), max_size=2),
    )
    | any_objects(tuples=True)
)


def decode(data: Any, *, strict: bool) -> tuple[ProtectionShellInfo | None, RestDecodeError | None]:
    """from_rest, with a RestDecodeError returned instead of raised (anything else escapes)."""
    try:
        return from_rest(data, strict=strict), None
    except RestDecodeError as error:
        return None, error


def acceptable_fields(data: Any) -> set[str | None]:
    """The ``field`` a RestDecodeError about ``data`` may name."""
    if not isinstance(data, Mapping):
        return {None}
    fields: set[str | None] = set()
    for key in data:
        fields |= {key, ascii(key)[1:-1]} if isinstance(key, str) else {repr(key)}
    return fields


def assert_one_bounded_line(error: RestDecodeError) -> None:
    text = str(error)
    assert text
    assert text.isprintable(), ascii(text)
    assert len(text) <= MESSAGE_LIMIT, len(text)
    assert error.field is None or (error.field.isprintable() and len(error.field) <= MESSAGE_LIMIT)


MESSAGE_LIMIT = 400


@settings(max_examples=300, deadline=None)
@given(any_records, st.booleans())
def test_arbitrary_input_either_decodes_or_raises_rest_decode_error(data: Any, strict: bool) -> None:
    msg, error = decode(data, strict=strict)
    if error is not None:
        fields = acceptable_fields(data)
        assert error.field in fields or any(not isinstance(k, str) or plain_key(k) != k for k in data)
        assert_one_bounded_line(error)
        return
    assert msg is not None
    # Whatever was accepted can be written, sent and read back.
    assert to_rest(through_the_wire(msg)) == to_rest(msg)


def is_json(value: Any) -> bool:
    """True if ``value`` is exactly what json.loads could have produced."""
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(is_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json(k) and is_json(v) for k, v in value.items())
    return False


@SETTINGS
@given(data=st.dictionaries(any_keys, any_objects(tuples=False), max_size=6))
def test_what_is_accepted_comes_back_unchanged(data: dict[Any, Any]) -> None:
    # "Forward compatibility without loss": from_rest must refuse rather than
    # accept a value it cannot give back as the same JSON value.
    try:
        msg = from_rest(data)
    except RestDecodeError:
        return
    assert is_json(data), f"accepted a value that is not JSON: {data!r}"
    back = to_rest(through_the_wire(msg))
    assert {k: value_key(v) for k, v in back.items()} == {k: value_key(v) for k, v in without_known_nulls(data).items()}


# --- json_format as an oracle ----------------------------------------------------------

_FIELDS = ProtectionShellInfo.DESCRIPTOR.fields_by_name


@st.composite
def messages(draw: st.DrawFn) -> ProtectionShellInfo:
    """A message without unrecognized content and without _UNSPECIFIED enums."""
    values = {
        "job_run_id": int64s,
        "start_time_usecs": int64s,
        "end_time_usecs": int64s,
        "run_type": st.sampled_from([v.number for v in RunType.DESCRIPTOR.values if v.number]),
        "status": st.sampled_from([v.number for v in RunStatus.DESCRIPTOR.values if v.number]),
        "error": texts,
        "start_time_hhmm": hhmms,
        "end_time_hhmm": hhmms,
    }
    present = draw(st.sets(st.sampled_from(sorted(values))))
    return ProtectionShellInfo(**{name: draw(values[name]) for name in present})


def _rest_name(field: Any, enum_name: str) -> str:
    return field.enum_type.values_by_name[enum_name].GetOptions().Extensions[pb.rest_name]


def _proto_name(field: Any, rest_spelling: str) -> str:
    for value in field.enum_type.values:
        if value.GetOptions().Extensions[pb.rest_name] == rest_spelling:
            return value.name
    raise AssertionError(rest_spelling)


def proto_json_to_rest(proto_json: dict[str, Any]) -> dict[str, Any]:
    """Rewrite json_format output in the REST spelling: int64 strings -> int, enum names -> rest_name."""
    by_json = {f.json_name: f for f in ProtectionShellInfo.DESCRIPTOR.fields}
    out: dict[str, Any] = {}
    for key, value in proto_json.items():
        field = by_json[key]
        if field.type == field.TYPE_INT64:
            out[key] = int(value)
        elif field.type == field.TYPE_ENUM:
            out[key] = _rest_name(field, value)
        else:
            out[key] = value
    return out


def rest_to_proto_json(rest: dict[str, Any]) -> dict[str, Any]:
    by_json = {f.json_name: f for f in ProtectionShellInfo.DESCRIPTOR.fields}
    return {
        key: _proto_name(by_json[key], value) if by_json[key].type == by_json[key].TYPE_ENUM else value
        for key, value in rest.items()
    }


@SETTINGS
@given(msg=messages())
def test_to_rest_agrees_with_json_format(msg: ProtectionShellInfo, same_json: Any) -> None:
    expected = proto_json_to_rest(json_format.MessageToDict(msg))
    got = to_rest(msg)
    assert same_json(got, expected)
    assert list(got) == list(expected)  # same (field number) order


@SETTINGS
@given(rest_records())
def test_from_rest_agrees_with_json_format(data: dict[str, Any]) -> None:
    parsed = json_format.ParseDict(rest_to_proto_json(data), ProtectionShellInfo())
    assert from_rest(data) == parsed
    assert from_rest(data).SerializeToString(deterministic=True) == parsed.SerializeToString(deterministic=True)


@SETTINGS
@given(messages())
def test_message_round_trips_through_rest(msg: ProtectionShellInfo) -> None:
    assert from_rest(to_rest(msg)) == msg
    for name in _FIELDS:
        assert from_rest(to_rest(msg)).HasField(name) == msg.HasField(name)


# --- hostile input: nothing but RestDecodeError escapes (issue 7.2) --------------------------


class Boom(Exception):
    """An exception whose text is long, has line breaks, and whose str() may itself fail."""

    def __init__(self, fail_str: bool = False) -> None:
        super().__init__("boom\n" * 500)
        self.fail_str = fail_str

    def __str__(self) -> str:
        if self.fail_str:
            raise Boom()
        return super().__str__()


class RaisingEq:
    """Hashes like a known REST key, so a dict lookup of that key calls __eq__, which raises."""

    def __init__(self, like: str) -> None:
        self.like = like

    def __hash__(self) -> int:
        return hash(self.like)

    def __eq__(self, other: object) -> bool:
        raise Boom(fail_str=True)

    def __repr__(self) -> str:
        raise Boom()


class RaisingHashAfterInsert:
    """Hashable once (so it can be a dict key), raising ever after."""

    def __init__(self) -> None:
        self.calls = 0

    def __hash__(self) -> int:
        self.calls += 1
        if self.calls > 1:
            raise Boom()
        return 7


class RaisingIterList(list[Any]):
    def __iter__(self) -> Any:
        raise Boom()


class RaisingItemsDict(dict[Any, Any]):
    def items(self) -> Any:
        raise Boom(fail_str=True)


class RaisingGetDict(dict[Any, Any]):
    def get(self, key: Any, default: Any = None) -> Any:
        raise Boom()


class LyingMapping(Mapping[Any, Any]):
    """A mapping that yields a key twice, lies about its length, and fails on one key."""

    def __init__(self, items: list[tuple[Any, Any]]) -> None:
        self._items = items

    def __getitem__(self, key: Any) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        if key == "error":
            raise Boom()
        raise KeyError(key)

    def __iter__(self) -> Any:
        for k, _ in self._items:
            yield k
        yield from (k for k, _ in self._items[:1])

    def __len__(self) -> int:
        return 1

    def items(self) -> Any:
        return [*self._items, *self._items[:1]]


class StrSubclassRaisingHash(str):
    def __hash__(self) -> int:
        raise Boom()


class OddName(type):
    pass


Weird = OddName("Weird\nclass\x7f" + "x" * 500, (), {})


def deep(depth: int, leaf: Any, as_dict: bool) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


def cyclic(kind: int) -> Any:
    if kind == 0:
        a: list[Any] = []
        a.append(a)
        return a
    if kind == 1:
        d: dict[str, Any] = {}
        d["x"] = [1, {"y": d}]
        return d
    t: list[Any] = [1]
    t.append((t,))
    return t


hostile_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(4500, 6000).map(lambda n: 10**n)  # beyond str()'s 4300-digit limit
    | st.integers(4500, 6000).map(lambda n: -(10**n))
    | st.sampled_from([10**100, 2**64, 2**31, -(2**31) - 1, 2**63])
    | st.floats()
    | st.sampled_from([float("nan"), float("inf"), -float("inf")])
    | st.text(st.characters(categories=["Cs", "Cc", "Zl", "Zp", "L"]), max_size=6)
    | st.integers(10_000, 200_000).map(lambda n: "é\n\x00" * n)
    | st.binary(max_size=4)
    | st.decimals(allow_nan=True)
    | st.complex_numbers(max_magnitude=5)
    | st.sampled_from([*RUN_TYPES, *STATUSES, "09:05", "24:00", 0, 99, -1])
    | st.builds(object)
    | st.builds(Weird)
    | st.builds(RaisingEq, st.sampled_from(REST_KEYS))
    | st.builds(StrSubclassRaisingHash, st.sampled_from(["kSuccess", "x", "09:05"]))
    | st.integers(0, 2).map(cyclic)
)
hostile_keys = (
    st.sampled_from(REST_KEYS)
    | st.text(st.characters(categories=["Cs", "Cc", "Zl", "L"]), max_size=4)
    | st.integers(500, 5000).map(lambda n: "k\n" * n)
    | st.integers(-2, 2)
    | st.integers(4500, 6000).map(lambda n: 10**n)
    | st.sampled_from([None, 1.5, b"jobRunId", (1, "a"), frozenset({1})])
    | st.builds(RaisingEq, st.sampled_from(REST_KEYS))
    | st.builds(RaisingHashAfterInsert)
    | st.builds(StrSubclassRaisingHash, st.sampled_from([*REST_KEYS, "x"]))
)


def hostile_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    pairs = st.lists(st.tuples(hostile_keys, children), max_size=3)

    def to_dict(kind: int, items: list[tuple[Any, Any]]) -> Any:
        base: dict[Any, Any] = {}
        for key, value in items:
            try:
                base[key] = value
            except Exception:  # an unhashable key, or one whose hash fails: leave it out
                continue
        return [dict, RaisingItemsDict, RaisingGetDict, lambda d: LyingMapping(list(d.items()))][kind](base)

    return (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.builds(RaisingIterList, st.lists(children, max_size=2))
        | st.frozensets(st.integers(0, 3), max_size=2)
        | st.builds(to_dict, st.integers(0, 3), pairs)
        | st.builds(deep, st.integers(60, 10_000), children, st.booleans())
    )


hostile_values = st.recursive(hostile_scalars, hostile_containers, max_leaves=10)


@st.composite
def hostile_records(draw: st.DrawFn) -> Any:
    """A record: known keys and unknown keys, each with a value that may be hostile."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(hostile_values)
    good = draw(rest_records(nulls=True, extra_keys=True, odd_spellings=True))
    items = list(good.items())
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(REST_KEYS) | hostile_keys)
        items.append((key, draw(hostile_values)))
    items = draw(st.permutations(items))
    record: dict[Any, Any] = {}
    for key, value in items:
        try:
            record[key] = value
        except Exception:  # an unhashable key, or one whose hash fails: leave it out
            continue
    wrap = [dict, RaisingItemsDict, RaisingGetDict, lambda d: LyingMapping(list(d.items()))]
    return wrap[draw(st.sampled_from([0, 0, 0, 1, 2, 3]))](record)


@settings(max_examples=400, deadline=None)
@given(hostile_records(), st.booleans())
def test_hostile_input_raises_only_rest_decode_error_in_one_bounded_line(data: Any, strict: bool) -> None:
    try:
        msg = from_rest(data, strict=strict)
    except RestDecodeError as error:
        assert_one_bounded_line(error)
        return
    # What was accepted is a message that to_rest writes and from_rest reads back.
    assert isinstance(msg, ProtectionShellInfo)
    assert from_rest(to_rest(through_the_wire(msg))) == msg


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"x": 10**5000}, id="huge-int-unknown-key"),
        pytest.param({"jobRunId": 10**5000}, id="huge-int-known-key"),
        pytest.param({"status": -(10**5000)}, id="huge-int-enum"),
        pytest.param({"x": deep(10_000, 1, False)}, id="deep-10000-lists"),
        pytest.param({"x": deep(10_000, 1, True)}, id="deep-10000-objects"),
        pytest.param({"x": cyclic(0)}, id="cycle-list"),
        pytest.param({"x": cyclic(1)}, id="cycle-dict"),
        pytest.param({"x": cyclic(2)}, id="cycle-through-tuple"),
        pytest.param({"x": float("nan")}, id="nan"),
        pytest.param({"error": "\ud800"}, id="surrogate-known"),
        pytest.param({"\ud800\n": 1}, id="surrogate-key"),
        pytest.param({"x": "y" * 10**6 + "\ud800"}, id="long-string-surrogate-at-end"),
        pytest.param({"startTimeHhmm": "\n" * 10**6}, id="long-bad-hhmm"),
        pytest.param({"k\n" * 10**5: float("inf")}, id="long-key-with-newlines"),
        pytest.param({10**5000: 1}, id="huge-int-key"),
        pytest.param({RaisingEq("status"): 1}, id="key-with-raising-eq"),
        pytest.param(RaisingItemsDict(x=1), id="items-raises"),
        pytest.param(RaisingGetDict(x=1), id="get-raises"),
        pytest.param(LyingMapping([("x", 1)]), id="duplicate-key-from-mapping"),
        pytest.param({"x": RaisingIterList([1])}, id="iter-raises"),
        pytest.param({"x": Weird()}, id="type-name-with-newline"),
        pytest.param(Weird(), id="record-of-odd-type"),
    ],
)
def test_each_class_of_hostile_input(data: Any) -> None:
    with pytest.raises(RestDecodeError) as info:
        from_rest(data)
    assert_one_bounded_line(info.value)


# --- enum numbers without a spelling (shared decision 2) ---------------------------------------

int32s = st.integers(-(2**31), 2**31 - 1)


@SETTINGS
@given(status=int32s, run_type=int32s)
def test_enum_numbers_survive_binary_to_rest_and_back(status: int, run_type: int) -> None:
    msg = ProtectionShellInfo(job_run_id=1, status=status, run_type=run_type)  # type: ignore[arg-type]
    msg = through_the_wire(msg)
    rest = to_rest(msg)
    status_names = rest_names(RunStatus.DESCRIPTOR)
    run_type_names = rest_names(RunType.DESCRIPTOR)
    # Written as the spelling when there is one, else as the JSON integer; 0 reads as unset.
    assert rest.get("status") == (status_names.get(status, status) if status else None)
    assert rest.get("runType") == (run_type_names.get(run_type, run_type) if run_type else None)
    back = from_rest(rest)
    assert back.status == status
    assert back.run_type == run_type
    assert back.HasField("status") == bool(status)
    # Strict mode refuses exactly the numbers without a spelling.
    without_spelling = {
        k
        for k, n, names in (("status", status, status_names), ("runType", run_type, run_type_names))
        if n and n not in names
    }
    if without_spelling:
        with pytest.raises(RestDecodeError) as info:
            from_rest(rest, strict=True)
        assert info.value.field in without_spelling
    else:
        assert from_rest(rest, strict=True) == back
    # A JSON integer is read as the number whether or not it has a spelling.
    assert from_rest({"status": status}).status == status
