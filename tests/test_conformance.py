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

from shellinfo_grpc import ProtectionShellInfo, RestDecodeError, ShellInfoError, from_rest, to_rest

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
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def test_the_file_is_the_documented_format() -> None:
    assert VECTORS["format"] == "shellinfo-conformance"
    assert VECTORS["version"] == 1
    names = [case["name"] for kind in ("decode", "encode", "reject", "json_value") for case in VECTORS[kind]]
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
    # A strict rejection is the one difference from lenient mode: lenient keeps it.
    lenient = from_rest(json.loads(case["rest_text"]))
    assert lenient.HasField("unrecognized") or lenient.HasField("status") or lenient.HasField("run_type")


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
