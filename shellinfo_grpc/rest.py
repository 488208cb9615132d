"""Adapters between ``ProtectionShellInfo`` messages and the REST dictionary form.

The REST form is what the Cohesity REST API v1 sends (``protectionShellInfo``
objects) and what the official Python SDK's ``APIHelper.to_dictionary`` writes.
The rules, all of them derived from the schema's descriptors:

* the REST key of a field is its proto JSON name (``job_run_id`` ->
  ``jobRunId``);
* an enum value is spelled as its ``(shellinfo.v1.rest_name)`` option
  (``RUN_STATUS_SUCCESS`` -> ``"kSuccess"``);
* ``null`` and an absent key both mean "unset"; ``0`` and ``""`` are values;
* integers are JSON numbers within int64, never strings, floats or booleans;
* ``startTimeHhmm`` / ``endTimeHhmm`` are ``"HH:MM"`` on a 24-hour clock;
* keys and enum spellings this schema version does not know are kept in the
  ``unrecognized`` field and written back unchanged, unless ``strict=True``
  asks to reject them.

This module imports neither grpc nor the SDK: it is the codec's hot path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc.errors import RestDecodeError

__all__ = ["REST_KEYS", "from_rest", "from_sdk", "rest_names", "to_rest", "to_sdk"]

_Message = _pb.ProtectionShellInfo
_Unrecognized = _pb.UnrecognizedRest
_Extra = _pb.ExtraRestKey

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

# Kinds of REST value, decided from the field descriptors.
_INT: Final = "int"
_STR: Final = "str"
_HHMM: Final = "hhmm"
_ENUM: Final = "enum"

# The string fields whose value must be "HH:MM".
_HHMM_FIELDS: Final = frozenset({"start_time_hhmm", "end_time_hhmm"})
# The field that carries what this schema version does not know.
_UNRECOGNIZED: Final = "unrecognized"

_VALID_HHMM: Final = frozenset(f"{h:02d}:{m:02d}" for h in range(24) for m in range(60))
# Built once: json.dumps/json.loads with options build an encoder per call.
_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_JSON_DECODER: Final = json.JSONDecoder()


def rest_names(enum_descriptor: Any) -> dict[int, str]:
    """Map each number of an enum to its REST spelling, from the schema option.

    Values without a ``(shellinfo.v1.rest_name)`` option (the ``_UNSPECIFIED``
    zero values) are left out.
    """
    names: dict[int, str] = {}
    for value in enum_descriptor.values:
        options = value.GetOptions()
        if options.HasExtension(_pb.rest_name):
            names[value.number] = options.Extensions[_pb.rest_name]
    return names


class _NumberOrName(dict[int, Any]):
    """Enum number -> REST spelling; a number without one maps to itself."""

    def __missing__(self, number: int) -> int:
        return number


class _Field(NamedTuple):
    """How one REST key maps onto one field of ``ProtectionShellInfo``."""

    key: str  # the REST key, e.g. "jobRunId"
    attr: str  # the proto field name, e.g. "job_run_id"
    kind: str  # _INT, _STR, _HHMM or _ENUM
    by_rest: dict[str, int]  # enum only: REST spelling -> number
    by_number: _NumberOrName  # enum only: number -> REST spelling


def _rest_fields() -> tuple[_Field, ...]:
    fields: list[_Field] = []
    unrecognized = _Unrecognized.DESCRIPTOR.fields_by_name
    for field in _Message.DESCRIPTOR.fields:
        if field.name == _UNRECOGNIZED:
            continue
        by_number = _NumberOrName()
        if field.type == field.TYPE_INT64:
            kind = _INT
        elif field.type == field.TYPE_ENUM:
            kind = _ENUM
            by_number.update(rest_names(field.enum_type))
            if field.name not in unrecognized:  # pragma: no cover - guards a schema change
                raise RuntimeError(f"schema: UnrecognizedRest has no field {field.name}")
        elif field.type == field.TYPE_STRING:
            kind = _HHMM if field.name in _HHMM_FIELDS else _STR
        else:  # pragma: no cover - guards a schema change
            raise RuntimeError(f"schema: no REST mapping for field {field.name}")
        by_rest = {name: number for number, name in by_number.items()}
        fields.append(_Field(field.json_name, field.name, kind, by_rest, by_number))
    return tuple(fields)


_FIELDS: Final = _rest_fields()
_BY_KEY: Final = {field.key: field for field in _FIELDS}
_KNOWN_KEYS: Final = frozenset(_BY_KEY)

#: The REST keys of ``ProtectionShellInfo`` that this schema version knows, in
#: schema order.
REST_KEYS: Final = tuple(field.key for field in _FIELDS)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"a Python {type(value).__name__}"


def _bad_value(key: str, kind: str, value: object) -> RestDecodeError:
    """Explain why ``value`` is not acceptable for REST key ``key``."""
    if kind == _INT:
        if type(value) is int:
            return RestDecodeError(key, f"integer {value} is outside the int64 range")
        return RestDecodeError(key, f"expected an integer, got {_json_type(value)}")
    if kind == _HHMM and isinstance(value, str):
        return RestDecodeError(key, f'expected "HH:MM" (00:00 to 23:59), got {value!r}')
    return RestDecodeError(key, f"expected a string, got {_json_type(value)}")


def _unicode_error(key: str, value: object) -> RestDecodeError | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return RestDecodeError(key, "text is not valid Unicode (lone surrogate)")
    return None


def _not_json(value: object) -> str | None:
    """Say why ``value`` would not survive a trip through JSON text, or ``None``.

    ``json.dumps`` refuses some such values but quietly rewrites others
    (non-string object keys become strings, lone surrogates become escapes that
    other readers refuse), so every level is checked here.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, (bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{item!r} is not a JSON number"
        elif isinstance(item, str):
            if _unicode_error("", item) is not None:
                return "text is not valid Unicode (lone surrogate)"
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, Mapping):
            for member_key, member in item.items():
                if not isinstance(member_key, str):
                    return f"object key {member_key!r} is not a string"
                stack.extend((member_key, member))
        else:
            return f"a Python {type(item).__name__} is not a JSON value"
    return None


def _unrecognized(data: Mapping[Any, Any], kw: dict[str, Any], strict: bool) -> None:
    """Collect what ``data`` holds that the schema does not know into ``kw``.

    Called only when the quick count in ``from_rest`` shows nulls, unknown keys
    or unknown enum spellings, so the common record never pays for it.
    """
    spellings = {
        field.attr: kw.pop(field.attr) for field in _FIELDS if field.kind == _ENUM and type(kw.get(field.attr)) is str
    }
    extras: list[_pb.ExtraRestKey] = []
    for key, value in data.items():
        if key in _BY_KEY:
            continue
        if not isinstance(key, str):
            raise RestDecodeError(repr(key), "REST keys must be strings")
        if strict:
            raise RestDecodeError(key, "unknown key (strict mode rejects keys the schema does not know)")
        problem = _not_json(value)
        if problem is not None:
            raise RestDecodeError(key, f"value is not representable as JSON: {problem}")
        text = _JSON_ENCODER.encode(value)
        if _unicode_error(key, key) is not None:
            raise RestDecodeError(ascii(key)[1:-1], "key is not valid Unicode (lone surrogate)")
        extras.append(_Extra(key=key, json_value=text))
    if spellings or extras:
        try:
            kw[_UNRECOGNIZED] = _Unrecognized(extra_keys=extras, **spellings)
        except (ValueError, TypeError):
            raise _refused(data) from None


# from_rest and to_rest are compiled once, at import, from the field table
# above: one straight-line block per field instead of a loop that dispatches on
# each field's kind. That is what makes them an order of magnitude faster than
# protobuf's generic JSON path while checking every value (see
# docs/benchmarks.md). Their source is kept in _FROM_REST_SOURCE and
# _TO_REST_SOURCE for reading and debugging.


def _from_rest_source() -> str:
    lines = [
        "def from_rest(data, *, strict=False):",
        "    if type(data) is not dict and not isinstance(data, Mapping):",
        "        raise RestDecodeError(None, f'expected a JSON object, got {_json_type(data)}')",
        "    get = data.get",
        "    kw = {}",
        "    odd = False",  # an unknown enum spelling was seen
    ]
    for field in _FIELDS:
        key, attr, kind = field.key, field.attr, field.kind
        lines += [f"    v = get({key!r})", "    if v is not None:"]
        if kind == _INT:
            check = f"type(v) is not int or not {_INT64_MIN} <= v <= {_INT64_MAX}"
        elif kind == _HHMM:
            check = "type(v) is not str or v not in _VALID_HHMM"
        else:
            check = "type(v) is not str"
        lines += [f"        if {check}:", f"            raise _bad_value({key!r}, {kind!r}, v)"]
        if kind == _ENUM:
            lines += [
                f"        number = _by_rest_{key}(v)",
                "        if number is not None:",
                f"            kw[{attr!r}] = number",
                "        elif strict:",
                f"            raise RestDecodeError({key!r}, f'unknown value {{v!r}} (strict mode)')",
                "        else:",
                f"            kw[{attr!r}] = v",  # moved into `unrecognized` below
                "            odd = True",
            ]
        else:
            lines.append(f"        kw[{attr!r}] = v")
    lines += [
        # Each known key with a value put one entry in kw: if the counts differ
        # there are nulls or unknown keys, and only unknown keys need the scan.
        "    if odd or (len(kw) != len(data) and not _KNOWN_KEYS.issuperset(data)):",
        "        _unrecognized(data, kw, strict)",
        "    try:",
        "        return _Message(**kw)",
        "    except (ValueError, TypeError):",
        "        raise _refused(data) from None",
    ]
    return "\n".join(lines) + "\n"


def _to_rest_source() -> str:
    lines = ["def to_rest(msg, *, include_nulls=False):", "    out = {}", "    has = msg.HasField"]
    for field in _FIELDS:
        key, attr = field.key, field.attr
        lines.append(f"    v = msg.{attr}")
        if field.kind == _ENUM:
            # The zero value (_UNSPECIFIED) has no REST spelling: it reads as unset.
            lines += ["    if v:", f"        out[{key!r}] = _by_number_{key}[v]"]
        else:
            lines += [f"    if v or has({attr!r}):", f"        out[{key!r}] = v"]
        lines += ["    elif include_nulls:", f"        out[{key!r}] = None"]
    lines += [
        f"    if has({_UNRECOGNIZED!r}):",
        f"        return _with_unrecognized(out, msg.{_UNRECOGNIZED})",
        "    return out",
    ]
    return "\n".join(lines) + "\n"


def _refused(data: Mapping[str, Any]) -> RestDecodeError:
    """Name the REST key whose text protobuf refused (a lone surrogate, say)."""
    for field in _FIELDS:
        error = _unicode_error(field.key, data.get(field.key))
        if error is not None:
            return error
    return RestDecodeError(None, "protobuf refused the record")  # pragma: no cover


def _with_unrecognized(out: dict[str, Any], unrecognized: _pb.UnrecognizedRest) -> dict[str, Any]:
    """Add back what the schema did not know, keeping the known keys in order."""
    spellings: dict[str, str] = {}
    for field in _FIELDS:
        if field.kind == _ENUM and out.get(field.key) is None and unrecognized.HasField(field.attr):  # type: ignore[arg-type]
            spellings[field.key] = getattr(unrecognized, field.attr)
    if spellings:
        out = {key: spellings.get(key, out.get(key)) for key in REST_KEYS if key in out or key in spellings}
    for extra in unrecognized.extra_keys:
        if extra.key not in out:
            out[extra.key] = _JSON_DECODER.decode(extra.json_value)
    return out


def _bind_tables() -> None:
    # The enum tables, bound as globals of this module under the names the
    # compiled code uses (``_by_rest_status``, ``_by_number_status``, ...).
    for field in _FIELDS:
        if field.kind == _ENUM:
            globals()[f"_by_rest_{field.key}"] = field.by_rest.get
            globals()[f"_by_number_{field.key}"] = field.by_number


_bind_tables()

_FROM_REST_DOC: Final = """Build a ``ProtectionShellInfo`` from its REST dictionary form.

    ``data`` is one ``protectionShellInfo`` object as parsed from JSON. Keys and
    enum spellings this schema version does not know are kept in the message
    (its ``unrecognized`` field) so that :func:`to_rest` writes them back
    unchanged; with ``strict=True`` they are rejected instead.

    Raises :class:`RestDecodeError` naming the REST key and the reason for any
    value of the wrong JSON type, an integer outside int64, a malformed
    ``"HH:MM"``, text that is not valid Unicode, an unknown value that is not
    representable as JSON, or a ``data`` that is not a mapping.
    """

_TO_REST_DOC: Final = """Write a ``ProtectionShellInfo`` in its REST dictionary form.

    Set fields come out in schema order, integers as ``int``, enums as their
    REST spelling; then the keys this schema version did not know, in the order
    they were received. With ``include_nulls=True`` every known key is present
    and unset ones are ``None``, exactly as the SDK's
    ``APIHelper.to_dictionary`` writes them.

    An enum number that this schema version has no REST spelling for (a newer
    producer's value that reached us in binary form) is written as that number,
    as protobuf's JSON mapping does, so that it is not lost. An enum explicitly
    set to its ``_UNSPECIFIED`` zero value reads as unset.
    """


def _compile(source: str, name: str, doc: str, annotations: dict[str, Any]) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<shellinfo_grpc.rest.{name}>", "exec"), globals(), namespace)  # noqa: S102
    function = namespace[name]
    function.__module__ = __name__
    function.__doc__ = doc
    function.__annotations__ = annotations
    return function


_FROM_REST_SOURCE: Final = _from_rest_source()
_TO_REST_SOURCE: Final = _to_rest_source()

if TYPE_CHECKING:

    def from_rest(data: Mapping[str, Any], *, strict: bool = False) -> _pb.ProtectionShellInfo: ...

    def to_rest(msg: _pb.ProtectionShellInfo, *, include_nulls: bool = False) -> dict[str, Any]: ...

else:
    # The public functions are the compiled ones themselves: a wrapper would
    # cost a tenth of the whole conversion.
    from_rest = _compile(
        _FROM_REST_SOURCE,
        "from_rest",
        _FROM_REST_DOC,
        {"data": "Mapping[str, Any]", "strict": "bool", "return": "ProtectionShellInfo"},
    )
    to_rest = _compile(
        _TO_REST_SOURCE,
        "to_rest",
        _TO_REST_DOC,
        {"msg": "ProtectionShellInfo", "include_nulls": "bool", "return": "dict[str, Any]"},
    )


def from_sdk(obj: Any, *, strict: bool = False) -> _pb.ProtectionShellInfo:
    """Build a message from an official SDK ``ProtectionShellInfo`` model object.

    The SDK (``cohesity-management-sdk``) is not imported: the object is read
    through its ``_names`` table (attribute name -> REST key), so any model
    object of that shape works. Values are checked as :func:`from_rest` checks
    them.
    """
    names = getattr(obj, "_names", None)
    if not isinstance(names, Mapping):
        raise RestDecodeError(None, f"expected an SDK ProtectionShellInfo model, got {type(obj).__name__}")
    return from_rest({key: getattr(obj, attr, None) for attr, key in names.items()}, strict=strict)


def to_sdk(msg: _pb.ProtectionShellInfo) -> Any:
    """Build an official SDK ``ProtectionShellInfo`` model object from a message.

    Needs ``cohesity-management-sdk`` installed (it is imported here, not at
    package import). The SDK model has no room for keys it does not know, so
    extra keys are not carried over; unknown enum spellings are, as strings.
    """
    try:
        from cohesity_management_sdk.models.protection_shell_info import (  # noqa: PLC0415
            ProtectionShellInfo as SdkProtectionShellInfo,
        )
    except ImportError as exc:
        raise ImportError("to_sdk needs the official SDK: pip install cohesity-management-sdk") from exc
    return SdkProtectionShellInfo.from_dictionary(to_rest(msg, include_nulls=True))
