"""Example-based tests of shellinfo_grpc.rest: schema tables, presence, errors, golden vectors.

The property-based counterparts live in test_rest_properties.py; the official
SDK peer in test_sdk_interop.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
from json_oracle import canonical_text, value_key
from samples import COMPLETED

from shellinfo_grpc import (
    REST_KEYS,
    ProtectionShellInfo,
    RestDecodeError,
    RunStatus,
    RunType,
    ShellInfoError,
    from_rest,
    from_sdk,
    to_rest,
)
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc.rest import rest_names

GOLDEN = Path(__file__).parent / "golden" / "vectors.json"

# The contract as the issue states it (not derived from the code under test).
RUN_TYPES = ["kRegular", "kFull", "kLog", "kSystem"]
STATUSES = [
    "kAccepted",
    "kRunning",
    "kCanceling",
    "kCanceled",
    "kSuccess",
    "kFailure",
    "kWarning",
    "kOnHold",
    "kMissed",
    "kFinalizing",
]
INT_KEYS = ["jobRunId", "startTimeUsecs", "endTimeUsecs"]
TEXT_KEYS = ["error", "startTimeHhmm", "endTimeHhmm"]
ENUM_KEYS = ["runType", "status"]
HHMM_KEYS = ["startTimeHhmm", "endTimeHhmm"]
EXPECTED_REST_KEYS = (
    "jobRunId",
    "startTimeUsecs",
    "endTimeUsecs",
    "runType",
    "status",
    "error",
    "startTimeHhmm",
    "endTimeHhmm",
)
# REST key -> proto field name, for HasField.
ATTR = {
    "jobRunId": "job_run_id",
    "startTimeUsecs": "start_time_usecs",
    "endTimeUsecs": "end_time_usecs",
    "runType": "run_type",
    "status": "status",
    "error": "error",
    "startTimeHhmm": "start_time_hhmm",
    "endTimeHhmm": "end_time_hhmm",
}
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def roundtrip(data: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """REST -> message -> bytes -> message -> REST."""
    wire = from_rest(data).SerializeToString(deterministic=True)
    return to_rest(ProtectionShellInfo.FromString(wire), **kw)


# --- the schema declares the REST spellings -----------------------------------


def test_run_type_rest_spellings_come_from_the_schema() -> None:
    assert rest_names(RunType.DESCRIPTOR) == {i + 1: name for i, name in enumerate(RUN_TYPES)}


def test_run_status_rest_spellings_come_from_the_schema() -> None:
    names = rest_names(RunStatus.DESCRIPTOR)
    assert names == {i + 1: name for i, name in enumerate(STATUSES)}
    assert len(names) == 10
    assert "kFinalizing" in names.values()


@pytest.mark.parametrize("enum", [RunType, RunStatus], ids=lambda e: e.DESCRIPTOR.name)
def test_every_nonzero_enum_value_has_a_rest_name_and_zero_is_unspecified(enum: Any) -> None:
    for value in enum.DESCRIPTOR.values:
        has_option = value.GetOptions().HasExtension(pb.rest_name)
        if value.number == 0:
            assert value.name.endswith("_UNSPECIFIED")
            assert not has_option
        else:
            assert has_option, value.name
            assert value.GetOptions().Extensions[pb.rest_name].startswith("k")


def test_rest_keys_are_the_eight_keys_in_schema_order() -> None:
    assert REST_KEYS == EXPECTED_REST_KEYS


# --- round trip, types, order ---------------------------------------------------


def test_completed_run_round_trips(same_json: Any) -> None:
    assert same_json(roundtrip(COMPLETED), COMPLETED)


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", [INT64_MAX, INT64_MIN, -1, 0, 1, 2**53 + 1])
def test_int64_range_is_accepted_and_comes_back_as_int(key: str, value: int) -> None:
    out = roundtrip({key: value})
    assert out == {key: value}
    assert type(out[key]) is int


@pytest.mark.parametrize("name", RUN_TYPES)
def test_every_run_type_round_trips(name: str) -> None:
    msg = from_rest({"runType": name})
    assert msg.run_type == RUN_TYPES.index(name) + 1
    assert not msg.HasField("unrecognized")
    assert roundtrip({"runType": name}) == {"runType": name}


@pytest.mark.parametrize("name", STATUSES)
def test_every_status_round_trips(name: str) -> None:
    msg = from_rest({"status": name})
    assert msg.status == STATUSES.index(name) + 1
    assert not msg.HasField("unrecognized")
    assert roundtrip({"status": name}) == {"status": name}


def test_to_rest_writes_known_keys_in_schema_order_then_unknown_keys_in_received_order() -> None:
    data = {"zeta": 1, "status": "kFailure", "alpha": 2, "jobRunId": 3, "error": "x", "mid": 3}
    out = roundtrip(data)
    assert list(out) == ["jobRunId", "status", "error", "zeta", "alpha", "mid"]


def test_include_nulls_writes_every_known_key() -> None:
    out = to_rest(from_rest({"status": "kRunning"}), include_nulls=True)
    assert list(out) == list(EXPECTED_REST_KEYS)
    assert out == dict.fromkeys(EXPECTED_REST_KEYS) | {"status": "kRunning"}


def test_include_nulls_keeps_unknown_spellings_and_keys() -> None:
    out = roundtrip({"status": "kNew", "foo": [1]}, include_nulls=True)
    assert list(out) == [*EXPECTED_REST_KEYS, "foo"]
    assert out == dict.fromkeys(EXPECTED_REST_KEYS) | {"status": "kNew", "foo": [1]}


@pytest.mark.parametrize("mapping", [OrderedDict, types.MappingProxyType], ids=["OrderedDict", "MappingProxyType"])
def test_any_mapping_is_accepted(mapping: Any) -> None:
    data = {**COMPLETED, "extra": {"a": 1}}
    assert from_rest(mapping(data)) == from_rest(data)


# --- explicit presence -------------------------------------------------------------

# For each key: a "zero" value (0, "" or the smallest legal value) and another one.
PRESENCE = [
    ("jobRunId", 0, 7),
    ("startTimeUsecs", 0, 1700000000000000),
    ("endTimeUsecs", 0, -5),
    ("error", "", "boom"),
    ("startTimeHhmm", "00:00", "13:37"),
    ("endTimeHhmm", "00:00", "23:59"),
    ("runType", "kRegular", "kSystem"),
    ("status", "kAccepted", "kFinalizing"),
]


@pytest.mark.parametrize(("key", "zero", "other"), PRESENCE, ids=[p[0] for p in PRESENCE])
def test_absent_zero_and_value_are_distinct(key: str, zero: Any, other: Any) -> None:
    attr = ATTR[key]
    absent, null, with_zero, with_other = (
        from_rest({}),
        from_rest({key: None}),
        from_rest({key: zero}),
        from_rest({key: other}),
    )
    assert not absent.HasField(attr)
    assert not null.HasField(attr)
    assert with_zero.HasField(attr)
    assert with_other.HasField(attr)
    # null and absent are the same message, byte for byte; zero is not.
    assert null == absent
    assert null.SerializeToString() == b""
    assert with_zero.SerializeToString() != b""
    assert with_zero != absent
    assert with_zero != with_other
    # Presence survives the wire.
    assert ProtectionShellInfo.FromString(with_zero.SerializeToString()).HasField(attr)
    assert roundtrip({}) == {}
    assert roundtrip({key: None}) == {}
    assert roundtrip({key: zero}) == {key: zero}
    assert roundtrip({key: other}) == {key: other}


def test_null_and_absent_mean_unset_for_every_key_at_once() -> None:
    nulls = dict.fromkeys(EXPECTED_REST_KEYS)
    assert from_rest(nulls) == ProtectionShellInfo()
    assert from_rest(nulls, strict=True) == ProtectionShellInfo()
    assert to_rest(from_rest(nulls)) == {}


def test_explicit_unspecified_enum_reads_as_unset() -> None:
    msg = ProtectionShellInfo(run_type=RunType.RUN_TYPE_UNSPECIFIED, status=RunStatus.RUN_STATUS_UNSPECIFIED)
    assert msg.HasField("status")
    assert to_rest(msg) == {}
    assert to_rest(msg, include_nulls=True) == dict.fromkeys(EXPECTED_REST_KEYS)


def test_enum_number_without_rest_spelling_is_written_as_the_number() -> None:
    # A newer producer's value that reached us in binary: kept, as json_format does.
    msg = ProtectionShellInfo.FromString(bytes([0x28, 99, 0x20, 42]))
    assert to_rest(msg) == {"runType": 42, "status": 99}


# Per field: the values that take different ways through to_rest (absent; set
# to the zero value, which only HasField tells from absent; set to another
# value; for enums also a number without a spelling). Raw proto values.
PRESENCE_CASES: dict[str, tuple[Any, ...]] = {
    "job_run_id": (None, 0, 48213),
    "start_time_usecs": (None, 0, -1),
    "end_time_usecs": (None, 0, 1795791612654321),
    "run_type": (None, 0, 1, 42),
    "status": (None, 0, 2, 99),
    "error": (None, "", "boom"),
    "start_time_hhmm": (None, "", "14:00"),
    "end_time_hhmm": (None, "", "15:00"),
}


def expected_rest(values: dict[str, Any], include_nulls: bool) -> dict[str, Any]:
    """The REST form of a message with these proto values, written from the contract alone."""
    out: dict[str, Any] = {}
    for key in EXPECTED_REST_KEYS:
        value = values.get(ATTR[key])
        if key in ENUM_KEYS and value is not None:
            names = RUN_TYPES if key == "runType" else STATUSES
            value = None if value == 0 else names[value - 1] if value <= len(names) else value
        if value is not None or include_nulls:
            out[key] = value
    return out


def test_to_rest_for_every_presence_pattern() -> None:
    # Every combination of the cases above (15,552 messages), with and without
    # include_nulls and an unknown key: every branch of the generated fast path
    # and of the general path, each checked against the contract.
    import itertools

    names = list(PRESENCE_CASES)
    for n, combo in enumerate(itertools.product(*PRESENCE_CASES.values())):
        values = {name: value for name, value in zip(names, combo, strict=True) if value is not None}
        msg = ProtectionShellInfo(**values)
        for include_nulls in (False, True):
            expected = expected_rest(values, include_nulls)
            got = to_rest(msg, include_nulls=include_nulls)
            assert got == expected, values
            assert list(got) == list(expected), values
        if n % 5 == 0:  # an unknown key comes after the known ones, on every path
            msg.unrecognized.extra_keys.add(key="zone", json_value='"CET"')
            got = to_rest(msg)
            assert got == {**expected_rest(values, False), "zone": "CET"}, values
            assert list(got)[-1] == "zone"


# --- forward compatibility ----------------------------------------------------------


def test_unknown_keys_and_spellings_survive_the_wire(same_json: Any) -> None:
    data = {
        "status": "kReplicating",
        "runType": "kHyperFull",
        "jobRunId": 1,
        "nested": {"b": [1, 2.5, {"c": None}], "a": True},
        "exponentSmall": 1e-07,
        "huge": 2**64 + 5,
        "hugeNegative": -(2**70),
        "beyondDouble": 2**53 + 1,
        "float": 0.1,
        "exponent": 1e300,
        "floatOne": 1.0,
        "text": "Zürich ✓ 😀 \x00 \u2028",
        "bool": False,
        "null": None,
        "emptyObject": {},
        "emptyArray": [],
        "": "empty key",
        "unrecognized": "a key that looks like the field name",
    }
    msg = from_rest(data)
    assert not msg.HasField("status")
    assert not msg.HasField("run_type")
    assert msg.unrecognized.status == "kReplicating"
    assert msg.unrecognized.run_type == "kHyperFull"
    back = roundtrip(data)
    assert {k: value_key(v) for k, v in back.items()} == {k: value_key(v) for k, v in data.items()}
    # And the order of the unknown keys is kept.
    assert [k for k in back if k not in EXPECTED_REST_KEYS] == [k for k in data if k not in REST_KEYS]
    # Each value is stored in canonical form (shared decision 1), spelled out here.
    stored = {extra.key: extra.json_value for extra in msg.unrecognized.extra_keys}
    assert stored["nested"] == '{"a":true,"b":[1,2.5,{"c":null}]}'
    assert stored["exponentSmall"] == "1e-7"
    assert stored["exponent"] == "1e+300"
    assert stored["floatOne"] == "1"
    assert stored["huge"] == "18446744073709551621"
    assert stored["text"] == '"Zürich ✓ 😀 \\u0000 \u2028"'
    assert stored == {k: canonical_text(v) for k, v in data.items() if k not in REST_KEYS}


def test_unknown_spelling_that_differs_only_in_case_is_kept_verbatim() -> None:
    msg = from_rest({"status": "ksuccess", "runType": "RUN_TYPE_FULL"})
    assert not msg.HasField("status")
    assert roundtrip({"status": "ksuccess", "runType": "RUN_TYPE_FULL"}) == {
        "status": "ksuccess",
        "runType": "RUN_TYPE_FULL",
    }


def test_empty_string_enum_spelling_is_kept() -> None:
    assert roundtrip({"status": ""}) == {"status": ""}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"timezone": "UTC"}, "timezone"),
        ({"jobRunId": 1, "timezone": None}, "timezone"),
        ({"status": "kReplicating"}, "status"),
        ({"runType": "kHyperFull"}, "runType"),
        ({"status": "ksuccess"}, "status"),
    ],
)
def test_strict_rejects_what_the_schema_does_not_know(data: dict[str, Any], field: str) -> None:
    with pytest.raises(RestDecodeError) as info:
        from_rest(data, strict=True)
    assert info.value.field == field
    assert field in str(info.value)
    from_rest(data)  # and the lenient default keeps it


def test_strict_accepts_every_known_value() -> None:
    assert from_rest(COMPLETED, strict=True) == from_rest(COMPLETED)


# --- bad input ------------------------------------------------------------------------

NOT_JSON = object()


def _bad_cases() -> list[Any]:
    cases: list[Any] = []

    def case(data: Any, field: str | None, name: str, *, strict: bool = False) -> None:
        cases.append(pytest.param(data, field, strict, id=name))

    for data in [[], [("jobRunId", 1)], "jobRunId", 1, None, 1.5, b"{}", ("jobRunId",)]:
        case(data, None, f"record-{type(data).__name__}-{data!r}")
    for key in INT_KEYS:
        for value in [True, False, 1.0, 1.5, float("nan"), "1", "", [1], {"v": 1}, b"1"]:
            case({key: value}, key, f"{key}-{value!r}")
        case({key: INT64_MAX + 1}, key, f"{key}-2**63")
        case({key: INT64_MIN - 1}, key, f"{key}-(-2**63-1)")
        case({key: 2**64}, key, f"{key}-2**64")
    for key in TEXT_KEYS:
        for value in [1, 0, 1.5, True, [], ["kSuccess"], {}, b"kSuccess"]:
            case({key: value}, key, f"{key}-{value!r}")
    for key in ENUM_KEYS:  # integers within int32 are enum numbers (shared decision 2)
        for i, value in enumerate([1.5, 1.0, True, [], ["kSuccess"], {}, b"kSuccess", 2**31, -(2**31) - 1, 10**5000]):
            case({key: value}, key, f"{key}-{type(value).__name__}-{i}")
        for value in [0, 99, -1, 2**31 - 1]:
            case({key: value}, key, f"{key}-{value}-strict", strict=True)
    for key in HHMM_KEYS:
        for value in [
            "24:00",
            "9:05",
            "09:60",
            "0905",
            "",
            " 09:05",
            "09:05 ",
            "09:05:00",
            "ab:cd",
            "09:05\n",
            "\u0660\u0669:\u0660\u0665",  # Arabic-Indic digits
            "-1:00",
            "09.05",
        ]:
            case({key: value}, key, f"{key}-{value!r}")
    # Lone surrogates: not Unicode, cannot be UTF-8 on the wire.
    case({"error": "\ud800"}, "error", "error-lone-surrogate")
    case({"error": "ok \udfff ok"}, "error", "error-lone-low-surrogate")
    case({"status": "k\ud800"}, "status", "status-lone-surrogate")
    case({"runType": "\udc00"}, "runType", "runType-lone-surrogate")
    case({"startTimeHhmm": "\ud800"}, "startTimeHhmm", "startTimeHhmm-lone-surrogate")
    case({"\ud800": 1}, "\\ud800", "unknown-key-lone-surrogate")
    # Values of unknown keys must be JSON.
    case({"x": {1, 2}}, "x", "unknown-value-set")
    case({"x": float("nan")}, "x", "unknown-value-nan")
    case({"x": float("inf")}, "x", "unknown-value-infinity")
    case({"x": -float("inf")}, "x", "unknown-value-minus-infinity")
    case({"x": [1, {"y": float("nan")}]}, "x", "unknown-value-nested-nan")
    case({"x": {"y": frozenset()}}, "x", "unknown-value-nested-frozenset")
    case({"x": b"bytes"}, "x", "unknown-value-bytes")
    case({"x": NOT_JSON}, "x", "unknown-value-object")
    case({"jobRunId": 1, "x": 1j}, "x", "unknown-value-complex-after-known")
    # Non-string keys: the field is the key's repr.
    for key in [1, None, 1.5, ("a",), b"jobRunId", True]:
        case({"jobRunId": 1, key: 1}, repr(key), f"non-string-key-{key!r}")
        case({key: 1}, repr(key), f"non-string-key-{key!r}-strict", strict=True)
    # A bad known value is reported even when unknown keys are present.
    case({"x": 1, "jobRunId": "1"}, "jobRunId", "bad-known-with-unknown")
    return cases


@pytest.mark.parametrize(("data", "field", "strict"), _bad_cases())
def test_bad_input_names_the_field(data: Any, field: str | None, strict: bool) -> None:
    with pytest.raises(RestDecodeError) as info:
        from_rest(data, strict=strict)
    error = info.value
    assert isinstance(error, ValueError)
    assert isinstance(error, ShellInfoError)
    assert error.field == field
    assert error.reason
    if field is not None:
        assert str(error).startswith(f"{field}: ")


# Non-JSON values that json.dumps does not refuse but silently rewrites (int
# keys become strings and may collide; a lone surrogate becomes a "\udXXX"
# escape that no other JSON reader accepts as text): the round trip could not
# give them back, so they must be refused like a set or NaN is.
LOSSY_UNKNOWN_VALUES = [
    pytest.param({"x": {1: "a", "1": "b"}}, id="nested-int-key-collides"),
    pytest.param({"x": {1: 2}}, id="nested-int-key"),
    pytest.param({"x": {None: 2}}, id="nested-none-key"),
    pytest.param({"x": [{True: 2}]}, id="nested-bool-key"),
    pytest.param({"x": "\ud800"}, id="lone-surrogate-value"),
    pytest.param({"x": ["ok", "\udfff"]}, id="nested-lone-surrogate-value"),
    pytest.param({"x": {"\ud800": 1}}, id="nested-lone-surrogate-key"),
]


@pytest.mark.parametrize("data", LOSSY_UNKNOWN_VALUES)
def test_unknown_value_that_is_not_json_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(RestDecodeError) as info:
        from_rest(data)
    assert info.value.field == "x"


@pytest.mark.parametrize(("key", "value"), [(k, v) for k in INT_KEYS for v in (INT64_MAX, INT64_MIN)])
def test_int64_bounds_are_good(key: str, value: int) -> None:
    assert from_rest({key: value}).HasField(ATTR[key])


@pytest.mark.parametrize("value", [f"{h:02d}:{m:02d}" for h in (0, 9, 23) for m in (0, 5, 59)])
@pytest.mark.parametrize("key", HHMM_KEYS)
def test_valid_hhmm_is_accepted(key: str, value: str) -> None:
    assert roundtrip({key: value}) == {key: value}


# --- from_sdk without the SDK -----------------------------------------------------


def test_from_sdk_refuses_an_object_that_is_not_a_model() -> None:
    with pytest.raises(RestDecodeError) as info:
        from_sdk(object())
    assert info.value.field is None


def test_from_sdk_reads_any_object_of_the_model_shape() -> None:
    class Model:
        def __init__(self) -> None:
            self._names = {"job_run_id": "jobRunId", "status": "status", "error": "error"}
            self.job_run_id = 5
            self.status = "kMissed"
            self.error = None

    assert from_sdk(Model()) == from_rest({"jobRunId": 5, "status": "kMissed"})


# --- golden vectors -------------------------------------------------------------------
#
# tests/golden/vectors.json was generated once from from_rest() and is never
# regenerated to make a test pass: a change in these bytes is a wire-format
# change. To see that it was not just self-recorded, here is the
# "completed-run" vector decoded by hand, tag by tag (tag = field << 3 | wire
# type; wire type 0 = varint, 2 = length-delimited):
#
#   08                        field 1 jobRunId, varint
#   92 c2 02                  41234 = 0x12 + (0x42 << 7) + (0x02 << 14)
#   10                        field 2 startTimeUsecs, varint
#   c0 c4 80 c1 c1 c4 82 03   1700000000123456, 7 bits per byte, low first
#   18                        field 3 endTimeUsecs, varint
#   f1 cb f5 ec c2 c4 82 03   1700000360654321
#   20 01                     field 4 runType = 1 (RUN_TYPE_REGULAR, "kRegular")
#   28 05                     field 5 status = 5 (RUN_STATUS_SUCCESS, "kSuccess")
#   3a 05 32 32 3a 31 33      field 7 startTimeHhmm, 5 bytes "22:13"
#   42 05 32 32 3a 31 39      field 8 endTimeHhmm, 5 bytes "22:19"
#
# (field 6, error, is unset and so absent). "zero-values" shows presence on the
# wire: 08 00 10 00 18 00 32 00 = fields 1, 2, 3 set to 0 and field 6 set to
# "" (length 0); an unset field writes nothing at all. "int64-extremes" shows
# -2**63 as the 10-byte varint 80 80 80 80 80 80 80 80 80 01 (two's
# complement, as int64 is always written). test_golden_vectors_match_a_hand_encoder
# re-derives every vector with the small independent encoder below.


def _golden() -> list[dict[str, Any]]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def _golden_params() -> list[Any]:
    return [pytest.param(case["rest"], case["hex"], id=case["name"]) for case in _golden()]


def test_golden_file_covers_what_it_must() -> None:
    cases = _golden()
    names = [case["name"] for case in cases]
    assert len(names) == len(set(names))
    runs = [case["rest"] for case in cases]
    assert {r["runType"] for r in runs if "runType" in r} >= set(RUN_TYPES)
    assert {r["status"] for r in runs if "status" in r} >= set(STATUSES)
    assert any(r.get("status") not in (None, *STATUSES) for r in runs)
    assert any(set(r) - set(REST_KEYS) for r in runs)
    assert any(r.get("jobRunId") == INT64_MIN for r in runs)
    assert any(r.get("jobRunId") == 0 and r.get("error") == "" for r in runs)
    assert any(r.get("status") == "kRunning" and "endTimeUsecs" not in r for r in runs)
    assert any(r.get("status") == "kFailure" and r.get("error") for r in runs)


@pytest.mark.parametrize(("rest", "hexbytes"), _golden_params())
def test_golden_vector_encodes_to_the_recorded_bytes(rest: dict[str, Any], hexbytes: str) -> None:
    assert from_rest(rest).SerializeToString(deterministic=True).hex() == hexbytes
    assert from_rest(rest).SerializeToString().hex() == hexbytes


@pytest.mark.parametrize(("rest", "hexbytes"), _golden_params())
def test_golden_vector_decodes_to_the_recorded_rest(rest: dict[str, Any], hexbytes: str, same_json: Any) -> None:
    back = to_rest(ProtectionShellInfo.FromString(bytes.fromhex(hexbytes)))
    known = [k for k in rest if k in REST_KEYS]
    assert same_json({k: back[k] for k in known if k in back}, {k: rest[k] for k in known})
    # Unknown keys come back as the same JSON values (canonical form: objects
    # sorted, numbers in ECMAScript form), in the order received.
    assert {k: value_key(v) for k, v in back.items()} == {k: value_key(v) for k, v in rest.items()}
    assert [k for k in back if k not in REST_KEYS] == [k for k in rest if k not in REST_KEYS]


def _varint(number: int) -> bytes:
    number &= 2**64 - 1  # int64 on the wire: two's complement, 64 bits
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: int | bytes) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3 | 0) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _hand_encode(rest: dict[str, Any]) -> bytes:
    """Encode a REST record from the .proto file alone, in field-number order."""
    numbers = {key: i + 1 for i, key in enumerate(EXPECTED_REST_KEYS)}
    out = b""
    unknown_spellings: dict[str, str] = {}
    for key in EXPECTED_REST_KEYS:
        value = rest.get(key)
        if value is None:
            continue
        if key in ENUM_KEYS and value not in (RUN_TYPES if key == "runType" else STATUSES):
            unknown_spellings[key] = value
        elif key == "runType":
            out += _field(numbers[key], RUN_TYPES.index(value) + 1)
        elif key == "status":
            out += _field(numbers[key], STATUSES.index(value) + 1)
        elif isinstance(value, int):
            out += _field(numbers[key], value)
        else:
            out += _field(numbers[key], value.encode("utf-8"))
    # UnrecognizedRest (field 15): run_type = 1, status = 2, extra_keys = 3
    # (ExtraRestKey: key = 1, json_value = 2, compact JSON text).
    inner = b""
    if "runType" in unknown_spellings:
        inner += _field(1, unknown_spellings["runType"].encode("utf-8"))
    if "status" in unknown_spellings:
        inner += _field(2, unknown_spellings["status"].encode("utf-8"))
    for key, value in rest.items():
        if key not in EXPECTED_REST_KEYS:
            text = canonical_text(value)
            inner += _field(3, _field(1, key.encode("utf-8")) + _field(2, text.encode("utf-8")))
    if unknown_spellings or inner:
        out += _field(15, inner)
    return out


@pytest.mark.parametrize(("rest", "hexbytes"), _golden_params())
def test_golden_vectors_match_a_hand_encoder(rest: dict[str, Any], hexbytes: str) -> None:
    assert _hand_encode(rest).hex() == hexbytes


def test_hand_encoder_agrees_with_the_comment_above() -> None:
    # The numbers the comment quotes, checked so the comment cannot rot.
    assert _varint(41234) == bytes.fromhex("92c202")
    assert _varint(1700000000123456) == bytes.fromhex("c0c480c1c1c48203")
    assert _varint(-(2**63)) == bytes.fromhex("80808080808080808001")


# --- import hygiene ------------------------------------------------------------------


def test_codec_does_not_import_grpc(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        import shellinfo_grpc
        from shellinfo_grpc import from_rest, from_sdk, to_rest
        msg = from_rest({"jobRunId": 1, "status": "kSuccess", "x": [1]})
        assert to_rest(msg) == {"jobRunId": 1, "status": "kSuccess", "x": [1]}
        class Model:
            _names = {"job_run_id": "jobRunId"}
            job_run_id = 2
        assert from_sdk(Model()).job_run_id == 2
        loaded = sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "grpc_")))
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- the generated code is inspectable (issue 8.6) -------------------------------------------


def test_show_source_prints_the_code_that_runs() -> None:
    import shellinfo_grpc.rest as rest_module

    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "shellinfo_grpc", "--show-source"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "def from_rest(data, *, strict=False):" in out
    assert "def to_rest(msg, *, include_nulls=False):" in out
    # Every REST key has its block in both functions.
    for key in EXPECTED_REST_KEYS:
        assert f"get({key!r})" in out
        assert f"out[{key!r}]" in out
    # What is printed compiles to functions that behave as the package's own.
    namespace: dict[str, Any] = {}
    exec(compile(out, "<shown>", "exec"), vars(rest_module), namespace)
    data = {**COMPLETED, "status": 99, "x": {"b": 1e-07, "a": 1}}
    assert namespace["from_rest"](data) == from_rest(data)
    assert namespace["to_rest"](from_rest(data)) == to_rest(from_rest(data))


def test_module_docstring_example_is_the_generated_code() -> None:
    # The expanded example in the module docstring is cut from the generated
    # source (at any indentation), so it cannot drift from what runs.
    import shellinfo_grpc.rest as rest_module

    doc = rest_module.__doc__ or ""
    blocks = doc.split("::\n\n")[1:]
    assert len(blocks) == 2
    sources = [rest_module._FROM_REST_SOURCE, rest_module._TO_REST_SOURCE]
    for block, source in zip(blocks, sources, strict=True):
        example = textwrap.dedent(block.split("\n\n")[0])
        for part in example.split("...\n"):
            lines = part.strip("\n").splitlines()
            assert len(lines) >= 5
            assert any("\n".join(" " * shift + line for line in lines) in source for shift in range(0, 17, 4)), part
