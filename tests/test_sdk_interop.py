"""shellinfo_grpc.rest against the real peer: the official Cohesity Python SDK.

``cohesity-management-sdk`` 1.16.0 (the ``test`` extra) is used as is: its
``ProtectionShellInfo.from_dictionary`` and ``APIHelper.to_dictionary`` define
what ``to_rest(..., include_nulls=True)`` must write.
"""

from __future__ import annotations

from typing import Any

import pytest
from cohesity_management_sdk.api_helper import APIHelper
from cohesity_management_sdk.models.protection_shell_info import ProtectionShellInfo as SdkProtectionShellInfo
from hypothesis import given, settings
from hypothesis import strategies as st

from shellinfo_grpc import REST_KEYS, ProtectionShellInfo, RestDecodeError, from_rest, from_sdk, to_rest, to_sdk
from shellinfo_grpc.rest import rest_names

SETTINGS = settings(max_examples=200, deadline=None)

RUN_TYPES = list(rest_names(ProtectionShellInfo.DESCRIPTOR.fields_by_name["run_type"].enum_type).values())
STATUSES = list(rest_names(ProtectionShellInfo.DESCRIPTOR.fields_by_name["status"].enum_type).values())

int64s = st.integers(-(2**63), 2**63 - 1)
hhmms = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
unknown_spelling = st.text(max_size=12).filter(lambda s: s not in RUN_TYPES and s not in STATUSES)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "jobRunId": int64s,
    "startTimeUsecs": int64s,
    "endTimeUsecs": int64s,
    # The SDK does not check enum strings: unknown spellings pass through it too.
    "runType": st.sampled_from(RUN_TYPES) | unknown_spelling,
    "status": st.sampled_from(STATUSES) | unknown_spelling,
    "error": st.text(),
    "startTimeHhmm": hhmms,
    "endTimeHhmm": hhmms,
}


@st.composite
def sdk_records(draw: st.DrawFn, *, extra_keys: bool = False) -> dict[str, Any]:
    """A valid REST record, null or absent for unset keys, as the SDK would read it."""
    keys = draw(st.lists(st.sampled_from(REST_KEYS), unique=True))
    data = {key: draw(VALUES[key] | st.none()) for key in keys}
    if extra_keys:
        data |= draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in REST_KEYS), st.integers()))
    return data


def sdk_dict(data: dict[str, Any]) -> dict[str, Any]:
    """What the SDK writes for ``data``: parse it into the model, then to_dictionary."""
    return APIHelper.to_dictionary(SdkProtectionShellInfo.from_dictionary(data))


def typed(d: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    return {k: (type(v).__name__, v) for k, v in d.items()}


@SETTINGS
@given(sdk_records())
def test_include_nulls_equals_the_sdk_to_dictionary(data: dict[str, Any]) -> None:
    ours = to_rest(from_rest(data), include_nulls=True)
    theirs = sdk_dict(data)
    assert typed(ours) == typed(theirs)
    assert set(ours) == set(REST_KEYS)


@SETTINGS
@given(sdk_records())
def test_include_nulls_equals_the_sdk_after_the_wire(data: dict[str, Any]) -> None:
    msg = ProtectionShellInfo.FromString(from_rest(data).SerializeToString(deterministic=True))
    assert typed(to_rest(msg, include_nulls=True)) == typed(sdk_dict(data))


@SETTINGS
@given(sdk_records())
def test_from_sdk_equals_from_rest(data: dict[str, Any]) -> None:
    assert from_sdk(SdkProtectionShellInfo.from_dictionary(data)) == from_rest(data)


@SETTINGS
@given(sdk_records(extra_keys=True))
def test_to_sdk_gives_the_sdk_object_of_the_same_data(data: dict[str, Any]) -> None:
    # The SDK model has no room for unknown keys: both sides drop them.
    obj = to_sdk(from_rest(data))
    assert isinstance(obj, SdkProtectionShellInfo)
    assert typed(APIHelper.to_dictionary(obj)) == typed(sdk_dict(data))
    assert from_sdk(obj) == from_rest({k: v for k, v in data.items() if k in REST_KEYS})


def test_sdk_reads_nothing_as_all_nulls() -> None:
    assert to_rest(from_rest({}), include_nulls=True) == sdk_dict({})
    assert from_sdk(SdkProtectionShellInfo()) == ProtectionShellInfo()


def test_zero_values_reach_the_sdk_as_values() -> None:
    obj = to_sdk(from_rest({"jobRunId": 0, "error": ""}))
    assert obj.job_run_id == 0
    assert obj.error == ""
    assert obj.status is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"jobRunId": "12"}, "jobRunId"),
        ({"startTimeUsecs": 1.5}, "startTimeUsecs"),
        ({"endTimeUsecs": 2**63}, "endTimeUsecs"),
        ({"status": 5.0}, "status"),  # an integer is an enum number (shared decision 2); a float is not
        ({"runType": ["kFull"]}, "runType"),
        ({"error": 404}, "error"),
        ({"startTimeHhmm": "9:05"}, "startTimeHhmm"),
        ({"endTimeHhmm": "24:00"}, "endTimeHhmm"),
    ],
)
def test_from_sdk_checks_what_the_sdk_let_through(data: dict[str, Any], field: str) -> None:
    obj = SdkProtectionShellInfo.from_dictionary(data)  # the SDK checks nothing
    with pytest.raises(RestDecodeError) as info:
        from_sdk(obj)
    assert info.value.field == field


def test_from_sdk_strict_rejects_an_unknown_spelling() -> None:
    obj = SdkProtectionShellInfo.from_dictionary({"status": "kReplicating"})
    assert from_sdk(obj) == from_rest({"status": "kReplicating"})
    with pytest.raises(RestDecodeError) as info:
        from_sdk(obj, strict=True)
    assert info.value.field == "status"
