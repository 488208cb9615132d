"""Python's REST codec against the language-neutral conformance vectors.

tests/golden/conformance.json (format: tests/golden/README.md, rules:
docs/contract.md) is the suite every implementation of the contract runs; the
Node suite in interop/node runs the same file. Here each vector goes through
``from_rest`` / ``to_rest``:

* decode: the REST text parsed as JSON, ``from_rest`` (strict when the vector
  says so, lenient always), bytes compared with ``hex``, and ``to_rest`` of the
  parsed bytes compared with ``rest_out`` (top-level key order exactly; values
  as JSON values, since Python holds numbers as ``int``/``float``);
* encode: bytes parsed, ``to_rest`` compared with ``rest_out`` the same way;
* reject: ``from_rest`` raises ``RestDecodeError`` whose ``field`` is the
  vector's REST key;
* run_instance: ``from_run_instance`` splits the ProtectionRunInstance text
  into run and job bytes; ``job_to_rest`` of the job bytes gives ``job_out``;
  run_instance_reject names the key; job_filter: ``compile_filter`` with
  ``job_ids`` on an update with that job;
* json_value: a message carrying the text as ``ExtraRestKey.json_value`` goes
  ``to_rest`` -> ``from_rest``; a valid text must come back as its canonical
  form, an invalid one must be refused with an error of the package's
  hierarchy (never another exception, never accepted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shellinfo_grpc import ProtectionShellInfo, RestDecodeError, ShellInfoError, from_rest, to_rest
from shellinfo_grpc._gen.shellinfo.v1.protection_job_pb2 import ProtectionJob
from shellinfo_grpc._gen.shellinfo.v1.run_update_service_pb2 import RunFilter, RunUpdate
from shellinfo_grpc.rules import compile_filter
from shellinfo_grpc.run_instance import from_run_instance, job_from_rest, job_to_rest

VECTORS = json.loads((Path(__file__).parent / "golden" / "conformance.json").read_text(encoding="utf-8"))


def _cases(kind: str) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in VECTORS[kind]]


def _same_rest(actual: dict[str, Any], expected_text: str) -> None:
    expected = json.loads(expected_text)
    assert list(actual) == list(expected), "REST keys or their order differ"
    for key, value in expected.items():
        assert _equal_json(actual[key], value), f"{key}: {actual[key]!r} != {value!r}"


def _equal_json(a: Any, b: Any) -> bool:
    """JSON value equality: numbers by value (1 == 1.0), objects without order, booleans apart from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal_json(x, y) for x, y in zip(a, b, strict=True))
    if type(a) in (int, float) and type(b) in (int, float):
        # A double written canonically may read back as an integer token (docs/contract.md 2.3):
        # against a float, compare as doubles; two integers compare exactly.
        return bool(float(a) == float(b)) if float in (type(a), type(b)) else bool(a == b)
    return type(a) is type(b) and bool(a == b)


def test_the_file_is_the_documented_format() -> None:
    assert VECTORS["format"] == "shellinfo-conformance"
    assert VECTORS["version"] == 1
    kinds = ("decode", "encode", "reject", "json_value", "run_instance", "run_instance_reject", "job_filter")
    names = [case["name"] for kind in kinds for case in VECTORS[kind]]
    assert len(names) == len(set(names)), "vector names are unique"


@pytest.mark.parametrize("case", _cases("decode"))
def test_decode(case: dict[str, Any]) -> None:
    modes = (False, True) if case["strict"] else (False,)
    for strict in modes:
        msg = from_rest(json.loads(case["rest_text"]), strict=strict)
        assert msg.SerializeToString().hex() == case["hex"], f"strict={strict}"
    back = ProtectionShellInfo.FromString(bytes.fromhex(case["hex"]))
    _same_rest(to_rest(back), case["rest_out"])


@pytest.mark.parametrize("case", _cases("encode"))
def test_encode(case: dict[str, Any]) -> None:
    msg = ProtectionShellInfo.FromString(bytes.fromhex(case["hex"]))
    _same_rest(to_rest(msg), case["rest_out"])


@pytest.mark.parametrize("case", _cases("reject"))
def test_reject(case: dict[str, Any]) -> None:
    with pytest.raises(RestDecodeError) as caught:
        from_rest(json.loads(case["rest_text"]), strict=case["strict"])
    assert caught.value.field == case["field"]
    if not case["strict"]:
        return
    # A strict rejection is the one difference from lenient mode: lenient reads the same text.
    from_rest(json.loads(case["rest_text"]))  # lenient mode reads it without an error


@pytest.mark.parametrize("case", _cases("json_value"))
def test_json_value(case: dict[str, Any]) -> None:
    msg = ProtectionShellInfo()
    msg.unrecognized.extra_keys.add(key="x", json_value=case["input"])
    if "canonical" in case:
        again = from_rest(to_rest(msg))
        assert again.unrecognized.extra_keys[0].json_value == case["canonical"]
        return
    try:
        again = from_rest(to_rest(msg))
    except ShellInfoError:
        return
    pytest.fail(
        f"accepted an invalid json_value ({case['invalid']}) as {again.unrecognized.extra_keys[0].json_value!r}"
    )


# --- the canonical form as a property, beyond the listed vectors ---------------------------
#
# A reference writer of docs/contract.md section 2, written from the spec for
# this test, against which from_rest's json_value is compared for generated
# JSON values. Python's repr of a float has the same shortest round-trip digits
# as ECMAScript; only the layout differs, and es_number applies ECMAScript's.


def es_number(x: float) -> str:
    """``Number.prototype.toString`` of a finite double."""
    if x == 0:
        return "0"
    if x < 0:
        return "-" + es_number(-x)
    mantissa, _, exponent = repr(x).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    stripped = len(digits) - len(digits.lstrip("0"))
    digits = digits.strip("0")
    k, n = len(digits), len(whole) + int(exponent or 0) - stripped  # x = 0.digits * 10**n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    return (digits if k == 1 else digits[0] + "." + digits[1:]) + "e" + sign + str(abs(e))


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def es_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def reference_canonical(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return es_number(value)
    if isinstance(value, str):
        return es_string(value)
    if isinstance(value, list):
        return "[" + ",".join(reference_canonical(item) for item in value) + "]"
    members = sorted(value.items(), key=lambda item: item[0].encode("utf-16-be"))  # UTF-16 code unit order
    return "{" + ",".join(es_string(k) + ":" + reference_canonical(v) for k, v in members) + "}"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


# --- jobs: ProtectionRunInstance and the job_ids filter ---------------------------------------------


@pytest.mark.parametrize("case", _cases("run_instance"))
def test_run_instance(case: dict[str, Any]) -> None:
    for strict in (False, True):
        run, job = from_run_instance(json.loads(case["rest_text"]), strict=strict)
        assert run.SerializeToString().hex() == case["hex"]
        assert (job.SerializeToString().hex() if job is not None else None) == case["job_hex"]
    if case["job_hex"] is None:
        assert case["job_out"] is None
        return
    parsed = ProtectionJob.FromString(bytes.fromhex(case["job_hex"]))
    written = job_to_rest(parsed)
    assert json.dumps(written, ensure_ascii=False, separators=(",", ":")) == case["job_out"]


@pytest.mark.parametrize("case", _cases("run_instance_reject"))
def test_run_instance_reject(case: dict[str, Any]) -> None:
    with pytest.raises(RestDecodeError) as info:
        from_run_instance(json.loads(case["rest_text"]))
    assert info.value.field == case["field"]


@pytest.mark.parametrize("case", _cases("job_filter"))
def test_job_filter(case: dict[str, Any]) -> None:
    update = RunUpdate(source="c1", run=ProtectionShellInfo(job_run_id=1), revision=1)
    if case["job"] is not None:
        job = job_from_rest(json.loads(case["job"]))
        assert job is not None
        update.job.CopyFrom(job)
    matches = compile_filter(RunFilter(job_ids=case["job_ids"]))
    assert matches(update) is case["matches"]


def test_reference_writer_matches_the_listed_vectors() -> None:
    """The reference above agrees with the hand-written canonical vectors (it is checked, too)."""
    checked = 0
    for case in VECTORS["json_value"]:
        if "canonical" in case:
            assert reference_canonical(json.loads(case["input"])) == case["canonical"], case["name"]
            checked += 1
    assert checked > 30


@given(JSON_VALUES)
def test_from_rest_writes_the_canonical_json_value(value: Any) -> None:
    msg = from_rest({"jobRunId": 1, "x": value})
    assert msg.unrecognized.extra_keys[0].json_value == reference_canonical(value)


@given(JSON_VALUES)
def test_canonical_text_reads_back_as_the_same_value(value: Any) -> None:
    assert _equal_json(json.loads(reference_canonical(value)), value)
