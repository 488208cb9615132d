"""Tests of shellinfo_grpc.rules: what the service stores is always readable (issue 7.1),
is_final agrees with to_rest, and runs are compared by JSON value (issue 10.2).

The central property: for any message, including hostile ``unrecognized``
parts and fields from a newer schema, ``check_run`` accepts it exactly when
``to_rest`` can write it and ``from_rest`` reads back the same message (with
``json_value`` texts compared in canonical form), and the run has a
``jobRunId`` and no end before its start.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_oracle import canonical_text

from shellinfo_grpc import REST_KEYS, ProtectionShellInfo, RestDecodeError, RunRejected, from_rest, to_rest
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc.rest import rest_names
from shellinfo_grpc.rules import check_run, check_storable, check_update, is_final, same_run

SETTINGS = settings(max_examples=400, deadline=None)

RUN_TYPES = rest_names(pb.RunType.DESCRIPTOR)
STATUSES = rest_names(pb.RunStatus.DESCRIPTOR)
# The final statuses as the service contract states them (README, proto comment).
FINAL_SPELLINGS = {"kSuccess", "kFailure", "kWarning", "kCanceled", "kMissed"}

# --- generated messages, hostile unrecognized parts included -----------------------------

int64s = st.integers(-(2**63), 2**63 - 1)
hhmm_texts = st.sampled_from(["00:00", "23:59", "12:30"]) | st.sampled_from(["24:00", "9:05", "", "ab:cd", "12:30 "])
enum_numbers = st.integers(-3, 12) | st.sampled_from([2**31 - 1, -(2**31)])
spellings = st.sampled_from([*RUN_TYPES.values(), *STATUSES.values()]) | st.text(max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=8,
)
valid_json_texts = st.builds(
    lambda v, indent, sort: json.dumps(v, indent=indent, sort_keys=sort, ensure_ascii=False),
    json_values,
    st.sampled_from([None, 1]),
    st.booleans(),
) | st.sampled_from(["1e-07", "1E-7", " 1 ", "18446744073709551617", "[1.0, 2.50]", '{"b":1,"a":2}'])
invalid_json_texts = st.sampled_from(
    [
        "",
        "NaN",
        "[Infinity]",
        "[1] x",
        '{"a":1,"a":2}',
        '"\\ud800"',
        "1e400",
        "1" * 101,
        "[" * 65 + "]" * 65,
        "{'a': 1}",
        "undefined",
    ]
)
extra_keys = st.sampled_from([*REST_KEYS, "unrecognized", "x", "x", "timezone"]) | st.text(max_size=4)
# Raw fields of a newer schema version: field 16 (varint) and 100 (bytes).
unknown_field_bytes = st.sampled_from([b"\x80\x01\x01", b"\xa2\x06\x01z"])


@st.composite
def messages(draw: st.DrawFn) -> ProtectionShellInfo:
    msg = ProtectionShellInfo()
    if draw(st.integers(0, 9)):  # usually present: the rule that needs it is tested apart
        msg.job_run_id = draw(int64s)
    if draw(st.booleans()):
        msg.start_time_usecs = draw(int64s)
    if draw(st.booleans()):
        msg.end_time_usecs = draw(int64s)
    if draw(st.booleans()):
        msg.run_type = draw(enum_numbers)  # type: ignore[assignment]
    if draw(st.booleans()):
        msg.status = draw(enum_numbers)  # type: ignore[assignment]
    if draw(st.booleans()):
        msg.error = draw(st.text(max_size=5))
    if draw(st.booleans()):
        msg.start_time_hhmm = draw(hhmm_texts)
    if draw(st.booleans()):
        msg.end_time_hhmm = draw(hhmm_texts)
    if draw(st.booleans()):
        unrecognized = msg.unrecognized
        unrecognized.SetInParent()
        if draw(st.booleans()):
            unrecognized.status = draw(spellings)
        if draw(st.booleans()):
            unrecognized.run_type = draw(spellings)
        for _ in range(draw(st.integers(0, 3))):
            text = draw(valid_json_texts | invalid_json_texts) if draw(st.integers(0, 3)) else draw(invalid_json_texts)
            unrecognized.extra_keys.add(key=draw(extra_keys), json_value=text)
        if draw(st.integers(0, 9)) == 0:
            unrecognized.MergeFromString(draw(unknown_field_bytes))
    if draw(st.integers(0, 9)) == 0:
        msg.MergeFromString(draw(unknown_field_bytes))
    return msg


def canonical_copy(msg: ProtectionShellInfo) -> ProtectionShellInfo:
    """The message with every json_value in canonical form (by the independent oracle)."""
    out = ProtectionShellInfo()
    out.CopyFrom(msg)
    for extra in out.unrecognized.extra_keys:
        extra.json_value = canonical_text(json.loads(extra.json_value))
    return out


def round_trips(msg: ProtectionShellInfo) -> bool:
    """to_rest writes it and from_rest reads back the same message (json_value by canonical form)."""
    try:
        back = from_rest(to_rest(msg))
        return canonical_copy(back) == canonical_copy(msg)
    except (RestDecodeError, ValueError, RecursionError, AssertionError):
        # to_rest/from_rest refused, or the oracle found a json_value that is
        # not JSON (one to_rest skipped: a known or repeated key, so it was lost).
        return False


def accepted(msg: ProtectionShellInfo) -> RunRejected | None:
    try:
        check_run(msg)
    except RunRejected as error:
        return error
    return None


@SETTINGS
@given(messages())
def test_check_run_accepts_exactly_what_rest_reads_back(msg: ProtectionShellInfo) -> None:
    other_rules_ok = msg.HasField("job_run_id") and not (
        msg.HasField("start_time_usecs")
        and msg.HasField("end_time_usecs")
        and msg.end_time_usecs < msg.start_time_usecs
    )
    error = accepted(msg)
    assert (error is None) == (other_rules_ok and round_trips(msg)), error
    if error is not None:
        assert error.code == "INVALID_ARGUMENT"
        assert error.reason == "INVALID_RUN"
        assert error.violations
        for field, text in error.violations:
            assert field
            assert text
        assert error.message.isprintable()


@SETTINGS
@given(messages())
def test_is_final_exactly_when_to_rest_shows_a_final_status(msg: ProtectionShellInfo) -> None:
    del msg.unrecognized.extra_keys[:]  # to_rest may refuse a bad json_value; status does not depend on it
    assert is_final(msg) == (to_rest(msg).get("status") in FINAL_SPELLINGS)


# --- each violation names the REST key --------------------------------------------------


def _violations(msg: ProtectionShellInfo) -> dict[str, str]:
    with pytest.raises(RunRejected) as info:
        check_storable(msg)
    assert info.value.code == "INVALID_ARGUMENT"
    return dict(info.value.violations)


def _with_extras(*pairs: tuple[str, str], **fields: Any) -> ProtectionShellInfo:
    msg = ProtectionShellInfo(job_run_id=1, **fields)
    msg.unrecognized.SetInParent()
    for key, text in pairs:
        msg.unrecognized.extra_keys.add(key=key, json_value=text)
    return msg


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        pytest.param(_with_extras(("timezone", "NaN")), "timezone", id="nan"),
        pytest.param(_with_extras(("x", "[1] 2")), "x", id="trailing-data"),
        pytest.param(_with_extras(("x", "")), "x", id="empty-text"),
        pytest.param(_with_extras(("x", "[" * 65 + "]" * 65)), "x", id="too-deep"),
        pytest.param(_with_extras(("x", "9" * 101)), "x", id="number-too-long"),
        pytest.param(_with_extras(("x", '{"a":1,"a":1}')), "x", id="duplicate-member"),
        pytest.param(_with_extras(("status", '"kSuccess"')), "status", id="extra-key-is-a-known-key"),
        pytest.param(_with_extras(("x", "1"), ("x", "2")), "x", id="extra-key-twice"),
        pytest.param(_with_extras(("a\nb", "NaN")), "a\\nb", id="key-with-newline-escaped"),
        pytest.param(_with_extras(), "unrecognized", id="empty-unrecognized"),
        pytest.param(ProtectionShellInfo(job_run_id=1, status=0), "status", id="explicit-unspecified-status"),
        pytest.param(ProtectionShellInfo(job_run_id=1, run_type=0), "runType", id="explicit-unspecified-run-type"),
        pytest.param(ProtectionShellInfo(job_run_id=1, start_time_hhmm="24:00"), "startTimeHhmm", id="bad-hhmm"),
        pytest.param(ProtectionShellInfo(job_run_id=1, end_time_hhmm="9:05"), "endTimeHhmm", id="bad-end-hhmm"),
    ],
)
def test_violation_names_the_rest_key(msg: ProtectionShellInfo, field: str) -> None:
    assert field in _violations(msg)


def test_unrecognized_spelling_only_where_the_enum_is_unset_and_only_unknown() -> None:
    both = ProtectionShellInfo(job_run_id=1, status=pb.RUN_STATUS_RUNNING)
    both.unrecognized.status = "kReplicating"
    assert "status" in _violations(both)
    known = ProtectionShellInfo(job_run_id=1)
    known.unrecognized.run_type = "kFull"
    assert "runType" in _violations(known)
    fine = ProtectionShellInfo(job_run_id=1)
    fine.unrecognized.status = "kReplicating"
    fine.unrecognized.run_type = "kHyperFull"
    check_run(fine)


def test_fields_of_a_newer_schema_are_refused() -> None:
    msg = ProtectionShellInfo(job_run_id=1)
    msg.MergeFromString(b"\x80\x01\x01")  # field 16, varint 1
    assert "#16" in _violations(msg)


def test_unknown_enum_numbers_are_stored_and_read_back() -> None:
    msg = ProtectionShellInfo(job_run_id=1, status=99, run_type=42)  # type: ignore[arg-type]
    check_run(msg)
    assert to_rest(msg) == {"jobRunId": 1, "runType": 42, "status": 99}
    assert from_rest(to_rest(msg)) == msg
    assert not is_final(msg)


def test_what_from_rest_builds_is_storable() -> None:
    msg = from_rest({"jobRunId": 1, "status": "kNew", "x": {"b": 1e-07, "a": [2**70]}, "y": None})
    check_run(msg)


# --- compared by JSON value (issue 10.2) ---------------------------------------------


def _run(status: str, **extras: str) -> ProtectionShellInfo:
    msg = from_rest({"jobRunId": 5, "status": status})
    for key, text in extras.items():
        msg.unrecognized.extra_keys.add(key=key, json_value=text)
    return msg


SAME_BY_VALUE = [
    pytest.param({"tiny": "1e-07"}, {"tiny": "1e-7"}, id="exponent-spelling"),
    pytest.param({"tiny": "0.0000001"}, {"tiny": "1E-7"}, id="fraction-vs-exponent"),
    pytest.param({"o": '{"b":1,"a":[1,{"d":2,"c":3}]}'}, {"o": '{"a":[1,{"c":3,"d":2}],"b":1}'}, id="object-key-order"),
    pytest.param({"o": '{ "a" : 1 }'}, {"o": '{"a":1}'}, id="whitespace"),
    pytest.param({"big": "18446744073709551617"}, {"big": "18446744073709551617"}, id="big-int"),
    pytest.param({"n": "100"}, {"n": "1e2"}, id="1e2-is-100"),
    pytest.param({"a": "1", "b": "2"}, {"b": "2", "a": "1"}, id="unknown-keys-in-another-order"),
]


@pytest.mark.parametrize(("a", "b"), SAME_BY_VALUE)
@pytest.mark.parametrize("status", ["kRunning", "kSuccess"])
def test_same_record_by_value_is_a_no_op(a: dict[str, str], b: dict[str, str], status: str) -> None:
    current, new = _run(status, **a), _run(status, **b)
    assert same_run(current, new)
    assert check_update(current, new) is False
    assert check_update(new, current) is False


DIFFERENT = [
    pytest.param({"big": "18446744073709551617"}, {"big": "18446744073709551616"}, id="big-ints-differ-by-one"),
    pytest.param({"big": "18446744073709551617"}, {"big": "1.8446744073709552e19"}, id="exact-int-vs-double"),
    pytest.param({"a": "[1,2]"}, {"a": "[2,1]"}, id="array-order"),
    pytest.param({"a": "1"}, {"b": "1"}, id="other-key"),
    pytest.param({"a": "1"}, {"a": "1", "b": "1"}, id="one-more-key"),
]


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_different_values_are_a_change(a: dict[str, str], b: dict[str, str]) -> None:
    current, new = _run("kRunning", **a), _run("kRunning", **b)
    assert not same_run(current, new)
    assert check_update(current, new) is True


def test_final_status_rule_uses_the_shown_status() -> None:
    final = _run("kSuccess", tiny="1e-07")
    assert check_update(final, _run("kSuccess", tiny="1e-7")) is False
    with pytest.raises(RunRejected) as info:
        check_update(final, _run("kRunning", tiny="1e-7"))
    assert info.value.code == "FAILED_PRECONDITION"
    assert info.value.reason == "RUN_FINAL"
    # A record stored before check_storable with the final spelling in
    # unrecognized.status shows as final, and as that status.
    legacy = ProtectionShellInfo(job_run_id=5)
    legacy.unrecognized.status = "kSuccess"
    assert is_final(legacy)
    assert check_update(legacy, from_rest({"jobRunId": 5, "status": "kSuccess", "x": 1})) is True
    with pytest.raises(RunRejected):
        check_update(legacy, from_rest({"jobRunId": 5, "status": "kFailure"}))


@SETTINGS
@given(json_values, st.booleans())
def test_python_and_another_writer_give_one_revision(value: Any, final: bool) -> None:
    # Python's from_rest writes canonical text; "another language" writes the
    # same value as json.dumps does (keys unsorted, 1e-07, spaces).
    status = "kSuccess" if final else "kRunning"
    python = from_rest({"jobRunId": 9, "status": status, "v": value})
    other = _run(status, v=json.dumps(value, separators=(", ", ": ")))
    other.job_run_id = 9
    assert check_update(python, other) is False
    assert check_update(other, python) is False


@SETTINGS
@given(messages())
def test_to_rest_of_any_message_raises_only_rest_decode_error(msg: ProtectionShellInfo) -> None:
    # A record already in a store or a file may predate check_run: writing it
    # must fail cleanly, naming the key, never with another exception.
    error: RestDecodeError | None = None
    try:
        out = to_rest(msg)
    except RestDecodeError as exc:
        error = exc
    if error is None:
        assert isinstance(out, dict)
        return
    assert error.field
    assert str(error).isprintable()
    assert len(str(error)) <= 400
